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
from ia3_kernels.conv import ia3_conv

from .mixed import MixedBatchForward

# Base layers whose forward is exactly `x W^T + b` (nn.Linear) or `x W + b` (GPT-2's Conv1D).
_PLAIN_FORWARDS = (nn.Linear.forward, Conv1D.forward)

# merge(keep_original=None) follows this switch (set_keep_original_on_merge).
_merge_defaults = {"keep_original": False}


def set_keep_original_on_merge(keep: bool) -> None:
    """Make every ia3.Linear.merge keep a copy of the original weight and bias (as non-persistent
    buffers: moved by .to(), absent from state dicts), so that unmerge restores them bit for
    bit instead of PEFT's division by l + 1e-8. Costs one weight-sized copy per merged layer."""
    _merge_defaults["keep_original"] = bool(keep)


def active_scaling(layer: peft_ia3_layer.IA3Layer) -> Optional[torch.Tensor]:
    """The product of the active adapters' vectors that the layer holds (PEFT skips active
    adapters the layer lacks), computed in PyTorch so that autograd gives each adapter its own
    gradient. None when no active adapter is held."""
    scaling = None
    # nn.ParameterDict keeps its entries in _parameters; `name in d` + `d[name]` go through
    # Module.__getattr__: 0.71 us against 0.06 for the dict lookup on the development CPU (the
    # GPU machines' hosts ran this package's Python ~3-6x slower).
    vectors = layer.ia3_l._parameters
    for name in layer.active_adapters:
        vector = vectors.get(name)
        if vector is None:
            continue
        # PEFT's (1, in) or (out, 1) parameter as it is: the fused op reads it by flat index.
        scaling = vector if scaling is None else scaling * vector
    return scaling


def _unfusable_reason(base: nn.Module, plain_forwards: tuple, computes: str) -> Optional[str]:
    if type(base).forward not in plain_forwards:
        return (f"base layer {type(base).__name__} overrides forward(); the fused op computes "
                f"{computes}")
    if base._forward_hooks or base._forward_pre_hooks:
        return f"base layer {type(base).__name__} has forward hooks, which the fused op would skip"
    return None


class _FusedForward(MixedBatchForward):
    """The forward every dense fused layer shares: PEFT's own forward where it does something
    else (adapters disabled or merged, extra arguments), PEFT's forward with a one-time warning
    where the base is not the plain layer the op computes, the bare base without an active
    adapter, else `_fused_forward` (the layer's op)."""

    _PLAIN_FORWARDS: tuple = ()
    _COMPUTES = ""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            return self._mixed_forward(x, adapter_names, args, kwargs)
        if self._disable_adapters or self.merged_adapters or args or kwargs:
            return super().forward(x, *args, **kwargs)
        base, reason = self._fusable_base()
        if reason is not None:
            config.fallback(reason)
            return super().forward(x)
        scaling = active_scaling(self)
        if scaling is None:
            return self.base_layer(x)
        return self._fused_forward(x, base, scaling)

    def _fusable_base(self):
        """(the plain base layer, why the op cannot compute it or None)."""
        base = self.base_layer
        if isinstance(base, BaseTunerLayer):
            # get_base_layer() probes hasattr(module, "base_layer"), which raises and catches an
            # AttributeError on every plain nn.Linear: ~5 us a call. Only nested wrappers need it.
            base = base.get_base_layer()
        return base, _unfusable_reason(base, self._PLAIN_FORWARDS, self._COMPUTES)

    def _fused_mixed(self, x, table, index):
        base, reason = self._fusable_base()
        if reason is not None:
            config.fallback(reason)
            return None
        return self._fused_forward(x, base, table, adapter_index=index)


class _ExactUnmerge:
    """merge(keep_original=...) / unmerge for every fused layer with a plain weight and bias."""

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
              keep_original: Optional[bool] = None) -> None:
        """PEFT's merge; with keep_original (default: set_keep_original_on_merge's switch) the
        pre-merge weight and bias are kept so that unmerge() restores them exactly."""
        keep = _merge_defaults["keep_original"] if keep_original is None else keep_original
        if keep and not self.merged and getattr(self, "ia3_original_weight", None) is None:
            base = self.get_base_layer()
            self.register_buffer("ia3_original_weight", base.weight.data.clone(), persistent=False)
            bias = base.bias.data.clone() if base.bias is not None else None
            self.register_buffer("ia3_original_bias", bias, persistent=False)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if not self.merged:
            self._drop_original()  # nothing was merged: nothing to restore

    def unmerge(self) -> None:
        """Exact when merge kept the original weights, else PEFT's (approximate) unmerge."""
        original = getattr(self, "ia3_original_weight", None)
        if original is None or not self.merged:
            return super().unmerge()
        base = self.get_base_layer()
        base.weight.data = original
        if self.ia3_original_bias is not None:
            base.bias.data = self.ia3_original_bias
        self.merged_adapters.clear()
        self._drop_original()

    def _drop_original(self) -> None:
        for name in ("ia3_original_weight", "ia3_original_bias"):
            if name in self._buffers:
                del self._buffers[name]


class Linear(_FusedForward, _ExactUnmerge, peft_ia3_layer.Linear):
    """Drop-in for `peft.tuners.ia3.layer.Linear` (nn.Linear and GPT-2 Conv1D bases)."""

    _PLAIN_FORWARDS = _PLAIN_FORWARDS
    _COMPUTES = "nn.Linear's or Conv1D's"

    def _describe(self) -> str:
        kind = "feedforward" if self.is_feedforward else "attention"
        return (f"ia3.Linear({type(self.get_base_layer()).__name__} {self.in_features}->"
                f"{self.out_features}, {kind}, active adapters {list(self.active_adapters)})")

    def _fused_forward(self, x, base, scaling, adapter_index=None):
        return ia3_linear(x, base.weight, base.bias, scaling, feedforward=self.is_feedforward,
                          fan_in_fan_out=self.fan_in_fan_out, adapter_index=adapter_index,
                          describe=self._describe)


class _FusedConv(_FusedForward, _ExactUnmerge):
    """ia3.Conv2d/Conv3d: the IA3 scaling folded into the convolution's weight
    (ia3_kernels.ia3_conv)."""

    _COMPUTES = "the plain convolution"

    def _describe(self) -> str:
        kind = "feedforward" if self.is_feedforward else "attention"
        base = self.get_base_layer()
        return (f"ia3.{type(self).__name__}({base.in_channels}->{base.out_channels}, "
                f"kernel {tuple(base.kernel_size)}, groups {base.groups}, {kind}, "
                f"active adapters {list(self.active_adapters)})")

    def _fused_forward(self, x, base, scaling, adapter_index=None):
        return ia3_conv(x, base.weight, base.bias, scaling, self.is_feedforward, base.stride,
                        base.padding, base.dilation, base.groups, base.padding_mode,
                        adapter_index=adapter_index, describe=self._describe)


class Conv2d(_FusedConv, peft_ia3_layer.Conv2d):
    """Drop-in for `peft.tuners.ia3.layer.Conv2d`."""

    _PLAIN_FORWARDS = (nn.Conv2d.forward,)


class Conv3d(_FusedConv, peft_ia3_layer.Conv3d):
    """Drop-in for `peft.tuners.ia3.layer.Conv3d`."""

    _PLAIN_FORWARDS = (nn.Conv3d.forward,)
