"""Mixed-adapter batches through PEFT's API: `peft_model(**inputs, adapter_names=[...])` and
`peft_model.generate(..., adapter_names=[...])`, one adapter name per example ("__base__": no
adapter), as PEFT's LoRA does it, for every fused IA3 layer, in inference and in training
(multitask: each adapter receives only its own examples' gradient), with or without gradient
checkpointing. Stock PEFT strips `adapter_names` from IA3 models without a word and runs every
example with the active adapter; `install()` (called by patch_peft() and fuse()) gives PEFT's
IA3Model the hook that routes the names to the layers instead.

Per forward (or generate) call the names are resolved once (`AdapterBatch`: the adapters in
order of first appearance, one table row per example, copied to each device once); per layer
the op gets the layer's vectors stacked as a table (one row per adapter, a row of ones for
"__base__" and for adapters the layer does not hold, as PEFT's LoRA skips them) and the
examples' row indices. Without gradients the table is cached on the layer until the vectors
change (their version counters), so decoding 128 adapters costs no stack per step.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Optional, Sequence

import torch
from peft.tuners.ia3.layer import IA3Layer
from torch import nn

from ia3_kernels import config

from . import adapter_names as known_names

BASE_ADAPTER = "__base__"


class AdapterBatch:
    """One adapter name per example, resolved once: `adapters` (the table's rows: distinct
    names other than "__base__" in order of first appearance, or the given `adapters`, e.g. a
    server's whole set so that its cached tables serve every batch) and each example's table
    row (`len(adapters)` for "__base__"), as a host tensor copied once to each device."""

    def __init__(self, names: Sequence[str], adapters: Optional[Sequence[str]] = None):
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list of adapter names (str), one per example, "
                            f"got {names!r}")
        self.names = list(names)
        position: dict[str, int] = {}
        for name in (self.names if adapters is None else adapters):
            if name != BASE_ADAPTER and name not in position:
                position[name] = len(position)
        missing = {n for n in self.names if n != BASE_ADAPTER and n not in position}
        if missing:
            raise ValueError(f"adapter_names {sorted(missing)} are not among adapters={adapters}")
        self.adapters = tuple(position)
        self._given = None if adapters is None else tuple(adapters)
        # Tables stacked without gradients, per layer (adapter_table): valid while the batch
        # lives, i.e. within one forward or generate call, when the vectors cannot change. A
        # caller who keeps an AdapterBatch across vector updates calls clear_tables().
        self.tables: dict[int, torch.Tensor] = {}
        base_row = len(self.adapters)
        self._host_index = torch.tensor([position.get(n, base_row) for n in self.names],
                                        dtype=torch.int32)
        self._device_index: dict[torch.device, torch.Tensor] = {}

    def clear_tables(self) -> None:
        self.tables.clear()

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):  # PEFT's own checks iterate adapter_names
        return iter(self.names)

    def __getitem__(self, i):
        return self.names[i]

    def index(self, device: torch.device) -> torch.Tensor:
        index = self._device_index.get(device)
        if index is None:
            index = self._host_index.to(device)
            self._device_index[device] = index
        return index

    def repeated(self, times: int) -> "AdapterBatch":
        """Each example's name `times` times in a row (beam search expands the batch so)."""
        return AdapterBatch([n for n in self.names for _ in range(times)], self._given)


def as_adapter_batch(adapter_names) -> AdapterBatch:
    return adapter_names if isinstance(adapter_names, AdapterBatch) else AdapterBatch(adapter_names)


def adapter_table(layer: IA3Layer, batch: AdapterBatch) -> torch.Tensor:
    """(len(batch.adapters) + 1, F): the layer's vector for each adapter of the batch (ones where
    the layer lacks it), then ones for "__base__". Stacked in PyTorch when gradients flow (each
    vector gets its own rows' gradient). Without gradients it is cached twice: on the batch
    for its lifetime (one forward or generate call: every decoding step after the first finds
    it at the cost of a dict lookup), and on the layer until a vector changes (checked by the
    vectors' version counters, O(adapters) of Python: ~0.3 ms at 128 adapters on the H100
    host, which is why the batch-level cache exists)."""
    grad = torch.is_grad_enabled() and any(
        layer.ia3_l[name].requires_grad for name in batch.adapters if name in layer.ia3_l)
    if not grad:
        table = batch.tables.get(id(layer))
        if table is not None:
            return table
    vectors = [layer.ia3_l[name] for name in batch.adapters if name in layer.ia3_l]
    like = vectors[0] if vectors else next(iter(layer.ia3_l.values()))
    key = None
    if not grad:
        key = (batch.adapters, like.device, like.dtype,
               tuple((id(v), v._version) for v in vectors))
        cached = getattr(layer, "_ia3_table_cache", None)
        if cached is not None and cached[0] == key:
            batch.tables[id(layer)] = cached[1]
            return cached[1]
    ones = torch.ones(like.numel(), device=like.device, dtype=like.dtype)
    rows = [layer.ia3_l[name].reshape(-1).to(like.dtype) if name in layer.ia3_l else ones
            for name in batch.adapters] + [ones]
    table = torch.stack(rows)
    if key is not None:
        table = table.detach()
        layer._ia3_table_cache = (key, table)
        batch.tables[id(layer)] = table
    return table


def check_layer_call(layer: IA3Layer, x: torch.Tensor, batch: AdapterBatch) -> None:
    """PEFT's LoRA checks (_check_forward_args), with its messages."""
    if x.dim() < 2 or x.shape[0] != len(batch):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, "
                         f"but got {len(batch)} and {x.shape[0] if x.dim() else 0} respectively.")
    if layer.merged:
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                         "`unmerge_adapter` first.")


class MixedBatchForward:
    """The adapter_names path every fused layer shares; the layer supplies
    `_fused_mixed(x, table, index)` (None where its base is not fusable: it warned)."""

    def _mixed_forward(self, x: torch.Tensor, adapter_names, args: tuple, kwargs: dict):
        batch = as_adapter_batch(adapter_names)
        check_layer_call(self, x, batch)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        table = adapter_table(self, batch)
        index = batch.index(x.device)
        if not args and not kwargs:
            out = self._fused_mixed(x, table, index)
            if out is not None:
                return out
        else:
            config.fallback(f"extra forward arguments {sorted(kwargs)} beside adapter_names: the "
                            "fused op takes x only")
        return gathered_base_forward(self, x, table, index, args, kwargs)


def gathered_base_forward(layer: IA3Layer, x: torch.Tensor, table: torch.Tensor,
                          index: torch.Tensor, args: tuple = (), kwargs: Optional[dict] = None
                          ) -> torch.Tensor:
    """PEFT's IA3 math around the base layer's own forward with each example's vector: the
    path for bases the fused ops do not cover (one-time warning by the caller). Channel-first
    for convolutions (the vector scales dim 1), last dim for linear layers."""
    rows = table[index]
    conv = isinstance(layer.get_base_layer(), (nn.Conv2d, nn.Conv3d))
    shape = ((len(index), -1) + (1,) * (x.dim() - 2) if conv
             else (len(index),) + (1,) * (x.dim() - 2) + (-1,))
    scale = rows.reshape(shape)
    kwargs = kwargs or {}
    if layer.is_feedforward:
        return layer.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
    out = layer.base_layer(x, *args, **kwargs)
    return (out * scale).to(out.dtype)


# --------------------------------------------------------------------------------------------
# The model-level hook (PEFT's LoraModel._enable_peft_forward_hooks, for IA3Model)
# --------------------------------------------------------------------------------------------


def _inject(module, args, kwargs, batch):
    kwargs["adapter_names"] = batch
    return args, kwargs


def _fused_classes() -> tuple:
    from .patch import FUSED_CLASSES
    return tuple(FUSED_CLASSES.values())


@contextlib.contextmanager
def enable_peft_forward_hooks(self, *args, **kwargs):
    """IA3Model._enable_peft_forward_hooks: routes `adapter_names` to every IA3 layer for the
    duration of one forward or generate call (and, under gradient checkpointing, of its
    recomputation in the backward)."""
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        yield
        return
    batch = as_adapter_batch(adapter_names)
    layers = [m for m in self.modules() if isinstance(m, IA3Layer)]
    unfused = sorted({type(m).__name__ for m in layers if not isinstance(m, _fused_classes())})
    if unfused:
        raise ValueError(f"adapter_names (mixed-adapter batches) needs ia3's fused layers; PEFT's "
                         f"own IA3 layers ({', '.join(unfused)}) cannot serve them: build the "
                         "model under ia3.patch_peft() or call ia3.fuse(model)")
    known = set().union(*(m.ia3_l.keys() for m in layers)) if layers else set()
    unexpected = set(batch.adapters) - known
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): "
                         f"{', '.join(sorted(unexpected))}")
    num_beams = kwargs.get("num_beams")
    layer_batch = batch.repeated(num_beams) if isinstance(num_beams, int) and num_beams > 1 \
        else batch
    handles = []
    for module in layers:
        handles.append(module.register_forward_pre_hook(partial(_inject, batch=layer_batch),
                                                        with_kwargs=True))
    encoder = _get_encoder(self.model)
    if layer_batch is not batch and encoder is not None:
        # The encoder runs once on the un-expanded batch (PEFT's LoRA does the same).
        for module in encoder.modules():
            if isinstance(module, IA3Layer):
                handles.append(module.register_forward_pre_hook(partial(_inject, batch=batch),
                                                                with_kwargs=True))
    if self.model.training and torch.is_grad_enabled():
        _checkpointing_hooks(self.model, layer_batch)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _get_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The encoder of an encoder-decoder model, else None (transformers 5's get_encoder returns
    the decoder stack itself for decoder-only models)."""
    get = getattr(model, "get_encoder", None)
    if get is None or not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    try:
        return get()
    except (AttributeError, NotImplementedError, TypeError):
        return None


def _checkpointing_hooks(model: nn.Module, batch: AdapterBatch) -> None:
    """Gradient checkpointing reruns a layer's forward inside the backward, after the forward
    call's hooks are gone: each checkpointed layer gets a pre-hook that (at the forward and at
    the rerun) hooks its IA3 sublayers, and a backward hook that drops those once its backward
    is done (PEFT's aLoRA does the same)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: no checkpointed layer class to hook
        return
    for layer in model.modules():
        if not (isinstance(layer, GradientCheckpointingLayer)
                and getattr(layer, "gradient_checkpointing", False)):
            continue
        if getattr(layer, "_ia3_checkpoint_hooks", None):
            raise ValueError("Multiple forward calls with adapter_names before .backward() under "
                             "gradient checkpointing: run backward after each forward, or disable "
                             "gradient checkpointing")
        layer._ia3_checkpoint_hooks = []

        def hook_sublayers(module, inputs, batch=batch):
            for sub in module.modules():
                if isinstance(sub, IA3Layer):
                    module._ia3_checkpoint_hooks.append(sub.register_forward_pre_hook(
                        partial(_inject, batch=batch), with_kwargs=True))

        def drop_hooks(module, grad_input, grad_output):
            while module._ia3_checkpoint_hooks:
                module._ia3_checkpoint_hooks.pop().remove()

        layer._ia3_checkpoint_hooks.append(layer.register_forward_pre_hook(hook_sublayers))
        layer._ia3_checkpoint_hooks.append(layer.register_full_backward_hook(drop_hooks))


def unload_and_optionally_merge(self, *args, **kwargs):
    """IA3Model._unload_and_optionally_merge without PEFT's refusal of quantized models when
    every IA3 layer is ours (which merge into bnb weights: ia3.quant_merge)."""
    from peft.tuners.tuners_utils import BaseTuner

    merge = kwargs.get("merge", args[0] if args else True)
    known_names.check_known(self, kwargs.get("adapter_names", args[3] if len(args) > 3 else None),
                              "merge_and_unload")
    quantized = (getattr(self.model, "is_loaded_in_8bit", False)
                 or getattr(self.model, "is_loaded_in_4bit", False))
    layers = [m for m in self.modules() if isinstance(m, IA3Layer)]
    if merge and quantized and all(isinstance(m, _fused_classes()) for m in layers):
        return BaseTuner._unload_and_optionally_merge(self, *args, **kwargs)
    return _PEFT_UNLOAD[0](self, *args, **kwargs)


_PEFT_UNLOAD: list = []


def install() -> None:
    """Give PEFT's IA3Model the adapter_names hook, merge_and_unload on quantized bases, and
    errors for unknown adapter names (ia3.adapter_names). Idempotent."""
    from peft.tuners.ia3.model import IA3Model

    known_names.install()

    if getattr(IA3Model, "_enable_peft_forward_hooks", None) is not enable_peft_forward_hooks:
        IA3Model._enable_peft_forward_hooks = enable_peft_forward_hooks
    if IA3Model._unload_and_optionally_merge is not unload_and_optionally_merge:
        _PEFT_UNLOAD[:] = [IA3Model._unload_and_optionally_merge]
        IA3Model._unload_and_optionally_merge = unload_and_optionally_merge

