"""Merging IA3 into bitsandbytes bases (PEFT: "not supported (yet)"), for ia3.Linear8bitLt and
ia3.Linear4bit.

* Attention vectors scale whole output rows of W, so they fold exactly into the per-row
  statistics: LLM.int8's SCB (one scale per row) becomes SCB * l; a 4-bit weight whose
  quantization blocks do not straddle rows (in_features a multiple of the blocksize) gets each
  block's absmax times its row's l (double-quantized statistics are unpacked to float32 first:
  re-quantizing them would add error). The bias becomes b * l. Exact up to the float32 rounding
  of the new statistics.
* Feedforward vectors scale columns, across every row's quantization: dequantize, scale,
  re-quantize (LLM.int8's per-row absmax; bitsandbytes' own quantize_4bit with the layer's
  format), with a warning that states the measured relative error of the merged weight against
  W diag(l). So do attention vectors on 4-bit layouts whose blocks straddle rows.

Unmerge restores the statistics (and bias) saved by merge: bit-for-bit where the merge was
exact. A re-quantized merge restores the original weight bit for bit when merge kept it
(`keep_original=True` or ia3.set_keep_original_on_merge(True)); otherwise unmerge re-quantizes
with 1 / l and warns again.
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch

from ia3_kernels.fourbit import FourBitWeight, _absmax_fp32, dequantize_4bit
from ia3_kernels.int8 import dequantize_int8


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def _warn_requantized(layer, what: str, error: float) -> None:
    warnings.warn(f"{layer._describe()}: {what} re-quantizes the weight (a feedforward vector "
                  f"scales columns across the quantization blocks): relative error of the merged "
                  f"weight against the exact product: {error:.2e}", UserWarning, stacklevel=4)


# ---- LLM.int8 ------------------------------------------------------------------------------


def _int8_tensors(base):
    from .bnb import int8_weight
    cb, scb = int8_weight(base)
    if scb is None:
        raise ValueError("Linear8bitLt has no SCB statistics yet (quantized on its first move to "
                         "a CUDA device): nothing to merge into")
    return cb, scb


def _quantize_rows(w: torch.Tensor):
    """LLM.int8's weight quantization: CB = round(127 w / rowmax), SCB = rowmax."""
    scb = w.abs().amax(dim=1).clamp_min(1e-12)
    cb = torch.round(w * (127.0 / scb[:, None])).clamp(-127, 127).to(torch.int8)
    return cb, scb.float()


def merge_int8(layer, scale: torch.Tensor, keep_original: bool, what: str = "merge") -> dict:
    """Fold `scale` (the merged vectors' product) into the layer's int8 weight in place.
    Returns what unmerge needs."""
    base = layer.get_base_layer()
    cb, scb = _int8_tensors(base)
    saved = {"scb": scb.clone()}
    flat = scale.reshape(-1).float()
    if not layer.is_feedforward:
        scb.mul_(flat)  # in place: weight.SCB and state.SCB are one tensor
        return saved
    exact = dequantize_int8(cb, scb, torch.float32) * flat[None, :]
    new_cb, new_scb = _quantize_rows(exact)
    if keep_original:
        saved["cb"] = cb.clone()
    cb.copy_(new_cb)
    scb.copy_(new_scb)
    _warn_requantized(layer, what, _relative_error(dequantize_int8(cb, scb, torch.float32), exact))
    return saved


def unmerge_int8(layer, saved: dict, scale: torch.Tensor) -> None:
    cb, scb = _int8_tensors(layer.get_base_layer())
    if layer.is_feedforward and "cb" not in saved:
        merge_int8(layer, 1.0 / scale, keep_original=False, what="unmerge")
        return
    if "cb" in saved:
        cb.copy_(saved["cb"])
    scb.copy_(saved["scb"])


# ---- bitsandbytes 4-bit --------------------------------------------------------------------


def _state_copy(weight) -> dict:
    return {"data": weight.data, "quant_state": weight.quant_state}


def merge_4bit(layer, scale: torch.Tensor, keep_original: bool, what: str = "merge") -> dict:
    """Fold `scale` into the layer's 4-bit weight: into the absmax statistics where exact,
    else by re-quantizing. Returns what unmerge needs (the original data and quant_state
    objects, untouched: the merge builds new ones)."""
    weight = layer.get_base_layer().weight
    state = weight.quant_state
    saved = {}
    flat = scale.reshape(-1).float()
    out_features, in_features = state.shape
    w4 = FourBitWeight.from_bnb(weight.data, state)
    if not layer.is_feedforward and in_features % state.blocksize == 0:
        saved.update(_state_copy(weight))  # statistics only: a few % of the weight's bytes
        absmax = _absmax_fp32(w4).view(out_features, -1) * flat[:, None]
        new_state = copy.copy(state)
        new_state.absmax = absmax.reshape(-1).contiguous()
        new_state.nested, new_state.state2, new_state.offset = False, None, None
        weight.quant_state = new_state
        return saved
    import bitsandbytes as bnb

    if keep_original:
        saved.update(_state_copy(weight))
    dequantized = dequantize_4bit(w4, torch.float32)
    exact = dequantized * (flat[None, :] if layer.is_feedforward else flat[:, None])
    packed, new_state = bnb.functional.quantize_4bit(
        exact, blocksize=state.blocksize, compress_statistics=bool(getattr(state, "nested", False)),
        quant_type=state.quant_type, quant_storage=weight.data.dtype)
    new_state.dtype = state.dtype
    weight.data = packed.view(weight.data.dtype) if packed.dtype != weight.data.dtype else packed
    weight.quant_state = new_state
    merged = dequantize_4bit(FourBitWeight.from_bnb(weight.data, new_state), torch.float32)
    _warn_requantized(layer, what, _relative_error(merged, exact))
    return saved


def unmerge_4bit(layer, saved: dict, scale: torch.Tensor) -> None:
    if "quant_state" not in saved:
        merge_4bit(layer, 1.0 / scale, keep_original=False, what="unmerge")
        return
    weight = layer.get_base_layer().weight
    weight.data = saved["data"]
    weight.quant_state = saved["quant_state"]


class QuantizedMerge:
    """merge / unmerge for the fused bnb layers (ia3.Linear8bitLt, ia3.Linear4bit): the product
    of the adapters to merge is folded in once (one re-quantization, not one per adapter). The
    format's _MERGE / _UNMERGE handle the weight; the bias (attention: b * l, restored by
    unmerge) is handled here for both."""

    _MERGE = staticmethod(merge_int8)
    _UNMERGE = staticmethod(unmerge_int8)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None,
              keep_original: Optional[bool] = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        from .layer import _merge_defaults

        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.ia3_l]
        if not names:
            return
        if self.merged:
            raise ValueError(f"{self._describe()}: merge the adapters of a quantized layer in one "
                             f"call (already merged: {self.merged_adapters}); unmerge first")
        scale = None
        for name in names:
            vector = self.ia3_l[name].data.float()
            scale = vector if scale is None else scale * vector
        if safe_merge and not torch.isfinite(scale).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to "
                             "be broken")
        keep = _merge_defaults["keep_original"] if keep_original is None else keep_original
        saved = self._MERGE(self, scale, keep)
        bias = self.get_base_layer().bias
        saved["bias"] = None
        if bias is not None and not self.is_feedforward:
            saved["bias"] = bias.data.clone()
            bias.data = (bias.data.float() * scale.reshape(-1)).to(bias.dtype)
        self._ia3_merge_saved = (saved, scale)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        saved, scale = self._ia3_merge_saved
        self._UNMERGE(self, saved, scale)
        if saved["bias"] is not None:
            self.get_base_layer().bias.data = saved["bias"]
        self._ia3_merge_saved = None
        self.merged_adapters.clear()
