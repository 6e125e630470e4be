"""Dense (IA)^3 linear: Triton kernels, launchers, the pure-PyTorch reference and the custom op.

Feedforward layers scale the input, `y = (x*l) W^T + b`; attention layers scale the output,
`y = (x W^T + b) * l`. Both are one op, `ia3_linear`, that runs one of two paths:

* "fused": one Triton GEMM does everything. The feedforward scaling is applied to the x tile in
  registers inside the K-loop (rounded to the weight dtype exactly as PEFT rounds `x*l`), the
  attention bias and scaling sit in the epilogue, which can also write the pre-scaling output `u`
  that the attention backward needs. At small M the layer is bound by reading W once, so the
  extra multiply is free; when the output tiles cannot fill the GPU (N=1024 at M=1 gives 16 tiles
  of 64 columns for 132 SMs) the K-loop is split and the last CTA of each tile sums the splits
  in a fixed order, so the result does not change from run to run.
* "cublas": cuBLAS does the GEMM and one Triton pass applies what IA3 adds. At large M the
  textbook Triton GEMM is 25-32% behind cuBLAS on an H100 (../shared/anchors/triton-gemm-h100.md)
  while a bandwidth-bound pass costs a few percent: the feedforward forward folds l into the
  smaller operand (W diag(l) where N <= M, x*l where N > M, so the scratch never outgrows x),
  the feedforward backward scales cuBLAS's dy W in place, the attention forward scales
  cuBLAS's x W^T + b, the attention backward forms dy*l in row chunks of an eighth of M x N.
  Which strategy runs is decided per phase, M and GEMM size by `_use_cublas`, from
  measurements; GEMMs under SMALL_GEMM_FLOP stay fused, where eager launches cost the most.

Backward, both paths: feedforward `g = dy W`, `dx = g*l`, `dl = sum_rows g*x` (the reduction is
an epilogue of the dx GEMM, or of the pass that scales cuBLAS's g in place); attention
`dx = (dy*l) W`, `dl = sum_rows dy*u` (reduced from the dx kernel's own dy tiles in small
GEMMs, else by a pass). Every `dl` is a per-block partial sum followed by a fixed-order sum
over blocks (none where one block is final): no atomics, bitwise reproducible.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from . import config, mixed, tma_gemm
from .launch import FastKernel, PlanCache, aligned_16, cdiv, current_stream_handle
from .launch import sm_count as _sm_count

# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _absmax_of_blocks(blk, mask, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                      NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """fp32 absmax of the 4-bit quantization blocks `blk` (0 where masked). Nested (bnb's
    double quantization): a uint8 code of a 256-value map, times the second-level absmax of
    its BLOCKSIZE2 blocks, plus the offset, in fp32, as bitsandbytes' dequantize_4bit."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        absmax = tl.load(code2_ptr + q) * a2 + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, absmax, 0.0)


@triton.jit
def gather_table(table, idx):
    """table[idx] for an index tensor of any shape: one tl.gather over the flattened indices
    (a register/shared-memory lookup, no global load per element), reshaped back."""
    return tl.reshape(tl.gather(table, tl.reshape(idx, (idx.numel,)), 0), idx.shape)


@triton.jit
def _codes(code_ptr, q):
    """The 4-bit code values of nibbles q (any shape): the 16-entry table loaded once and
    gathered in registers (tl.gather). A table load per element, as this file did before,
    becomes an asynchronous 4-byte copy per weight element through shared memory in sm_90
    SASS (the dx loop at 16x64x128 issued 72 LDGSTS a step for 4 KB of packed weights); in
    small_m.py the same change made the tl.dot path 7x faster (386 -> 57 us at M = 16,
    14336->4096, tune-lut-h100.log)."""
    return gather_table(tl.load(code_ptr + tl.arange(0, 16)), q)


@triton.jit
def _dequant_4bit_tile(w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                       rows, row_mask, col0, IN,
                       R: tl.constexpr, C: tl.constexpr, BLOCKSIZE: tl.constexpr,
                       NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, ALIGNED: tl.constexpr):
    """W[rows, col0:col0 + C] (R x C, fp32) from bitsandbytes' 4-bit storage: codes two a byte,
    high nibble first, row-major over the (out, in) matrix flattened; one absmax per BLOCKSIZE
    consecutive elements; code_ptr the 16-value table (NF4 or FP4). fp32 table value * absmax,
    exactly bnb's dequantization before its rounding to the compute dtype."""
    if ALIGNED:
        # IN % BLOCKSIZE == 0, C <= BLOCKSIZE, col0 % C == 0: a tile row is C/2 whole bytes
        # inside one quantization block, so the bytes load as vectors and the absmax is one
        # value per row (a vector load, not a gather per element).
        half = tl.arange(0, C // 2)
        packed = tl.load(w_ptr + rows[:, None] * (IN // 2) + (col0 // 2 + half)[None, :],
                         mask=row_mask[:, None], other=0).to(tl.int32)
        vals = tl.interleave(_codes(code_ptr, packed >> 4), _codes(code_ptr, packed & 15))
        absmax = _absmax_of_blocks((rows * IN + col0) // BLOCKSIZE, row_mask, absmax_ptr,
                                   code2_ptr, absmax2_ptr, offset_ptr, NESTED, BLOCKSIZE2)
        w = vals * absmax[:, None]
    else:
        # Blocks or bytes straddle rows (IN % BLOCKSIZE != 0, odd IN): element-wise indexing
        # into the flat storage, a byte and an absmax gathered per element.
        cols = col0 + tl.arange(0, C)
        mask = row_mask[:, None] & (cols < IN)[None, :]
        idx = rows[:, None] * IN + cols[None, :]
        packed = tl.load(w_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        q = (packed >> (4 - 4 * (idx % 2)).to(tl.int32)) & 15
        w = _codes(code_ptr, q) * _absmax_of_blocks(idx // BLOCKSIZE, mask, absmax_ptr,
                                                       code2_ptr, absmax2_ptr, offset_ptr,
                                                       NESTED, BLOCKSIZE2)
    return w



@triton.jit
def _dequant_4bit_pairs(w_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr,
                        rows, row_mask, col0, IN, C: tl.constexpr, BLOCKSIZE: tl.constexpr,
                        NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, IN_ON_AXIS0: tl.constexpr):
    """W[rows, col0:col0 + C] for aligned layouts as two halves, even in-features (high
    nibbles) and odd ones (low nibbles): (C/2, R) with in-features on axis 0 (the forward's
    B = W^T, IN_ON_AXIS0) or (R, C/2) (dx's B = W). Each half feeds its own dot (the forward
    splits the A tile likewise; dx interleaves its two accumulators once after the K-loop), so
    no tile is transposed or interleaved per iteration: on the H100 the transposed, interleaved
    tile made the forward's tl.dot 5-10x slower than bnb (M = 16, 4096->14336: 697 us against
    72; 167 with halves), the dot layout reaching back into the gathers."""
    half = tl.arange(0, C // 2)
    absmax = _absmax_of_blocks((rows * IN + col0) // BLOCKSIZE, row_mask, absmax_ptr, code2_ptr,
                               absmax2_ptr, offset_ptr, NESTED, BLOCKSIZE2)
    if IN_ON_AXIS0:
        packed = tl.load(w_ptr + rows[None, :] * (IN // 2) + (col0 // 2 + half)[:, None],
                         mask=row_mask[None, :], other=0).to(tl.int32)
        absmax = absmax[None, :]
    else:
        packed = tl.load(w_ptr + rows[:, None] * (IN // 2) + (col0 // 2 + half)[None, :],
                         mask=row_mask[:, None], other=0).to(tl.int32)
        absmax = absmax[:, None]
    w_even = _codes(code_ptr, packed >> 4) * absmax
    w_odd = _codes(code_ptr, packed & 15) * absmax
    return w_even, w_odd


@triton.jit
def split_k_reduce(acc, workspace_ptr, counter_ptr, pid_k, split_stride, offs, mask,
                   SPLIT_K: tl.constexpr):
    """Deterministic split-K: park this split's fp32 partial at workspace[pid_k], count it on
    the tile's counter; the CTA that arrives last sums every partial in split order (the same
    order whoever is last), puts the counter back to zero for the next launch and returns
    (sum, True); the others return (acc, False)."""
    tl.store(workspace_ptr + pid_k * split_stride + offs, acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = arrived == SPLIT_K - 1
    if is_last:
        tl.store(counter_ptr, 0)
        acc = tl.zeros_like(acc)
        for s in range(SPLIT_K):
            acc += tl.load(workspace_ptr + s * split_stride + offs, mask=mask, other=0.0,
                           cache_modifier=".cg")
    return acc, is_last


@triton.jit
def last_arrival_row_sum(partial_ptr, counter_ptr, n_rows, row_len, cols, mask,
                         BLOCK: tl.constexpr, FINISH_R: tl.constexpr):
    """Partial sums finished in the launch that makes them: each of the n_rows CTAs that own a
    row of partial[:, cols] has stored it (fp32) and counts itself on counter_ptr; the one that
    arrives last gets (True, the sum of rows 0..n_rows-1 in that order: the same order whoever
    is last, deterministic) and puts the counter back to zero for the next launch; the others
    get (False, zeros). dl's kernels (here and conv's) store the sum; in place of a torch sum +
    cast + view after the kernel: three aten calls, ~45 of the 234 us of host a T5 768->768
    feedforward backward took on the H100 host under cProfile
    (benchmarks/results/host-spin-profile-h100.log)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    is_last = arrived == n_rows - 1
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    if is_last:
        tl.store(counter_ptr, 0)
        for r0 in range(0, n_rows, FINISH_R):
            offs_r = r0 + tl.arange(0, FINISH_R)
            tile = tl.load(partial_ptr + offs_r[:, None].to(tl.int64) * row_len + cols[None, :],
                           mask=(offs_r < n_rows)[:, None] & mask[None, :], other=0.0,
                           cache_modifier=".cg")
            total += tl.sum(tile, axis=0)
    return is_last, total


@triton.jit
def finish_partial_rows(partial_ptr, final_ptr, counter_ptr, n_rows, row_len, cols, mask,
                        BLOCK: tl.constexpr, FINISH_R: tl.constexpr):
    """last_arrival_row_sum, then the last CTA writes final[cols] in final's dtype."""
    is_last, total = last_arrival_row_sum(partial_ptr, counter_ptr, n_rows, row_len, cols, mask,
                                          BLOCK, FINISH_R)
    if is_last:
        tl.store(final_ptr + cols, total.to(final_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_rows_of_product(a_ptr, aux_ptr, out_ptr, block, M, K, stride_am, stride_ak, stride_xm,
                         stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[k] = sum over rows m (in order) of a[m, k] * aux[m, k] for one BLOCK_K block of k,
    in fp32, stored in out's dtype: the attention backward's dl, by programs launched beside
    the dx GEMM's tiles (REDUCE_A_AUX)."""
    offs_k = block * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rk = offs_k.to(tl.int64)
    total = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask = (offs_m < M)[:, None] & mask_k[None, :]
        rm = offs_m.to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak, mask=mask,
                    other=0.0)
        x = tl.load(aux_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask,
                    other=0.0)
        total += tl.sum(a.to(tl.float32) * x.to(tl.float32), axis=0)
    tl.store(out_ptr + rk, total.to(out_ptr.dtype.element_ty), mask=mask_k)


@triton.jit
def _ia3_matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    scale_a_ptr, scale_c_ptr, bias_ptr, aux_ptr, preact_ptr, partial_ptr,
    a_aux_ptr, workspace_ptr, counter_ptr, w_scale_ptr,
    q_code_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr, scale_index_ptr, final_ptr,
    M, N, K, rows_per_index, finish_base,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_auxm, stride_auxn,
    stride_a_auxm, stride_a_auxk,
    SCALE_A: tl.constexpr,  # multiply column k of the A tile by scale_a[k] before the dot
    # final[k] = sum over all rows of A * a_aux (A before SCALE_A), by programs of their own
    # after the GEMM's tiles: grid dim 0 = tiles + cdiv(K, AUX_BLOCK_K), each program
    # summing AUX_BLOCK_M x AUX_BLOCK_K blocks of its columns (_sum_rows_of_product).
    REDUCE_A_AUX: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # u = acc + bias[n]
    REDUCE_AUX: tl.constexpr,  # partial[pid_m, n] = sum over the tile's rows of u * aux
    # REDUCE_AUX's partial rows summed into final[n] by the last CTA to write one
    # (finish_partial_rows; counters from counter_ptr + finish_base).
    FINISH: tl.constexpr,
    STORE_PREACT: tl.constexpr,  # write u (M x N, contiguous) before the output scaling
    SCALE_C: tl.constexpr,  # c = u * scale_c[n]
    # Mixed-adapter batches: scale_a / scale_c are tables of one row per adapter (K or N
    # values each) and GEMM row m takes row scale_index[m // rows_per_index] (an example's
    # rows share its adapter): scale_a[idx, k], scale_c[idx, n] gathered from L2.
    SCALE_GATHER: tl.constexpr,
    STORE_C: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    # Quantized weights (B int8, LLM.int8's CB) are converted to A's dtype in registers; their
    # per-output-feature scale w_scale[f] * W_SCALE_MUL (SCB / 127) applies along the GEMM axis
    # that holds the output features: 1 = N (forward: acc * scale before the bias), 2 = K
    # (dx = dy W: the dy tile is scaled before the dot, with scale_a if both); 0 = none.
    W_SCALE_AXIS: tl.constexpr,
    W_SCALE_MUL: tl.constexpr,
    # bitsandbytes 4-bit weights (B = the packed bytes, w_scale = the absmax, q_* the tables;
    # see _dequant_4bit_tile), dequantized tile by tile in registers and rounded to A's dtype.
    # 1: forward, B[k, n] = W[n, k] (in-features on GEMM-K); 2: dx = dy W, B[k, n] = W[k, n]
    # (in-features on GEMM-N); 0: not 4-bit. The tile's extent along in-features (BLOCK_K or
    # BLOCK_N) is at most Q_BLOCKSIZE when Q_ALIGNED.
    W_4BIT: tl.constexpr,
    Q_BLOCKSIZE: tl.constexpr, Q_NESTED: tl.constexpr, Q_BLOCKSIZE2: tl.constexpr,
    Q_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    AUX_BLOCK_M: tl.constexpr, AUX_BLOCK_K: tl.constexpr,
):
    """C[M, N] = epilogue(prologue(A)[M, K] @ B[K, N]) with fp32 accumulation."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if REDUCE_A_AUX:
        # After the GEMM's tiles: where those are few and long (4096->14336 at M = 128: 64
        # tiles over N = 14336) they must start first. With the row sums first in the grid
        # that fwd+bwd took 202.8 us against 151.6 with them last (H100, CUDA graphs,
        # tune-attn-bwd-stop31b-h100.log, tune-attn-bwd-stop31c-h100.log).
        if pid >= num_pid_m * num_pid_n:
            if pid_k == 0:
                _sum_rows_of_product(a_ptr, a_aux_ptr, final_ptr, pid - num_pid_m * num_pid_n,
                                     M, K, stride_am, stride_ak, stride_a_auxm, stride_a_auxk,
                                     AUX_BLOCK_M, AUX_BLOCK_K)
            return
    # Grouped ordering: GROUP_M row-blocks share the same B columns while they are in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # int64 row/column offsets: M*K or K*N can pass 2**31 elements.
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    if SCALE_GATHER:
        scale_row = tl.load(scale_index_ptr + offs_m // rows_per_index, mask=mask_m,
                            other=0).to(tl.int64)

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # 4-bit with aligned blocks: B comes as even/odd in-feature halves (_dequant_4bit_pairs):
    # the forward splits A's columns likewise, dx keeps two accumulators (even/odd columns).
    PAIRS: tl.constexpr = W_4BIT == 1 and Q_ALIGNED
    PAIRS_N: tl.constexpr = W_4BIT == 2 and Q_ALIGNED
    if PAIRS_N:
        acc_even = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    if BLOCK_M < 16:
        if PAIRS_N:
            gemv_even = tl.zeros((BLOCK_K, BLOCK_N // 2), dtype=tl.float32)
            gemv_odd = tl.zeros((BLOCK_K, BLOCK_N // 2), dtype=tl.float32)
        if PAIRS:
            gemv_acc = tl.zeros((BLOCK_K // 2, BLOCK_N), dtype=tl.float32)
        elif W_4BIT == 1:  # the dequantized tile comes as W[n, k]: accumulate it as it is
            gemv_acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            gemv_acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        # Against K, not k_end: splits own whole BLOCK_K chunks, so only the last chunk of the
        # last split is partial, and K (an int argument) carries Triton's divisible-by-16
        # specialisation, which lets masked loads stay 16-byte vectors.
        mask_k = offs_k < K
        rk = offs_k.to(tl.int64)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if PAIRS:
            w_even, w_odd = _dequant_4bit_pairs(
                b_ptr, q_code_ptr, w_scale_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr, rn,
                mask_n, k0, K, BLOCK_K, Q_BLOCKSIZE, Q_NESTED, Q_BLOCKSIZE2, True)
            w_even = w_even.to(a_ptr.dtype.element_ty)  # rounded as bnb's dequantize_4bit rounds
            w_odd = w_odd.to(a_ptr.dtype.element_ty)
        elif PAIRS_N:
            w_even, w_odd = _dequant_4bit_pairs(
                b_ptr, q_code_ptr, w_scale_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr, rk,
                mask_k, pid_n * BLOCK_N, N, BLOCK_N, Q_BLOCKSIZE, Q_NESTED, Q_BLOCKSIZE2, False)
            w_even = w_even.to(a_ptr.dtype.element_ty)
            w_odd = w_odd.to(a_ptr.dtype.element_ty)
        elif W_4BIT == 1:
            w_nk = _dequant_4bit_tile(b_ptr, q_code_ptr, w_scale_ptr, q_code2_ptr, q_absmax2_ptr,
                                      q_offset_ptr, rn, mask_n, k0, K, BLOCK_N, BLOCK_K,
                                      Q_BLOCKSIZE, Q_NESTED, Q_BLOCKSIZE2, Q_ALIGNED)
            w_nk = w_nk.to(a_ptr.dtype.element_ty)  # rounded as bnb's dequantize_4bit rounds
            if BLOCK_M >= 16:
                b = tl.trans(w_nk)
        elif W_4BIT == 2:
            b = _dequant_4bit_tile(b_ptr, q_code_ptr, w_scale_ptr, q_code2_ptr, q_absmax2_ptr,
                                   q_offset_ptr, rk, mask_k, pid_n * BLOCK_N, N, BLOCK_K, BLOCK_N,
                                   Q_BLOCKSIZE, Q_NESTED, Q_BLOCKSIZE2, Q_ALIGNED)
            b = b.to(a_ptr.dtype.element_ty)
        else:
            b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SCALE_A:
            if SCALE_GATHER:
                s = tl.load(scale_a_ptr + scale_row[:, None] * K + rk[None, :],
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                a = a.to(tl.float32) * s
            else:
                s = tl.load(scale_a_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                a = a.to(tl.float32) * s[None, :]
        if W_SCALE_AXIS == 2:
            ws = tl.load(w_scale_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            a = a.to(tl.float32) * (ws * W_SCALE_MUL)[None, :]
        if W_SCALE_AXIS != 0:
            # int8 codes -127..127 are exact in fp16 and bf16: the conversion loses nothing.
            b = b.to(a_ptr.dtype.element_ty)
        if PAIRS:
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
            if BLOCK_M >= 16:
                acc = tl.dot(a_even.to(w_even.dtype), w_even, acc, input_precision=DOT_PRECISION)
                acc = tl.dot(a_odd.to(w_odd.dtype), w_odd, acc, input_precision=DOT_PRECISION)
            else:
                a_even32 = a_even.to(a_ptr.dtype.element_ty).to(tl.float32)
                a_odd32 = a_odd.to(a_ptr.dtype.element_ty).to(tl.float32)
                gemv_acc += (tl.trans(a_even32) * w_even.to(tl.float32)
                             + tl.trans(a_odd32) * w_odd.to(tl.float32))
        elif PAIRS_N:
            if BLOCK_M >= 16:
                acc_even = tl.dot(a.to(w_even.dtype), w_even, acc_even,
                                  input_precision=DOT_PRECISION)
                acc_odd = tl.dot(a.to(w_odd.dtype), w_odd, acc_odd, input_precision=DOT_PRECISION)
            else:
                a32 = tl.trans(a.to(a_ptr.dtype.element_ty).to(tl.float32))
                gemv_even += a32 * w_even.to(tl.float32)
                gemv_odd += a32 * w_odd.to(tl.float32)
        elif BLOCK_M >= 16:
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)
        elif W_4BIT == 1:
            a32 = a.to(a_ptr.dtype.element_ty).to(tl.float32)
            gemv_acc += w_nk.to(tl.float32) * a32
        else:
            # GEMV (BLOCK_M == 1, quantized weights): FMAs on the weight tile as loaded, into a
            # BLOCK_K x BLOCK_N accumulator reduced once after the loop, so no tensor-core layout
            # shuffle and no cross-thread reduction per tile.
            a32 = a.to(b.dtype).to(tl.float32)  # rounded as the dot path rounds (PEFT's x*l)
            gemv_acc += tl.trans(a32) * b.to(tl.float32)

    if PAIRS_N:
        if BLOCK_M < 16:
            acc_even += tl.sum(gemv_even, axis=0)[None, :]
            acc_odd += tl.sum(gemv_odd, axis=0)[None, :]
        acc = tl.interleave(acc_even, acc_odd)  # once per tile: columns back in order
    elif BLOCK_M < 16:
        if W_4BIT == 1 and not PAIRS:
            acc += tl.sum(gemv_acc, axis=1)[None, :]
        else:
            acc += tl.sum(gemv_acc, axis=0)[None, :]
    offs_2d = rm[:, None] * N + rn[None, :]
    mask_2d = mask_m[:, None] & mask_n[None, :]
    is_last = True
    if SPLIT_K > 1:
        # Deterministic split-K: every split parks its fp32 partial, the CTA that arrives last
        # sums all of them in split order 0..SPLIT_K-1, the same order whoever is last, then
        # runs the epilogue: one launch, no order-dependent adds. The counters are zero when a
        # launch starts, and the last CTA of each tile puts its counter back to zero, so a
        # buffer kept per stream needs no memset launch before the next kernel.
        acc, is_last = split_k_reduce(acc, workspace_ptr, counter_ptr + pid_m * num_pid_n + pid_n,
                                      pid_k, M * N, offs_2d, mask_2d, SPLIT_K)

    if is_last:
        u = acc
        if W_SCALE_AXIS == 1:
            ws = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            u = u * (ws * W_SCALE_MUL)[None, :]
        if HAS_BIAS:
            u += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if REDUCE_AUX:
            aux = tl.load(aux_ptr + rm[:, None] * stride_auxm + rn[None, :] * stride_auxn,
                          mask=mask_2d, other=0.0).to(tl.float32)
            part = tl.sum(tl.where(mask_2d, u * aux, 0.0), axis=0)
            tl.store(partial_ptr + pid_m * N + rn, part, mask=mask_n)
            if FINISH:
                finish_partial_rows(partial_ptr, final_ptr, counter_ptr + finish_base + pid_n,
                                    num_pid_m, N, rn, mask_n, BLOCK_N, 16)
        if STORE_PREACT:
            tl.store(preact_ptr + offs_2d, u.to(preact_ptr.dtype.element_ty), mask=mask_2d)
        if STORE_C:
            out = u
            if SCALE_C and SCALE_GATHER:
                out = u * tl.load(scale_c_ptr + scale_row[:, None] * N + rn[None, :], mask=mask_2d,
                                  other=0.0).to(tl.float32)
            elif SCALE_C:
                out = u * tl.load(scale_c_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn,
                     out.to(c_ptr.dtype.element_ty), mask=mask_2d)


@triton.jit
def _ia3_scale_reduce_kernel(
    src_ptr, scale_ptr, out_ptr, aux_ptr, partial_ptr, row_scale_ptr,
    q_code_ptr, q_code2_ptr, q_absmax2_ptr, q_offset_ptr, scale_index_ptr,
    R, C, rows_per_program, rows_per_index,
    stride_sr, stride_sc, stride_or, stride_oc, stride_ar, stride_ac,
    # A batch of (R, C) matrices along grid axis 2 (a convolution's (N, C, spatial) activations
    # as N matrices of spatial rows x channel columns); 0 strides for one matrix.
    stride_sb, stride_ob, stride_ab,
    SCALE_AXIS: tl.constexpr,  # 1: out = src * scale[col]; 0: out = src * scale[row]
    # Mixed-adapter batches (SCALE_AXIS 1): scale is a table of C-value rows, and row r of
    # matrix b takes row scale_index[(b * R + r) // rows_per_index].
    SCALE_GATHER: tl.constexpr,
    # Dequantization of an int8 weight: out = src * row_scale[row] * ROW_SCALE_MUL (and then
    # the scaling above, if any): LLM.int8's CB * SCB / 127 with IA3's vector folded in.
    ROW_SCALE: tl.constexpr, ROW_SCALE_MUL: tl.constexpr,
    # src is a bitsandbytes 4-bit weight (R = out, C = in features; row_scale = its absmax):
    # dequantized tile by tile (_dequant_4bit_tile; BLOCK_C <= Q_BLOCKSIZE when Q_ALIGNED).
    SRC_4BIT: tl.constexpr, Q_BLOCKSIZE: tl.constexpr, Q_NESTED: tl.constexpr,
    Q_BLOCKSIZE2: tl.constexpr, Q_ALIGNED: tl.constexpr,
    STORE_OUT: tl.constexpr,
    REDUCE_AUX: tl.constexpr,  # partial[pid_r, col] = sum over the program's rows of src * aux
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One bandwidth-bound pass beside a cuBLAS GEMM: scale a matrix by a row or column vector
    and/or reduce its product with another matrix over rows. out may alias src (each element
    is read and written by the same thread)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    src_ptr += pid_b * stride_sb
    if STORE_OUT:
        out_ptr += pid_b * stride_ob
    if REDUCE_AUX:
        aux_ptr += pid_b * stride_ab
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    rc = offs_c.to(tl.int64)
    if STORE_OUT and SCALE_AXIS == 1 and not SCALE_GATHER:  # SCALE_AXIS -1: no scaling vector
        col_scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    part = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid_r * rows_per_program
    row_end = min(R, row_start + rows_per_program)
    for r0 in range(row_start, row_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < row_end
        rr = offs_r.to(tl.int64)
        mask = mask_r[:, None] & mask_c[None, :]
        if SRC_4BIT:
            v = _dequant_4bit_tile(src_ptr, q_code_ptr, row_scale_ptr, q_code2_ptr, q_absmax2_ptr,
                                   q_offset_ptr, rr, mask_r, pid_c * BLOCK_C, C, BLOCK_R, BLOCK_C,
                                   Q_BLOCKSIZE, Q_NESTED, Q_BLOCKSIZE2, Q_ALIGNED)
        else:
            v = tl.load(src_ptr + rr[:, None] * stride_sr + rc[None, :] * stride_sc, mask=mask,
                        other=0.0).to(tl.float32)
        if REDUCE_AUX:
            aux = tl.load(aux_ptr + rr[:, None] * stride_ar + rc[None, :] * stride_ac, mask=mask,
                          other=0.0).to(tl.float32)
            part += tl.sum(tl.where(mask, v * aux, 0.0), axis=0)
        if STORE_OUT:
            if ROW_SCALE:
                rs = tl.load(row_scale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
                v = v * (rs * ROW_SCALE_MUL)[:, None]
            if SCALE_AXIS == 1 and SCALE_GATHER:
                scale_row = tl.load(scale_index_ptr + (pid_b * R + offs_r) // rows_per_index,
                                    mask=mask_r, other=0).to(tl.int64)
                o = v * tl.load(scale_ptr + scale_row[:, None] * C + rc[None, :], mask=mask,
                                other=0.0).to(tl.float32)
            elif SCALE_AXIS == 1:
                o = v * col_scale[None, :]
            elif SCALE_AXIS == 0:
                o = v * tl.load(scale_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[:, None]
            else:
                o = v
            tl.store(out_ptr + rr[:, None] * stride_or + rc[None, :] * stride_oc,
                     o.to(out_ptr.dtype.element_ty), mask=mask)
    if REDUCE_AUX:
        row = pid_b * tl.num_programs(0) + pid_r
        tl.store(partial_ptr + row * C + rc, part, mask=mask_c)


# The custom op's body launches through wrap_triton, which torch.compile traces into its graph.
# Eager calls launch the raw kernels: outside a triton_op, a wrap_triton launch dispatches a
# higher-order op, measured at 400-800 us of CPU per layer call on the H100 host (a bf16
# nn.Linear costs 8 us there).
def _traceable(kernel):
    try:
        return wrap_triton(kernel)
    except RuntimeError:
        # torch < 2.13 refuses interpreter-wrapped kernels (TRITON_INTERPRET=1): the traced op
        # then launches them directly (torch.compile over interpreted kernels is not a use).
        return kernel


_KERNELS = {
    False: ((_ia3_matmul_kernel, _ia3_scale_reduce_kernel) if config.triton_interpreted()
            else (FastKernel(_ia3_matmul_kernel), FastKernel(_ia3_scale_reduce_kernel))),
    True: (_traceable(_ia3_matmul_kernel), _traceable(_ia3_scale_reduce_kernel)),
}

# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

_PATHS = ("auto", "fused", "cublas", "tma", "aten")
_path_override = {"path": os.environ.get("IA3_DENSE_PATH", "auto")}
if _path_override["path"] not in _PATHS:
    raise ValueError(f"IA3_DENSE_PATH must be one of {_PATHS}, got {_path_override['path']!r}")

# Where cuBLAS + a Triton pass replaces the fused Triton GEMM, per phase, from H100 timings of
# both strategies under CUDA graphs (benchmarks/results/paths-*.json, README "Design"):
# - feedforward forward: one pass folds l into the smaller operand (W*l if N <= M, else x*l,
#   so the scratch never outgrows x), then cuBLAS, from M = 128 for GEMMs of 2**34 flop or
#   more (SMALL_GEMM_FLOP below). H100, CUDA graphs, forward (tune-small-m-mid-stop30-h100.log;
#   us, fused kernel with the table's tiles / with the best of 16 candidates / cuBLAS route /
#   bare): 4096->4096 at M = 512 (2**34 flop) 52.3 / 45.6 / 36.8 / 32.6, 4096->14336 at
#   M = 256 90.2 / 90.2 / 62.4 / 59.4, 14336->4096 at M = 256 106.4 / 82.3 / 75.2 / 67.2.
#   Smaller GEMMs keep the fused kernel (eager launches): 4096->1024 at M = 512 (2**32 flop)
#   45.9 / 25.1 / 20.2 / 15.4. (Until stop 30 this bound was M = 2048.)
FF_FWD_CUBLAS_MIN_M = 128
# - feedforward backward: cuBLAS's g = dy W scaled in place wins from M = 128 (4096x4096:
#   37 us against 48 at M = 512);
FF_BWD_CUBLAS_MIN_M = 128
# - attention forward: cuBLAS's x W^T + b then one pass writing y = u*l, from M = 128
#   (4096->1024 at M = 128: 17 us against 29 for the fused kernel's 64 output tiles).
ATTN_FWD_CUBLAS_MIN_M = 128
# - attention backward: cuBLAS's (dy*l) W is faster on the GPU at every M, but dy*l is scratch:
#   used where it stays under 256 KiB or under the fused kernel's own split-K workspace
#   (small M; _attn_bwd_fused_workspace) or in 8 row chunks of >= 512 rows (M >= 4096),
#   and there only for GEMMs of >= 2**39 flop (~0.8 ms): the chunk loop costs ~2 ms of host
#   time on the H100 host (4096->1024 at M = 8192: 2.3 ms against 0.2 ms bare), which only
#   the largest GEMMs hide. Elsewhere the fused kernel scales the dy tile in registers.
SMALL_SCRATCH_BYTES = 256 << 10
ATTN_BWD_CHUNKED_MIN_FLOP = 1 << 39
# - attention backward at M <= 64 and N <= 1024: the fused kernel also reduces dl from its dy
#   tiles, so the whole backward is one launch where the cuBLAS route takes three (pass, GEMM,
#   sum). H100, CUDA graphs, fwd+bwd at M = 1/16: fused 24.9/25.3 us against 26.3/27.0 on
#   4096->1024 and 21.7/22.5 against 24.7/25.9 on 3072->768, but 158-177 against 107-110 where
#   the GEMM reduces over N = 4096 or 14336 (4096->14336, 14336->4096), 57-62 against 46-49 on
#   4096->4096 (benchmarks/results/paths-small-attn-h100.md).
ATTN_BWD_FUSED_MAX_M = 64
ATTN_BWD_FUSED_MAX_N = 1024
# - and from M = 17 to 64 where N > 1024, cuBLAS whatever its dy*l scratch (at most 128 x N
#   bytes: 1.75 MiB on 4096->14336, freed as the GEMM ends): the fused dx GEMM reduces over N
#   there with no split-K. H100, CUDA graphs, fwd+bwd at M = 64 (tune-attn-bwd-stop29-h100.log,
#   tune-small-m64-stop29-h100.log; fused with the best tiles / cuBLAS / bare, us): 4096->14336
#   145.9 / 114.8 / 100.0, 14336->4096 118.6 / 107.3 / 96.2, 4096->4096 47.9 / 47.0 / 36.2.
ATTN_BWD_WIDE_CUBLAS_MIN_M = 17
ATTN_BWD_WIDE_SCRATCH_BYTES = 8 << 20
# The rules above come from GPU time alone (CUDA graphs). In eager mode every extra launch of
# the cuBLAS route (pass, sums, chunks) costs 20-25 us of CPU on the H100 host, which is about
# what a bf16 GEMM of 2**34 flop takes on the GPU. Below that size the single fused kernel
# wins the eager step even where cuBLAS + a pass wins under graphs by up to ~17 us (T5-base
# 768->768 at M = 8192): T5-base training, 8 x 512 tokens, fused 1.41x the no-adapter floor
# against 1.80x with cuBLAS + passes (benchmarks/results/e2e-t5-{fused,cublas}-h100.md).
SMALL_GEMM_FLOP = 1 << 34
# Forwards captured in a CUDA graph (serving stacks replay them) have no host time to save, so
# there the cuBLAS routes of the feedforward and attention forwards (one pass + one GEMM) start
# at 2**30 flop, where GPU time alone favours them. H100, CUDA graphs, forward, us, fused /
# cuBLAS route / bare (tune-small-m check, stop 31,
# benchmarks/results/check-mid-m-stop31a-h100.log):
# feedforward 4096->4096 M = 128 37.7 / 25.5 / 23.1, 14336->4096 M = 128 104.8 / 60.0 / 55.8,
# 4096->1024 M = 256 22.9 / 18.3 / 14.5 and M = 512 33.4 / 20.4 / 15.5, 3072->768 M = 512
# 26.8 / 18.1 / 13.5; attention 4096->4096 M = 256 37.0 / 31.0 / 28.6, 4096->1024 M = 256
# 21.8 / 16.9 / 14.6. Below 2**30 the fused kernel stays ahead or level: 768->768 at
# M = 128..512 8.9-12.5 against 11.2-12.0, 3072->768 at M = 128 13.9 against 14.8.
# With the rule (check-mid-m-stop31b-h100.log, shipped dispatch captured / bare): those
# feedforward rows 26.0 / 23.4, 61.2 / 56.6, 18.2 / 14.6, 20.1 / 15.3, 17.6 / 13.4.
# Eager forwards keep SMALL_GEMM_FLOP: not re-timed against this rule on the GPU host.
GRAPHED_FWD_CUBLAS_MIN_FLOP = 1 << 30
# Eager feedforward forwards too take the cuBLAS route below SMALL_GEMM_FLOP where the fused
# kernel's K-loop is this long. Its extra GPU time over the route grows with K where 64 tiles
# or fewer cover the output (the mid-M rows), ~3 ns per in-feature on the H100 (graphs,
# check-mid-m-stop31a/b-h100.log, fused / cuBLAS route, us): 14336->4096 M = 128 104.8 / 61.2
# (3.1 ns), 4096->4096 M = 128 37.7 / 26.0 (2.9), 4096->1024 M = 512 33.4 / 20.1 (3.2),
# 3072->768 M = 512 26.8 / 17.6 (3.0). From K = 8192 that passes ~25 us, the host time of the
# route's second launch; the eager suite read 104.7 us for 14336->4096 at M = 128 against
# PEFT's 65.4 (suite-dense-mid-stop31.md). Not yet timed eager with this rule.
FF_FWD_EAGER_CUBLAS_MIN_K = 8192
# The fused attention backward's dl = sum_rows dy*u: up to ATTN_BWD_DL_IN_KERNEL_MAX_M rows by
# programs of the dx GEMM's launch, each summing every row of a block of columns after the
# GEMM's tiles (REDUCE_A_AUX: no launch of its own, the GEMM's K-loop untouched); past it by a
# pass of its own after the GEMM (see dense_backward_impl), which reads the rows in parallel.
# Until stop 31 dl was summed inside the K-loop past M = 64 and below 2**34 flop (a pass above),
# which doubled the loop (317 -> 631 SASS instructions a step at 64x128x64, ~130 -> ~232
# registers; sass-mid-m-attn-bwd-stop30.log) and lost to both other ways wherever timed.
# H100, CUDA graphs, attention fwd+bwd, us, K-loop / programs / pass / bare:
# - M = 128 (tune-attn-bwd-mid-stop31-h100.log, programs with the GEMM's BLOCK_M x BLOCK_K):
#   4096->4096 120.6 / 56.1 / 65.5 / 37.5, 4096->1024 42.5 / 26.0 / 33.4 / 19.0, 14336->4096
#   183.8 / 109.0 / 118.2 / 97.2, 4096->14336 442.9 / 150.7 / 167.6 / 104.7;
# - programs of 128 x 32 blocks (_a_aux_blocks), now also past 2**34 flop, against the pass
#   (tune-attn-bwd-stop31c-h100.log): 4096->4096 M = 512 86.6 against 94.7; 14336->4096
#   M = 256 158.2 / 169.7, M = 512 217.6 / 241.3; 4096->14336 M = 512 262.4 / 276.3 but
#   M = 256 206.8 / 181.3 (unexplained; the one loss); 768->768 M = 512 17.6 / 26.3;
# - T5-base 768->768 at M = 8192: the pass 85.3 against 103.5 in the K-loop (stop 26); at
#   M <= 16 too (tune-attn-gemv-e2e-stop27-h100.log): k/v_proj 20.7 against 23.5.
# benchmarks.tune_attn_bwd times each way.
ATTN_BWD_DL_IN_KERNEL_MAX_M = 512


# Hopper, large M: the persistent TMA GEMM (tma_gemm.py) with IA3 in its prologue/epilogue,
# where it beat both strategies above. H100, bf16, CUDA graphs, M = 2048 and 8192
# (benchmarks/results/tune-tma-h100.log; ours / cuBLAS at M = 8192, TMA against the path
# before it):
# - attention forward (y, and u when training): 4096->4096 1.008 / 1.022 against 1.075 /
#   1.138; 4096->14336 1.046 / 1.009 against 1.136 / 1.071; 4096->1024 1.08 / 1.07 against
#   1.11. Lost where K is large next to N, so that cuBLAS's pass over M x N is cheap and the
#   kernel's own gap to cuBLAS shows: 14336->4096 1.039 against 1.005, 3072->768 1.26 against
#   1.14 (its plain GEMM is 1.24x cuBLAS there: 6 column tiles of 128);
# - feedforward backward (dx = (dy W)*l, dl's partial sums of (dy W)*x in the epilogue): won on
#   every shape, 4096->4096 1.174 against 1.256, 14336->4096 1.048 against 1.142, T5
#   768->768 1.94 against 2.54;
# - attention backward (dx = (dy*l) W, dy scaled in registers; dl by a pass as before): won
#   where no dimension passes 4096 (4096->4096 487 + a ~45 us pass against 664 us), lost on
#   4096->14336 and 14336->4096 (1.40 against 1.23), where scaling the A tile in registers
#   costs what it costs the feedforward forward (1.2-1.4x cuBLAS, so that one stays cuBLAS's).
# Only eager calls (host-side descriptors, built per call) and only past SMALL_GEMM_FLOP (host
# time rules below it). In the backward, only past TMA_BWD_MIN_FLOP. The first reason, ~450-500
# us more host time a backward launch through Triton's own run() (host-overhead-paths-h100.log),
# went when the kernel moved to launch.FastKernel (ff fwd+bwd host at T5 768->768, M = 16: 686
# us against 855 before, fused 335; host-overhead-paths-fastkernel-h100.log). What keeps the
# limit: below 2**38 the TMA backward saved no device time in the layer's forward+backward
# (`overhead --eager`, host-overhead-eager-h100.log, device time without host gaps: q/o_proj
# ff M = 2048 243.8 us forced against 217.5 by this rule, k/v_proj ff M = 8192 296.6 against
# 297.7; only T5 wo attn at M = 2048 gained, 70.4 against 84.6, a host-bound layer anyway)
# while its five descriptors cost host time on every call.
TMA_MIN_M = 2048
TMA_MAX_DIM = 4096
TMA_BWD_MIN_FLOP = 1 << 38
# Mixed-adapter attention forwards gather each example's l in the TMA GEMM's epilogue at every
# width, where the single-adapter batch takes its l there. H100, CUDA graphs, prefill M = 4096
# (128 sequences of 32 tokens), mixed / single-adapter batch, the epilogue gather against cuBLAS
# + the gathering pass: q/o_proj 4096->4096 bf16 1.028-1.033 against 1.062-1.064, NF4
# 1.013-1.018 against 1.053-1.061 (mixed-stop34-tma-h100.md against mixed-stop34-h100.md).
# Dense k/v_proj 4096->1024 lost (1.072-1.080 against 1.032-1.037) while the gather went
# through shared memory per row at fewer pipeline stages (tma_gemm.gather_span's notes); with
# the per-example gather it read 1.007-1.011 (bf16 table) and 1.012-1.018 (fp32) against
# 1.025-1.033 for cuBLAS + the pass (gather1024*-stop36-h100.md, mixed-stop36b*-h100.md).


# Under torch.compile (the custom ops' bodies, traced: traceable=True) the GEMMs from
# COMPILED_ATEN_MIN_FLOP and COMPILED_ATEN_MIN_M up run as aten ops: cuBLAS's GEMM, with IA3's
# elementwise work (x*l, u*l, dy*l, g*l) and dl's row sums written in PyTorch, which Inductor
# fuses into the kernels around them (the norm that makes x, the reduction that makes dl) as it
# does for PEFT's compiled layers. Our own passes are opaque to it: one more read and write of
# an activation each. And compiled code launches without an autograd.Function or Python
# checks per call, so the fused Triton GEMM's reason to stay in small GEMMs eagerly
# (SMALL_GEMM_FLOP, host time) goes: GPU time alone decides, and under CUDA graphs the cuBLAS
# routes win from 2**30 flop and M = 128 (GRAPHED_FWD_CUBLAS_MIN_FLOP). Before this rule, the
# compiled T-Few T5-base step (768-wide layers, all under SMALL_GEMM_FLOP) read 1.183x PEFT
# compiled's and GPT-2 small 1.004x (benchmarks/results/e2e-h100.md, 2026-11-25); with it
# 0.991x and 0.982x, at PEFT compiled's peak memory (e2e-compiled-stop34-h100.md, H100).
# Decode-sized calls (M < 128) keep the fused kernels, which beat cuBLAS + a pass there.
COMPILED_ATEN_MIN_FLOP = 1 << 30
COMPILED_ATEN_MIN_M = 128


def _use_aten(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, traceable: bool,
              scale_index) -> bool:
    """The aten route (_aten_forward, _aten_backward): compiled 16-bit GEMMs past the bounds
    above on CUDA, or forced by dense_path("aten") (tests, A/B timings). Mixed-adapter batches
    keep their own routes."""
    if scale_index is not None:
        return False
    forced = _path_override["path"]
    if forced != "auto":
        return forced == "aten"
    return (traceable and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and M >= COMPILED_ATEN_MIN_M and 2 * M * N * K >= COMPILED_ATEN_MIN_FLOP)


def _aten_forward(x, weight, bias, scale, feedforward: bool, fan_in_fan_out: bool,
                  save_preact: bool):
    """(y, u or None) in aten ops, the arithmetic of the cuBLAS route: feedforward x*l in fp32
    rounded once to the weight dtype (PEFT's x*l, then autocast's cast), attention u*l in fp32
    rounded once."""
    w_kn = weight if fan_in_fan_out else weight.t()
    if feedforward:
        l = scale.reshape(-1).float()
        return _cublas_linear((x.float() * l).to(weight.dtype), w_kn, bias), None
    u = _cublas_linear(x.to(weight.dtype), w_kn, bias)
    return _aten_scaled(u, scale), (u if save_preact else None)


def _aten_scaled(t, scale):
    """t * l along t's columns in fp32, rounded once to t's dtype (aten ops: Inductor fuses it)."""
    return (t.float() * scale.reshape(-1).float()).to(t.dtype)


def _aten_row_sums(a, b, scale):
    """dl = sum_rows a*b in fp32, shaped and typed like scale. Inductor's reductions use no
    atomics, so dl is reproducible as on the other routes."""
    return (a.float() * b.float()).sum(0).to(scale.dtype).view(scale.shape)


def _aten_feedforward_grads(g, x, scale, need_dx: bool, need_dscale: bool):
    """(dx or None, dl or None) from g = dy W in aten ops: dx = g*l, dl = sum_rows g*x. Written
    in aten so that x, the output of the norm or activation before the layer, is an input
    Inductor can recompute in the backward instead of saving it (a Triton pass reading x made
    the partitioner keep it: 4 x 224 MiB on NF4 Llama-3-8B dims, saved-nf4-compiled-stop36)."""
    return (_aten_scaled(g, scale) if need_dx else None,
            _aten_row_sums(g, x, scale) if need_dscale else None)


def _aten_backward(dy, x, weight, scale, preact, feedforward: bool, fan_in_fan_out: bool,
                   need_dx: bool, need_dscale: bool):
    """(dx or None, dscale or None) in aten ops, dy in the weight dtype: feedforward
    g = dy W, dx = g*l, dl = sum_rows g*x; attention dx = (dy*l) W, dl = sum_rows dy*u."""
    w_nk = weight.t() if fan_in_fan_out else weight
    if feedforward:
        return _aten_feedforward_grads(torch.matmul(dy, w_nk), x, scale, need_dx, need_dscale)
    dx = torch.matmul(_aten_scaled(dy, scale), w_nk) if need_dx else None
    return dx, (_aten_row_sums(dy, preact, scale) if need_dscale else None)


def _use_tma(phase: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
             traceable: bool) -> bool:
    """phase: "attn_fwd", "ff_bwd", "attn_bwd" or "ff_fwd" (forced only); N = out_features,
    K = in_features. The operands' TMA eligibility is the caller's check."""
    forced = _path_override["path"]
    if traceable or dtype not in (torch.float16, torch.bfloat16):
        return False
    if forced == "auto":  # cheapest tests first: every eager call of every layer asks
        if M < TMA_MIN_M or device.type != "cuda" or 2 * M * N * K < SMALL_GEMM_FLOP:
            return False
    elif forced != "tma":
        return False
    if not tma_gemm.available(device):
        return False
    if forced == "tma":
        return True
    if phase == "attn_fwd":
        return K <= TMA_MAX_DIM and (N >= 1024 or K <= 1024)
    if phase == "ff_bwd":
        return 2 * M * N * K >= TMA_BWD_MIN_FLOP
    if phase == "attn_bwd":
        return max(N, K) <= TMA_MAX_DIM and 2 * M * N * K >= TMA_BWD_MIN_FLOP
    return False


def _tma_tiles(n_gemm: int, reduce_aux: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SUBTILE) from the same sweep: 128x256 with a
    split epilogue, 4 stages (3 when the epilogue also stages the aux tile: 4 asked for 262 KB
    of shared memory); 128x128 with a whole epilogue for GEMMs under 1024 columns (T5's 768:
    6 column tiles of 256 left SMs idle)."""
    if config.triton_interpreted():
        return (16, 32, 16, 4, 1, True)  # several tiles a CTA and a split epilogue, in tests
    if n_gemm < 1024:
        return (128, 128, 64, 8, 4, False)
    return (128, 256, 64, 8, 3 if reduce_aux else 4, True)


def _tma_attention_forward(x, w, w_kn: bool, N: int, bias, scale, save_preact: bool,
                           traceable: bool, scale_index=None):
    """(y, u) of the attention forward by tma_gemm (bias and l in its epilogue) where _use_tma
    takes it and the operands are TMA-addressable; None otherwise. w: the stored weight, or a
    quantized layer's dequantized (N, K) scratch. scale_index: a mixed-adapter batch, each row
    gathering its example's l from the table in the epilogue (the notes above)."""
    M, K = x.shape
    if not _use_tma("attn_fwd", M, N, K, w.dtype, x.device, traceable):
        return None
    x = x.to(w.dtype)
    if not tma_gemm.eligible(x, w, N):
        return None
    y, u, _ = tma_gemm.launch_tma_gemm(x, w, w_kn, N, bias=bias, scale_c=scale,
                                       store_preact=save_preact, tiles=_tma_tiles(N, False),
                                       scale_index=scale_index)
    return y, u


def _tma_feedforward_grads(dy, w, w_kn: bool, K: int, x, scale, need_dx: bool,
                           need_dscale: bool, traceable: bool):
    """(dx, partial): dx = (dy W)*l and dl's partial sums of (dy W)*x (for _reduce_partials)
    from one tma_gemm, where _use_tma takes the feedforward backward and the operands are
    TMA-addressable; None otherwise. w as for _tma_attention_forward."""
    M, N = dy.shape
    aux = x if need_dscale else None
    if not (_use_tma("ff_bwd", M, N, K, w.dtype, dy.device, traceable)
            and tma_gemm.eligible(dy, w, K, aux) and (aux is None or aux.dtype == w.dtype)):
        return None
    dx, _, partial = tma_gemm.launch_tma_gemm(dy, w, w_kn, K, scale_c=scale, aux=aux,
                                              store_c=need_dx, tiles=_tma_tiles(K, need_dscale))
    return dx, partial


def dense_path(path: str):
    """Force the "fused", "cublas", "tma" or "aten" strategy (tests and benchmarks; "tma" where
    the operands and the device allow it, else "fused"; "aten": the route of compiled GEMMs,
    _use_aten, also eagerly); "auto" chooses by M."""
    return config.path_override(_path_override, path, _PATHS)


def _use_cublas(phase: str, M: int, N: int, K: int, dtype: torch.dtype,
                device: torch.device) -> bool:
    """phase: "ff_fwd", "ff_fwd_mixed", "ff_bwd", "attn_fwd" or "attn_bwd"; N = out_features,
    K = in_features. "ff_fwd_mixed": a mixed-adapter batch's feedforward forward, where cuBLAS
    multiplies x*l formed by a pass (M x K, whatever N)."""
    forced = _path_override["path"]
    if forced != "auto":
        return forced == "cublas"
    if device.type != "cuda":
        return False
    if not _cublas_ready(device):
        return False  # a capture on a thread that never ran cuBLAS: stay on Triton
    flop = 2 * M * N * K
    small_gemm = dtype != torch.float32 and flop < SMALL_GEMM_FLOP
    # (the capture query last: decode-sized GEMMs, under 2**30, never pay for it)
    if (phase in ("ff_fwd", "attn_fwd") and small_gemm and flop >= GRAPHED_FWD_CUBLAS_MIN_FLOP
            and torch.cuda.is_current_stream_capturing()):
        small_gemm = False
    if phase == "ff_fwd_mixed":
        return True  # on CUDA: x*l by a pass, then a plain GEMM, which cuBLAS does best
    if phase == "ff_fwd":
        # One pass (W*l where N <= M, x*l where N > M; _feedforward_forward_cublas) and one
        # GEMM. fp32 keeps its earlier bound (N <= 2M); 16-bit from FF_FWD_CUBLAS_MIN_M at any
        # N, past SMALL_GEMM_FLOP (timings at FF_FWD_CUBLAS_MIN_M).
        if dtype == torch.float32:
            return N <= 2 * M
        return M >= FF_FWD_CUBLAS_MIN_M and (not small_gemm or K >= FF_FWD_EAGER_CUBLAS_MIN_K)
    if phase == "attn_bwd":
        small_scratch = M * N * dtype.itemsize <= SMALL_SCRATCH_BYTES
        chunked = (M >= ATTN_BWD_CHUNKS * ATTN_BWD_MIN_CHUNK_ROWS
                   and 2 * M * N * K >= ATTN_BWD_CHUNKED_MIN_FLOP)
        if dtype == torch.float32:
            return small_scratch or chunked
        if M <= ATTN_BWD_FUSED_MAX_M:
            if N <= ATTN_BWD_FUSED_MAX_N:
                return False
            if M >= ATTN_BWD_WIDE_CUBLAS_MIN_M:
                return M * N * dtype.itemsize <= ATTN_BWD_WIDE_SCRATCH_BYTES
            return small_scratch or M * N * dtype.itemsize <= _attn_bwd_fused_workspace(
                M, N, K, dtype, device)
        return chunked  # beyond M = 64 a dy*l that fits the small scratch is a small GEMM's
    if dtype == torch.float32:
        # An fp32 tl.dot is either tf32 (3e-4 relative error, 10x PEFT's exact fp32 cuBLAS) or
        # ieee FMAs (far slower than cuBLAS): cuBLAS wins both ways.
        return True
    if small_gemm:
        return False
    return M >= (FF_BWD_CUBLAS_MIN_M if phase == "ff_bwd" else ATTN_FWD_CUBLAS_MIN_M)


# cuBLAS creates its handle (and cuBLASLt's) on a thread's first GEMM, which fails inside a
# CUDA graph capture (CUBLAS_STATUS_NOT_INITIALIZED from cublasCreate, and the capture is
# invalidated): a warm-up whose calls all stayed on Triton (GRAPHED_FWD_CUBLAS_MIN_FLOP routes
# only captured forwards to cuBLAS; autograd runs backwards on a thread of its own) left none.
# So each thread makes them on its first eager call here, and a capture on a thread that has
# none keeps the Triton routes. ~0.1 us a call after the first.
_blas_threads = threading.local()


def _cublas_ready(device: torch.device) -> bool:
    ready = getattr(_blas_threads, "devices", None)
    if ready is None:
        ready = _blas_threads.devices = set()
    if device.index in ready:
        return True
    if torch.cuda.is_current_stream_capturing():
        return False
    with torch.cuda.device(device):
        torch.cuda.current_blas_handle()  # the handle whose creation failed inside a capture
        a = torch.zeros((16, 16), device=device, dtype=torch.bfloat16)
        try:
            torch.addmm(a[0], a, a)  # a 1-D bias: cuBLASLt's epilogue path, its handle too
        except RuntimeError:
            # torch.use_deterministic_algorithms(True) without CUBLAS_WORKSPACE_CONFIG refuses
            # every cuBLAS GEMM (ours on the cuBLAS routes too, as any nn.Linear's): the
            # fused routes, which need no cuBLAS, must keep working there.
            pass
    if not is_fake(a):  # torch.compile's tracing ran no GEMM: the next real call does
        ready.add(device.index)
    return True


def _attn_bwd_fused_workspace(M: int, N: int, K: int, dtype: torch.dtype,
                              device: torch.device) -> int:
    """Bytes of split-K workspace the fused attention backward (dx = (dy*l) W: M x K out,
    reduced over N) would allocate. Where the cuBLAS route's dy*l scratch (M x N) is no larger,
    that route costs no more memory, so _use_cublas takes it past SMALL_SCRATCH_BYTES:
    4096->14336 at M = 9..16, whose fused kernel splits K in two (512 KiB of fp32 partials
    at M = 16 against a 448 KiB scratch) and took 151.4 us against cuBLAS's 109.5 at M = 16
    (H100, CUDA graphs, benchmarks/results/paths-small-attn-h100.md)."""
    elem = dtype.itemsize
    split_k = _matmul_config(M, K, N, elem, _sm_count(device), False, a_elem_size=elem,
                             scales_a=True)[3]
    return split_k * M * K * 4 if split_k > 1 else 0


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's matmul setting (exact unless allow_tf32); 16-bit dots ignore it."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


SPLIT_K_WORKSPACE_BYTES = 512 << 10
# Quantized weights (4-bit at M = 2..64, int8 at 17..64) may take 8 MiB and split to ~4 CTAs
# an SM: the bare bnb layer's backward builds a 16-bit copy of the whole weight (32 MiB on
# 4096x4096, 8 MiB on 4096x1024), so a larger workspace stays under its peak, and their
# dequantize-matmuls are latency-bound at small M: ncu on the H100 (2026-12-06) found the NF4
# backward at M = 16 on 4096->4096 running 128 CTAs of 4 warps (2 splits: the 512 KiB cap) at
# 1 warp a scheduler and 9% of DRAM bandwidth
# (benchmarks/results/ncu-quant-small-m-stop32-h100.log).
# Forward+backward under CUDA graphs, us, this rule against the dense one
# (tune-quant-split-stop32-h100.log): NF4 ff / attn at M = 64 on 4096->14336 169 / 227 against
# 394 / 425, on 4096->4096 60 / 79 against 103 / 113; at M = 16 on 4096->14336 109 / 119
# against 143 / 165; int8 on 4096->4096 at M = 64 44 / 58 against 53 / 76, at M = 16 28 / 36
# against 32 / 44 but its forward, which dense.py runs at M = 2..16 (decode batches), 12.9
# against 11.7: int8 keeps the dense rule to M = 16. M = 1 keeps it for both: the GEMV-shaped
# backward lost with more splits on 3 of 4 NF4 shapes (4096->4096: 26.5 against 24.2).
QUANT_SPLIT_K_WORKSPACE_BYTES = 8 << 20
QUANT_SPLIT_K_CTAS_PER_SM = 4
# LLM.int8 stores W ~= CB * SCB / 127 (a row's absmax maps to 127).
INT8_SCALE_MUL = 1.0 / 127.0
# int8 weights at M = 1 take the GEMV kernel with (BLOCK_N, BLOCK_K, num_warps, num_stages)
# = INT8_GEMV_TILE (python -m benchmarks.quant --tune).
# H100 sweep: 8x1024x3 stages was best or within 5% on the four Llama-3-8B shapes (14336->4096:
# 38.8 us; the tl.dot path, 36.6-40.2).
INT8_GEMV_TILE = (8, 1024, 4, 3)


def _matmul_config(M: int, N: int, K: int, elem_size: int, n_sm: int, interpret: bool,
                   stores_preact: bool = False, a_elem_size: Optional[int] = None,
                   scales_a: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) by M bucket. elem_size: the
    weight's bytes per element (1 picks the int8 rows); a_elem_size: the activation's (x or dy),
    when it differs; scales_a: the A tile is scaled by l inside the K-loop (the feedforward
    forward's x, the attention backward's dy), work that BLOCK_N columns share."""
    if elem_size == 1 and M == 1:
        # int8 weights at M = 1: the GEMV kernel (BLOCK_M = 1: FMAs, no tl.dot). At M = 4 and 8
        # it lost to tl.dot with M padded to 16 (H100: 63 and 113 us against ~39 on
        # 14336->4096, benchmarks/results/int8-h100-tune.log).
        bm = 1
        bn, bk, warps, stages = INT8_GEMV_TILE
        if interpret:
            bn, bk, stages = 16, 32, 1
    elif interpret:
        bm, bn, bk, warps, stages = 16, 32, 32, 4, 1
    elif elem_size == 1 and M <= 16:
        # int8 weights, tl.dot with M padded to 16 (H100 sweep, CUDA graphs, int8-h100-tune.log):
        # 64x512 tiles were best on 4096->4096 and 14336->4096 (18.7 and 39.0 us at M = 16),
        # 64x256 where N >= 8192 (4096->14336: 39.0), 32x256 where N <= 1024 (13.1).
        bm, warps = 16, 4
        bn, bk, stages = (32, 256, 4) if N <= 1024 else (64, 256, 4) if N >= 8192 else (64, 512, 3)
    elif M <= 16:
        # Bound by reading W once. Narrow column blocks (32) give enough CTAs to keep 132 SMs
        # streaming; H100 sweep (benchmarks/tune_small_m.py, CUDA graphs): 32x256x4 stages is
        # within 1-3% of the bare layer from 4096->1024 to 14336->4096, and 32x512x3 stages
        # gains another 3-6% where N >= 8192 or N <= 1024 (4096->14336: 57.7 us vs 61+).
        if N >= 8192 or N <= 1024:
            bm, bn, bk, warps, stages = 16, 32, 512, 4, 3
        else:
            bm, bn, bk, warps, stages = 16, 32, 256, 4, 4
    elif M <= 64 and elem_size == 2:
        # 16-bit weights, 16 < M <= 64. One 64x64 tile row gave 64 CTAs on 4096 columns and no
        # split-K (its fp32 workspace, 1 MiB at M = 64, passes SPLIT_K_WORKSPACE_BYTES): half
        # the SMs idle while W streams. H100 sweep at M = 64, CUDA graphs
        # (benchmarks/results/tune-small-m64-stop29-h100.log; us, 64x64x128 -> this row, bare):
        # feedforward forward 4096->4096 52.3 -> 24.0 (22.2), 14336->4096 154.6 -> 63.6 (56.4),
        # 768->768 13.5 -> 8.5 (8.3); attention forward 26.6 -> 23.7 (22.6). 32x32x256 was best
        # or within 5% everywhere but the widest GEMMs (N >= 8192: 4096->14336), where 64x128x64
        # already fills the GPU (ff forward 58.8 against 67.0, bare 56.2). Shipped, feedforward
        # fwd+bwd at M = 64: 4096->4096 71.3 -> 47.5 us, 14336->4096 203.6 -> 107.0 (bare 36.2,
        # 97.3; tune-attn-bwd-after-tiles-stop29-h100.log).
        if N >= 8192:
            bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
        else:
            bm, bn, bk, warps, stages = 32, 32, 256, 4, 4
    elif M <= 64:
        bm, bn, bk, warps, stages = 64, 64, 128, 4, 4
    elif M > 256 and not stores_preact and cdiv(M, 128) * cdiv(N, 256) >= n_sm:
        # 128x256 tiles past M = 256 where they still fill the GPU. H100 sweep, fused strategy,
        # CUDA graphs (benchmarks/results/tune-large-m-h100.log): the feedforward forward (x
        # scaled in the K-loop) on 4096->4096 at M = 8192 takes 445 us against 703 with 128x128
        # (bare 356), forward+backward 1033 against 1412; 4096->1024 at M = 8192 324 against
        # 419. The attention forward, which stores u and y, and grids under one wave keep
        # 128x128 (or the row below up to M = 512).
        bm, bn, bk, warps, stages = 128, 256, 64, 8, 3
    elif M <= 512 and elem_size == 2:
        # 16-bit weights, 64 < M <= 512: the GEMMs the fused kernel keeps here are those under
        # SMALL_GEMM_FLOP and the attention backward's dx. 64x128 tiles gave 64 CTAs or fewer
        # on 4096 columns at M = 128 (16 on 1024), the 128x128 row 24 on T5's 768 at M = 512.
        # H100, CUDA graphs, forward, us (sweep: tune-small-m-mid-stop30-h100.log; shipped
        # rows checked in check-mid-m-stop30-h100.log; table before -> this row, bare):
        # - N <= 1024 up to M = 256, 32x32x256: 4096->1024 feedforward 33.2 -> 16.2 (13.2) at
        #   M = 128 and 33.2 -> 23.0 (14.3) at M = 256, attention 28.4 -> 16.4 (13.1);
        # - where 64x128 tiles would not fill half the SMs, 64x64x128, but only where the A
        #   tile is not scaled: attention forward 4096->4096 at M = 128 36.5 -> 27.1 (23.5),
        #   14336->4096 94.6 -> 65.3 (56.8), 4096->1024 at M = 512 40.0 -> 19.3 (15.6). With x
        #   scaled in the K-loop (feedforward) half as many columns share that work: 4096->4096
        #   37.8 -> 52.7 and 14336->4096 105.9 -> 155.8 at M = 128, so those keep 64x128x64
        #   (sm_90 SASS, Triton 3.6, a K step of the same 524288 MACs: 504 loop instructions
        #   at 64x64x128 against 317 at 64x128x64 with A scaled, 246 against 172 without;
        #   benchmarks/results/sass-mid-m-attn-bwd-stop30.log);
        # - else 64x128x64, also from M = 257 in place of 128x128: 4096->4096 feedforward at
        #   M = 512 52.1 -> 45.6, attention 48.0 -> 41.5.
        # Split-K was faster still where CTAs were few (4096->4096 at M = 128, feedforward: 30.2
        # with 4 splits), but its fp32 workspace (splits x M x N, 8 MiB there) would outgrow x
        # and raise the training step's peak.
        if N <= 1024 and M <= 256:
            bm, bn, bk, warps, stages = 32, 32, 256, 4, 4
        elif not scales_a and cdiv(M, 64) * cdiv(N, 128) * 2 <= n_sm:
            bm, bn, bk, warps, stages = 64, 64, 128, 4, 4
        else:
            bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
    elif M <= 256:
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if 4 in (elem_size, a_elem_size) and bm > 1 and not interpret:
        # fp32 tiles are twice the bytes: stay inside 227 KB smem. The activation counts too:
        # int8's 64x64x128 4-stage tile with an fp32 dy asked for 263,680 bytes (GPU fuzz test).
        bk, stages = 32, min(stages, 3)
    return bm, bn, bk, split_k_for(M, N, K, bm, bn, bk, elem_size, n_sm, interpret), warps, stages


def split_k_for(M, N, K, bm, bn, bk, elem_size, n_sm, interpret=False,
                four_bit=False) -> int:
    """How many ways to split the K-loop for a BLOCK_M x BLOCK_N x BLOCK_K tiling. elem_size 1:
    a quantized weight (int8, or 4-bit: fourbit.py passes 1 and four_bit)."""
    # int8 forwards at M = 2..16 run this kernel (4-bit ones small_m.py's), which the wider
    # split made slower (above), so int8 takes the quantized rule from M = 17 only.
    quantized = elem_size == 1 and (M > 16 or (four_bit and M > 1))
    ctas_per_sm = QUANT_SPLIT_K_CTAS_PER_SM if quantized else 2
    workspace_cap = QUANT_SPLIT_K_WORKSPACE_BYTES if quantized else SPLIT_K_WORKSPACE_BYTES
    tiles = cdiv(M, bm) * cdiv(N, bn)
    if tiles >= ctas_per_sm * n_sm or M > 64 or (not interpret and N * K * elem_size < 2 << 20):
        return 1
    # Too few output tiles to keep every SM streaming W: split K, at least 2 BLOCK_K a split.
    # Only at small M and for weights of 2 MB or more (below that the launch, not the
    # bandwidth, is the cost), with the fp32 workspace (splits x M x N) capped so the training
    # step's peak stays the bare layer's.
    return max(1, min(cdiv(ctas_per_sm * n_sm, tiles), K // (2 * bk), 16,
                      workspace_cap // max(1, 4 * M * N)))


def _quant4_args(quant4):
    """The kernels' 4-bit pointers (code, code2, absmax2, offset) and constexprs (blocksize,
    nested, blocksize2); None/neutral when the weight is not 4-bit."""
    if quant4 is None:
        return (None, None, None, None), (64, False, 256)
    return ((quant4.code, quant4.code2, quant4.absmax2, quant4.offset),
            (quant4.blocksize, quant4.nested, quant4.blocksize2))


def _launch_matmul(a, b_strides, b, out_shape, out_dtype, *, traceable, scale_a=None, scale_c=None,
                   bias=None, aux=None, store_preact=False, reduce_aux=False, store_c=True,
                   a_aux=None, sum_dtype=torch.float32, w_scale=None, w_scale_axis=0,
                   quant4=None, w_4bit=0, tiles=None, scale_index=None, finish_like=None):
    """C = epilogue(prologue(a) @ B) where B[k, n] = b[k*b_strides[0] + n*b_strides[1]].
    An int8 b is dequantized in registers with w_scale / 127 along GEMM axis w_scale_axis
    (1 = N, 2 = K; see the kernel's W_SCALE_AXIS). A 4-bit weight comes as `quant4` (b its
    packed bytes), read as W^T (w_4bit = 1, forward) or W (2, dx = dy W); its caller picks
    the tiles: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, aligned).
    scale_index: a mixed-adapter batch (see mixed.py): scale_a / scale_c are (adapters, K or N)
    tables and each of the scale_index.numel() examples owns M / numel consecutive rows.

    Returns (c, preact, partial, a_sums): partial (row blocks, N) sums of u*aux, and a_sums
    the column sums of a*a_aux (a before scale_a), or None. partial is fp32, or `sum_dtype`
    where one row block makes it final (no cast launch afterwards).
    finish_like: a tensor of N (reduce_aux) or K (a_aux, where it is required) elements; the
    sums then come back final, summed over row blocks in the kernel, shaped and typed like it
    (the caller's dl).
    """
    M, K = a.shape
    N = out_shape[1]
    device = a.device
    if a_aux is not None and (finish_like is None or reduce_aux):
        raise ValueError("_launch_matmul: a_aux's sums need finish_like and no reduce_aux")
    c = torch.empty(out_shape, device=device, dtype=out_dtype) if store_c else None
    preact = torch.empty((M, N), device=device, dtype=out_dtype) if store_preact else None
    q_ptrs, (q_blocksize, q_nested, q_blocksize2) = _quant4_args(quant4)
    if quant4 is not None:
        w_scale = quant4.absmax
    plan_key = None
    if _PLANS_ENABLED and not traceable and device.type == "cuda":
        plan_key = _plan_key(a, b, b_strides, out_shape, out_dtype, scale_a, scale_c, bias, aux,
                             store_preact, reduce_aux, store_c, a_aux, sum_dtype, w_scale,
                             w_scale_axis, quant4, w_4bit, tiles, scale_index, finish_like)
        tiles = _MATMUL_PLANS.extra(plan_key) or tiles
    if tiles is None:
        bm, bn, bk, split_k, warps, stages = _matmul_config(
            M, N, K, b.element_size(), _sm_count(device), config.triton_interpreted(),
            store_preact, a.element_size(), scale_a is not None)
        aligned = False
    else:
        bm, bn, bk, split_k, warps, stages, aligned = tiles
    num_pid_m = cdiv(M, bm)
    num_pid_n = cdiv(N, bn)
    tiles = num_pid_m * num_pid_n
    partial_dtype = sum_dtype if num_pid_m == 1 else torch.float32
    final = (torch.empty_like(finish_like)
             if (reduce_aux or a_aux is not None) and finish_like is not None else None)
    finish = reduce_aux and final is not None and num_pid_m > 1
    partial = None
    if reduce_aux:
        # One row block: the kernel writes its row straight into final, the sums' last home.
        partial = (final if final is not None and num_pid_m == 1
                   else torch.empty((num_pid_m, N), device=device, dtype=partial_dtype))
    aux_block_m, aux_block_k = _a_aux_blocks(M, bm, bk)
    workspace = counters = None
    finish_base = tiles if split_k > 1 else 0
    if split_k > 1:
        workspace = torch.empty((split_k, M, N), device=device, dtype=torch.float32)
    if split_k > 1 or finish:
        counters = _split_k_counters(finish_base + (num_pid_n if finish else 0), device,
                                     traceable)

    final_arg = final if finish or a_aux is not None else None

    def arguments():
        return _matmul_launch_args(
            a, b, b_strides, c, scale_a, scale_c, bias, aux, preact, partial, a_aux,
            workspace, counters, w_scale, q_ptrs, scale_index, final_arg, M, N, K, finish_base,
            store_c, store_preact, reduce_aux, finish, split_k, w_scale_axis,
            quant4, w_4bit, q_blocksize, q_nested, q_blocksize2, aligned, bm, bn, bk, warps,
            stages, aux_block_m, aux_block_k)

    grid = (tiles + (cdiv(K, aux_block_k) if a_aux is not None else 0), split_k)
    if plan_key is None:  # traced, CPU, unaligned or plans off: the full launch
        args, kwargs = arguments()
        _KERNELS[traceable][0][grid](*args, **kwargs)
    else:
        _MATMUL_PLANS.launch(
            plan_key, grid, (a, b, c, scale_a, scale_c, bias, aux, preact, partial, a_aux,
                             workspace, counters, w_scale, *q_ptrs, scale_index, final_arg),
            arguments, extra=(bm, bn, bk, split_k, warps, stages, aligned))
    if reduce_aux and final is not None:  # the sums come back final, shaped like finish_like
        partial = final
    return c, preact, partial, final if a_aux is not None else None


def _a_aux_blocks(M: int, bm: int, bk: int) -> tuple:
    """(rows, columns) a dl program sums per step (REDUCE_A_AUX). Up to M = 64 the GEMM's own
    BLOCK_M x BLOCK_K (timed there: tune-attn-gemv-e2e-stop27-h100.log). Past it 128 x 32, so
    that columns spread over more programs with fewer serial steps each: with the GEMM's
    32 x 256 on T5-base 768->768 at M = 256 three programs took 8 steps each and the attention
    fwd+bwd 31.0 us against 21.2 with dl in the K-loop (H100, CUDA graphs,
    tune-attn-bwd-mid-stop31-h100.log)."""
    if M <= 64:
        return bm, bk
    return 128, 32


def _matmul_launch_args(a, b, b_strides, c, scale_a, scale_c, bias, aux, preact, partial, a_aux,
                        workspace, counters, w_scale, q_ptrs, scale_index, final, M, N, K,
                        finish_base, store_c, store_preact, reduce_aux, finish, split_k,
                        w_scale_axis, quant4, w_4bit, q_blocksize, q_nested, q_blocksize2,
                        aligned, bm, bn, bk, warps, stages, aux_block_m, aux_block_k):
    """_ia3_matmul_kernel's (args, kwargs) for _launch_matmul."""
    aux_strides = aux.stride() if aux is not None else (0, 0)
    a_aux_strides = a_aux.stride() if a_aux is not None else (0, 0)
    # Pointers a configuration does not use are None: the constexpr flags keep them untouched.
    return (
        a, b, c, scale_a, scale_c, bias, aux, preact, partial, a_aux, workspace,
        counters, w_scale, *q_ptrs, scale_index, final, M, N, K,
        mixed.rows_per_example(scale_index, M), finish_base,
        a.stride(0), a.stride(1), b_strides[0], b_strides[1],
        c.stride(0) if store_c else 0, c.stride(1) if store_c else 0,
        aux_strides[0], aux_strides[1], a_aux_strides[0], a_aux_strides[1],
    ), dict(
        SCALE_A=scale_a is not None, REDUCE_A_AUX=a_aux is not None, HAS_BIAS=bias is not None,
        REDUCE_AUX=reduce_aux, FINISH=finish, STORE_PREACT=store_preact,
        SCALE_C=scale_c is not None,
        SCALE_GATHER=scale_index is not None, STORE_C=store_c, SPLIT_K=split_k,
        DOT_PRECISION=_dot_precision(b.dtype if w_scale is None and quant4 is None else a.dtype),
        W_SCALE_AXIS=w_scale_axis if w_scale is not None and quant4 is None else 0,
        W_SCALE_MUL=INT8_SCALE_MUL, W_4BIT=w_4bit if quant4 is not None else 0,
        Q_BLOCKSIZE=q_blocksize, Q_NESTED=q_nested, Q_BLOCKSIZE2=q_blocksize2, Q_ALIGNED=aligned,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        AUX_BLOCK_M=aux_block_m, AUX_BLOCK_K=aux_block_k,
        num_warps=warps, num_stages=stages,
    )


# Eager launches of _ia3_matmul_kernel replay a launch plan (launch.FastKernel.plan) kept per
# call signature: the tile choice, the kernel's keyword arguments and FastKernel's binding
# and key are computed once per signature instead of on every call. Host time on the H100 host
# under cProfile (benchmarks/results/host-spin-profile-h100.log, T5 768->768 backward):
# _launch_matmul's own Python 26 us, FastKernel's launch + bind + device query ~38 us, a call.
# The plan keeps the tiles chosen for its signature (PlanCache's extra).
_PLANS_ENABLED = True
# Every tensor parameter of _ia3_matmul_kernel, in signature order: a plan's runtime values.
_MATMUL_PLANS = PlanCache(
    _KERNELS[False][0],
    ("a_ptr", "b_ptr", "c_ptr", "scale_a_ptr", "scale_c_ptr", "bias_ptr", "aux_ptr",
     "preact_ptr", "partial_ptr", "a_aux_ptr", "workspace_ptr", "counter_ptr",
     "w_scale_ptr", "q_code_ptr", "q_code2_ptr", "q_absmax2_ptr", "q_offset_ptr",
     "scale_index_ptr", "final_ptr"),
    max_entries=4096)


def _dtype_and_strides(t):
    return None if t is None else (t.dtype, t.stride())


def _plan_key(a, b, b_strides, out_shape, out_dtype, scale_a, scale_c, bias, aux, store_preact,
              reduce_aux, store_c, a_aux, sum_dtype, w_scale, w_scale_axis, quant4, w_4bit,
              tiles, scale_index, finish_like):
    """Everything a launch of _launch_matmul depends on besides the tensors' data: shapes,
    strides and dtypes of every operand, the flags, the caller's tiles; None (no plan) when an
    operand is not 16-byte aligned (Triton specialises pointers on it; outputs are fresh
    allocations, always aligned)."""
    q_tensors = () if quant4 is None else (quant4.code, quant4.code2, quant4.absmax2,
                                           quant4.offset)
    if not aligned_16((a, b, scale_a, scale_c, bias, aux, a_aux, w_scale, scale_index)
                      + q_tensors):
        return None
    described = _dtype_and_strides
    return (a.shape, a.stride(), a.dtype, b.dtype, b_strides, out_shape, out_dtype,
            described(scale_a), described(scale_c), described(bias), described(aux),
            store_preact, reduce_aux, store_c, described(a_aux), sum_dtype, described(w_scale),
            w_scale_axis, w_4bit, tiles, None if scale_index is None else
            (scale_index.numel(), scale_index.dtype),
            None if finish_like is None else (finish_like.shape, finish_like.dtype),
            None if quant4 is None else (quant4.blocksize, quant4.nested, quant4.blocksize2,
                                         tuple(t.dtype for t in q_tensors if t is not None)),
            # fp32 dots follow torch's allow_tf32 switch, which may change between calls
            _dot_precision(b.dtype if w_scale is None and quant4 is None else a.dtype),
            a.device.index)


# Split-K tile counters kept per (device, stream): the kernel leaves them at zero, so eager
# launches skip a memset (a launch of its own: ~20 us of host time on the H100 host, ~2 us of
# GPU time in a CUDA graph). Per stream, because kernels on one stream never overlap.
# Traced calls (torch.compile) allocate zeros instead: a buffer shared across calls is state
# that a functional graph must not have.
_counter_buffers: dict = {}
# Launches captured in a CUDA graph must not get a buffer allocated inside the capture: its
# zeroing is a node of that graph, run only when that graph replays, so a second graph captured
# on the same stream (a server capturing one graph per batch size) that replays first would
# read uninitialised counters. Captures take this buffer, zeroed by an eager call before the
# capture began (the usual warm-up), or, where there is none, a fresh zeroed one per launch.
# Graphs share it (one per device), as graphs captured on one stream (torch.cuda.graph's own)
# shared theirs before: graphs that contain split-K launches must not replay concurrently.
_capture_counters: dict = {}
# Buffers a captured graph may still point at are never freed when a larger one replaces them.
_retired_counters: list = []


def _split_k_counters(tiles: int, device: torch.device, traceable: bool) -> torch.Tensor:
    if traceable or device.type != "cuda":
        return torch.zeros((tiles,), device=device, dtype=torch.int32)
    key = (device.index, current_stream_handle(device.index))
    buf = _counter_buffers.get(key)
    if buf is not None and buf.numel() >= tiles:
        return buf
    # First call on this stream (or more tiles): only now is the capture query paid for.
    spare = _capture_counters.get(device.index)
    if torch.cuda.is_current_stream_capturing():
        if spare is None or spare.numel() < tiles:
            return torch.zeros((tiles,), device=device, dtype=torch.int32)
        return _replace_counters(_counter_buffers, key, spare)
    size = max(tiles, 1024)
    if spare is None or spare.numel() < size:
        _replace_counters(_capture_counters, device.index,
                          torch.zeros((size,), device=device, dtype=torch.int32))
    return _replace_counters(_counter_buffers, key,
                             torch.zeros((size,), device=device, dtype=torch.int32))


def _replace_counters(store: dict, key, buf: torch.Tensor) -> torch.Tensor:
    """store[key] = buf, the buffer it replaces kept alive (_retired_counters)."""
    old = store.get(key)
    if old is not None:
        _retired_counters.append(old)
    store[key] = buf
    return buf


def _launch_scale_reduce(src, *, traceable, scale=None, scale_axis=1, out=None, aux=None,
                         sum_dtype=torch.float32, row_scale=None, quant4=None, batched=None,
                         scale_index=None, tiles=None):
    """out = src * scale (along columns if scale_axis == 1, rows if 0) and/or
    partial = per-row-block sums of src * aux (fp32, or sum_dtype where there is one block).
    row_scale: src is an int8 weight, dequantized as src * row_scale[row] / 127 first.
    quant4: src is the packed bytes of that 4-bit weight, dequantized to (out, in) first.
    batched: ((B, R, C), src strides, out strides, aux strides), each stride triple (batch, row,
    column): the tensors are read as B matrices of R x C through these strides (a convolution's
    activations, without a view op per tensor: ~10 us of host time each); partial then holds B
    row blocks per program row, summed in a fixed order. Tiles run long along the row axis
    where its stride is 1 (NCHW).
    scale_index: a mixed-adapter batch (scale_axis 1): scale is an (adapters, C) table and the
    B*R rows, in order, belong to scale_index.numel() examples of equal row counts.
    tiles: (BLOCK_R, BLOCK_C, CTAs per SM, num_warps) in place of the defaults below (tuning).
    Returns (out, partial)."""
    rows_contiguous = False
    if batched is not None:
        (B, R, C), src_strides, out_strides, aux_strides = batched
        rows_contiguous = src_strides[1] == 1
    elif quant4 is not None:
        B, R, C = 1, quant4.out_features, quant4.in_features
    else:
        B, (R, C) = 1, src.shape
    device = src.device
    if config.triton_interpreted():
        block_r, block_c = (16, 32)
    else:
        # 128 contiguous bf16 elements (256 bytes) a tile row along the contiguous axis.
        block_r, block_c = (128, 16) if rows_contiguous else (32, 128)
    ctas_per_sm, num_warps = 8, 4
    if batched is not None and not config.triton_interpreted():
        # Convolution activations (benchmarks/results/tune-channel-pass-h100.log, H100, a
        # read-only sum over two bf16 activations): channels_last 64 x 64 tiles reach 1.72 TB/s
        # at 64 channels where 32 x 128 (half masked) reached 1.22; NCHW runs 16 CTAs an SM of 8
        # warps (1.78 vs 1.66 TB/s at 49 MiB).
        if rows_contiguous:
            ctas_per_sm, num_warps = 16, 8
        else:
            block_r, block_c = 64, (128 if C >= 256 else 64)
    if tiles is not None:
        block_r, block_c, ctas_per_sm, num_warps = tiles
    aligned = quant4 is not None and C % quant4.blocksize == 0
    if aligned:
        block_c = min(block_c, quant4.blocksize)  # a tile row inside one quantization block
    col_programs = cdiv(C, block_c)
    # Rows split over enough programs for ~8 CTAs an SM (a bandwidth-bound pass needs many
    # loads in flight); with a reduction each program writes one fp32 partial row.
    row_programs = max(1, min(cdiv(R, block_r),
                              (ctas_per_sm * _sm_count(device)) // (col_programs * B)))
    rows_per_program = cdiv(cdiv(max(R, 1), row_programs), block_r) * block_r
    row_programs = cdiv(max(R, 1), rows_per_program)
    partial = (torch.empty((B * row_programs, C), device=device,
                           dtype=sum_dtype if B * row_programs == 1 else torch.float32)
               if aux is not None else None)
    if batched is None:
        out_strides = (0, *out.stride()) if out is not None else (0, 0, 0)
        aux_strides = (0, *aux.stride()) if aux is not None else (0, 0, 0)
        src_strides = (0, *src.stride()) if quant4 is None else (0, 0, 0)
    grid = (row_programs, col_programs, B)
    q_ptrs, (q_blocksize, q_nested, q_blocksize2) = _quant4_args(quant4)
    _KERNELS[traceable][1][grid](
        src, scale, out, aux, partial, row_scale if quant4 is None else quant4.absmax, *q_ptrs,
        scale_index, R, C, rows_per_program,
        mixed.rows_per_example(scale_index, B * R),
        src_strides[1], src_strides[2], out_strides[1], out_strides[2], aux_strides[1], aux_strides[2],
        src_strides[0], out_strides[0], aux_strides[0],
        SCALE_AXIS=scale_axis if scale is not None else -1, SCALE_GATHER=scale_index is not None,
        STORE_OUT=out is not None,
        REDUCE_AUX=aux is not None, ROW_SCALE=row_scale is not None, ROW_SCALE_MUL=INT8_SCALE_MUL,
        SRC_4BIT=quant4 is not None, Q_BLOCKSIZE=q_blocksize, Q_NESTED=q_nested,
        Q_BLOCKSIZE2=q_blocksize2, Q_ALIGNED=aligned,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return out, partial


def _feedforward_forward_cublas(x, weight, bias, scale, fan_in_fan_out, traceable,
                                scale_index=None):
    """y = (x*l) W^T + b by cuBLAS, l folded by one pass over the smaller operand: W diag(l)
    (N x K) where N <= M, x*l (M x K, rounded as PEFT's x*l) where N > M or where l differs
    per example (a mixed-adapter batch: scale_index, scale a table). Each pass costs about
    467/M (W) or 467/N (x) of the GEMM on an H100 (3 TB/s against ~700 TFLOP/s), and its
    scratch is never larger than x, so the forward never peaks above the backward's dx.
    (Before, N > M took W*l in column chunks of <= M features, a pass and a GEMM each: 7 chunks
    on 4096->14336 at M = 2048 measured 1.0 ms against 0.66 for the fused kernel.)"""
    M, K = x.shape
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    if N > M or scale_index is not None:
        # From x as given (an fp32 x under autocast is scaled in fp32, then rounded once, as
        # PEFT's x*l followed by autocast's cast).
        xs = torch.empty((M, K), device=x.device, dtype=weight.dtype)
        _launch_scale_reduce(x, scale=scale, scale_axis=1, out=xs, scale_index=scale_index,
                             traceable=traceable)
        return _cublas_linear(xs, weight if fan_in_fan_out else weight.t(), bias)
    w_scaled = _scaled_weight(weight, scale, True, fan_in_fan_out, traceable)
    return _cublas_linear(x.to(weight.dtype), w_scaled if fan_in_fan_out else w_scaled.t(), bias)


def _gemm_into(out_view, a, b, bias, traceable):
    """out_view = a @ b (+ bias). Eager: cuBLAS writes into the view (a row or column slice,
    BLAS-compatible strides, no copy). Traced: AOTAutograd mis-functionalizes mm's out= on a
    column slice (opcheck: eager and traced outputs differ), so compute then copy_ (a
    chunk-sized temporary, what functionalization handles)."""
    if traceable:
        out_view.copy_(_cublas_linear(a, b, bias))
    elif bias is None:
        torch.mm(a, b, out=out_view)
    else:
        torch.addmm(bias, a, b, out=out_view)


def _scaled_weight(weight, scale, scale_in_features: bool, fan_in_fan_out: bool, traceable: bool):
    """A fresh copy of the stored weight with l folded in: feedforward W diag(l) (l along
    in-features), attention diag(l) W (l along out-features). Keeps the stored layout."""
    out = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    # Stored (out, in) unless fan_in_fan_out: in-features are columns there, rows here.
    axis = 1 if (scale_in_features != fan_in_fan_out) else 0
    _launch_scale_reduce(weight, scale=scale, scale_axis=axis, out=out, traceable=traceable)
    return out


def _weight_as_kn(weight, fan_in_fan_out):
    """Strides of B[k, n] = W[n, k] (W as (out, in)) over the stored weight."""
    s0, s1 = weight.stride()
    return (s0, s1) if fan_in_fan_out else (s1, s0)


def _weight_as_nk(weight, fan_in_fan_out):
    """Strides of B[n, k] = W[n, k] over the stored weight (for dx = dy @ W)."""
    s0, s1 = weight.stride()
    return (s1, s0) if fan_in_fan_out else (s0, s1)


def _cublas_linear(x, w_kn, bias):
    """x @ w_kn (+ bias in cuBLAS's epilogue); w_kn may be a transposed view, no copy."""
    return torch.matmul(x, w_kn) if bias is None else torch.addmm(bias, x, w_kn)


def _feedforward_grads_from_g(g, x, scale, need_dx, need_dscale, traceable):
    """Feedforward backward beside a cuBLAS g = dy W (M x K): one pass scales g by l in place
    (it becomes dx) and reduces dl's partial sums of g*x. Returns (dx or None, partial)."""
    _, partial = _launch_scale_reduce(g, scale=scale, scale_axis=1, out=g if need_dx else None,
                                      aux=x if need_dscale else None, sum_dtype=scale.dtype,
                                      traceable=traceable)
    return (g if need_dx else None), partial


def _reduce_partials(partial, like):
    """Per-block partial sums -> a gradient shaped and typed like `like` (fixed order). One
    block is already final, in like's dtype (the kernels were given it as sum_dtype); sums a
    kernel finished itself (_launch_matmul's finish_like) come shaped like `like`: as they are."""
    if partial.shape == like.shape and partial.dtype == like.dtype:
        return partial
    total = partial[0] if partial.shape[0] == 1 else partial.sum(0)
    return total.to(like.dtype).view(like.shape)  # .to is free where the dtype already is


# The cuBLAS attention backward needs dy*l as a GEMM operand. Built for all M rows at once it
# would be a second M x N tensor beside the saved u; in 8 row chunks it is an eighth of one, and
# each chunk's GEMM (>= 512 rows) still runs at cuBLAS's large-M efficiency.
ATTN_BWD_CHUNKS = 8
ATTN_BWD_MIN_CHUNK_ROWS = 512


def _attention_backward_cublas(dy, weight, scale, preact, fan_in_fan_out, need_dx, need_dscale,
                               traceable, row_index=None):
    """dx = (dy*l) W by cuBLAS over row chunks; the pass that forms each chunk of dy*l also
    reduces its rows of dy*u. Returns (dx, partial sums of dy*u for _reduce_partials): one
    chunk's row blocks as they are, or several chunks' sums added in chunk order (deterministic)
    as one fp32 row, so that only one chunk's partial rows are alive at a time.
    row_index: a mixed-adapter batch's table row per row of dy (mixed.row_index); its dl is
    mixed.py's, so need_dscale is False then."""
    M, N = dy.shape
    w_nk = weight.t() if fan_in_fan_out else weight
    dx = torch.empty((M, w_nk.shape[1]), device=dy.device, dtype=weight.dtype) if need_dx else None
    rows = M
    if need_dx and M * N * dy.element_size() > SMALL_SCRATCH_BYTES:
        # (never more rows than M: a forced cuBLAS path below 512 rows gets one M-row chunk)
        rows = min(M, max(ATTN_BWD_MIN_CHUNK_ROWS, cdiv(M, ATTN_BWD_CHUNKS)))
    total = None
    # One scratch buffer serves every chunk (the stream orders each chunk's pass after the
    # previous chunk's GEMM has read it).
    scratch = torch.empty((rows, N), device=dy.device, dtype=dy.dtype) if need_dx else None
    for start in range(0, M, rows):
        stop = min(M, start + rows)
        dyl = scratch[: stop - start] if need_dx else None
        _, partial = _launch_scale_reduce(
            dy[start:stop], scale=scale, scale_axis=1, out=dyl,
            aux=preact[start:stop] if need_dscale else None,
            sum_dtype=scale.dtype if rows == M else torch.float32, traceable=traceable,
            scale_index=None if row_index is None else row_index[start:stop])
        if need_dx:
            _gemm_into(dx[start:stop], dyl, w_nk, None, traceable)
        if need_dscale:
            if rows == M:
                return dx, partial  # one chunk: its partial rows are what the caller sums
            chunk_sum = partial.sum(0)
            total = chunk_sum if total is None else total + chunk_sum
    return dx, (None if total is None else total[None])


def dense_forward_impl(x, weight, bias, scale, feedforward: bool, fan_in_fan_out: bool,
                       save_preact: bool, traceable: bool = False, scale_index=None):
    """x: (M, K) with any strides; weight (N, K) or (K, N) if fan_in_fan_out; scale (K,) or (N,).
    scale: a contiguous tensor of K (feedforward) or N (attention) elements, any shape; or, with
    scale_index (B,), an (adapters, K or N) table of which example b (rows b*M/B onwards) takes
    row scale_index[b] (mixed.py).
    Returns (y, u): u is x W^T + b for attention layers when save_preact, else None."""
    M, K = x.shape
    N = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    out_dtype = weight.dtype
    if M == 0:
        empty = x.new_empty((0, N), dtype=out_dtype)
        return empty, (x.new_empty((0, N), dtype=out_dtype) if save_preact else None)
    if _use_aten(M, N, K, weight.dtype, x.device, traceable, scale_index):
        return _aten_forward(x, weight, bias, scale, feedforward, fan_in_fan_out, save_preact)
    if feedforward:
        if scale_index is not None and _use_cublas("ff_fwd_mixed", M, N, K, weight.dtype,
                                                   x.device):
            # W diag(l) differs per example: a pass scales x instead (an M x K scratch, the
            # size of the input) and the GEMM is a plain one, cuBLAS's. H100, CUDA graphs,
            # 14336->4096 at M = 64: 104 us with the table gathered in the fused kernel's K-loop
            # against ~60 for pass + cuBLAS (benchmarks/results/mixed-h100.md).
            return _feedforward_forward_cublas(x, weight, bias, scale, fan_in_fan_out, traceable,
                                               scale_index), None
        if (scale_index is None and _use_tma("ff_fwd", M, N, K, weight.dtype, x.device, traceable)
                and tma_gemm.eligible(x, weight, N)):  # forced only: see TMA_MIN_M
            return tma_gemm.launch_tma_gemm(x, weight, fan_in_fan_out, N, scale_a=scale,
                                            bias=bias, tiles=_tma_tiles(N, False))[0], None
        # l folded into W (N <= M) or x (N > M) by a pass: a scratch no larger than x, so the
        # forward never peaks above the backward's dx.
        if scale_index is None and _use_cublas("ff_fwd", M, N, K, weight.dtype, x.device):
            return _feedforward_forward_cublas(x, weight, bias, scale, fan_in_fan_out,
                                               traceable), None
        y, _, _, _ = _launch_matmul(x, _weight_as_kn(weight, fan_in_fan_out), weight, (M, N), out_dtype,
                                 scale_a=scale, bias=bias, scale_index=scale_index,
                                 traceable=traceable)
        return y, None
    done = _tma_attention_forward(x, weight, fan_in_fan_out, N, bias, scale, save_preact,
                                  traceable, scale_index)
    if done is not None:
        return done
    if _use_cublas("attn_fwd", M, N, K, weight.dtype, x.device):
        u = _cublas_linear(x.to(out_dtype), weight if fan_in_fan_out else weight.t(), bias)
        y = torch.empty_like(u)
        _launch_scale_reduce(u, scale=scale, scale_axis=1, out=y, scale_index=scale_index,
                             traceable=traceable)
        return y, (u if save_preact else None)
    y, u, _, _ = _launch_matmul(x, _weight_as_kn(weight, fan_in_fan_out), weight, (M, N), out_dtype,
                             scale_c=scale, bias=bias, store_preact=save_preact,
                             scale_index=scale_index, traceable=traceable)
    return y, u


def dense_backward_impl(dy, x, weight, bias, scale, preact, feedforward: bool, fan_in_fan_out: bool,
                        need_dx: bool, need_dscale: bool, need_dbias: bool, need_dweight: bool,
                        x_dtype: torch.dtype, scale_index=None, traceable: bool = False):
    """Gradients (dx, dscale, dbias, dweight); entries not asked for are None. With scale_index
    (a mixed-adapter batch), dscale is the (adapters, F) table's gradient."""
    M, N = dy.shape
    K = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    dx = dscale = dbias = dweight = None
    if M == 0:
        if need_dx:
            dx = dy.new_zeros((0, K), dtype=x_dtype)
        if need_dscale:
            dscale = torch.zeros_like(scale)
        if need_dbias:
            dbias = dy.new_zeros((N,), dtype=weight.dtype)
        if need_dweight:
            dweight = torch.zeros_like(weight)
        return dx, dscale, dbias, dweight
    dy = dy.to(weight.dtype)
    if not feedforward and need_dscale and (preact is None or preact.numel() == 0):
        # The op was called with save_preact=False yet l's gradient is wanted (direct op users,
        # opcheck): recompute u = x W^T + b rather than fail. ia3_linear always saves u instead.
        preact = _cublas_linear(x.to(weight.dtype), weight if fan_in_fan_out else weight.t(), bias)
    if scale_index is not None:
        return _dense_backward_mixed(dy, x, weight, scale, preact, scale_index, feedforward,
                                     fan_in_fan_out, need_dx, need_dscale, need_dbias,
                                     need_dweight, x_dtype, traceable)
    aten = (need_dx or need_dscale) and _use_aten(M, N, K, weight.dtype, dy.device, traceable,
                                                  None)
    if aten:
        dx, dscale = _aten_backward(dy, x, weight, scale, preact, feedforward, fan_in_fan_out,
                                    need_dx, need_dscale)
    if feedforward:
        if (need_dx or need_dscale) and not aten:
            # g = dy W: B[n, k] = W[n, k], stored (N, K) rows unless fan_in_fan_out.
            done = _tma_feedforward_grads(dy, weight, not fan_in_fan_out, K, x, scale, need_dx,
                                          need_dscale, traceable)
            if done is not None:
                dx, partial = done
            elif _use_cublas("ff_bwd", M, N, K, weight.dtype, dy.device):
                w_nk = weight.t() if fan_in_fan_out else weight
                dx, partial = _feedforward_grads_from_g(torch.matmul(dy, w_nk), x, scale,
                                                        need_dx, need_dscale, traceable)
            else:
                dx, _, partial, _ = _launch_matmul(
                    dy, _weight_as_nk(weight, fan_in_fan_out), weight, (M, K), weight.dtype,
                    scale_c=scale, aux=x if need_dscale else None, reduce_aux=need_dscale,
                    store_c=need_dx, sum_dtype=scale.dtype, traceable=traceable,
                    finish_like=scale)
            if need_dscale:
                dscale = _reduce_partials(partial, scale)
        if need_dbias:
            dbias = dy.sum(0, dtype=torch.float32).to(weight.dtype)
        if need_dweight:
            xs = (x.to(scale.dtype) * scale.reshape(-1)).to(weight.dtype)
            dweight = dy.t().mm(xs)  # (N, K)
    else:
        if aten:
            pass  # dx and dl came from _aten_backward above
        elif (need_dx and _use_tma("attn_bwd", M, N, K, weight.dtype, dy.device, traceable)
                and tma_gemm.eligible(dy, weight, K)):
            dx, _, _ = tma_gemm.launch_tma_gemm(dy, weight, not fan_in_fan_out, K, scale_a=scale,
                                                tiles=_tma_tiles(K, False))
            if need_dscale:  # dl = sum_rows dy*u: a pass, as the fused path does at this size
                _, partial = _launch_scale_reduce(dy, aux=preact, sum_dtype=scale.dtype,
                                                  traceable=traceable)
                dscale = _reduce_partials(partial, scale)
        elif need_dx and not _use_cublas("attn_bwd", M, N, K, weight.dtype, dy.device):
            # dx = (dy*l) W with dy scaled in registers. dl = sum_rows dy*u: by the launch's
            # own row-sum programs up to ATTN_BWD_DL_IN_KERNEL_MAX_M rows, else by a pass.
            in_kernel = need_dscale and M <= ATTN_BWD_DL_IN_KERNEL_MAX_M
            dx, _, _, partial = _launch_matmul(
                dy, _weight_as_nk(weight, fan_in_fan_out), weight, (M, K), weight.dtype,
                scale_a=scale, a_aux=preact if in_kernel else None, sum_dtype=scale.dtype,
                traceable=traceable, finish_like=scale)
            if need_dscale and not in_kernel:
                _, partial = _launch_scale_reduce(dy, aux=preact, sum_dtype=scale.dtype,
                                                  traceable=traceable)
            if need_dscale:
                dscale = _reduce_partials(partial, scale)
        elif need_dx or need_dscale:
            dx, partial = _attention_backward_cublas(dy, weight, scale, preact, fan_in_fan_out,
                                                     need_dx, need_dscale, traceable)
            if need_dscale:
                dscale = _reduce_partials(partial, scale)
        if need_dbias:
            dbias = (dy.sum(0, dtype=torch.float32) * scale.reshape(-1).float()).to(weight.dtype)
        if need_dweight:
            dyl = (dy.float() * scale.reshape(-1).float()).to(weight.dtype)
            dweight = dyl.t().mm(x.to(weight.dtype))  # (N, K)
    if dweight is not None and fan_in_fan_out:
        dweight = dweight.t()
    if dx is not None and dx.dtype != x_dtype:
        dx = dx.to(x_dtype)
    return dx, dscale, dbias, dweight


def _dense_backward_mixed(dy, x, weight, scale, preact, scale_index, feedforward, fan_in_fan_out,
                          need_dx, need_dscale, need_dbias, need_dweight, x_dtype, traceable):
    """dense_backward_impl for a mixed-adapter batch (mixed.mixed_backward), dy already in the
    weight's dtype."""
    M, N = dy.shape
    K = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    w_nk = weight.t() if fan_in_fan_out else weight

    def grad_input(a, scaled):
        if not scaled:  # g = dy W
            if _use_cublas("ff_bwd", M, N, K, weight.dtype, a.device):
                return torch.matmul(a, w_nk)
            return _launch_matmul(a, _weight_as_nk(weight, fan_in_fan_out), weight, (M, K),
                                  weight.dtype, traceable=traceable)[0]
        if _use_cublas("attn_bwd", M, N, K, weight.dtype, a.device):
            return _attention_backward_cublas(a, weight, scale, None, fan_in_fan_out, True, False,
                                              traceable, mixed.row_index(scale_index, M))[0]
        return _launch_matmul(a, _weight_as_nk(weight, fan_in_fan_out), weight, (M, K),
                              weight.dtype, scale_a=scale, scale_index=scale_index,
                              traceable=traceable)[0]

    dx, dscale = (mixed.mixed_backward(dy, x, scale, preact, scale_index, feedforward, need_dx,
                                       need_dscale, grad_input, traceable)
                  if need_dx or need_dscale else (None, None))
    dbias = (mixed.mixed_bias_grad(dy, scale, scale_index, feedforward).to(weight.dtype)
             if need_dbias else None)
    dweight = None
    if need_dweight:
        rows = mixed.gathered_rows(scale, scale_index, M).float()
        if feedforward:
            dweight = dy.t().mm((x.float() * rows).to(weight.dtype))
        else:
            dweight = (dy.float() * rows).to(weight.dtype).t().mm(x.to(weight.dtype))
        if fan_in_fan_out:
            dweight = dweight.t()
    if dx is not None and dx.dtype != x_dtype:
        dx = dx.to(x_dtype)
    return dx, dscale, dbias, dweight


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile) and the eager autograd entry point; both call the impls above.
# --------------------------------------------------------------------------------------------


@triton_op("ia3_kernels::dense_linear", mutates_args=())
def _dense_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     scale: torch.Tensor, feedforward: bool, fan_in_fan_out: bool,
                     save_preact: bool, scale_index: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    y, preact = dense_forward_impl(x, weight, bias, scale, feedforward, fan_in_fan_out,
                                   save_preact, traceable=True, scale_index=scale_index)
    return y, (x.new_empty(0) if preact is None else preact)  # custom ops return tensors


@triton_op("ia3_kernels::dense_linear_backward", mutates_args=())
def _dense_linear_backward_op(
        dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        scale: torch.Tensor, preact: torch.Tensor, feedforward: bool, fan_in_fan_out: bool, need_dx: bool,
        need_dscale: bool, need_dbias: bool, need_dweight: bool,
        x_dtype: torch.dtype, scale_index: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Custom ops cannot return None: gradients not asked for come back as empty tensors.
    grads = dense_backward_impl(dy, x, weight, bias, scale, preact, feedforward, fan_in_fan_out,
                                need_dx, need_dscale, need_dbias, need_dweight, x_dtype,
                                traceable=True, scale_index=scale_index)
    return tuple(dy.new_empty(0) if g is None else g for g in grads)


def _save_for_backward(ctx, x, weight, bias, scale, preact, feedforward, fan_in_fan_out,
                       save_preact, scale_index):
    """What both entry points keep: x for the feedforward dl and for dW; u for the attention dl
    (or, when the caller did not save it, x and the bias to recompute it)."""
    kept_u = save_preact or feedforward
    keep_x = feedforward or weight.requires_grad or not kept_u
    ctx.save_for_backward(x if keep_x else None, weight, None if kept_u else bias, scale, preact,
                          scale_index)
    ctx.flags = (feedforward, fan_in_fan_out, x.dtype)


def _backward_args(ctx, dy):
    """(positional args of dense_backward_impl, wanted): `wanted` orders the input-grad flags
    as (dx, dscale, dbias, dweight) from the op's (x, weight, bias, scale, ...)."""
    x, weight, bias, scale, preact, scale_index = ctx.saved_tensors
    feedforward, fan_in_fan_out, x_dtype = ctx.flags
    need = ctx.needs_input_grad
    wanted = (need[0], need[3], need[2], need[1])
    return (dy.contiguous(), x, weight, bias, scale, preact, feedforward, fan_in_fan_out,
            *wanted, x_dtype, scale_index), wanted


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, feedforward, fan_in_fan_out, save_preact, scale_index = inputs
    _save_for_backward(ctx, x, weight, bias, scale, output[1], feedforward, fan_in_fan_out,
                       save_preact, scale_index)


def _backward(ctx, dy, _dpreact):
    args, wanted = _backward_args(ctx, dy)
    if args[1] is None:
        args = (args[0], dy.new_empty(0)) + args[2:]  # custom ops take no None tensors for x
    grads = torch.ops.ia3_kernels.dense_linear_backward(*args)
    dx, dscale, dbias, dweight = (g if w else None for g, w in zip(grads, wanted))
    return dx, dweight, dbias, dscale, None, None, None, None


torch.library.register_autograd("ia3_kernels::dense_linear", _backward, setup_context=_setup_context)


class _DenseLinearFunction(torch.autograd.Function):
    """Eager twin of the custom op: the dispatcher round-trip of a custom op costs ~10 us of
    CPU per call against ~2.5 for an autograd.Function, which is the whole budget of a small
    layer's forward at M <= 512. Same impls; u is saved as an intermediate (no second output,
    so autograd never materialises a zero M x N gradient for it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, feedforward, fan_in_fan_out, save_preact,
                scale_index):
        y, preact = dense_forward_impl(x, weight, bias, scale, feedforward, fan_in_fan_out,
                                       save_preact, scale_index=scale_index)
        _save_for_backward(ctx, x, weight, bias, scale, preact, feedforward, fan_in_fan_out,
                           save_preact, scale_index)
        return y

    @staticmethod
    def backward(ctx, dy):
        args, _ = _backward_args(ctx, dy)
        dx, dscale, dbias, dweight = dense_backward_impl(*args)
        return dx, dweight, dbias, dscale, None, None, None, None


# --------------------------------------------------------------------------------------------
# Reference and public entry point
# --------------------------------------------------------------------------------------------


def torch_ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     scale: torch.Tensor, feedforward: bool, fan_in_fan_out: bool = False,
                     adapter_index: Optional[torch.Tensor] = None):
    """Pure-PyTorch reference, PEFT's exact arithmetic (peft.tuners.ia3.layer.Linear.forward):
    feedforward `F.linear((x.to(l.dtype) * l).to(x.dtype), W, b)`, attention
    `(F.linear(x, W, b) * l).to(dtype)`. The ground truth of the tests and the CPU path.
    adapter_index: a mixed-adapter batch, scale being the (adapters, F) table (mixed.py)."""
    w = weight.t() if fan_in_fan_out else weight
    scale = mixed.gathered_scale(scale, adapter_index, x.dim())
    if feedforward:
        return F.linear((x.to(scale.dtype) * scale).to(x.dtype), w, bias)
    u = F.linear(x, w, bias)
    return (u * scale).to(u.dtype)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Caller:
    """Who raises, for error messages: the layer's description, else the op's name. The
    description is formatted only when a message is (str(), or a call where a callable is
    expected): formatted on every call, the layer's shape and active adapters cost ~3-9 us of
    Python a forward in cProfile on the development CPU (the GPU hosts run Python 2-6x slower)."""

    __slots__ = ("describe", "op")

    def __init__(self, describe, op: str = "ia3_linear"):
        self.describe = describe
        self.op = op

    def __str__(self) -> str:
        return self.describe() if self.describe is not None else self.op

    __call__ = __str__


def _check_scale_and_bias(where, scale, bias, K: int, N: int, feedforward: bool,
                          adapter_index=None, x=None) -> None:
    """The IA3 vector has in_features (feedforward) or out_features (attention) values, or a
    mixed-adapter batch's table one row of them per adapter and one index per example of x;
    the bias out_features. Shared by every op family's input checks."""
    expected = K if feedforward else N
    if adapter_index is not None:
        mixed.check_adapter_index(where, x, scale, adapter_index, expected, feedforward)
    elif scale.numel() != expected:
        kind = "feedforward (scales in_features)" if feedforward else "attention (scales out_features)"
        raise ValueError(f"{where}: a {kind} layer needs {expected} scaling values, "
                         f"got a vector of shape {tuple(scale.shape)}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"{where}: bias must have out_features={N} elements, got "
                         f"{tuple(bias.shape)}")


def _check_inputs(x, weight, bias, scale, feedforward, fan_in_fan_out, describe=None,
                  adapter_index=None):
    """Clear errors before anything launches, prefixed with describe() (the layer) if given."""
    where = _Caller(describe)
    if weight.dim() != 2:
        raise ValueError(f"{where}: weight must be 2-D, got shape {tuple(weight.shape)}")
    K, N = (weight.shape if fan_in_fan_out else weight.shape[::-1])
    if x.dim() < 1 or x.shape[-1] != K:
        layout = "(in, out) since fan_in_fan_out=True" if fan_in_fan_out else "(out, in)"
        raise ValueError(f"{where}: x's last dimension must be in_features={K} (weight "
                         f"{tuple(weight.shape)} stored {layout}), got x of shape {tuple(x.shape)}")
    _check_scale_and_bias(where, scale, bias, K, N, feedforward, adapter_index, x)
    _check_devices_and_dtypes(where, x, weight, bias, scale)


def _check_devices_and_dtypes(where, x, weight, bias, scale, stored=None) -> None:
    """One device for all, floating-point tensors; `where()` names the caller, called only on
    error. Shared by every op family's input checks. `weight` is a floating-point weight (dense,
    conv) or None; `stored` (name -> tensor or None) holds a quantized weight's tensors as
    bitsandbytes stores them, which must share the device but need not be floating point."""
    # Plain comparisons: this runs on every call and a small layer's whole budget is ~20 us.
    device = x.device
    if (scale.device != device or (weight is not None and weight.device != device)
            or (bias is not None and bias.device != device)
            or (stored is not None and any(t is not None and t.device != device
                                           for t in stored.values()))):
        devices = {"x": device, "weight": None if weight is None else weight.device,
                   "scale": scale.device, "bias": None if bias is None else bias.device}
        if weight is None:
            del devices["weight"]
        devices.update({k: None if t is None else t.device for k, t in (stored or {}).items()})
        raise ValueError(f"{where()}: all tensors must be on one device, got {devices}")
    if not (x.is_floating_point() and scale.is_floating_point()
            and (weight is None or weight.is_floating_point())
            and (bias is None or bias.is_floating_point())):
        for name, t in (("x", x), ("weight", weight), ("scale", scale), ("bias", bias)):
            if t is not None and not t.is_floating_point():
                raise TypeError(f"{where()}: {name} must be a floating-point tensor, "
                                f"got {t.dtype}")


def check_matching_dtypes(where, x, weight, bias, what: str) -> None:
    """Outside autocast x, weight and bias must share a dtype, as `what` (nn.Linear, nn.Conv)
    needs: checked before the kernels-or-reference choice, so that a float64 x on a float32
    layer gets this error naming the layer, not the reference's bare matmul error."""
    if torch.is_autocast_enabled(x.device.type):
        return
    if x.dtype != weight.dtype:
        raise TypeError(f"{where()}: x is {x.dtype} but weight is {weight.dtype}; {what} needs "
                        "them equal outside autocast")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{where()}: bias is {bias.dtype} but weight is {weight.dtype}")


def _kernel_refusal(x, weight, bias, scale) -> Optional[str]:
    """Why the kernels cannot take this call (None if they can)."""
    if weight.dtype not in _KERNEL_DTYPES:
        return f"weight dtype {weight.dtype} (kernels cover float16, bfloat16, float32)"
    if x.dtype not in _KERNEL_DTYPES:
        return f"input dtype {x.dtype} (kernels cover float16, bfloat16, float32)"
    if scale.dtype not in _KERNEL_DTYPES:
        return f"scaling vector dtype {scale.dtype} (kernels cover float16, bfloat16, float32)"
    if x.device.type != "cuda" and not config.triton_interpreted():
        return (f"backend 'triton' on a {x.device.type} tensor needs TRITON_INTERPRET=1 set before "
                "import")
    return None


def _use_kernels(x, weight, bias, scale) -> bool:
    backend = config.get_backend()
    if backend == "torch":
        return False
    if backend == "auto" and x.device.type != "cuda":
        return False  # CPU tensors run the reference by design: no warning
    reason = _kernel_refusal(x, weight, bias, scale)
    if reason is not None:
        config.fallback(reason)
        return False
    return True


def ia3_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               scale: torch.Tensor, feedforward: bool, fan_in_fan_out: bool = False, *,
               adapter_index: Optional[torch.Tensor] = None, describe=None) -> torch.Tensor:
    """(IA)^3 linear. x: (..., in_features); weight (out, in), or (in, out) with
    fan_in_fan_out=True (GPT-2's Conv1D); bias (out,) or None; scale: the product of the
    active IA3 vectors, in_features values (feedforward) or out_features (attention).

    Feedforward: `(x*l) W^T + b`; attention: `(x W^T + b) * l`. Result dtype: the weight's
    compute dtype (x's dtype without autocast), as nn.Linear. Differentiable in x, scale,
    bias and weight. `describe`: optional callable naming the caller (a layer) in error messages.

    Mixed-adapter batch: `adapter_index` (B,) int32/int64 with x (B, ..., in_features), and
    `scale` an (adapters, in or out features) table: example b scales with row adapter_index[b]
    (mixed.py); the table's gradient gives each row the sum over its own examples only.
    """
    _check_inputs(x, weight, bias, scale, feedforward, fan_in_fan_out, describe, adapter_index)
    check_matching_dtypes(_Caller(describe), x, weight, bias, "nn.Linear")
    if not _use_kernels(x, weight, bias, scale):
        return torch_ia3_linear(x, weight, bias, scale, feedforward, fan_in_fan_out,
                                adapter_index)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # What F.linear does under autocast: weight and bias in the autocast dtype (x is cast
        # in-kernel, after the feedforward scaling, exactly like PEFT's x*l then autocast).
        compute_dtype = torch.get_autocast_dtype(device_type)
        weight = weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    # The kernels index the scaling vector by its flat position: PEFT's (1, in) and (out, 1)
    # parameters go in as they are (no view op per call) and get gradients of their own shape.
    if not scale.is_contiguous():
        scale = scale.contiguous()
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    grad_mode = torch.is_grad_enabled()
    save_preact = (not feedforward) and scale.requires_grad and grad_mode
    if torch.compiler.is_compiling():
        y, _ = torch.ops.ia3_kernels.dense_linear(x2d, weight, bias, scale, feedforward,
                                                  fan_in_fan_out, save_preact, adapter_index)
    elif grad_mode and (x.requires_grad or scale.requires_grad or weight.requires_grad
                        or (bias is not None and bias.requires_grad)):
        y = _DenseLinearFunction.apply(x2d, weight, bias, scale, feedforward, fan_in_fan_out,
                                       save_preact, adapter_index)
    else:
        # Nothing to differentiate (serving, no_grad): autograd.Function.apply alone costs
        # ~5 us of Python, a quarter of a small layer's eager call.
        y, _ = dense_forward_impl(x2d, weight, bias, scale, feedforward, fan_in_fan_out, False,
                                  scale_index=adapter_index)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
