"""Fused IA3 layers: subclasses of PEFT's, so merge/unmerge, several adapters, set_adapter,
add_weighted_adapter, delete_adapter, unload and state-dict keys keep PEFT's behaviour; only
the forward changes, to one fused op."""
from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.ia3 import layer as peft_ia3_layer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from ia3_kernels import config, ia3_linear

# Base layers whose forward is exactly `x W^T + b` (nn.Linear) or `x W + b` (GPT-2's Conv1D).
_PLAIN_FORWARDS = (nn.Linear.forward, Conv1D.forward)


def active_scaling(layer: peft_ia3_layer.IA3Layer) -> Optional[torch.Tensor]:
    """The product of the active adapters' vectors that the layer holds (PEFT skips active
    adapters the layer lacks), computed in PyTorch so that autograd gives each adapter its own
    gradient. None when no active adapter is held."""
    scaling = None
    for name in layer.active_adapters:
        if name not in layer.ia3_l:
            continue
        # PEFT's (1, in) or (out, 1) parameter as it is: the fused op reads it by flat index.
        vector = layer.ia3_l[name]
        scaling = vector if scaling is None else scaling * vector
    return scaling


def _unfusable_reason(base: nn.Module) -> Optional[str]:
    if type(base).forward not in _PLAIN_FORWARDS:
        return (f"base layer {type(base).__name__} overrides forward(); the fused op computes "
                "nn.Linear's or Conv1D's")
    if base._forward_hooks or base._forward_pre_hooks:
        return f"base layer {type(base).__name__} has forward hooks, which the fused op would skip"
    return None


class Linear(peft_ia3_layer.Linear):
    """Drop-in for `peft.tuners.ia3.layer.Linear` (nn.Linear and GPT-2 Conv1D bases)."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._disable_adapters or self.merged_adapters or args or kwargs:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        if isinstance(base, BaseTunerLayer):
            # get_base_layer() probes hasattr(module, "base_layer"), which raises and catches an
            # AttributeError on every plain nn.Linear: ~5 us a call. Only nested wrappers need it.
            base = base.get_base_layer()
        reason = _unfusable_reason(base)
        if reason is not None:
            config.fallback(reason)
            return super().forward(x)
        scaling = active_scaling(self)
        if scaling is None:
            return self.base_layer(x)
        return ia3_linear(x, base.weight, base.bias, scaling, feedforward=self.is_feedforward,
                          fan_in_fan_out=self.fan_in_fan_out)
