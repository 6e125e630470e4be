"""Forward and backward of (IA)^3 on a frozen quantized weight (LLM.int8 in int8.py, bitsandbytes
4-bit in fourbit.py): one implementation of the IA3 math, two strategies, and a small interface
per storage format.

Strategies, chosen per phase by the format's `use_cublas(M, phase, device)`:
* fused: dense.py's GEMM kernel reads the stored weight and dequantizes it tile by tile in
  registers (`fused_args`: what the format hands `_launch_matmul`), with IA3's scaling in the
  prologue or epilogue as for a float weight;
* cublas: a Triton pass dequantizes the whole weight into a compute-dtype scratch, with l folded
  in where that is exact (feedforward along in-features, attention backward along
  out-features), cuBLAS multiplies it and the scratch is freed right after. bitsandbytes' own
  layers build the same copy in their backward (and 4-bit forward at large M), so a training
  step peaks no higher than bnb's.

Backward: feedforward `g = dy W`, `dx = g*l`, `dl = sum_rows g*x` (the reduction in the dx GEMM's
epilogue, or in the pass that scales cuBLAS's g); attention `dx = (dy*l) W`, `dl = sum_rows dy*u`
(from the dx kernel's own dy tiles at small M and N, else a pass). No atomics: deterministic.
"""
from __future__ import annotations

import torch

from .dense import (_cublas_linear, _feedforward_grads_from_g, _launch_matmul, _launch_scale_reduce,
                    _reduce_partials)

# The attention backward reduces dl from the dx kernel's dy tiles (one launch) only where the
# dense kernel measured it a win (dense.ATTN_BWD_FUSED_MAX_*): M <= 64 and N <= 1024.
ATTN_DL_IN_KERNEL_MAX_M = 64
ATTN_DL_IN_KERNEL_MAX_N = 1024


def quantized_forward_impl(x, wq, bias, scale, feedforward: bool, save_preact: bool,
                           traceable: bool = False):
    """x: (M, K) in the compute dtype, any strides; wq: the quantized weight (its format's
    object). Returns (y, u): u = x W^T + b for attention layers when save_preact, else None."""
    M, K = x.shape
    N = wq.out_features
    dtype = x.dtype
    if M == 0:
        return x.new_empty((0, N)), (x.new_empty((0, N)) if save_preact else None)
    if not wq.use_cublas(M, "fwd", x.device):
        fused = wq.fused_args(M, "fwd", dtype)
        if feedforward:
            y, _, _, _ = _launch_matmul(x, out_shape=(M, N), out_dtype=dtype, scale_a=scale,
                                        bias=bias, traceable=traceable, **fused)
            return y, None
        y, u, _, _ = _launch_matmul(x, out_shape=(M, N), out_dtype=dtype, scale_c=scale,
                                    bias=bias, store_preact=save_preact, traceable=traceable,
                                    **fused)
        return y, u
    # W (feedforward: W diag(l), exact) dequantized whole, one cuBLAS GEMM.
    w = wq.dequantize_into(torch.empty((N, K), device=x.device, dtype=dtype),
                           scale=scale if feedforward else None, scale_axis=1,
                           traceable=traceable)
    out = _cublas_linear(x, w.t(), bias)
    del w
    if feedforward:
        return out, None
    y = torch.empty_like(out)
    _launch_scale_reduce(out, scale=scale, scale_axis=1, out=y, traceable=traceable)
    return y, (out if save_preact else None)


def quantized_backward_impl(dy, x, wq, bias, scale, preact, feedforward: bool, need_dx: bool,
                            need_dscale: bool, need_dbias: bool, x_dtype: torch.dtype,
                            traceable: bool = False):
    """Gradients (dx, dscale, dbias); entries not asked for are None. dy: (M, N) in the compute
    dtype; x: what the forward multiplied (compute dtype); preact: u (attention), or None/empty
    when the forward did not save it (x and bias are then given to recompute it)."""
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
        preact = quantized_forward_impl(x, wq, bias, scale, False, True, traceable)[1]
    cublas = wq.use_cublas(M, "bwd", dy.device)
    partial = None
    if feedforward and (need_dx or need_dscale):
        # g = dy W; dx = g*l; dl = sum_rows g*x (from g in registers, or from cuBLAS's g).
        if cublas:
            w = wq.dequantize_into(torch.empty((N, K), device=dy.device, dtype=dtype),
                                   traceable=traceable)
            g = torch.matmul(dy, w)
            del w
            dx, partial = _feedforward_grads_from_g(g, x, scale, need_dx, need_dscale, traceable)
        else:
            dx, _, partial, _ = _launch_matmul(
                dy, out_shape=(M, K), out_dtype=dtype, scale_c=scale,
                aux=x if need_dscale else None, reduce_aux=need_dscale, store_c=need_dx,
                sum_dtype=scale.dtype, traceable=traceable, **wq.fused_args(M, "bwd", dtype))
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
                traceable=traceable, **wq.fused_args(M, "bwd", dtype))
        if need_dscale and not dl_in_kernel:
            _, partial = _launch_scale_reduce(dy, aux=preact, sum_dtype=scale.dtype,
                                              traceable=traceable)
    if need_dscale:
        dscale = _reduce_partials(partial, scale)
    if need_dbias:
        dbias = dy.sum(0, dtype=torch.float32)
        if not feedforward:
            dbias = dbias * scale.reshape(-1).float()
    if dx is not None and dx.dtype != x_dtype:
        dx = dx.to(x_dtype)
    return dx, dscale, dbias


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """bnb's layers return x's dtype; under autocast, the autocast dtype (as F.linear)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
