"""The forward of (IA)^3 on a quantized weight at small M (decode, M <= SMALL_M_MAX_M): one
kernel for bitsandbytes 4-bit (NF4/FP4, quantization blocks aligned to rows) and LLM.int8.

Why a kernel of its own: at small M the forward streams the weight (14336x4096 NF4: 29 MB) and
little else, so the work per weight element decides. dense.py's GEMM puts x on the tensor
cores' M axis and the dequantized weight on B, transposed: a register tile re-laid through
shared memory at every K step, which left NF4 at 195 us against bnb's 123 on 14336->4096 at
M = 16 (H100, L2-cold CUDA graphs, benchmarks/results/tune-quant-small-m-h100.log). Here the
roles swap (CUTLASS's mixed-input trick, quant-matmul.md section 1): the weight tile, BLOCK_N
output features x BLOCK_K in-features as stored, is the dot's A operand and x^T (M padded to
16..64) its B operand, so the time stays nearly flat from M = 2 to 16 (57 us there).

4-bit: each tile is loaded as one (BLOCK_N, blocks, bytes) tensor, up to 256 bytes a row, so
many bytes are in flight per CTA (64-byte-wide tiles ran 1.5-3x slower). Nibbles index the
16-entry code table with tl.gather from registers: a global-memory table load per element cost
7x at M = 16 (386 against 57 us; tune-lut-h100.log). Each weight is bnb's own, code * absmax in
fp32 rounded once to x's dtype. At M = 1 there are no tensor cores: fp32 FMAs into a tile-sized
accumulator, the block's absmax applied once per pair of products (the weight is not rounded).
int8: CB converts to 16 bits exactly; SCB / 127 scales the epilogue.

M = 1 has a GEMV kernel of its own (`_quant_gemv_kernel`, both formats; the default where
measured faster, GEMV_DEFAULT / IA3_GEMV): the weight read as 32-bit words, x loaded a word's
elements at a time, codes decoded by one shared-memory gather a step or by byte permutes
(inline PTX), fp32 FMAs into a tile-shaped accumulator.

Split-K (grid axis 1) where the N tiles do not fill the GPU, deterministic: each split parks
its fp32 partial, the CTA that arrives last sums them in split order and runs the epilogue
(dense.py's scheme and counters).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import config, mixed
from .dense import (INT8_SCALE_MUL, _absmax_of_blocks, _dot_precision, _sm_count,
                    _split_k_counters, _traceable, gather_table, split_k_reduce)
from .launch import FastKernel, cdiv


@triton.jit
def _quant_small_m_kernel(
    x_ptr, w_ptr, c_ptr, scale_a_ptr, scale_c_ptr, bias_ptr, preact_ptr, workspace_ptr,
    counter_ptr, w_scale_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, scale_index_ptr,
    M, N, K, rows_per_index,
    stride_xm, stride_xk, stride_wn, stride_cm, stride_cn,
    # 1: bnb 4-bit, w_ptr the packed bytes (two codes a byte, high nibble first, rows of K/2
    # bytes), w_scale_ptr the absmax of each Q_BLOCKSIZE elements (BLOCK_K divides it);
    # 0: LLM.int8, w_ptr CB (N, K) int8, w_scale_ptr SCB (N,) times W_SCALE_MUL.
    W_4BIT: tl.constexpr, W_SCALE_MUL: tl.constexpr,
    Q_BLOCKSIZE: tl.constexpr, Q_NESTED: tl.constexpr, Q_BLOCKSIZE2: tl.constexpr,
    SCALE_A: tl.constexpr,  # feedforward: x[:, k] * scale_a[k] (rounded as PEFT's x*l)
    HAS_BIAS: tl.constexpr, STORE_PREACT: tl.constexpr,
    SCALE_C: tl.constexpr,  # attention: y = u * scale_c[n]
    SCALE_GATHER: tl.constexpr,  # scale_c is a table, row scale_index[m // rows_per_index]
    SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rn = offs_n.to(tl.int64)  # N * K can pass 2**31
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rm = offs_m.to(tl.int64)
    dtype = x_ptr.dtype.element_ty

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if W_4BIT:
        # 4-bit tiles: BLOCK_N rows x NB quantization blocks x SUB/2 bytes, loaded as one 3-D
        # tensor (many bytes in flight a CTA), each block's absmax broadcast along its bytes.
        SUB: tl.constexpr = BLOCK_K if BLOCK_K < Q_BLOCKSIZE else Q_BLOCKSIZE
        NB: tl.constexpr = BLOCK_K // SUB
        table = tl.load(code_ptr + tl.arange(0, 16))  # fp32 code values, in registers
        if BLOCK_M == 1:
            # GEMV (M = 1): FMAs into a tile-shaped accumulator, reduced once after the loop.
            gemv_acc = tl.zeros((BLOCK_N, NB, SUB // 2), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if W_4BIT:
            # Even in-features are the high nibbles, odd ones the low: two dots over the tile
            # as loaded (interleaving the halves would re-lay the tile every step).
            blocks = tl.arange(0, NB)
            byte = ((k0 // 2 + blocks * (SUB // 2))[None, :, None]
                    + tl.arange(0, SUB // 2)[None, None, :])
            packed = tl.load(w_ptr + rn[:, None, None] * (K // 2) + byte,
                             mask=mask_n[:, None, None], other=0).to(tl.int32)
            absmax = _absmax_of_blocks(
                (rn[:, None] * K + k0 + blocks[None, :] * SUB) // Q_BLOCKSIZE, mask_n[:, None],
                w_scale_ptr, code2_ptr, absmax2_ptr, offset_ptr, Q_NESTED, Q_BLOCKSIZE2)
            c_even = gather_table(table, packed >> 4)
            c_odd = gather_table(table, packed & 15)
            if BLOCK_M == 1:
                # GEMV: x comes as (blocks, bytes) like the tile, so it broadcasts along the rows
                # with no re-layout; FMAs in fp32, the block's absmax once per pair of products.
                k_e = (k0 + 2 * ((blocks * (SUB // 2))[:, None]
                                 + tl.arange(0, SUB // 2)[None, :])).to(tl.int64)
                x_e = tl.load(x_ptr + k_e * stride_xk).to(tl.float32)
                x_o = tl.load(x_ptr + (k_e + 1) * stride_xk).to(tl.float32)
                if SCALE_A:  # rounded as PEFT's x*l
                    x_e = (x_e * tl.load(scale_a_ptr + k_e).to(tl.float32)).to(dtype).to(tl.float32)
                    x_o = (x_o * tl.load(scale_a_ptr + k_e + 1).to(tl.float32)).to(dtype).to(tl.float32)
                gemv_acc += (c_even * x_e[None, :, :] + c_odd * x_o[None, :, :]) * absmax[:, :, None]
            else:
                k_even = (k0 + 2 * tl.arange(0, BLOCK_K // 2)).to(tl.int64)
                x_even = tl.load(x_ptr + rm[None, :] * stride_xm + k_even[:, None] * stride_xk,
                                 mask=mask_m[None, :], other=0.0)
                x_odd = tl.load(x_ptr + rm[None, :] * stride_xm + (k_even + 1)[:, None] * stride_xk,
                                mask=mask_m[None, :], other=0.0)
                if SCALE_A:
                    s_even = tl.load(scale_a_ptr + k_even).to(tl.float32)
                    s_odd = tl.load(scale_a_ptr + k_even + 1).to(tl.float32)
                    x_even = (x_even.to(tl.float32) * s_even[:, None]).to(dtype)
                    x_odd = (x_odd.to(tl.float32) * s_odd[:, None]).to(dtype)
                # bnb's weight exactly: code * absmax in fp32, rounded once to x's dtype.
                w_even = tl.reshape((c_even * absmax[:, :, None]).to(dtype), (BLOCK_N, BLOCK_K // 2))
                w_odd = tl.reshape((c_odd * absmax[:, :, None]).to(dtype), (BLOCK_N, BLOCK_K // 2))
                acc = tl.dot(w_even, x_even, acc, input_precision=DOT_PRECISION)
                acc = tl.dot(w_odd, x_odd, acc, input_precision=DOT_PRECISION)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            rk = offs_k.to(tl.int64)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0)
            x_t = tl.load(x_ptr + rm[None, :] * stride_xm + rk[:, None] * stride_xk,
                          mask=mask_m[None, :] & mask_k[:, None], other=0.0)
            if SCALE_A:
                s = tl.load(scale_a_ptr + rk, mask=mask_k, other=0.0).to(tl.float32)
                x_t = (x_t.to(tl.float32) * s[:, None]).to(dtype)
            # int8 codes -127..127 are exact in fp16 and bf16.
            acc = tl.dot(w.to(dtype), x_t, acc, input_precision=DOT_PRECISION)

    if BLOCK_M == 1:
        acc = tl.sum(tl.sum(gemv_acc, axis=2), axis=1)[:, None]
    _small_m_epilogue(acc, rn, mask_n, offs_m, mask_m, M, N, c_ptr, scale_c_ptr, bias_ptr,
                      preact_ptr, workspace_ptr, counter_ptr, w_scale_ptr, scale_index_ptr,
                      rows_per_index, stride_cm, stride_cn, pid_n, pid_k, W_4BIT, W_SCALE_MUL,
                      HAS_BIAS, STORE_PREACT, SCALE_C, SCALE_GATHER, SPLIT_K)


@triton.jit
def _small_m_epilogue(acc, rn, mask_n, offs_m, mask_m, M, N, c_ptr, scale_c_ptr, bias_ptr,
                      preact_ptr, workspace_ptr, counter_ptr, w_scale_ptr, scale_index_ptr,
                      rows_per_index, stride_cm, stride_cn, pid_n, pid_k,
                      W_4BIT: tl.constexpr, W_SCALE_MUL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      STORE_PREACT: tl.constexpr, SCALE_C: tl.constexpr,
                      SCALE_GATHER: tl.constexpr, SPLIT_K: tl.constexpr):
    """acc[n, m] (fp32, this split's share) -> split-K reduce, int8 row scales, bias, u, the
    attention scaling; output (m, n) lives at c[m * stride_cm + n * stride_cn]."""
    rm = offs_m.to(tl.int64)
    offs_2d = rm[None, :] * N + rn[:, None]
    mask_2d = mask_n[:, None] & mask_m[None, :]
    is_last = True
    if SPLIT_K > 1:
        acc, is_last = split_k_reduce(acc, workspace_ptr, counter_ptr + pid_n, pid_k, M * N,
                                      offs_2d, mask_2d, SPLIT_K)
    if is_last:
        u = acc
        if not W_4BIT:
            ws = tl.load(w_scale_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
            u = u * (ws * W_SCALE_MUL)[:, None]
        if HAS_BIAS:
            u += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        if STORE_PREACT:
            tl.store(preact_ptr + offs_2d, u.to(preact_ptr.dtype.element_ty), mask=mask_2d)
        out = u
        if SCALE_C and SCALE_GATHER:
            row = tl.load(scale_index_ptr + offs_m // rows_per_index, mask=mask_m,
                          other=0).to(tl.int64)
            out = u * tl.load(scale_c_ptr + row[None, :] * N + rn[:, None], mask=mask_2d,
                              other=0.0).to(tl.float32)
        elif SCALE_C:
            out = u * tl.load(scale_c_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptr + rm[None, :] * stride_cm + rn[:, None] * stride_cn,
                 out.to(c_ptr.dtype.element_ty), mask=mask_2d)


# 8 nibbles of a word -> 8 fp32 codes through fp16 byte planes ($9-$12 low bytes, $13-$16 high
# bytes of the 16 fp16 codes, 4 a register), 4 nibbles at a time: prmt picks byte n & 7 of a
# plane pair (codes 0-7 and 8-15), a second prmt chooses by bit 3, a third pairs low and high
# bytes into two fp16 values. Outputs $0-$7 are elements 0-7 of the word in storage order (a
# byte holds its even element in the high nibble).
def _prmt_decode_4(src: str, outs, planes: int = 9) -> str:
    """PTX: the 4 nibbles in the low 16 bits of register `src` -> the fp32 codes of their
    elements 0-3 in outputs outs[0..3] (nibble slot 1 holds element 0: a byte's high nibble is
    its first element). The 8 table registers are operands $planes..$planes+7."""
    o = outs
    lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = (f"${planes + i}" for i in range(8))
    return f"""and.b32 s7, {src}, 0x7777;
shr.b32 sel, {src}, 1;
and.b32 sel, sel, 0x4444;
or.b32 sel, sel, 0x3210;
prmt.b32 la, {lo0}, {lo1}, s7;
prmt.b32 lb, {lo2}, {lo3}, s7;
prmt.b32 lo, la, lb, sel;
prmt.b32 ha, {hi0}, {hi1}, s7;
prmt.b32 hb, {hi2}, {hi3}, s7;
prmt.b32 hi, ha, hb, sel;
prmt.b32 p, lo, hi, 0x5140;
mov.b32 {{h0, h1}}, p;
cvt.f32.f16 ${o[1]}, h0;
cvt.f32.f16 ${o[0]}, h1;
prmt.b32 p, lo, hi, 0x7362;
mov.b32 {{h0, h1}}, p;
cvt.f32.f16 ${o[3]}, h0;
cvt.f32.f16 ${o[2]}, h1;
"""


_PRMT_DECODE_ASM = tl.constexpr(
    "{\n.reg .b32 s, s7, sel, la, lb, lo, ha, hb, hi, p;\n.reg .b16 h0, h1;\n"
    + _prmt_decode_4("$8", (0, 1, 2, 3)) + "shr.b32 s, $8, 16;\n"
    + _prmt_decode_4("s", (4, 5, 6, 7)) + "}\n")
# Decode 3: elements 0-3 of a word by the byte permutes above (ALU pipe), 4-7 by a gather from
# the 16 fp32 codes in shared memory (MIO pipe), splitting the lookups between two pipes.
_PRMT_DECODE_LOW_ASM = tl.constexpr(
    "{\n.reg .b32 s7, sel, la, lb, lo, ha, hb, hi, p;\n.reg .b16 h0, h1;\n"
    + _prmt_decode_4("$4", (0, 1, 2, 3), planes=5) + "}\n")


# int8 word -> its 4 codes as fp32: byte ^ 0x80 (code + 128) placed by one prmt as the low
# mantissa byte of 2**23 (0x4B0000uu), minus 2**23 + 128 (0f4B000080): exact.
_PRMT_INT8_ASM = tl.constexpr("""
{
.reg .b32 t, c, b0, b1, b2, b3;
.reg .f32 f0, f1, f2, f3;
xor.b32 t, $4, 0x80808080;
mov.b32 c, 0x4B000000;
prmt.b32 b0, t, c, 0x7540;
prmt.b32 b1, t, c, 0x7541;
prmt.b32 b2, t, c, 0x7542;
prmt.b32 b3, t, c, 0x7543;
mov.b32 f0, b0;
mov.b32 f1, b1;
mov.b32 f2, b2;
mov.b32 f3, b3;
sub.f32 $0, f0, 0f4B000080;
sub.f32 $1, f1, 0f4B000080;
sub.f32 $2, f2, 0f4B000080;
sub.f32 $3, f3, 0f4B000080;
}
""")


@triton.jit
def _byte_plane(byte, i16):
    """16 bytes (one a code) packed 4 a register: byte i of register r is code 4r + i."""
    placed = byte << (8 * (i16 % 4))  # disjoint bit fields: the sums are ORs
    return (tl.sum(tl.where(i16 // 4 == 0, placed, 0)), tl.sum(tl.where(i16 // 4 == 1, placed, 0)),
            tl.sum(tl.where(i16 // 4 == 2, placed, 0)), tl.sum(tl.where(i16 // 4 == 3, placed, 0)))


@triton.jit
def _code_pair(pair):
    """(code of the high nibble, code of the low nibble) from decode 1's int64 table entry."""
    return (pair.to(tl.int32).to(tl.float32, bitcast=True),
            (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def _word_mask(mask_n, k0, word, k_end, EPW: tl.constexpr, EVEN_K: tl.constexpr):
    """The (rows, blocks, words) tile's load mask at k0: whole tiles (EVEN_K: k0 is a tile
    start, K a multiple of the tile) are in or out as one, so the loads stay vectors."""
    if EVEN_K:
        k_ok = (word * 0 + k0) < k_end  # folds to one scalar test
    else:
        k_ok = (k0 + word * EPW) < k_end
    return mask_n[:, None, None] & k_ok[None, :, :]


@triton.jit
def _int8_code(biased_byte):
    """int8 code from its byte ^ 0x80 (code + 128): 2**23 + code + 128 as fp32 bits, minus
    2**23 + 128, exact."""
    return (biased_byte | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _gemv_tile_loads(row_ptr, x_ptr, scale_a_ptr, w_scale_ptr, absmax2_ptr, rn, mask_n, word,
                     blocks, k0, k_end, K, stride_xk, EPW: tl.constexpr, SUB: tl.constexpr,
                     Q_BLOCKSIZE: tl.constexpr, Q_NESTED: tl.constexpr,
                     Q_BLOCKSIZE2: tl.constexpr, W_4BIT: tl.constexpr, SCALE_A: tl.constexpr,
                     EVEN_K: tl.constexpr):
    """The GEMV tile at k0's global loads, as stored (all masked past k_end): the weight words,
    x and l of its elements, and for 4-bit the absmax of its (row, sub-block)s: bnb's uint8
    code and second-level absmax where nested (the code's table lookup, a load that depends
    on it, is left to the caller), else the fp32 absmax. Unused outputs are placeholders."""
    w_words = tl.load(row_ptr + (k0 // EPW + word)[None, :, :],
                      mask=_word_mask(mask_n, k0, word, k_end, EPW, EVEN_K), other=0)
    k_elem = (k0 + word * EPW).to(tl.int64)[:, :, None] + tl.arange(0, EPW)[None, None, :]
    x_mask = k_elem < k_end
    x_raw = tl.load(x_ptr + k_elem * stride_xk, mask=x_mask, other=0.0)
    l_raw = x_raw
    if SCALE_A:
        l_raw = tl.load(scale_a_ptr + k_elem, mask=x_mask, other=0.0)
    q_raw = tl.zeros((1,), dtype=tl.int32)
    a2_raw = tl.zeros((1,), dtype=tl.float32)
    if W_4BIT:
        blk = (rn[:, None] * K + k0 + blocks[None, :] * SUB) // Q_BLOCKSIZE
        # a prefetch past the end reads nothing (a tensor test: the interpreter wants one)
        in_range = mask_n[:, None] & ((blocks * 0 + k0) < k_end)[None, :]
        if Q_NESTED:
            q_raw = tl.load(w_scale_ptr + blk, mask=in_range, other=0).to(tl.int32)
            a2_raw = tl.load(absmax2_ptr + blk // Q_BLOCKSIZE2, mask=in_range, other=0.0)
        else:
            q_raw = tl.load(w_scale_ptr + blk, mask=in_range, other=0.0).to(tl.float32)
    return w_words, x_raw, l_raw, q_raw, a2_raw


@triton.jit
def _quant_gemv_kernel(
    x_ptr, w_ptr, c_ptr, scale_a_ptr, scale_c_ptr, bias_ptr, preact_ptr, workspace_ptr,
    counter_ptr, w_scale_ptr, code_ptr, code2_ptr, absmax2_ptr, offset_ptr, scale_index_ptr,
    N, K, stride_xk, stride_w_words, stride_cn,
    # 1: bnb 4-bit (w_ptr: the packed bytes viewed as int32, 8 codes a word, rows of K/8 words;
    # w_scale_ptr: the absmax of each Q_BLOCKSIZE elements); 0: LLM.int8 (w_ptr: CB viewed as
    # int32, 4 codes a word; w_scale_ptr: SCB, times W_SCALE_MUL).
    W_4BIT: tl.constexpr, W_SCALE_MUL: tl.constexpr,
    Q_BLOCKSIZE: tl.constexpr, Q_NESTED: tl.constexpr, Q_BLOCKSIZE2: tl.constexpr,
    SCALE_A: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_PREACT: tl.constexpr,
    SCALE_C: tl.constexpr, SCALE_GATHER: tl.constexpr, SPLIT_K: tl.constexpr,
    # 4-bit code lookup: 0 the 16 fp32 codes gathered per nibble; 1 a 256-entry table of fp32
    # code pairs (int64) gathered per byte, built per CTA from the 16 codes (one gather a step
    # either way, through shared memory); 2 byte permutes in registers on fp16 codes (GPU
    # only: inline PTX; bf16 only: the codes' 2**-11 rounding is under bf16's 2**-8, not under
    # fp16's or fp32's); 3 (4-bit, bf16 only) elements 0-3 of a word as 2, 4-7 as 0: the
    # lookups split between the ALU and the shared-memory pipes (sm_90 SASS, Triton 3.6, at
    # 128x128: 2.9 ALU-pipe and 0.65 LDS instructions a weight against 3.5 and 0.15 for 2, 2.4
    # and 1.15 for 0; not timed yet). int8: 0 integer ops, 2 prmt (inline PTX); exact.
    # PREFETCH: 0 none; 1 the next tile's loads issued into registers before this tile's ALU
    # work; n >= 2 the K-loop software-pipelined n stages deep by Triton (tl.range num_stages:
    # cp.async copies into shared memory, n - 1 tiles in flight, no registers held for them;
    # Triton pipelines loads that feed no tl.dot only in a loop annotated so, sm_90 SASS of
    # Triton 3.6 and 3.9 compiled on a CPU). H100, tune_gemv --pipeline-only: 2-4 stages lost
    # to 1 on every NF4 shape and tied or lost for int8 (tune-attn-gemv-e2e-stop27-h100.log).
    LUT: tl.constexpr, PREFETCH: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[n] = epilogue(sum_k W[n, k] * x[k]) at M = 1, W read as stored in 32-bit words (16 bytes
    a thread a load) and decoded in registers: FMAs in fp32 into a tile-shaped accumulator that
    is reduced once after the loop (no cross-thread traffic inside it)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rn = offs_n.to(tl.int64)
    # Tile = BLOCK_N rows x NB sub-blocks x WPB words; 4-bit sub-blocks lie inside one
    # quantization block (one absmax each).
    EPW: tl.constexpr = 8 if W_4BIT else 4  # elements per word
    SUB: tl.constexpr = (BLOCK_K if BLOCK_K < Q_BLOCKSIZE else Q_BLOCKSIZE) if W_4BIT else BLOCK_K
    NB: tl.constexpr = BLOCK_K // SUB
    WPB: tl.constexpr = SUB // EPW
    blocks = tl.arange(0, NB)
    word = blocks[:, None] * WPB + tl.arange(0, WPB)[None, :]  # (NB, WPB), word in the tile
    row_ptr = w_ptr + rn[:, None, None] * stride_w_words

    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)
    if W_4BIT:
        if LUT == 1:
            # Byte b -> (code[b >> 4], code[b & 15]) as the two fp32 halves of an int64.
            b256 = tl.arange(0, 256)
            hi = tl.load(code_ptr + (b256 >> 4)).to(tl.int32, bitcast=True).to(tl.int64)
            lo = tl.load(code_ptr + (b256 & 15)).to(tl.int32, bitcast=True).to(tl.int64)
            table = (hi & 0xFFFFFFFF) | (lo << 32)
        elif LUT >= 2:
            # The 16 codes as fp16, split into a low-byte and a high-byte plane of 4 registers
            # each (byte i of register r = code 4r + i), the tables of _PRMT_DECODE_ASM.
            i16 = tl.arange(0, 16)
            bits = tl.load(code_ptr + i16).to(tl.float16).to(tl.int16, bitcast=True)
            bits = bits.to(tl.int32) & 0xFFFF
            t_lo0, t_lo1, t_lo2, t_lo3 = _byte_plane(bits & 0xFF, i16)
            t_hi0, t_hi1, t_hi2, t_hi3 = _byte_plane(bits >> 8, i16)
        if LUT == 0 or LUT == 3:
            table = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_N, NB, WPB), dtype=tl.float32)

    REGISTER_PREFETCH: tl.constexpr = PREFETCH == 1
    LOOP_STAGES: tl.constexpr = PREFETCH if PREFETCH >= 2 else 1
    if W_4BIT and Q_NESTED:
        absmax_offset = tl.load(offset_ptr)
    if REGISTER_PREFETCH:
        w_next, x_next, l_next, q_next, a2_next = _gemv_tile_loads(
            row_ptr, x_ptr, scale_a_ptr, w_scale_ptr, absmax2_ptr, rn, mask_n, word, blocks,
            k_start, k_end, K, stride_xk, EPW, SUB, Q_BLOCKSIZE, Q_NESTED, Q_BLOCKSIZE2, W_4BIT,
            SCALE_A, EVEN_K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=LOOP_STAGES):
        if REGISTER_PREFETCH:
            # The next tile's loads (weights, x, l and the absmax codes) go out before this
            # tile's ALU work. ncu on the H100 (2026-12-06, 14336->4096, 128x128): with only
            # the weights prefetched, 26% of the warps' stall samples waited on this tile's
            # absmax byte and x / l loads (long scoreboard), at 1.8 warps a scheduler.
            w_words, x_raw, l_raw, q_raw, a2_raw = w_next, x_next, l_next, q_next, a2_next
            w_next, x_next, l_next, q_next, a2_next = _gemv_tile_loads(
                row_ptr, x_ptr, scale_a_ptr, w_scale_ptr, absmax2_ptr, rn, mask_n, word,
                blocks, k0 + BLOCK_K, k_end, K, stride_xk, EPW, SUB, Q_BLOCKSIZE, Q_NESTED,
                Q_BLOCKSIZE2, W_4BIT, SCALE_A, EVEN_K)
        else:
            w_words, x_raw, l_raw, q_raw, a2_raw = _gemv_tile_loads(
                row_ptr, x_ptr, scale_a_ptr, w_scale_ptr, absmax2_ptr, rn, mask_n, word,
                blocks, k0, k_end, K, stride_xk, EPW, SUB, Q_BLOCKSIZE, Q_NESTED, Q_BLOCKSIZE2,
                W_4BIT, SCALE_A, EVEN_K)
        # x (times l) for the tile's elements, one vector load a word (16 bytes of bf16 for a
        # 4-bit word), split into one (NB, WPB) tensor per element slot of a word. Each thread
        # converts only the x of its own words, reused across its rows. Not rounded to x's
        # dtype after the scaling (PEFT rounds x*l): fp32 is closer to the float64 product.
        # Loading x per element slot and rounding x*l took 10.2 SASS instructions a weight
        # (decode 0; 5.04 now, benchmarks/sass_loop.py).
        xs = x_raw.to(tl.float32)
        if SCALE_A:
            xs = xs * l_raw.to(tl.float32)
        if W_4BIT:
            part = tl.zeros((BLOCK_N, NB, WPB), dtype=tl.float32)  # one absmax a sub-block
            # (NB, WPB, 8) -> slots (0, 2, 4, 6) and (1, 3, 5, 7) -> (0, 4) (2, 6) (1, 5) (3, 7)
            x_even, x_odd = tl.split(tl.reshape(xs, (NB, WPB, 4, 2)))
            x04, x26 = tl.split(tl.reshape(x_even, (NB, WPB, 2, 2)))
            x15, x37 = tl.split(tl.reshape(x_odd, (NB, WPB, 2, 2)))
            x0, x4 = tl.split(x04)
            x2, x6 = tl.split(x26)
            x1, x5 = tl.split(x15)
            x3, x7 = tl.split(x37)
            if LUT == 2:
                # Codes from registers with byte permutes (no shared-memory lookups), elements
                # in storage order (word bits 4-7 are element 0, bits 0-3 element 1, ...).
                c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
                    _PRMT_DECODE_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,r,r,r",
                    [w_words, t_lo0, t_lo1, t_lo2, t_lo3, t_hi0, t_hi1, t_hi2, t_hi3],
                    dtype=(tl.float32,) * 8, is_pure=True, pack=1)
            elif LUT == 3:
                c0, c1, c2, c3 = tl.inline_asm_elementwise(
                    _PRMT_DECODE_LOW_ASM, "=f,=f,=f,=f,r,r,r,r,r,r,r,r,r",
                    [w_words, t_lo0, t_lo1, t_lo2, t_lo3, t_hi0, t_hi1, t_hi2, t_hi3],
                    dtype=(tl.float32,) * 4, is_pure=True, pack=1)
                n45 = tl.join((w_words >> 20) & 15, (w_words >> 16) & 15)
                n67 = tl.join((w_words >> 28) & 15, (w_words >> 24) & 15)
                nib = tl.join(n45, n67)
                codes = gather_table(table, nib)
                c45, c67 = tl.split(codes)
                c4, c5 = tl.split(c45)
                c6, c7 = tl.split(c67)
            elif LUT == 1:
                # The 4 bytes of each word in one gather of fp32 code pairs: one table store
                # and barrier pair a step (a gather a byte issued four).
                b01 = tl.join(w_words & 0xFF, (w_words >> 8) & 0xFF)
                b23 = tl.join((w_words >> 16) & 0xFF, (w_words >> 24) & 0xFF)
                pairs = tl.join(b01, b23)
                pairs = gather_table(table, pairs)
                p01, p23 = tl.split(pairs)
                p0, p1 = tl.split(p01)
                p2, p3 = tl.split(p23)
                c0, c1 = _code_pair(p0)
                c2, c3 = _code_pair(p1)
                c4, c5 = _code_pair(p2)
                c6, c7 = _code_pair(p3)
            else:
                # All 8 nibbles of each word in one gather from the 16 codes (one table store
                # and barrier pair a step, against eight with a gather a nibble pair: 5.20 ->
                # 5.04 SASS instructions a weight), joined along new minor dims and split back.
                n01 = tl.join((w_words >> 4) & 15, w_words & 15)
                n23 = tl.join((w_words >> 12) & 15, (w_words >> 8) & 15)
                n45 = tl.join((w_words >> 20) & 15, (w_words >> 16) & 15)
                n67 = tl.join((w_words >> 28) & 15, (w_words >> 24) & 15)
                nib = tl.join(tl.join(n01, n23), tl.join(n45, n67))
                codes = gather_table(table, nib)
                c0123, c4567 = tl.split(codes)  # split undoes the outermost join first
                c01, c23 = tl.split(c0123)
                c45, c67 = tl.split(c4567)
                c0, c1 = tl.split(c01)
                c2, c3 = tl.split(c23)
                c4, c5 = tl.split(c45)
                c6, c7 = tl.split(c67)
            part += c0 * x0[None, :, :]
            part += c1 * x1[None, :, :]
            part += c2 * x2[None, :, :]
            part += c3 * x3[None, :, :]
            part += c4 * x4[None, :, :]
            part += c5 * x5[None, :, :]
            part += c6 * x6[None, :, :]
            part += c7 * x7[None, :, :]
        else:
            # int8: byte ^ 0x80 = code + 128 in the low mantissa bits of 2**23, an exact
            # float after one subtraction, where an int8 -> fp32 conversion runs at quarter
            # rate. Byte j of a word is element j.
            x02, x13 = tl.split(tl.reshape(xs, (NB, WPB, 2, 2)))
            x0, x2 = tl.split(x02)
            x1, x3 = tl.split(x13)
            if LUT == 2:
                # One prmt a code builds its float's bits (GPU only: inline PTX).
                c0, c1, c2, c3 = tl.inline_asm_elementwise(
                    _PRMT_INT8_ASM, "=f,=f,=f,=f,r", [w_words], dtype=(tl.float32,) * 4,
                    is_pure=True, pack=1)
            else:
                biased = w_words ^ -2139062144  # 0x80808080 as an int32
                c0 = _int8_code(biased & 0xFF)
                c1 = _int8_code((biased >> 8) & 0xFF)
                c2 = _int8_code((biased >> 16) & 0xFF)
                c3 = _int8_code((biased >> 24) & 0xFF)
            acc += c0 * x0[None, :, :]  # one row scale (SCB), applied after the loop
            acc += c1 * x1[None, :, :]
            acc += c2 * x2[None, :, :]
            acc += c3 * x3[None, :, :]
        if W_4BIT:
            if Q_NESTED:  # bnb's double quantization, as dense._absmax_of_blocks
                absmax = tl.load(code2_ptr + q_raw) * a2_raw + absmax_offset
            else:
                absmax = q_raw.to(tl.float32)
            absmax = tl.where(mask_n[:, None], absmax, 0.0)
            acc += part * absmax[:, :, None]
    # One (BLOCK_N, 1) column: small_m's epilogue with M = 1.
    _small_m_epilogue(tl.sum(tl.sum(acc, axis=2), axis=1)[:, None], rn, mask_n,
                      tl.arange(0, 1), tl.full((1,), 1, tl.int1), 1, N, c_ptr, scale_c_ptr,
                      bias_ptr, preact_ptr, workspace_ptr, counter_ptr, w_scale_ptr,
                      scale_index_ptr, 1, 0, stride_cn, pid_n, pid_k, W_4BIT, W_SCALE_MUL,
                      HAS_BIAS, STORE_PREACT, SCALE_C, SCALE_GATHER, SPLIT_K)


_KERNELS = {
    False: (_quant_small_m_kernel if config.triton_interpreted()
            else FastKernel(_quant_small_m_kernel)),
    True: _traceable(_quant_small_m_kernel),
}
_GEMV_KERNELS = {
    False: (_quant_gemv_kernel if config.triton_interpreted()
            else FastKernel(_quant_gemv_kernel)),
    True: _traceable(_quant_gemv_kernel),
}

# The largest M this kernel takes (M padded to BLOCK_M = 16..64 on the dot's N axis).
SMALL_M_MAX_M = 64
# Split-K workspace (splits x M x N fp32) cap: 8 MiB, against the 117 MB bf16 weight copy that
# bnb's own dequantize + F.linear path allocates at these M.
SMALL_M_WORKSPACE_BYTES = 8 << 20


def small_m_tiles(M: int, N: int, K: int, four_bit: bool, device, tiles=None, elem_size: int = 2):
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); BLOCK_M = 1 is the GEMV.
    `tiles` = (BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K or 0 = auto, 4-bit GEMV at M = 1)
    overrides the table (benchmarks/tune_quant_small_m.py). 4-bit: BLOCK_K halves until it
    divides K (a multiple of the blocksize, >= 32), so 4-bit tiles need no mask along K.

    The table: H100 sweeps on the Llama-3-8B shapes, L2-cold CUDA graphs
    (benchmarks/results/tune-lut-h100.log, tune-quant-small-m-h100.log). NF4, us:
      M = 1 GEMV: 14336->4096 (64, 256, 4) 42.9; 4096->4096 (64, 128, 4) 14.1; 4096->14336
        (16, 512, 4) 37.8 (bnb 31.3, 11.4, 30.5; dense.py 56.9, 18.0, 48.5);
      M = 16: (128, 128, 4) best on all three: 57.1, 19.4, 61.2 (bnb 125.4, 38.0, 67.8);
      M = 64: (64, 256, 8) 129.6 on 14336->4096, (128, 128, 8) 97.4 on 4096->14336 (bnb 126.6,
        123.3; dense.py 408.6, 179.3).
    int8 (M = 17..64 only; dense.py's tuned GEMV and tl.dot tiles hold below): (64, 128, 4, 3)
      at M = 64: 14336->4096 46.7 with 4 splits, 4096->4096 19.3, 4096->1024 9.3 (dense.py
      113.4, 31.0, 17.7).
    The table is for 16-bit activations; fp32 ones (elem_size 4) take half the BLOCK_K on the
    tl.dot path, as dense.py's fp32 rule does: a 16-bit tile fed fp32 operands can pass the
    H100's 232,448 bytes of shared memory (dense.py's int8 64x64x128 tile asked for 263,680
    with an fp32 dy; found by the GPU fuzz test)."""
    interpret = config.triton_interpreted()
    gemv = M == 1
    if tiles is not None:
        bn, bk, warps, stages, split, gemv = tiles
    elif interpret:
        bn, bk, warps, stages, split = 16, 64, 4, 1, 0
    elif not four_bit:
        bn, bk, warps, stages, split = 64, 128, 4, 3, 0
    elif M == 1:
        bn, bk, warps, stages, split = ((16, 512, 4, 2, 0) if N >= 8192 else
                                        (64, 256, 4, 2, 0) if K >= 8192 else (64, 128, 4, 2, 0))
    elif M <= 16:
        bn, bk, warps, stages, split = 128, 128, 4, 2, 0
    else:
        bn, bk, warps, stages, split = (64, 256, 8, 2, 0) if K >= 8192 else (128, 128, 8, 2, 0)
    gemv = gemv and M == 1 and four_bit  # int8 takes this kernel from M = 17 only
    if elem_size == 4 and not gemv and tiles is None and not interpret:
        bk = max(32, bk // 2)
    if four_bit:
        while K % bk:  # the in-features are whole quantization blocks: tiles need no K mask
            bk //= 2
    bm = 1 if gemv else max(16, 1 << (M - 1).bit_length())  # not triton.next_power_of_2: ~1.5 us
    if split == 0:
        split = _splits_to_fill(M, N, K, bn, bk, device, interpret, below_tiles_per_sm=2)
    return bm, bn, bk, split, warps, stages


def _splits_to_fill(M, N, K, bn, bk, device, interpret, below_tiles_per_sm, ctas_per_sm=4,
                    power_of_two=False):
    """SPLIT_K where fewer than below_tiles_per_sm x SMs output tiles would stream the weight:
    ~ctas_per_sm CTAs an SM, at least 2 BLOCK_K steps each, the workspace within its cap;
    power_of_two rounds down (a power-of-two K then splits into whole, equal BLOCK_K runs:
    5 splits of 16 steps give 4 of 4 steps and an empty fifth that still joins the reduction)."""
    n_tiles = cdiv(N, bn)
    if interpret or n_tiles >= below_tiles_per_sm * _sm_count(device):
        return 1
    split = max(1, min(cdiv(ctas_per_sm * _sm_count(device), n_tiles), K // (2 * bk), 64,
                       SMALL_M_WORKSPACE_BYTES // max(1, 4 * M * N)))
    return 1 << (split.bit_length() - 1) if power_of_two else split


def _launch_buffers(M, N, n_tiles, split, out_dtype, store_preact, quant4, device, traceable):
    """Both kernels' launch arguments besides the operands: y, u (or None), the split-K
    workspace and counters (or None), and the 4-bit format's pointers and constants (int8:
    placeholders)."""
    c = torch.empty((M, N), device=device, dtype=out_dtype)
    preact = torch.empty((M, N), device=device, dtype=out_dtype) if store_preact else None
    if split > 1:
        workspace = torch.empty((split, M, N), device=device, dtype=torch.float32)
        counters = _split_k_counters(n_tiles, device, traceable)
    else:
        workspace = counters = None
    if quant4 is not None:
        q_ptrs = (quant4.code, quant4.code2, quant4.absmax2, quant4.offset)
        q_const = (quant4.blocksize, quant4.nested, quant4.blocksize2)
    else:
        q_ptrs, q_const = (None, None, None, None), (64, False, 256)
    return c, preact, workspace, counters, q_ptrs, q_const


def launch_small_m(x, w, w_scale, N: int, out_dtype, *, traceable: bool, quant4=None,
                   scale_a=None, scale_c=None, bias=None, store_preact=False, scale_index=None,
                   tiles=None):
    """y (M, N) = epilogue(x_scaled @ W^T) for a quantized W; returns (y, u or None).
    4-bit (quant4 given, its blocks aligned to rows): w = the packed bytes, w_scale = absmax.
    int8: w = CB (N, K), w_scale = SCB. scale_a: feedforward l (along K); scale_c: attention l
    (along N; with scale_index an (adapters, N) table gathered per example)."""
    M, K = x.shape
    device = x.device
    four_bit = quant4 is not None
    if M == 1 and tiles is None and use_gemv(w, four_bit, K):
        return launch_gemv(x, w, w_scale, N, out_dtype, traceable=traceable, quant4=quant4,
                           scale_a=scale_a, scale_c=scale_c, bias=bias,
                           store_preact=store_preact, scale_index=scale_index)
    bm, bn, bk, split, warps, stages = small_m_tiles(M, N, K, four_bit, device, tiles,
                                                     x.element_size())
    n_tiles = cdiv(N, bn)
    c, preact, workspace, counters, q_ptrs, q_const = _launch_buffers(
        M, N, n_tiles, split, out_dtype, store_preact, quant4, device, traceable)
    _KERNELS[traceable][(n_tiles, split)](
        x, w, c, scale_a, scale_c, bias, preact, workspace, counters, w_scale, *q_ptrs,
        scale_index, M, N, K, mixed.rows_per_example(scale_index, M),
        x.stride(0), x.stride(1), 0 if four_bit else w.stride(0), c.stride(0), c.stride(1),
        W_4BIT=four_bit, W_SCALE_MUL=INT8_SCALE_MUL, Q_BLOCKSIZE=q_const[0],
        Q_NESTED=q_const[1], Q_BLOCKSIZE2=q_const[2], SCALE_A=scale_a is not None,
        HAS_BIAS=bias is not None, STORE_PREACT=store_preact, SCALE_C=scale_c is not None,
        SCALE_GATHER=scale_index is not None, SPLIT_K=split,
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages,
    )
    return c, preact


# Whether M = 1 takes the GEMV kernel by default, per format: on where its sweep
# (benchmarks/tune_gemv.py, H100, L2-cold CUDA graphs, benchmarks/results/tune-gemv-h100.log)
# put it ahead of the path it replaces on the Llama-3-8B shapes. 4-bit, against small_m's
# tiled GEMV: 4096->4096 / 4096->1024 / 4096->14336 / 14336->4096 at 12.2 / 5.7 / 31.9 / 30.5 us
# (table tiles, 2 splits an SM: 10.7 / 5.7 / 32.0 / 29.3) against 14.3 / 7.2 / 44.0 / 37.6
# (bare bnb 11.5 / 7.5 / 30.9 / 31.6). int8, against dense.py's GEMV: 10.9 / 5.7 / 27.6 / 28.4
# against 10.6 / 6.3 / 31.9 / 29.7. The first version (10.2 SASS instructions a weight against
# 3.6-6.1 now) had lost on 4-bit (tune-gemv-v1-h200.log).
# IA3_GEMV=1 (or 0) turns it on (off) for both formats, whatever the table says.
GEMV_DEFAULT = {"4bit": True, "int8": True}
_GEMV_FORCED = {"1": True, "on": True, "true": True, "yes": True,
                "0": False, "off": False, "false": False,
                "no": False}.get(os.environ.get("IA3_GEMV", "").strip().lower())  # None: table


def use_gemv(w: torch.Tensor, four_bit: bool, K: int) -> bool:
    """launch_small_m's choice at M = 1 with the table's tiles."""
    on = GEMV_DEFAULT["4bit" if four_bit else "int8"] if _GEMV_FORCED is None else _GEMV_FORCED
    return on and gemv_eligible(w, four_bit, K)


def gemv_eligible(w: torch.Tensor, four_bit: bool, K: int) -> bool:
    """Whether the weight's bytes read as rows of whole 32-bit words (the GEMV kernel's loads):
    4-bit, contiguous packed bytes (rows of K/2 bytes, K a multiple of the blocksize >= 32);
    int8, CB rows contiguous with a row stride and K that are multiples of 4."""
    if w.data_ptr() % 4:
        return False
    if four_bit:
        return w.is_contiguous() and K % 8 == 0
    return w.dim() == 2 and w.stride(1) == 1 and w.stride(0) % 4 == 0 and K % 4 == 0


def gemv_tiles(N: int, K: int, four_bit: bool, device, tiles=None, dtype=torch.bfloat16):
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, LUT, PREFETCH) for the M = 1 GEMV kernel; `tiles`
    (same fields, SPLIT_K 0 = auto) overrides the table (benchmarks/tune_gemv.py)."""
    interpret = config.triton_interpreted()
    if tiles is not None:
        bn, bk, split, warps, lut, prefetch = tiles
    elif interpret:
        bn, bk, split, warps, lut, prefetch = 16, 64, 0, 4, 1, 1
    elif four_bit:
        # H100 sweeps. Decode (tune-gemv-h100.log, 64x256): byte permutes (decode 2) with
        # prefetch were best on 3 of 4 shapes (14336->4096: 30.5 us; shared-memory gathers,
        # decode 0: 32.9, decode 1: 43.0, bank conflicts); 512-deep tiles spill (1.2-19x).
        # Tiles: 64x128 at 4 warps, split to ~4 CTAs an SM with the register prefetch (122
        # registers: 4 CTAs fit) and ~8 without it (70), which the wide outputs take
        # (tune-gemv-occupancy-stop32-h100.log, the CTAs-an-SM sweep after ncu found the
        # kernel latency-bound; us against the earlier table's 128x128 / 32x256 tiles at 2 CTAs
        # an SM): 4096->14336 25.7 against 28.4 (split 4, no prefetch); 14336->4096 27.3
        # against 27.8; 4096->4096 10.1 against 10.4; 4096->1024 5.3 against 5.6.
        bn, bk, split, warps, lut = 64, 128, 0, 4, 2
        prefetch = 0 if N >= 2 * K else 1
    else:
        # Same sweep: 32x256 with byte permutes, no prefetch (14336->4096 28.4 us, 4096->14336
        # 27.6; integer-op decode 28.5 / 29.8; 64-wide and 512-deep tiles 0-8% slower).
        bn, bk, split, warps, lut, prefetch = 32, 256, 0, 4, 2, 0
    if four_bit:
        while K % bk:  # whole quantization blocks: no mask along K
            bk //= 2
        if lut in (2, 3) and dtype != torch.bfloat16:
            lut, prefetch = 0, 0  # fp16 codes: exact enough for bf16 only (the kernel's LUT note)
    if split == 0:
        # 4-bit: power-of-two splits (whole, equal BLOCK_K runs), as many CTAs an SM as the
        # registers let stay resident (above); int8's 32-wide tiles did best at 4 an SM
        # (14336->4096: 28.4 us with 5 splits, 29.0 with 4; 27.4 with 6 in the occupancy
        # sweep, within its noise of 5).
        split = _splits_to_fill(1, N, K, bn, bk, device, interpret, below_tiles_per_sm=4,
                                ctas_per_sm=(8 if prefetch == 0 else 4) if four_bit else 4,
                                power_of_two=four_bit)
    return bn, bk, split, warps, lut, prefetch


def launch_gemv(x, w, w_scale, N: int, out_dtype, *, traceable: bool, quant4=None,
                scale_a=None, scale_c=None, bias=None, store_preact=False, scale_index=None,
                tiles=None):
    """launch_small_m at M = 1 (weights that pass gemv_eligible): y (1, N), u or None."""
    K = x.shape[1]
    device = x.device
    four_bit = quant4 is not None
    bn, bk, split, warps, lut, prefetch = gemv_tiles(N, K, four_bit, device, tiles, x.dtype)
    n_tiles = cdiv(N, bn)
    c, preact, workspace, counters, q_ptrs, q_const = _launch_buffers(
        1, N, n_tiles, split, out_dtype, store_preact, quant4, device, traceable)
    if four_bit:
        words = quant4.words() if quant4.packed is w else w.reshape(-1).view(torch.int32)
        stride_words = K // 8
    else:
        words = w.view(torch.int32)
        stride_words = w.stride(0) // 4
    _GEMV_KERNELS[traceable][(n_tiles, split)](
        x, words, c, scale_a, scale_c, bias, preact, workspace, counters, w_scale, *q_ptrs,
        scale_index, N, K, x.stride(1), stride_words, c.stride(1),
        W_4BIT=four_bit, W_SCALE_MUL=INT8_SCALE_MUL, Q_BLOCKSIZE=q_const[0],
        Q_NESTED=q_const[1], Q_BLOCKSIZE2=q_const[2], SCALE_A=scale_a is not None,
        HAS_BIAS=bias is not None, STORE_PREACT=store_preact, SCALE_C=scale_c is not None,
        SCALE_GATHER=scale_index is not None, SPLIT_K=split, LUT=lut, PREFETCH=prefetch,
        EVEN_K=K % bk == 0,
        BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1,
    )
    return c, preact
