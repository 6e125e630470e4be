"""Forward and backward of (IA)^3 on a frozen quantized weight (LLM.int8 in int8.py, bitsandbytes
4-bit in fourbit.py): one implementation of the IA3 math, three strategies, and a small interface
per storage format.

Strategies, chosen per phase by the format's `use_small_m(M)` and `use_cublas(M, phase, device)`:
* fused: dense.py's GEMM kernel reads the stored weight and dequantizes it tile by tile in
  registers (`fused_args`: what the format hands `_launch_matmul`), with IA3's scaling in the
  prologue or epilogue as for a float weight;
* small_m (forward at small M, the format's `use_small_m`): small_m.py's weight-streaming
  kernel, the stored weight tile as the tensor cores' A operand;
* cublas: a Triton pass dequantizes the whole weight into a compute-dtype scratch, with l folded
  in where that is exact (feedforward along in-features, attention backward along
  out-features), cuBLAS multiplies it and the scratch is freed right after. On Hopper at large
  M the attention forward and the feedforward backward multiply the scratch with tma_gemm
  instead, where dense.py's rule (`_use_tma`) takes it: l and the bias, or dl's partial sums,
  ride in its epilogue instead of a pass over the M x N output. bitsandbytes' own
  layers build the same copy in their backward (and 4-bit forward at large M), so a training
  step peaks no higher than bnb's.

Backward: feedforward `g = dy W`, `dx = g*l`, `dl = sum_rows g*x` (the reduction in the dx GEMM's
epilogue, or in the pass that scales cuBLAS's g); attention `dx = (dy*l) W`, `dl = sum_rows dy*u`
(from the dx kernel's own dy tiles at small M and N, else a pass). No atomics: deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import config, mixed
from .dense import _KERNEL_DTYPES
from .dense import (_aten_feedforward_grads, _aten_row_sums, _aten_scaled, _cublas_linear,
                    _feedforward_grads_from_g, _launch_matmul, _launch_scale_reduce,
                    _reduce_partials, _tma_attention_forward, _tma_feedforward_grads, _use_aten)
from .small_m import launch_small_m

# The attention backward reduces dl from the dx kernel's dy tiles (one launch) only where the
# dense kernel measured it a win (dense.ATTN_BWD_FUSED_MAX_*): M <= 64 and N <= 1024.
ATTN_DL_IN_KERNEL_MAX_M = 64
ATTN_DL_IN_KERNEL_MAX_N = 1024


def quantized_forward_impl(x, wq, bias, scale, feedforward: bool, save_preact: bool,
                           traceable: bool = False, scale_index=None):
    """x: (M, K) in the compute dtype, any strides; wq: the quantized weight (its format's
    object); scale_index: a mixed-adapter batch, scale its (adapters, F) table (mixed.py).
    Returns (y, u): u = x W^T + b for attention layers when save_preact, else None."""
    M, K = x.shape
    N = wq.out_features
    dtype = x.dtype
    if M == 0:
        return x.new_empty((0, N)), (x.new_empty((0, N)) if save_preact else None)
    if feedforward and scale_index is not None:
        # A mixed batch's l differs per example: one pass forms x*l (M x K, rounded as PEFT's
        # x*l), then the dequantize-matmul runs without scaling. Gathering the table in the
        # fused K-loop cost up to 1.2x the single-adapter layer on NF4 14336->4096 at M = 64
        # (H100, CUDA graphs, benchmarks/results/mixed-h100.md); the pass costs ~2 us there.
        xs = torch.empty((M, K), device=x.device, dtype=dtype)
        x = _launch_scale_reduce(x, scale=scale, scale_axis=1, out=xs, scale_index=scale_index,
                                 traceable=traceable)[0]
        scale = scale_index = None
    if wq.use_small_m(M):
        return launch_small_m(x, N=N, out_dtype=dtype, bias=bias, traceable=traceable,
                              scale_a=scale if feedforward else None,
                              scale_c=None if feedforward else scale,
                              store_preact=save_preact and not feedforward,
                              scale_index=scale_index, **wq.small_m_args())
    if not wq.use_cublas(M, "fwd", x.device):
        fused = wq.fused_args(M, "fwd", dtype)
        if feedforward and scale is None:
            y, _, _, _ = _launch_matmul(x, out_shape=(M, N), out_dtype=dtype, bias=bias,
                                        traceable=traceable, **fused)
            return y, None
        if feedforward:
            y, _, _, _ = _launch_matmul(x, out_shape=(M, N), out_dtype=dtype, scale_a=scale,
                                        bias=bias, scale_index=scale_index, traceable=traceable,
                                        **fused)
            return y, None
        y, u, _, _ = _launch_matmul(x, out_shape=(M, N), out_dtype=dtype, scale_c=scale,
                                    bias=bias, store_preact=save_preact, scale_index=scale_index,
                                    traceable=traceable, **fused)
        return y, u
    # W (feedforward: W diag(l), exact) dequantized whole, one cuBLAS GEMM.
    w = wq.dequantize_into(torch.empty((N, K), device=x.device, dtype=dtype),
                           scale=scale if feedforward else None, scale_axis=1,
                           traceable=traceable)
    if not feedforward:
        # The scratch is a 16-bit (N, K) matrix: the dense layer's rule and kernel apply, with
        # bias and l (a mixed batch: each row's l) in the epilogue instead of a pass over u
        # (dense.TMA_MIN_M's notes).
        done = _tma_attention_forward(x, w, False, N, bias, scale, save_preact, traceable,
                                      scale_index)
        if done is not None:
            return done
    out = _cublas_linear(x, w.t(), bias)
    del w
    if feedforward:
        return out, None
    if _use_aten(M, N, K, dtype, x.device, traceable, scale_index):
        # Compiled large GEMMs: u*l in aten ops, which Inductor fuses (mixed batches keep
        # their routes).
        return _aten_scaled(out, scale), (out if save_preact else None)
    y = torch.empty_like(out)
    _launch_scale_reduce(out, scale=scale, scale_axis=1, out=y, scale_index=scale_index,
                         traceable=traceable)
    return y, (out if save_preact else None)


def quantized_backward_impl(dy, x, wq, bias, scale, preact, feedforward: bool, need_dx: bool,
                            need_dscale: bool, need_dbias: bool, x_dtype: torch.dtype,
                            scale_index=None, traceable: bool = False):
    """Gradients (dx, dscale, dbias); entries not asked for are None. dy: (M, N) in the compute
    dtype; x: what the forward multiplied (compute dtype); preact: u (attention), or None/empty
    when the forward did not save it (x and bias are then given to recompute it). With
    scale_index (a mixed-adapter batch) dscale is the (adapters, F) table's gradient."""
    M, N = dy.shape
    K = wq.in_features
    dtype = dy.dtype
    dx = dscale = dbias = None
    if M == 0:
        if need_dx:
            dx = dy.new_zeros((0, K), dtype=x_dtype)
        if need_dscale:
            dscale = torch.zeros_like(scale)
        if need_dbias:
            dbias = dy.new_zeros((N,))
        return dx, dscale, dbias
    if not feedforward and need_dscale and (preact is None or preact.numel() == 0):
        preact = quantized_forward_impl(x, wq, bias, scale, False, True, traceable,
                                        scale_index)[1]
    cublas = wq.use_cublas(M, "bwd", dy.device)
    # Compiled, on the dequantized scratch: dx and dl in aten ops (dense._aten_feedforward_grads
    # says why).
    aten = cublas and _use_aten(M, N, K, dtype, dy.device, traceable, scale_index)
    if scale_index is not None:
        return _quantized_backward_mixed(dy, x, wq, scale, preact, scale_index, feedforward,
                                         need_dx, need_dscale, need_dbias, x_dtype, cublas,
                                         traceable)
    partial = None
    if feedforward and (need_dx or need_dscale):
        # g = dy W; dx = g*l; dl = sum_rows g*x (from g in registers, or from cuBLAS's g).
        if cublas:
            w = wq.dequantize_into(torch.empty((N, K), device=dy.device, dtype=dtype),
                                   traceable=traceable)
            # dx = (dy W)*l and dl's partials in one tma_gemm where dense's rule takes it.
            done = _tma_feedforward_grads(dy, w, True, K, x, scale, need_dx, need_dscale,
                                          traceable)
            if done is not None:
                dx, partial = done
            elif aten:
                dx, dscale = _aten_feedforward_grads(torch.matmul(dy, w), x, scale, need_dx,
                                                     need_dscale)
            else:
                g = torch.matmul(dy, w)
                dx, partial = _feedforward_grads_from_g(g, x, scale, need_dx, need_dscale,
                                                        traceable)
            del w
        else:
            dx, _, partial, _ = _launch_matmul(
                dy, out_shape=(M, K), out_dtype=dtype, scale_c=scale,
                aux=x if need_dscale else None, reduce_aux=need_dscale, store_c=need_dx,
                sum_dtype=scale.dtype, traceable=traceable, finish_like=scale,
                **wq.fused_args(M, "bwd", dtype))
    elif not feedforward:
        # dx = (dy*l) W = dy (diag(l) W); dl = sum_rows dy*u.
        dl_in_kernel = False
        if need_dx and cublas:
            # diag(l) W: l along the output features (rows of W), folded in exactly.
            w = wq.dequantize_into(torch.empty((N, K), device=dy.device, dtype=dtype),
                                   scale=scale, scale_axis=0, traceable=traceable)
            dx = torch.matmul(dy, w)
            del w
        elif need_dx:
            dl_in_kernel = (need_dscale and M <= ATTN_DL_IN_KERNEL_MAX_M
                            and N <= ATTN_DL_IN_KERNEL_MAX_N)
            dx, _, _, partial = _launch_matmul(
                dy, out_shape=(M, K), out_dtype=dtype, scale_a=scale,
                a_aux=preact if dl_in_kernel else None, sum_dtype=scale.dtype,
                traceable=traceable, finish_like=scale, **wq.fused_args(M, "bwd", dtype))
        if need_dscale and aten:
            dscale = _aten_row_sums(dy, preact, scale)
        elif need_dscale and not dl_in_kernel:
            _, partial = _launch_scale_reduce(dy, aux=preact, sum_dtype=scale.dtype,
                                              traceable=traceable)
    if need_dscale and dscale is None:
        dscale = _reduce_partials(partial, scale)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32)
        if not feedforward:
            dbias = dbias * scale.reshape(-1).float()
    if dx is not None and dx.dtype != x_dtype:
        dx = dx.to(x_dtype)
    return dx, dscale, dbias


def _quantized_backward_mixed(dy, x, wq, scale, preact, scale_index, feedforward, need_dx,
                              need_dscale, need_dbias, x_dtype, cublas, traceable):
    """quantized_backward_impl for a mixed-adapter batch (mixed.mixed_backward)."""
    M, N = dy.shape
    K = wq.in_features

    def grad_input(a, scaled):
        if cublas:
            if scaled:  # (dy*l) W: l differs per example, so it scales dy, not W
                a = _launch_scale_reduce(a, scale=scale, scale_axis=1, out=torch.empty_like(a),
                                         scale_index=scale_index, traceable=traceable)[0]
            w = wq.dequantize_into(torch.empty((N, K), device=a.device, dtype=a.dtype),
                                   traceable=traceable)
            return torch.matmul(a, w)
        return _launch_matmul(a, out_shape=(M, K), out_dtype=a.dtype,
                              scale_a=scale if scaled else None,
                              scale_index=scale_index if scaled else None, traceable=traceable,
                              **wq.fused_args(M, "bwd", a.dtype))[0]

    dx, dscale = (mixed.mixed_backward(dy, x, scale, preact, scale_index, feedforward, need_dx,
                                       need_dscale, grad_input, traceable)
                  if need_dx or need_dscale else (None, None))
    dbias = mixed.mixed_bias_grad(dy, scale, scale_index, feedforward) if need_dbias else None
    if dx is not None and dx.dtype != x_dtype:
        dx = dx.to(x_dtype)
    return dx, dscale, dbias


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """bnb's layers return x's dtype; under autocast, the autocast dtype (as F.linear)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# --------------------------------------------------------------------------------------------
# The public entry points' shared steps (int8.ia3_linear_int8, fourbit.ia3_linear_4bit)
# --------------------------------------------------------------------------------------------


def use_kernels(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor, family: str) -> bool:
    """The backend's choice ("auto": Triton on CUDA tensors; "triton": on any device), with the
    one-time fallback warning (an error in strict mode) where the kernels cannot take the
    call. family names the layer kind in the warning ("int8", "4-bit")."""
    backend = config.get_backend()
    if backend == "torch" or (backend == "auto" and x.device.type != "cuda"):
        return False
    reason = None
    if dtype not in _KERNEL_DTYPES:
        reason = f"{family} layer computing in {dtype} (kernels cover float16, bfloat16, float32)"
    elif scale.dtype not in _KERNEL_DTYPES:
        reason = f"scaling vector dtype {scale.dtype} (kernels cover float16, bfloat16, float32)"
    elif x.device.type != "cuda" and not config.triton_interpreted():
        reason = (f"backend 'triton' on a {x.device.type} tensor needs TRITON_INTERPRET=1 set "
                  "before import")
    if reason is not None:
        config.fallback(reason)
        return False
    return True


def run_quantized(x, dtype, bias: Optional[torch.Tensor], scale, feedforward: bool, *,
                  compiled_op, op_weight_args, function, function_weight_args, eager_forward,
                  adapter_index=None):
    """x (..., K) -> the op's (M, N) output in the compute dtype, reshaped to x's leading dims.
    Traced: the custom op (compiled_op(x2d, *op_weight_args, bias, scale, feedforward,
    save_preact, adapter_index)); with something to differentiate: the eager
    autograd.Function; else (serving, no_grad) eager_forward(x2d, bias, scale) straight, as
    .apply alone costs ~5 us of Python."""
    if not scale.is_contiguous():
        scale = scale.contiguous()
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2d.dtype != dtype:
        x2d = x2d.to(dtype)  # autocast or a compute_dtype: the kernels read x in it
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)  # a copy; ia3/bnb.py casts in place first, as bnb does
    grad_mode = torch.is_grad_enabled()
    save_preact = (not feedforward) and scale.requires_grad and grad_mode
    if torch.compiler.is_compiling():
        y, _ = compiled_op(x2d, *op_weight_args, bias, scale, feedforward, save_preact,
                           adapter_index)
    elif grad_mode and (x.requires_grad or scale.requires_grad
                        or (bias is not None and bias.requires_grad)):
        y = function.apply(x2d, *function_weight_args, bias, scale, feedforward, save_preact,
                           adapter_index)
    else:
        y, _ = eager_forward(x2d, bias, scale)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
