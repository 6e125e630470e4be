"""Persistent TMA GEMM for large M on Hopper (sm_90+): the dense IA3 layer's GEMMs with what IA3
adds fused in, as an alternative to cuBLAS beside a bandwidth-bound pass.

Why: at M = 8192 the cuBLAS route pays one pass over an M x N (or N x K) tensor next to the
GEMM, 8-20% of the bare layer on the Llama-3-8B shapes (README, "Large M"), and the textbook
Triton GEMM (`dense._ia3_matmul_kernel`: pointer loads, one CTA per tile) is 25-32% behind
cuBLAS before any IA3 work (../shared/anchors/triton-gemm-h100.md). This kernel is the Hopper
design of Triton's persistent-matmul tutorial: one CTA per SM walking output tiles in grouped
order, operands brought by TMA descriptors into swizzled shared memory for wgmma, the
epilogue optionally split in two halves of the N tile (less shared memory for the store, a
deeper pipeline). IA3 rides on it:
  - SCALE_A: the A tile times scale_a[k] (feedforward forward x*l; attention backward dy*l),
    rounded to the operand dtype as PEFT rounds x*l;
  - epilogue: u = acc (+ bias[n]); STORE_PREACT writes u; REDUCE_AUX writes per-tile-row
    partial sums of u * aux (the feedforward backward's dl = sum_rows (dy W) * x, summed later
    in a fixed order: deterministic); SCALE_C multiplies by scale_c[n] (attention forward's l,
    feedforward backward's dx = g * l), or with SCALE_GATHER by scale_c[idx[m // T], n]: row m
    of a mixed-adapter batch takes its example's row of an (adapters, N) table (mixed.py).
B is read as stored: (N, K) rows (nn.Linear's weight in the forward) or (K, N) rows
(B_KN: fan_in_fan_out weights, and W itself in dx = g W).

TMA needs 16-byte aligned base pointers and row strides and a unit inner stride
(`eligible`); 16-bit operands only (fp32 stays on cuBLAS, see dense._use_cublas). Out-of-range
rows and columns of a descriptor load read as zeros and stores to them are dropped, so M, N and
K need not be multiples of a block. Offsets inside the descriptors are the hardware's (64-bit).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import mixed
from .launch import cdiv, sm_count

try:  # triton >= 3.4: host-side tensor descriptors (passed by value, capturable in graphs)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - triton 3.3
    TensorDescriptor = None


@triton.jit
def _tile_of(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row blocks share B's column block while it is in L2."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile // per_group) * GROUP_M
    rows = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@triton.jit
def _tma_epilogue(acc, c_desc, u_desc, aux_desc, bias_ptr, scale_c_ptr, partial_ptr,
                  scale_index_ptr, rows_per_index, pid_m, off_m, off_n, M, N,
                  HAS_BIAS: tl.constexpr, STORE_PREACT: tl.constexpr, REDUCE_AUX: tl.constexpr,
                  SCALE_C: tl.constexpr, SCALE_GATHER: tl.constexpr, GATHER_SPAN: tl.constexpr,
                  STORE_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    u = acc
    if HAS_BIAS:
        u += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STORE_PREACT:
        u_desc.store([off_m, off_n], u.to(u_desc.dtype))
    if REDUCE_AUX:
        # Rows past M read as zeros from the descriptor: they add nothing.
        aux = aux_desc.load([off_m, off_n]).to(tl.float32)
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(u * aux, axis=0),
                 mask=mask_n)
    if STORE_C:
        if SCALE_GATHER and GATHER_SPAN > 0:
            # The tile's rows belong to at most GATHER_SPAN examples: one table row (a vector,
            # loaded in the accumulator's column layout as SCALE_C's is) per example, selected
            # per row. No shared memory: the pipeline keeps its stages (see gather_span).
            offs_m = off_m + tl.arange(0, BLOCK_M)
            first = off_m // rows_per_index
            last = (tl.minimum(off_m + BLOCK_M, M) - 1) // rows_per_index
            scaled = u
            for j in tl.static_range(GATHER_SPAN):
                # Past the tile's last example j reloads that one's vector, which then
                # scales no row: the index load needs no mask.
                example = tl.minimum(first + j, last)
                row = tl.load(scale_index_ptr + example).to(tl.int64)
                vec = tl.load(scale_c_ptr + row * N + offs_n, mask=mask_n,
                              other=0.0).to(tl.float32)
                if GATHER_SPAN == 1:
                    scaled = u * vec[None, :]
                else:
                    mine = (offs_m // rows_per_index) == first + j
                    scaled = tl.where(mine[:, None], u * vec[None, :], scaled)
            u = scaled
        elif SCALE_GATHER:
            # Rows of many examples (decode-like batches): each row gathers its own table row,
            # a 2-D tile the compiler stages through shared memory into the accumulator's
            # layout. The table is L2-resident (128 adapters x 4096 fp32 values: 2 MiB).
            offs_m = off_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            row = tl.load(scale_index_ptr + offs_m // rows_per_index, mask=mask_m,
                          other=0).to(tl.int64)
            u = u * tl.load(scale_c_ptr + row[:, None] * N + offs_n[None, :],
                            mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        elif SCALE_C:
            u = u * tl.load(scale_c_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c_desc.store([off_m, off_n], u.to(c_desc.dtype))


@triton.jit
def _ia3_tma_gemm_kernel(
    a_desc, b_desc, c_desc, u_desc, aux_desc,
    scale_a_ptr, bias_ptr, scale_c_ptr, partial_ptr, scale_index_ptr, rows_per_index,
    M, N, K,
    B_KN: tl.constexpr,  # B stored (K, N) (else (N, K), used transposed)
    SCALE_A: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PREACT: tl.constexpr,
    REDUCE_AUX: tl.constexpr, SCALE_C: tl.constexpr, SCALE_GATHER: tl.constexpr,
    GATHER_SPAN: tl.constexpr,  # examples a BLOCK_M tile spans at most; 0: gather per row
    STORE_C: tl.constexpr,
    SUBTILE: tl.constexpr,  # the epilogue in two BLOCK_N / 2 halves
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """C[M, N] = epilogue(prologue(A)[M, K] @ B[K, N]), fp32 accumulation, one CTA per SM."""
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    # The epilogue recomputes its tile from a counter of its own: Triton's pipeliner then
    # overlaps the next tile's first loads with this tile's epilogue (the tutorial's pattern).
    tile_c = start - NUM_SMS
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_of(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = a_desc.load([off_m, off_k])
            if SCALE_A:
                offs_k = off_k + tl.arange(0, BLOCK_K)
                s = tl.load(scale_a_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) * s[None, :]).to(a_desc.dtype)
            if B_KN:
                acc = tl.dot(a, b_desc.load([off_k, off_n]), acc)
            else:
                acc = tl.dot(a, b_desc.load([off_n, off_k]).T, acc)
        tile_c += NUM_SMS
        pid_m, pid_n = _tile_of(tile_c, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            _tma_epilogue(acc0, c_desc, u_desc, aux_desc, bias_ptr, scale_c_ptr, partial_ptr,
                          scale_index_ptr, rows_per_index, pid_m, off_m, off_n, M, N, HAS_BIAS,
                          STORE_PREACT, REDUCE_AUX, SCALE_C, SCALE_GATHER, GATHER_SPAN,
                          STORE_C, BLOCK_M, BLOCK_N // 2)
            _tma_epilogue(acc1, c_desc, u_desc, aux_desc, bias_ptr, scale_c_ptr, partial_ptr,
                          scale_index_ptr, rows_per_index, pid_m, off_m, off_n + BLOCK_N // 2,
                          M, N, HAS_BIAS, STORE_PREACT, REDUCE_AUX, SCALE_C, SCALE_GATHER,
                          GATHER_SPAN, STORE_C, BLOCK_M, BLOCK_N // 2)
        else:
            _tma_epilogue(acc, c_desc, u_desc, aux_desc, bias_ptr, scale_c_ptr, partial_ptr,
                          scale_index_ptr, rows_per_index, pid_m, off_m, off_n, M, N, HAS_BIAS,
                          STORE_PREACT, REDUCE_AUX, SCALE_C, SCALE_GATHER, GATHER_SPAN,
                          STORE_C, BLOCK_M, BLOCK_N)


def _eager_kernel():
    """The kernel as eager calls launch it: through launch.FastKernel (descriptors keyed by
    dtype, block shape and alignment), or as it is under the interpreter."""
    from . import config
    from .launch import FastKernel
    if config.triton_interpreted():
        return _ia3_tma_gemm_kernel
    return FastKernel(_ia3_tma_gemm_kernel)


_KERNEL = _eager_kernel()

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SUBTILE) for direct calls: the H100
# sweep's most frequent winner at M = 8192 that also fits the aux tile's shared memory
# (benchmarks/results/tune-tma-h100.log); dense._tma_tiles picks per GEMM for the op.
DEFAULT_TILES = (128, 256, 64, 8, 3, True)


def _aligned(t: Optional[torch.Tensor]) -> bool:
    """A 2-D tensor a TMA descriptor can address: unit inner stride, 16-byte base and rows."""
    if t is None:
        return True
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


@functools.lru_cache(maxsize=8)
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def available(device: torch.device) -> bool:
    """Triton has host-side descriptors, and the device is Hopper or newer (TMA, wgmma) or the
    interpreter runs the kernel."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        from . import config
        return config.triton_interpreted()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _hopper_or_newer(index)


def eligible(a: torch.Tensor, b: torch.Tensor, n_out: int, *others: Optional[torch.Tensor]) -> bool:
    """Operands this kernel can take: 16-bit, TMA-addressable (see _aligned), and an output of
    n_out columns whose rows are whole 16-byte units (it is written through a descriptor)."""
    return (a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype
            and (n_out * a.element_size()) % 16 == 0
            and all(_aligned(t) for t in (a, b, *others)))


# The epilogue gathers per example (one table vector each, no shared memory) where a BLOCK_M
# tile spans at most this many examples, else per row. H100, Llama-3-8B prefill M = 4096 (128
# sequences of 32 tokens: 4 a tile), CUDA graphs, mixed / single-adapter batch, per row (stages
# capped) against per example: q/o_proj 4096->4096 with fp32 tables (get_peft_model's default)
# 1.50-1.54 against 1.026-1.056, NF4 k/v_proj 1.39-1.40 against 1.014-1.029
# (mixed-stop36-fp32-h100.md, mixed-stop36b-fp32-h100.md); bf16 tables 1.013-1.036 against
# 1.003-1.021 (mixed-stop36-h100.md, mixed-stop36b-h100.md). Each further example a tile spans
# costs one vector load and a select over the tile in the epilogue. 8 is a bound, not a tuned
# value: those timings are all at a span of 4.
GATHER_MAX_SPAN = 8


def gather_span(rows_per_example: int, block_m: int) -> int:
    """The most examples of rows_per_example consecutive rows one tile of block_m rows (tiles
    start at multiples of block_m) can hold, or 0 past GATHER_MAX_SPAN (gather per row)."""
    T = rows_per_example
    if T <= 0:
        return 0
    if T % block_m == 0:
        span = 1
    elif block_m % T == 0:
        span = block_m // T
    else:  # a window of block_m rows starting anywhere in an example
        span = (block_m - 1 + T - 1) // T + 1
    return span if span <= GATHER_MAX_SPAN else 0


def launch_tma_gemm(a, b, b_kn: bool, N: int, *, scale_a=None, bias=None, scale_c=None,
                    store_preact=False, aux=None, store_c=True, tiles=None, out=None,
                    scale_index=None):
    """C = epilogue(prologue(a) @ B), B[k, n] = b[k, n] if b_kn else b[n, k]. Returns
    (c, u, partial): u the pre-scaling output when store_preact, partial (row blocks, N) fp32
    sums of u * aux when aux is given (reduce with a fixed-order sum).
    scale_index: a mixed-adapter batch (B,) of table rows, scale_c then a contiguous
    (adapters, N) table: the M rows, in order, belong to B examples of M / B rows each."""
    M, K = a.shape
    bm, bn, bk, warps, stages, subtile = tiles or DEFAULT_TILES
    rows_per_index = mixed.rows_per_example(scale_index, M)
    span = 0
    if scale_index is not None and scale_c is not None:
        span = gather_span(rows_per_index, bm)
        if span == 0:
            # The per-row gather's table tile goes to the accumulator's layout through shared
            # memory, on top of the pipeline's stages (48 KiB each at 128 x 256 x 64) and the
            # 32 KiB output tile: 32 KiB more for a 16-bit table, 64 for an fp32 one (PEFT's
            # default vector dtype), 32 more again with u stored. H100 (232,448 bytes): 3
            # stages needed 245,784 bytes with u and a bf16 table (gpu-tests-stop34b/c-h100.log)
            # and as much with an fp32 table and no u (gpu-tests-stop35-h100.log); 2 stages ran
            # with u and an fp32 table, 3 without u and a bf16 table (mixed-stop34-tma-h100).
            stages = min(stages, 2 if store_preact or scale_c.element_size() > 2 else 3)
    n_sm = sm_count(a.device)
    c = None
    if store_c:
        c = out if out is not None else torch.empty((M, N), device=a.device, dtype=a.dtype)
    u = torch.empty((M, N), device=a.device, dtype=a.dtype) if store_preact else None
    num_pid_m = cdiv(M, bm)
    partial = (torch.empty((num_pid_m, N), device=a.device, dtype=torch.float32)
               if aux is not None else None)
    if M == 0 or N == 0:  # nothing to launch (a grid of 0 CTAs)
        if partial is not None:
            partial.zero_()
        return c, u, partial
    bn_epi = bn // 2 if subtile else bn
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(b, [bk, bn] if b_kn else [bn, bk])
    # Unused descriptors point at a: the constexpr flags keep the kernel off them.
    c_desc = TensorDescriptor.from_tensor(c if store_c else a, [bm, bn_epi])
    u_desc = TensorDescriptor.from_tensor(u, [bm, bn_epi]) if store_preact else c_desc
    aux_desc = TensorDescriptor.from_tensor(aux, [bm, bn_epi]) if aux is not None else c_desc
    grid = (min(n_sm, num_pid_m * cdiv(N, bn)),)
    _KERNEL[grid](
        a_desc, b_desc, c_desc, u_desc, aux_desc, scale_a, bias, scale_c, partial, scale_index,
        rows_per_index, M, N, K,
        B_KN=b_kn, SCALE_A=scale_a is not None, HAS_BIAS=bias is not None,
        STORE_PREACT=store_preact, REDUCE_AUX=aux is not None,
        SCALE_C=scale_c is not None and scale_index is None,
        SCALE_GATHER=scale_c is not None and scale_index is not None, GATHER_SPAN=span,
        STORE_C=store_c,
        SUBTILE=subtile, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        NUM_SMS=n_sm, num_warps=warps, num_stages=stages)
    return c, u, partial
