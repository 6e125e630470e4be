"""Training utilities from the IA3 practitioner's playbook: gradient-norm monitoring of the IA3
vectors, and a check of `feedforward_modules` against `target_modules` and the model."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.ia3.model import IA3Model
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import TrainerCallback

# IA3 vectors train with per-vector gradient norms of roughly 1e-3 to 1e-1; two orders of
# magnitude outside that band is worth a warning.
VANISHED_BELOW = 1e-5
EXPLODING_ABOVE = 10.0


def ia3_grad_norms(model: nn.Module) -> Optional[torch.Tensor]:
    """The L2 norm of each IA3 vector's gradient (one device tensor), None if none has one."""
    norms = [p.grad.detach().float().norm() for name, p in model.named_parameters()
             if "ia3_l" in name and p.grad is not None]
    return torch.stack(norms) if norms else None


class IA3GradNormCallback(TrainerCallback):
    """Logs `ia3_grad_norm_mean` and `ia3_grad_norm_max` (over the IA3 vectors, before the
    optimizer step, after clipping) at every logging step, and warns once when they look
    vanished (max below `vanished_below`) or exploding (max above `exploding_above`).

    Norms are computed only on steps that log (one host sync each). Reporting integrations
    (wandb, tensorboard) run before user callbacks; `IA3GradNormCallback.install(trainer)` puts
    this one first so they see the values. They always land in `trainer.state.log_history`.
    """

    def __init__(self, vanished_below: float = VANISHED_BELOW,
                 exploding_above: float = EXPLODING_ABOVE):
        self.vanished_below = vanished_below
        self.exploding_above = exploding_above
        self._pending: Optional[dict] = None
        self._warned: set[str] = set()

    @classmethod
    def install(cls, trainer, **kwargs) -> "IA3GradNormCallback":
        callback = cls(**kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    @staticmethod
    def _logs_this_step(args, state) -> bool:
        step = state.global_step + 1  # global_step counts finished optimizer steps
        if args.logging_first_step and step == 1:
            return True
        return args.logging_strategy == "steps" and args.logging_steps > 0 and (
            step % args.logging_steps == 0)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None or not self._logs_this_step(args, state):
            return
        norms = ia3_grad_norms(model)
        if norms is None:
            return
        mean, largest = (v.item() for v in (norms.mean(), norms.max()))
        self._pending = {"ia3_grad_norm_mean": mean, "ia3_grad_norm_max": largest}
        if largest < self.vanished_below:
            self._warn("vanished", f"IA3 gradient norms look vanished: max {largest:.2e} < "
                                   f"{self.vanished_below:.0e} at step {state.global_step + 1} "
                                   "(healthy: ~1e-3 to 1e-1). Check the learning rate, that the "
                                   "vectors require grad, and the loss scale.")
        elif largest > self.exploding_above:
            self._warn("exploding", f"IA3 gradient norms look exploding: max {largest:.2e} > "
                                    f"{self.exploding_above:.0e} at step {state.global_step + 1} "
                                    "(healthy: ~1e-3 to 1e-1). Consider gradient clipping or a "
                                    "lower learning rate.")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None:
            return
        if logs is not None:
            logs.update(self._pending)
        if state.log_history:
            state.log_history[-1].update(self._pending)
        self._pending = None

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=2)


def _module_keys(model: nn.Module) -> list[str]:
    """Names PEFT matches against: every module of the base model, without IA3's own
    children (`...base_layer`, `...ia3_l`) when the model is already adapted."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [key for key, _ in base.named_modules()
            if key and not any(part in ("base_layer", "ia3_l") for part in key.split("."))]


def check_feedforward_modules(config, model: Optional[nn.Module] = None) -> list[str]:
    """Warn (and return the problems) when `config.feedforward_modules` is not a subset of
    `config.target_modules`, or, given the model (before or after get_peft_model), matches no
    module or matches modules that are not targets. PEFT itself checks only the subset rule, and
    only when both are lists/sets; a regex that matches nothing silently trains no feedforward
    layer."""
    feedforward, targets = config.feedforward_modules, config.target_modules
    if not feedforward:
        return []
    problems = []
    if (not isinstance(feedforward, str) and not isinstance(targets, str) and targets is not None
            and not set(feedforward) <= set(targets)):
        problems.append(f"feedforward_modules {sorted(set(feedforward) - set(targets))} are not in "
                        f"target_modules {sorted(targets)}")
    if model is not None:
        keys = _module_keys(model)
        ff_keys = [k for k in keys if IA3Model._check_target_module_feedforward(config, k)]
        if not ff_keys:
            problems.append(f"feedforward_modules {feedforward!r} matches no module of the model: "
                            "every IA3 layer will scale its output (attention-style)")
        elif targets is not None:
            stray = [k for k in ff_keys if not check_target_module_exists(config, k)]
            if stray:
                problems.append(f"feedforward_modules {feedforward!r} matches modules that "
                                f"target_modules does not: {stray[:5]}"
                                + (f" and {len(stray) - 5} more" if len(stray) > 5 else ""))
    for problem in problems:
        warnings.warn(f"IA3 config: {problem}", UserWarning, stacklevel=2)
    return problems
