"""(IA)^3 on LLM.int8 weights (bitsandbytes Linear8bitLt): the storage format, the pure-PyTorch
reference and the custom op. The kernels are dense.py's, with the int8 flags on (W_SCALE_AXIS,
ROW_SCALE); the IA3 forward and backward are quantized.py's.

bitsandbytes stores W ~= CB * SCB[:, None] / 127: CB int8 (out, in), SCB one float32 per output
row. Our op is a weight-only dequantize-matmul: the activations stay 16-bit, CB is converted to
x's dtype in registers (int8 codes are exact in fp16/bf16) and SCB/127 is applied in fp32, in the
epilogue of the forward (it scales output features) and on the dy tile of dx = dy W. bnb's own
LLM.int8 matmul also quantizes the activations to int8 per row (outlier columns above
`threshold` kept in fp16), so ours is closer to the float model than bnb's, whatever the
threshold (README "8-bit" shows both errors).

Paths, as in dense.py, chosen by M from H100 timings (benchmarks/results/int8-h100-paths-chunked.md):
"fused", one Triton GEMM reading CB as stored (the forward at M = 17..64: small_m.py's kernel),
below INT8_CUBLAS_MIN_M; above it "cublas": a
Triton pass dequantizes W (SCB, and l where that is exact, folded in) into a bf16 scratch and
cuBLAS multiplies it. The int8 -> bf16 conversion inside a Triton tl.dot ran at about half of
cuBLAS's bf16 speed from M = 256 on (4096->4096 at M = 2048: 207 us against 91 for bf16), while
the pass costs ~3 bytes per weight (~60 us for 14336x4096). The scratch is the whole weight in
the compute dtype, freed right after its GEMM: bnb's own backward builds the same copy
(MatMul8bitLt: CB * SCB / 127 in A's dtype), so a training step peaks no higher than bnb's.
Chunks of <= M rows (dense.py's rule) cost 7-16 narrow GEMMs and lost up to 2x.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from .dense import (SMALL_GEMM_FLOP, _check_devices_and_dtypes, _check_scale_and_bias,
                    _cublas_ready, _launch_scale_reduce, _path_override, _Caller)
from .quantized import compute_dtype as _compute_dtype
from .quantized import (quantized_backward_impl, quantized_forward_impl, run_quantized,
                        use_kernels)
from .small_m import SMALL_M_MAX_M, use_gemv

# Where dequantize + cuBLAS replaces the fused GEMM: from M = 512 in GEMMs of >= SMALL_GEMM_FLOP.
# H100, CUDA graphs, fused against cuBLAS on a chunked scratch: cuBLAS won every Llama-3-8B
# shape from M = 1024 (14336->4096: 274 against 425 us), lost at M = 256 only to the chunking
# (16 narrow GEMMs), which the whole-weight scratch removes.
INT8_CUBLAS_MIN_M = 512
# small_m.py's forward from this M (to SMALL_M_MAX_M).
INT8_SMALL_M_MIN_M = 17


class Int8Weight:
    """LLM.int8 storage as quantized.py's impls read it: CB int8 (out, in), SCB (out,) fp32."""

    __slots__ = ("cb", "scb", "out_features", "in_features")

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor):
        self.cb, self.scb = cb, scb
        self.out_features, self.in_features = cb.shape

    def use_cublas(self, M: int, phase: str, device: torch.device) -> bool:
        forced = _path_override["path"]
        if forced != "auto":  # "tma": the dequantized scratch feeds tma_gemm where it may;
            return forced in ("cublas", "tma", "aten")  # "aten": aten ops beside cuBLAS
        return (device.type == "cuda" and M >= INT8_CUBLAS_MIN_M
                and 2 * M * self.out_features * self.in_features >= SMALL_GEMM_FLOP
                and _cublas_ready(device))

    def use_small_m(self, M: int) -> bool:
        """small_m's forward at M = 1 (its GEMV kernel where small_m.use_gemv says so: CB rows
        of whole 32-bit words) and from M = 17 to 64 (H100: 2.4x dense.py's tl.dot at M = 64
        on 14336->4096); at M = 2..16 dense.py's M-padded-to-16 tiles were as fast."""
        if _path_override["path"] in ("cublas", "tma", "aten"):
            return False
        if M == 1:
            return use_gemv(self.cb, False, self.in_features)
        return INT8_SMALL_M_MIN_M <= M <= SMALL_M_MAX_M

    def small_m_args(self) -> dict:
        return dict(w=self.cb, w_scale=self.scb)

    def fused_args(self, M: int, phase: str, dtype: torch.dtype) -> dict:
        cb = self.cb
        if phase == "fwd":  # B[k, n] = CB[n, k]; SCB scales the GEMM's N axis (epilogue)
            return dict(b=cb, b_strides=(cb.stride(1), cb.stride(0)), w_scale=self.scb,
                        w_scale_axis=1)
        # dx = dy W: B[n, k] = CB[n, k], SCB along the GEMM's K axis (the dy tile)
        return dict(b=cb, b_strides=(cb.stride(0), cb.stride(1)), w_scale=self.scb,
                    w_scale_axis=2)

    def dequantize_into(self, out, scale=None, scale_axis=1, traceable=False):
        """out = CB * SCB[:, None] / 127 (* scale along scale_axis): one Triton pass."""
        _launch_scale_reduce(self.cb, scale=scale, scale_axis=scale_axis, out=out,
                             row_scale=self.scb, traceable=traceable)
        return out


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def dequantize_int8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = CB * SCB / 127 computed in float32, rounded once to `dtype`."""
    return (cb.float() * (scb.float()[:, None] / 127.0)).to(dtype)


def torch_ia3_linear_int8(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                          bias: Optional[torch.Tensor], scale: torch.Tensor,
                          feedforward: bool,
                          adapter_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-PyTorch reference: PEFT's IA3 arithmetic (dense.torch_ia3_linear) on the dequantized
    weight, in the compute dtype (autocast's, else x's). The ground truth of the tests and the
    CPU path. Differentiable in x, scale and bias. adapter_index: a mixed-adapter batch."""
    from .dense import torch_ia3_linear

    dtype = _compute_dtype(x)
    w = dequantize_int8(cb, scb, dtype if x.dtype != torch.float64 else torch.float64)
    xw = x if x.dtype == torch.float64 else x.to(dtype)
    b = None if bias is None else bias.to(w.dtype)
    return torch_ia3_linear(xw, w, b, scale, feedforward, adapter_index=adapter_index)


def int8_forward_impl(x, cb, scb, bias, scale, feedforward: bool, save_preact: bool,
                      traceable: bool = False, scale_index=None):
    """x: (M, K) in the compute dtype, any strides; cb (N, K) int8; scb (N,) fp32.
    Returns (y, u): u = x W^T + b for attention layers when save_preact, else None."""
    return quantized_forward_impl(x, Int8Weight(cb, scb), bias, scale, feedforward, save_preact,
                                  traceable, scale_index)


def int8_backward_impl(dy, x, cb, scb, bias, scale, preact, feedforward: bool, need_dx: bool,
                       need_dscale: bool, need_dbias: bool, x_dtype: torch.dtype,
                       scale_index=None, traceable: bool = False):
    """Gradients (dx, dscale, dbias); see quantized.quantized_backward_impl."""
    return quantized_backward_impl(dy, x, Int8Weight(cb, scb), bias, scale, preact, feedforward,
                                   need_dx, need_dscale, need_dbias, x_dtype, scale_index,
                                   traceable)


# --------------------------------------------------------------------------------------------
# Custom op (torch.compile) and the eager autograd entry point
# --------------------------------------------------------------------------------------------


@triton_op("ia3_kernels::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                    bias: Optional[torch.Tensor], scale: torch.Tensor, feedforward: bool,
                    save_preact: bool, scale_index: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    y, preact = int8_forward_impl(x, cb, scb, bias, scale, feedforward, save_preact,
                                  traceable=True, scale_index=scale_index)
    return y, (x.new_empty(0) if preact is None else preact)


@triton_op("ia3_kernels::int8_linear_backward", mutates_args=())
def _int8_linear_backward_op(
        dy: torch.Tensor, x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
        bias: Optional[torch.Tensor], scale: torch.Tensor, preact: torch.Tensor,
        feedforward: bool, need_dx: bool, need_dscale: bool, need_dbias: bool,
        x_dtype: torch.dtype, scale_index: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = int8_backward_impl(dy, x, cb, scb, bias, scale, preact, feedforward, need_dx,
                               need_dscale, need_dbias, x_dtype, scale_index, traceable=True)
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


def _save(ctx, x, cb, scb, scale, preact, feedforward, bias, scale_index):
    """x for the feedforward dl; u for the attention dl, or, when the caller did not save u
    (direct op users, opcheck), x and the bias to recompute it."""
    kept_u = feedforward or (preact is not None and preact.numel() > 0)
    ctx.save_for_backward(x if not (kept_u and not feedforward) else None, cb, scb, scale,
                          None if feedforward else preact, None if kept_u else bias, scale_index)
    ctx.flags = (feedforward, x.dtype, None if bias is None else bias.dtype)


def _backward_args(ctx, dy):
    x, cb, scb, scale, preact, bias, scale_index = ctx.saved_tensors
    feedforward, x_dtype, _ = ctx.flags
    need = ctx.needs_input_grad  # (x, cb, scb, bias, scale, ...)
    wanted = (need[0], need[4], need[3])
    return (dy.contiguous(), x, cb, scb, bias, scale, preact, feedforward, *wanted,
            x_dtype, scale_index), wanted


def _setup_context(ctx, inputs, output):
    x, cb, scb, bias, scale, feedforward, _, scale_index = inputs
    _save(ctx, x, cb, scb, scale, output[1], feedforward, bias, scale_index)


def _backward(ctx, dy, _dpreact):
    args, wanted = _backward_args(ctx, dy)
    # Custom ops take no None for tensors declared non-optional (x, preact): empty instead.
    args = tuple(dy.new_empty(0) if a is None and i != 4 else a
                 for i, a in enumerate(args[:7])) + args[7:]
    dx, dscale, dbias = (g if w else None for g, w in
                         zip(torch.ops.ia3_kernels.int8_linear_backward(*args), wanted))
    bias_dtype = ctx.flags[2]
    return (dx, None, None, None if dbias is None else dbias.to(bias_dtype), dscale, None, None,
            None)


torch.library.register_autograd("ia3_kernels::int8_linear", _backward,
                                setup_context=_setup_context)


class _Int8LinearFunction(torch.autograd.Function):
    """Eager twin of the custom op (an autograd.Function costs ~2.5 us of CPU against ~10 for
    a custom op's dispatch: see dense._DenseLinearFunction)."""

    @staticmethod
    def forward(ctx, x, cb, scb, bias, scale, feedforward, save_preact, scale_index):
        y, preact = int8_forward_impl(x, cb, scb, bias, scale, feedforward, save_preact,
                                      scale_index=scale_index)
        _save(ctx, x, cb, scb, scale, preact, feedforward, bias, scale_index)
        return y

    @staticmethod
    def backward(ctx, dy):
        args, _ = _backward_args(ctx, dy)
        dx, dscale, dbias = int8_backward_impl(*args)
        bias_dtype = ctx.flags[2]
        return (dx, None, None, None if dbias is None else dbias.to(bias_dtype), dscale, None,
                None, None)


# --------------------------------------------------------------------------------------------
# Checks and the public entry point
# --------------------------------------------------------------------------------------------


def _check_inputs(x, cb, scb, bias, scale, feedforward, describe=None, adapter_index=None):
    """Clear errors before anything launches."""
    where = _Caller(describe, "ia3_linear_int8")
    if cb.dim() != 2 or cb.dtype != torch.int8:
        raise ValueError(f"{where}: the int8 weight (CB) must be a 2-D int8 tensor (out, in), got "
                         f"{cb.dtype} of shape {tuple(cb.shape)}")
    N, K = cb.shape
    if scb.numel() != N or not scb.is_floating_point():
        raise ValueError(f"{where}: SCB must hold one float scale per output row ({N}), got "
                         f"{scb.dtype} of shape {tuple(scb.shape)}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"{where}: x's last dimension must be in_features={K} (CB {tuple(cb.shape)}"
                         f" stored (out, in)), got x of shape {tuple(x.shape)}")
    _check_scale_and_bias(where, scale, bias, K, N, feedforward, adapter_index, x)
    _check_devices_and_dtypes(where, x, None, bias, scale, {"CB": cb, "SCB": scb})


def ia3_linear_int8(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor,
                    bias: Optional[torch.Tensor], scale: torch.Tensor, feedforward: bool, *,
                    adapter_index: Optional[torch.Tensor] = None, describe=None) -> torch.Tensor:
    """(IA)^3 linear on an LLM.int8 weight W = CB * SCB / 127. x: (..., in_features); cb int8
    (out, in) and scb (out,) as bitsandbytes stores them (`weight.CB`/`weight.data`,
    `weight.SCB` or `state.SCB`); bias (out,) or None; scale: the product of the active IA3
    vectors. Returns the compute dtype (x's, or autocast's), as bnb's Linear8bitLt.
    Differentiable in x, scale and bias (the int8 weight is frozen). adapter_index: a
    mixed-adapter batch, scale the (adapters, F) table (dense.ia3_linear, mixed.py)."""
    _check_inputs(x, cb, scb, bias, scale, feedforward, describe, adapter_index)
    dtype = _compute_dtype(x)
    if not use_kernels(x, dtype, scale, "int8"):
        return torch_ia3_linear_int8(x, cb, scb, bias, scale, feedforward, adapter_index)
    if scb.dtype != torch.float32 or not scb.is_contiguous():
        scb = scb.float().contiguous()
    return run_quantized(
        x, dtype, bias, scale, feedforward, compiled_op=torch.ops.ia3_kernels.int8_linear,
        op_weight_args=(cb, scb), function=_Int8LinearFunction, function_weight_args=(cb, scb),
        eager_forward=lambda x2d, b, s: int8_forward_impl(x2d, cb, scb, b, s, feedforward, False,
                                                          scale_index=adapter_index),
        adapter_index=adapter_index)
