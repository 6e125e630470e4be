"""(IA)^3 on bitsandbytes 4-bit weights (Linear4bit: NF4 and FP4, every blocksize, with or
without double quantization): the storage format, the pure-PyTorch reference and the custom op.
The kernels are dense.py's with the 4-bit flags on (W_4BIT, SRC_4BIT); the IA3 forward and
backward are quantized.py's.

Storage, read as bitsandbytes keeps it (no repacking, nothing added to the layer's memory):
the weight's bytes hold two 4-bit codes each, high nibble first, row-major over the (out, in)
matrix flattened; `absmax` holds one scale per `blocksize` consecutive elements, fp32, or with
double quantization (`compress_statistics`) uint8 codes of a 256-value map (`state2.code`) times
a second-level fp32 absmax per `state2.blocksize` blocks, plus `offset`; `code` is the 16-value
table (NF4 or FP4). A weight is `code[q] * absmax` in fp32, rounded to the compute dtype: the
kernels dequantize exactly so, tile by tile in registers, so our GEMM sees bnb's own weight.

Paths by M (FOURBIT_*_CUBLAS_MIN_M): the forward at M <= 64 is small_m.py's weight-streaming
kernel (GEMV at M = 1, the weight tile as the dot's A operand above); other fused calls are
dense.py's dequantize-matmul (split-K where the tiles do not fill the GPU); at large M a Triton pass
dequantizes the weight (with l folded in where exact) into a scratch that cuBLAS multiplies,
which is what bnb itself does there (dequantize + F.linear) but with IA3 folded into the pass.
The backward stays fused through M = 1024: no (out, in) copy of the weight where bnb's
MatMul4Bit.backward always makes one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from . import config
from .dense import (SMALL_GEMM_FLOP, _check_devices_and_dtypes, _check_scale_and_bias,
                    _cublas_ready, _launch_scale_reduce, _path_override, _sm_count, _Caller,
                    split_k_for)
from .quantized import compute_dtype as _autocast_or
from .small_m import SMALL_M_MAX_M
from .quantized import (quantized_backward_impl, quantized_forward_impl, run_quantized,
                        use_kernels)

# The forward switches to dequantize + cuBLAS from M = 512 (GEMMs of >= SMALL_GEMM_FLOP): a
# tl.dot fed by in-register dequantization runs well under cuBLAS's bf16 rate once the GEMM is
# compute-bound (int8 measured half of it from M = 256, int8.py), while the pass costs ~2.5
# bytes per weight. bitsandbytes itself dequantizes + F.linear from M = 16-64 on an H100.
FOURBIT_FWD_CUBLAS_MIN_M = 512
# The backward keeps the fused kernel through M = 1024 (no bf16 copy of the weight there).
FOURBIT_BWD_CUBLAS_MIN_M = 2048
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes offers


class FourBitWeight:
    """A bitsandbytes 4-bit weight as the kernels read it (tensors as stored, no copies)."""

    __slots__ = ("packed", "absmax", "code", "blocksize", "out_features", "in_features",
                 "nested", "absmax2", "code2", "offset", "blocksize2", "checked", "_words")

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                 blocksize: int, out_features: int, in_features: int,
                 absmax2: Optional[torch.Tensor] = None, code2: Optional[torch.Tensor] = None,
                 offset: Optional[torch.Tensor] = None, blocksize2: int = 256):
        self.packed = packed
        self.absmax, self.code, self.blocksize = absmax, code, int(blocksize)
        self.out_features, self.in_features = int(out_features), int(in_features)
        self.nested = absmax2 is not None
        self.absmax2, self.code2, self.offset = absmax2, code2, offset
        self.blocksize2 = int(blocksize2)
        self.checked = False  # prepare_weight's: validated, in the kernels' layout
        self._words = None

    def words(self) -> torch.Tensor:
        """The packed bytes as int32 words (the M = 1 GEMV's loads), kept after the first call."""
        if self._words is None:
            self._words = self.packed.reshape(-1).view(torch.int32)
        return self._words

    @classmethod
    def from_bnb(cls, data: torch.Tensor, quant_state) -> "FourBitWeight":
        """From a `Params4bit`'s data and its `quant_state` (read by attribute: no bitsandbytes
        import). Any `quant_storage` dtype: the bytes are viewed as uint8."""
        out_features, in_features = quant_state.shape
        packed = data if data.dtype == torch.uint8 else data.view(torch.uint8)
        code = quant_state.code
        if getattr(quant_state, "nested", False):
            state2 = quant_state.state2
            offset = quant_state.offset
            if not torch.is_tensor(offset):
                offset = torch.tensor(float(offset), device=quant_state.absmax.device)
            return cls(packed, quant_state.absmax, code, quant_state.blocksize, out_features,
                       in_features, state2.absmax, state2.code, offset, state2.blocksize)
        return cls(packed, quant_state.absmax, code, quant_state.blocksize, out_features,
                   in_features)

    def tensors(self):
        """(packed, absmax, code, absmax2, code2, offset) for the custom op."""
        return self.packed, self.absmax, self.code, self.absmax2, self.code2, self.offset

    # -- quantized.py's interface --------------------------------------------------------------

    def use_cublas(self, M: int, phase: str, device: torch.device) -> bool:
        forced = _path_override["path"]
        if forced != "auto":  # "tma": the dequantized scratch feeds tma_gemm where it may;
            return forced in ("cublas", "tma", "aten")  # "aten": aten ops beside cuBLAS
        min_m = FOURBIT_FWD_CUBLAS_MIN_M if phase == "fwd" else FOURBIT_BWD_CUBLAS_MIN_M
        return (device.type == "cuda" and M >= min_m
                and 2 * M * self.out_features * self.in_features >= SMALL_GEMM_FLOP
                and _cublas_ready(device))

    def use_small_m(self, M: int) -> bool:
        """small_m's forward: M <= 64 and quantization blocks that never straddle rows."""
        return (M <= SMALL_M_MAX_M and self.in_features % self.blocksize == 0
                and _path_override["path"] not in ("cublas", "tma", "aten"))

    def small_m_args(self) -> dict:
        return dict(w=self.packed, w_scale=self.absmax, quant4=self)

    def fused_args(self, M: int, phase: str, dtype: torch.dtype) -> dict:
        """Forward: B = W^T (in-features on the GEMM's K); dx = dy W: B = W (on its N)."""
        forward = phase == "fwd"
        N, K = ((self.out_features, self.in_features) if forward
                else (self.in_features, self.out_features))
        return dict(b=self.packed, b_strides=(0, 0), quant4=self, w_4bit=1 if forward else 2,
                    tiles=_tiles(M, N, K, forward, self.blocksize,
                                 self.in_features % self.blocksize == 0, self.packed.device,
                                 dtype))

    def dequantize_into(self, out, scale=None, scale_axis=1, traceable=False):
        """out (out, in) = W (* scale along scale_axis), rounded once: one Triton pass."""
        _launch_scale_reduce(self.packed, scale=scale, scale_axis=scale_axis, out=out,
                             quant4=self, traceable=traceable)
        return out


def _tiles(M: int, N: int, K: int, forward: bool, blocksize: int, aligned: bool,
           device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, aligned) for the GEMM
    (M, N, K) = forward (M, out, in) or dx (M, in, out). With blocks aligned to rows the tile's
    extent along in-features (BLOCK_K forward, BLOCK_N for dx) stays inside one block."""
    interpret = config.triton_interpreted()
    n_sm = _sm_count(device)
    if interpret:
        # Small tiles: the interpreter's cost is per element; tests cover every branch.
        bm, bn, bk, warps, stages = (1, 16, 32, 4, 1) if M == 1 else (16, 32, 32, 4, 1)
        if not forward and M == 1:
            bn, bk = 32, 16
    elif M == 1:
        # GEMV: FMAs on the dequantized tile, no tensor-core padding of M.
        bm, warps = 1, 4
        bn, bk, stages = (128, 64, 4) if forward else (64, 128, 3)
    elif M <= 16:
        bm, bn, bk, warps, stages = (16, 64, 64, 4, 4) if forward else (16, 64, 128, 4, 3)
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 3
    elif M <= 256:
        bm, bn, bk, warps, stages = (64, 128, 64, 4, 3) if forward else (64, 64, 64, 4, 3)
    else:
        bm, bn, bk, warps, stages = (128, 128, 64, 8, 3) if forward else (128, 64, 64, 8, 3)
    if aligned:
        if forward:
            bk = min(bk, blocksize)
        else:
            bn = min(bn, blocksize)
    elif not interpret:
        # Blocks straddling rows gather a byte, a code and 1-3 absmax values per element: each
        # gathered tile pipelined over 3-4 stages asked 255 KB of shared memory (H100 limit:
        # 227 KB, fp32, blocksize 32). Rare layouts (no LLM width): no pipelining.
        stages = 1
    if dtype == torch.float32 and not interpret:
        stages = min(stages, 2)  # fp32 operand tiles are twice the bytes
    split_k = split_k_for(M, N, K, bm, bn, bk, 1, n_sm, interpret, four_bit=True)
    return bm, bn, bk, split_k, warps, stages, aligned


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def _absmax_fp32(w: FourBitWeight) -> torch.Tensor:
    """One fp32 scale per block; nested: code2[q] * absmax2[block // blocksize2] + offset."""
    if not w.nested:
        return w.absmax.float()
    n_blocks = w.absmax.numel()
    absmax2 = w.absmax2.float().repeat_interleave(w.blocksize2)[:n_blocks]
    return w.code2.float()[w.absmax.long()] * absmax2 + w.offset.float()


def dequantize_4bit(w: FourBitWeight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight: code[q] * absmax in fp32, rounded once to `dtype` (bitsandbytes'
    dequantize_4bit, in pure PyTorch)."""
    n = w.out_features * w.in_features
    flat = w.packed.reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), dim=1).reshape(-1)[:n].long()
    absmax = _absmax_fp32(w).repeat_interleave(w.blocksize)[:n]
    return (w.code.float()[codes] * absmax).reshape(w.out_features, w.in_features).to(dtype)


def torch_ia3_linear_4bit(x: torch.Tensor, w: FourBitWeight, bias: Optional[torch.Tensor],
                          scale: torch.Tensor, feedforward: bool,
                          compute_dtype: Optional[torch.dtype] = None,
                          adapter_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-PyTorch reference: PEFT's IA3 arithmetic (dense.torch_ia3_linear) on the dequantized
    weight in the compute dtype (autocast's, else `compute_dtype` or x's), returned in x's
    dtype as bnb's Linear4bit returns. A float64 x computes in float64 (the tests' ground
    truth). Differentiable in x, scale and bias. adapter_index: a mixed-adapter batch."""
    from .dense import torch_ia3_linear

    dtype = torch.float64 if x.dtype == torch.float64 else _compute_dtype(x, compute_dtype)
    weight = dequantize_4bit(w, dtype)
    b = None if bias is None else bias.to(dtype)
    return torch_ia3_linear(x.to(dtype), weight, b, scale, feedforward,
                            adapter_index=adapter_index).to(x.dtype)


def _compute_dtype(x: torch.Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    """bnb's Linear4bit casts x to its compute_dtype (if set) before its matmul; autocast wins."""
    if compute_dtype is None or torch.is_autocast_enabled(x.device.type):
        return _autocast_or(x)
    return compute_dtype


# --------------------------------------------------------------------------------------------
# Custom op (torch.compile) and the eager autograd entry point
# --------------------------------------------------------------------------------------------

def _weight(packed, absmax, code, absmax2, code2, offset, shape):
    out_features, in_features, blocksize, blocksize2 = shape
    return FourBitWeight(packed, absmax, code, blocksize, out_features, in_features, absmax2,
                         code2, offset, blocksize2)


def _shape(w: FourBitWeight) -> list[int]:
    return [w.out_features, w.in_features, w.blocksize, w.blocksize2]


@triton_op("ia3_kernels::fourbit_linear", mutates_args=())
def _fourbit_linear_op(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                       code: torch.Tensor, absmax2: Optional[torch.Tensor],
                       code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                       shape: list[int], bias: Optional[torch.Tensor], scale: torch.Tensor,
                       feedforward: bool, save_preact: bool,
                       scale_index: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    w = _weight(packed, absmax, code, absmax2, code2, offset, shape)
    y, preact = quantized_forward_impl(x, w, bias, scale, feedforward, save_preact,
                                       traceable=True, scale_index=scale_index)
    return y, (x.new_empty(0) if preact is None else preact)


@triton_op("ia3_kernels::fourbit_linear_backward", mutates_args=())
def _fourbit_linear_backward_op(
        dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
        code: torch.Tensor, absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor],
        offset: Optional[torch.Tensor], shape: list[int], bias: Optional[torch.Tensor],
        scale: torch.Tensor, preact: torch.Tensor, feedforward: bool, need_dx: bool,
        need_dscale: bool, need_dbias: bool, x_dtype: torch.dtype,
        scale_index: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = _weight(packed, absmax, code, absmax2, code2, offset, shape)
    grads = quantized_backward_impl(dy, x, w, bias, scale, preact, feedforward, need_dx,
                                    need_dscale, need_dbias, x_dtype, scale_index,
                                    traceable=True)
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


def _save(ctx, x, w, scale, preact, feedforward, bias, scale_index):
    """x for the feedforward dl; u for the attention dl, or, when the caller did not save u
    (direct op users, opcheck), x and the bias to recompute it."""
    kept_u = feedforward or (preact is not None and preact.numel() > 0)
    ctx.save_for_backward(x if not (kept_u and not feedforward) else None, scale,
                          None if feedforward else preact, None if kept_u else bias, scale_index,
                          *w.tensors())
    ctx.flags = (feedforward, x.dtype, None if bias is None else bias.dtype, _shape(w))


def _unpack(ctx):
    x, scale, preact, bias, scale_index, *tensors = ctx.saved_tensors
    feedforward, x_dtype, bias_dtype, shape = ctx.flags
    return x, scale, preact, bias, scale_index, tensors, feedforward, x_dtype, bias_dtype, shape


def _backward(ctx, dy, _dpreact):
    x, scale, preact, bias, scale_index, tensors, feedforward, x_dtype, bias_dtype, shape = \
        _unpack(ctx)
    need = ctx.needs_input_grad  # (x, packed, absmax, code, absmax2, code2, offset, shape, bias, scale, ...)
    wanted = (need[0], need[9], need[8])
    empty = dy.new_empty(0)
    grads = torch.ops.ia3_kernels.fourbit_linear_backward(
        dy.contiguous(), empty if x is None else x, *tensors, shape, bias, scale,
        empty if preact is None else preact, feedforward, *wanted, x_dtype, scale_index)
    dx, dscale, dbias = (g if w else None for g, w in zip(grads, wanted))
    dbias = None if dbias is None else dbias.to(bias_dtype)
    return (dx, None, None, None, None, None, None, None, dbias, dscale, None, None, None)


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, code, absmax2, code2, offset, shape, bias, scale, feedforward, _,
     scale_index) = inputs
    w = _weight(packed, absmax, code, absmax2, code2, offset, shape)
    _save(ctx, x, w, scale, output[1], feedforward, bias, scale_index)


torch.library.register_autograd("ia3_kernels::fourbit_linear", _backward,
                                setup_context=_setup_context)


class _FourBitLinearFunction(torch.autograd.Function):
    """Eager twin of the custom op (an autograd.Function costs ~2.5 us of CPU against ~10 for
    a custom op's dispatch: see dense._DenseLinearFunction)."""

    @staticmethod
    def forward(ctx, x, w, bias, scale, feedforward, save_preact, scale_index):
        y, preact = quantized_forward_impl(x, w, bias, scale, feedforward, save_preact,
                                           scale_index=scale_index)
        _save(ctx, x, w, scale, preact, feedforward, bias, scale_index)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, preact, bias, scale_index, tensors, feedforward, x_dtype, bias_dtype, shape = \
            _unpack(ctx)
        need = ctx.needs_input_grad  # (x, w, bias, scale, ...)
        dx, dscale, dbias = quantized_backward_impl(
            dy.contiguous(), x, _weight(*tensors, shape), bias, scale, preact, feedforward,
            need[0], need[3], need[2], x_dtype, scale_index)
        return (dx, None, None if dbias is None else dbias.to(bias_dtype), dscale, None, None,
                None)


# --------------------------------------------------------------------------------------------
# Checks and the public entry point
# --------------------------------------------------------------------------------------------


def _check_inputs(x, w: FourBitWeight, bias, scale, feedforward, describe=None,
                  adapter_index=None):
    """Clear errors before anything launches (a prepare_weight'd weight was checked then)."""
    where = _Caller(describe, "ia3_linear_4bit")
    N, K = w.out_features, w.in_features
    if not w.checked:
        _check_weight(w, where)
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{where}: x's last dimension must be in_features={K} (4-bit weight "
                         f"({N}, {K})), got x of shape {tuple(x.shape)}")
    _check_scale_and_bias(where, scale, bias, K, N, feedforward, adapter_index, x)
    # A prepared weight's tables share its bytes' device (prepare_weight checked it).
    _check_devices_and_dtypes(where, x, None, bias, scale, {"weight": w.packed} if w.checked else {
        "weight": w.packed, "absmax": w.absmax, "code": w.code, "absmax2": w.absmax2,
        "code2": w.code2, "offset": w.offset})


def _check_weight(w: FourBitWeight, where) -> None:
    N, K = w.out_features, w.in_features
    if w.blocksize not in BLOCKSIZES:
        raise ValueError(f"{where}: 4-bit blocksize must be one of {BLOCKSIZES}, got {w.blocksize}")
    n_blocks = -(-N * K // w.blocksize)
    if w.packed.dtype != torch.uint8 or w.packed.numel() != -(-N * K // 2):
        raise ValueError(f"{where}: the 4-bit weight must hold {-(-N * K // 2)} bytes for "
                         f"({N}, {K}) as uint8, got {w.packed.dtype} with {w.packed.numel()} elements")
    if w.code.numel() != 16 or not w.code.is_floating_point():
        raise ValueError(f"{where}: the 4-bit code must be 16 float values, got {w.code.dtype} "
                         f"of shape {tuple(w.code.shape)}")
    if w.absmax.numel() != n_blocks:
        raise ValueError(f"{where}: absmax must hold one value per {w.blocksize} weights "
                         f"({n_blocks}), got {w.absmax.numel()}")
    if w.nested:
        if w.absmax.dtype != torch.uint8 or w.code2 is None or w.code2.numel() != 256 \
                or w.offset is None or w.offset.numel() != 1 \
                or w.absmax2.numel() != -(-n_blocks // w.blocksize2):
            raise ValueError(f"{where}: double-quantized absmax needs uint8 codes, a 256-value "
                             f"code, one offset and one second-level absmax per {w.blocksize2} "
                             "blocks")
    elif not w.absmax.is_floating_point():
        raise ValueError(f"{where}: absmax must be floating point without double quantization, "
                         f"got {w.absmax.dtype}")


def prepare_weight(w: FourBitWeight, describe=None) -> Optional[FourBitWeight]:
    """`w` checked and in the kernels' layout, marked so that ia3_linear_4bit skips both on
    every later call (ia3.Linear4bit keeps one per layer: the checks, the layout and the GEMV's
    word view cost ~25 us of Python a call on the development CPU). None where that layout
    needs a copy of a table or of the bytes (a copy kept between calls would go stale if bnb's
    own tensors change in place) or the tables sit on other devices than the bytes: such
    weights take the per-call path."""
    _check_weight(w, _Caller(describe, "ia3_linear_4bit"))
    kernel = _as_kernel_weight(w)
    tables = kernel.tensors()[1:]
    if (kernel.packed.data_ptr() != w.packed.data_ptr()
            or any(a is not b for a, b in zip(tables, w.tensors()[1:]))
            or any(t is not None and t.device != kernel.packed.device for t in tables)):
        return None
    prepared = FourBitWeight(kernel.packed, kernel.absmax, kernel.code, kernel.blocksize,
                             kernel.out_features, kernel.in_features, kernel.absmax2,
                             kernel.code2, kernel.offset, kernel.blocksize2)
    prepared.checked = True
    return prepared


def _as_kernel_weight(w: FourBitWeight) -> FourBitWeight:
    """Flat contiguous bytes and fp32 tables (no copy when bnb's are already so)."""
    if w.checked:
        return w
    packed = w.packed.reshape(-1)
    if not packed.is_contiguous():
        packed = packed.contiguous()
    absmax = w.absmax if (w.nested or w.absmax.dtype == torch.float32) else w.absmax.float()
    code = w.code if w.code.dtype == torch.float32 else w.code.float()
    if (packed is w.packed and absmax is w.absmax and code is w.code
            and (not w.nested or (w.absmax2.dtype == torch.float32
                                  and w.code2.dtype == torch.float32
                                  and w.offset.dtype == torch.float32))):
        return w
    nested = (w.absmax2.float(), w.code2.float(), w.offset.float()) if w.nested else (None,) * 3
    return FourBitWeight(packed, absmax.contiguous(), code.contiguous(), w.blocksize,
                         w.out_features, w.in_features, *nested, w.blocksize2)


def ia3_linear_4bit(x: torch.Tensor, weight: FourBitWeight, bias: Optional[torch.Tensor],
                    scale: torch.Tensor, feedforward: bool, *,
                    compute_dtype: Optional[torch.dtype] = None,
                    adapter_index: Optional[torch.Tensor] = None, describe=None) -> torch.Tensor:
    """(IA)^3 linear on a bitsandbytes 4-bit weight (`FourBitWeight.from_bnb(param.data,
    param.quant_state)`). x: (..., in_features); bias (out,) or None; scale: the product of the
    active IA3 vectors. Computes in autocast's dtype, else `compute_dtype` (bnb's
    Linear4bit.compute_dtype) or x's; returns x's dtype, as bnb's Linear4bit.
    Differentiable in x, scale and bias (the 4-bit weight is frozen). adapter_index: a
    mixed-adapter batch, scale the (adapters, F) table (dense.ia3_linear, mixed.py)."""
    _check_inputs(x, weight, bias, scale, feedforward, describe, adapter_index)
    dtype = _compute_dtype(x, compute_dtype)
    if not use_kernels(x, dtype, scale, "4-bit"):
        return torch_ia3_linear_4bit(x, weight, bias, scale, feedforward, compute_dtype,
                                     adapter_index)
    weight = _as_kernel_weight(weight)
    y = run_quantized(
        x, dtype, bias, scale, feedforward, compiled_op=torch.ops.ia3_kernels.fourbit_linear,
        op_weight_args=(*weight.tensors(), _shape(weight)), function=_FourBitLinearFunction,
        function_weight_args=(weight,),
        eager_forward=lambda x2d, b, s: quantized_forward_impl(x2d, weight, b, s, feedforward,
                                                               False, scale_index=adapter_index),
        adapter_index=adapter_index)
    return y if y.dtype == x.dtype else y.to(x.dtype)  # bnb's Linear4bit returns x's dtype
