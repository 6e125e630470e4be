"""Fused IA3 layers on bitsandbytes bases (Linear8bitLt, Linear4bit): subclasses of PEFT's `peft.tuners.ia3.bnb` wrappers,
so adapters, state-dict keys and saved files stay PEFT's; the forward becomes one fused op.

Deliberate differences from PEFT's wrappers (../shared/design/semantics.md): the output has x's
dtype (autocast's under autocast for int8; always x's for 4-bit), as the bare bnb layer returns, where PEFT upcasts x to float32
and returns float32 (which breaks a Llama training step without autocast); and the int8 matmul
is weight-only (activations stay 16-bit), closer to the float model than LLM.int8.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from peft.tuners.ia3 import bnb as peft_ia3_bnb
from torch import nn

from ia3_kernels import config
from ia3_kernels.fourbit import FourBitWeight, ia3_linear_4bit, prepare_weight
from ia3_kernels.int8 import ia3_linear_int8

from .layer import active_scaling
from .mixed import MixedBatchForward
from .quant_merge import QuantizedMerge, merge_4bit, unmerge_4bit

HAS_BNB_8BIT = hasattr(peft_ia3_bnb, "Linear8bitLt")
HAS_BNB_4BIT = hasattr(peft_ia3_bnb, "Linear4bit")


def scaled_base_forward(layer, x: torch.Tensor, scaling: torch.Tensor) -> torch.Tensor:
    """PEFT's IA3 math around the base layer's own forward, without PEFT's float32 upcast:
    feedforward `base((x*l) in x's dtype)`, attention `(base(x) * l)` in the base's dtype. The
    path for configurations the fused kernels do not cover."""
    scaling = scaling.reshape(-1)
    if layer.is_feedforward:
        return layer.base_layer((x.to(scaling.dtype) * scaling).to(x.dtype))
    out = layer.base_layer(x)
    return (out * scaling).to(out.dtype)


def _unfusable_reason(base: nn.Module, bnb_class: type) -> Optional[str]:
    """Why the fused op would not compute what `base` computes (the checks both formats share)."""
    if type(base).forward is not bnb_class.forward:
        return f"base layer {type(base).__name__} overrides {bnb_class.__name__}.forward()"
    if base._forward_hooks or base._forward_pre_hooks:
        return f"base layer {type(base).__name__} has forward hooks, which the fused op would skip"
    return None


def _cast_bias_as_bnb_does(base: nn.Module, dtype: torch.dtype) -> None:
    """bnb's Linear8bitLt and Linear4bit forwards cast their bias in place to the dtype they
    compute in (`bias.data = bias.data.to(...)`, once); PEFT's wrappers inherit that through
    the base's forward, which the fused op bypasses. Doing the same leaves the module as bnb's
    forward leaves it and spares a cast of a copy on every call (a launch and an allocation:
    an fp32 bias, as a bnb layer built from nn.Linear keeps, cost one per call). Not while
    tracing (torch.compile cannot mutate .data inside a graph; the op casts a traced copy),
    capturing a CUDA graph (the new storage would come from the graph's private pool), or for
    a bias that trains (an optimizer's state for it keeps the dtype it was built with; PEFT's
    wrappers feed bnb float32 inputs, so under them such a bias stays float32)."""
    bias = base.bias
    if (bias is None or bias.dtype == dtype or bias.requires_grad
            or torch.compiler.is_compiling()):
        return
    if bias.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    bias.data = bias.data.to(dtype)


class _FusedBnbForward(MixedBatchForward):
    """The forward both bnb wrappers share: PEFT's own forward where it does something else
    (adapters disabled, extra arguments), the bare base without an active adapter, PEFT's math
    around the base with a one-time warning where the kernels do not cover the base
    (`_fused_forward` returns None then), else the fused op."""

    def _describe(self) -> str:
        kind = "feedforward" if self.is_feedforward else "attention"
        return (f"ia3.{type(self).__name__}({self.in_features}->{self.out_features}, {kind}, "
                f"active adapters {list(self.active_adapters)})")

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_forward(x, adapter_names, args, kwargs)
        if self.merged:
            # The base holds the merged weights (quant_merge.py); PEFT's bnb wrappers never
            # merge, so their forward would scale again.
            if self.disable_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or args or kwargs:
            return super().forward(x, *args, **kwargs)
        scaling = active_scaling(self)
        if scaling is None:
            return self.base_layer(x)
        out = self._fused_forward(x, scaling, self.get_base_layer())
        return scaled_base_forward(self, x, scaling) if out is None else out

    def _fused_mixed(self, x, table, index):
        return self._fused_forward(x, table, self.get_base_layer(), adapter_index=index)


def _int8_unfusable_reason(base: nn.Module) -> Optional[str]:
    import bitsandbytes as bnb

    reason = _unfusable_reason(base, bnb.nn.Linear8bitLt)
    if reason is not None:
        return reason
    if base.state.has_fp16_weights:
        return ("Linear8bitLt with has_fp16_weights=True keeps a 16-bit weight that bnb "
                "re-quantizes on every call; the fused op reads stored int8 weights")
    if base.weight.dtype != torch.int8:
        return (f"Linear8bitLt weight is {base.weight.dtype}, not yet quantized to int8 (bnb "
                "quantizes when the layer moves to its device)")
    return None


def int8_weight(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB, SCB) as bitsandbytes keeps them: CB is the weight's int8 data; SCB sits on the weight
    until bnb's first forward moves it to the layer's state (init_8bit_state)."""
    weight = base.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = base.state.SCB
    return weight.data, scb


if HAS_BNB_8BIT:

    class Linear8bitLt(_FusedBnbForward, QuantizedMerge, peft_ia3_bnb.Linear8bitLt):
        """Drop-in for `peft.tuners.ia3.bnb.Linear8bitLt` (bnb `Linear8bitLt` bases with
        `has_fp16_weights=False`, any `threshold`: the fused op never quantizes activations)."""

        def _fused_forward(self, x, scaling, base, adapter_index=None) -> Optional[torch.Tensor]:
            reason = _int8_unfusable_reason(base)
            cb, scb = int8_weight(base) if reason is None else (None, None)
            if reason is None and scb is None:
                reason = "Linear8bitLt has int8 weights but no SCB scales"
            if reason is not None:
                config.fallback(reason)
                return None
            _cast_bias_as_bnb_does(base, x.dtype)  # Linear8bitLt.forward: to x's dtype
            return ia3_linear_int8(x, cb, scb, base.bias, scaling, self.is_feedforward,
                                   adapter_index=adapter_index, describe=self._describe)


def _4bit_unfusable_reason(base: nn.Module) -> Optional[str]:
    import bitsandbytes as bnb

    reason = _unfusable_reason(base, bnb.nn.Linear4bit)
    if reason is not None:
        return reason
    if getattr(base.weight, "quant_state", None) is None:
        return ("Linear4bit weight is not quantized yet (bnb quantizes when the layer moves to "
                "its device)")
    if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        return "Linear4bit weight was repacked for bnb's CPU kernel (packing_format_for_cpu)"
    return None


# ia3.Linear4bit -> the prepared kernel weight of its base and what it was built from. Weakly
# keyed: nothing of it is saved, copied or pickled with the layer.
_PREPARED_4BIT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _4bit_kernel_weight(layer, weight) -> FourBitWeight:
    """The base's 4-bit weight as the op reads it: fourbit.prepare_weight's (checked once, kept
    per layer while bnb's bytes, quant_state and its tables are the same objects at the same
    address) where it can be kept, else built for this call. Not kept while tracing (no Python
    state in a graph) or from a call under inference_mode (views made there can be inference
    tensors, as the GEMV's int32 word view is, which autograd will not save for a backward)."""
    state = weight.quant_state
    if torch.compiler.is_compiling():
        return FourBitWeight.from_bnb(weight.data, state)
    # .data without Params4bit's __torch_function__, which runs Python on every attribute
    # read: 2.6 us for .data against 1.0 this way, on the development CPU.
    with torch._C.DisableTorchFunctionSubclass():
        data = weight.data
    state2 = getattr(state, "state2", None)
    same_objects = (state, state.absmax, state.code, getattr(state, "offset", None), state2,
                    None if state2 is None else state2.absmax,
                    None if state2 is None else state2.code)
    same_values = (state.blocksize, data.data_ptr(), data.dtype, data.shape)
    entry = _PREPARED_4BIT.get(layer)
    if (entry is not None and entry[1] == same_values
            and all(a is b for a, b in zip(entry[0], same_objects))):
        return entry[2]
    built = FourBitWeight.from_bnb(data, state)
    if torch.is_inference_mode_enabled():
        return built
    prepared = prepare_weight(built, describe=layer._describe)
    if prepared is None:
        return built
    _PREPARED_4BIT[layer] = (same_objects, same_values, prepared)
    return prepared


if HAS_BNB_4BIT:

    class Linear4bit(_FusedBnbForward, QuantizedMerge, peft_ia3_bnb.Linear4bit):
        """Drop-in for `peft.tuners.ia3.bnb.Linear4bit` (bnb `Linear4bit` bases: NF4 or FP4,
        any blocksize and quant_storage, with or without double quantization). Computes in the
        base's compute_dtype (autocast's under autocast) and returns x's dtype, as the bare
        bnb layer does."""

        _MERGE = staticmethod(merge_4bit)
        _UNMERGE = staticmethod(unmerge_4bit)

        def _fused_forward(self, x, scaling, base, adapter_index=None) -> Optional[torch.Tensor]:
            reason = _4bit_unfusable_reason(base)
            if reason is not None:
                config.fallback(reason)
                return None
            if not base.compute_type_is_set:  # what bnb's own first forward does
                base.set_compute_type(x)
                base.compute_type_is_set = True
            # Linear4bit.forward: x to compute_dtype (when set), then the bias to x's dtype.
            _cast_bias_as_bnb_does(base, base.compute_dtype or x.dtype)
            return ia3_linear_4bit(x, _4bit_kernel_weight(self, base.weight),
                                   base.bias, scaling, self.is_feedforward,
                                   compute_dtype=base.compute_dtype, adapter_index=adapter_index,
                                   describe=self._describe)
