"""(IA)^3 on convolutions (Conv2d, Conv3d; any stride, padding, dilation, groups, padding mode),
forward and backward, with its pure-PyTorch reference.

Forward: the scaling is folded into the weight, exact in real arithmetic: feedforward
W'[o, i, ...] = W[o, i, ...] * l[group(o) * C_in/groups + i], attention W'[o] = W[o] * l[o] and
b' = b * l; cuDNN then convolves with W', b'. One Triton launch over C_out*C_in/groups*k weight
elements (UNet 320->320 3x3: 0.9 M) instead of PEFT's pass over an activation (batch 8 at 64x64:
10.5 M) and the scaled copy its autograd keeps.

Backward: dx = dy conv^T W' by cuDNN in both modes (exact in real arithmetic: feedforward
(dy conv^T W) * l scales W's input channels, attention (dy * l) conv^T W its output channels), so
dx costs what the bare conv's input gradient costs. dl then comes from one Triton launch
(_ia3_conv_dl_kernel) that reads two activations once, a sum per channel of a product that
holds l once, divided by l:
- feedforward: dl = sum(x * g), g = dy conv^T W the gradient before the scaling; dx = g * l, so
  dl = sum(x * dx) / l (reads x and dx);
- attention: dl = sum(dy * u), u = conv(x, W, b) the output before the scaling; y = u * l, so
  dl = sum(dy * y) / l (reads dy and y; no u is kept).
Partial sums per block of pixels; the last program of each channel block sums them in a fixed
order (deterministic) and divides. A channel whose l is 0 keeps no trace of g or u (and inf or
NaN wipes them out); the same kernel finds such channels on the device and computes their
exact terms directly instead (a CUDA-core convolution of that channel alone), so the common
path needs no host sync and the same launch runs under CUDA-graph capture. W' is rebuilt in
the backward (a weight-sized launch) instead of being kept from the forward.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import config, mixed
from .dense import (_KERNEL_DTYPES, _Caller, _check_devices_and_dtypes, _launch_scale_reduce,
                    _sm_count, _split_k_counters, check_matching_dtypes, last_arrival_row_sum)
from .launch import FastKernel, PlanCache, cdiv, pointer_key


@triton.jit
def _ia3_conv_weight_kernel(
    w_ptr, scale_ptr, bias_ptr, w_out_ptr, bias_out_ptr,
    in_per_group, taps, out_per_group, stride_o, stride_i, stride_k,
    FEEDFORWARD: tl.constexpr,  # scale along input channels (group-aware), else output channels
    HAS_BIAS: tl.constexpr,  # attention: also bias_out = bias * l
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """w_out = w * l broadcast over a convolution weight read as (C_out, C_in/groups, taps)
    with strides (stride_o, stride_i, stride_k) (taps = the kernel's spatial positions, one
    stride in contiguous and channels_last storage alike). Program (o, i-block) scales a
    BLOCK_I x taps tile of output channel o: no integer division per element (the 1-D form
    spent three int64 div/mod, tens of instructions each, on every element of 4 bytes of
    traffic; its time was not profiled apart from the forward's). The product is formed in
    fp32 and rounded once, as PEFT's merge."""
    o = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < in_per_group
    if FEEDFORWARD:  # input channel (o // out_per_group) * in_per_group + i
        s = tl.load(scale_ptr + (o // out_per_group) * in_per_group + offs_i, mask=mask_i,
                    other=0.0).to(tl.float32)[:, None]
    else:
        s = tl.load(scale_ptr + o).to(tl.float32)
    row = o.to(tl.int64) * stride_o + offs_i.to(tl.int64)[:, None] * stride_i
    for k0 in range(0, taps, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs = row + offs_k[None, :] * stride_k
        mask = mask_i[:, None] & (offs_k < taps)[None, :]
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(w_out_ptr + offs, (w * s).to(w_out_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:  # attention: one output channel per program row, its bias once
        if pid_i == 0:
            b = tl.load(bias_ptr + o).to(tl.float32)
            tl.store(bias_out_ptr + o, (b * s).to(bias_out_ptr.dtype.element_ty))


@triton.jit
def _direct_channel_dl(
    dy_ptr, x_ptr, w_ptr, b_ptr, c, p_start, p_end, in_per_group, out_per_group,
    OD, OH, OW, ID, IH, IW, KD, KH, KW, sd, sh, sw, pd, ph, pw, dd, dh, dw,
    x_sn, x_sc, x_sd, x_sh, x_sw, dy_sn, dy_sc, dy_sd, dy_sh, dy_sw,
    w_so, w_si, w_sd, w_sh, w_sw,
    FEEDFORWARD: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The exact dl terms of channel c summed over output pixels [p_start, p_end), in fp32 FMAs
    (a CUDA-core convolution of that channel alone; spatial dims (D, H, W), size 1 where the
    conv has fewer):
    - attention (c an output channel): sum_p dy[c, p] * u[c, p], u = conv(x, W, b) here;
    - feedforward (c an input channel): sum_p sum_k x[c, in(p, k)] * sum_o W[o, c, k] dy[o, p]
      (= sum(x * g) with g = dy conv^T W, gathered from the output side)."""
    if FEEDFORWARD:  # the group's output channels; c's column of W
        first = (c // in_per_group) * out_per_group
        count = out_per_group
        w_base = w_ptr + (c % in_per_group) * w_si
    else:  # the group's input channels; c's row of W
        first = (c // out_per_group) * in_per_group
        count = in_per_group
        w_base = w_ptr + c * w_so
    total = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < p_end
        ow = offs_p % OW
        rest = offs_p // OW
        oh = rest % OH
        rest = rest // OH
        od = rest % OD
        n = rest // OD
        dy_pixel = dy_ptr + n * dy_sn + od * dy_sd + oh * dy_sh + ow * dy_sw
        acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for j in range(0, count):
            if FEEDFORWARD:
                g = tl.load(dy_pixel + (first + j) * dy_sc, mask=mask_p, other=0.0).to(tl.float32)
                w_j = w_base + (first + j) * w_so
                x_base = x_ptr + n * x_sn + c * x_sc
            else:
                w_j = w_base + j * w_si
                x_base = x_ptr + n * x_sn + (first + j) * x_sc
            for kd in range(0, KD):
                idd = od * sd - pd + kd * dd
                ok_d = mask_p & (idd >= 0) & (idd < ID)
                for kh in range(0, KH):
                    ih = oh * sh - ph + kh * dh
                    ok_h = ok_d & (ih >= 0) & (ih < IH)
                    for kw in range(0, KW):
                        iw = ow * sw - pw + kw * dw
                        ok = ok_h & (iw >= 0) & (iw < IW)
                        wv = tl.load(w_j + kd * w_sd + kh * w_sh + kw * w_sw).to(tl.float32)
                        xv = tl.load(x_base + idd * x_sd + ih * x_sh + iw * x_sw, mask=ok,
                                     other=0.0).to(tl.float32)
                        if FEEDFORWARD:
                            acc += wv * g * xv
                        else:
                            acc += wv * xv
        if not FEEDFORWARD:
            if HAS_BIAS:
                acc += tl.load(b_ptr + c).to(tl.float32)
            acc *= tl.load(dy_pixel + c * dy_sc, mask=mask_p, other=0.0).to(tl.float32)
        total += tl.where(mask_p, acc, 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _ia3_conv_dl_kernel(
    src_ptr, aux_ptr, dy_ptr, x_ptr, w_ptr, b_ptr, scale_ptr, partial_ptr, counter_ptr, dl_ptr,
    C, R, row_blocks, rows_per_program, pixels, pixels_per_program,
    src_sb, src_sr, src_sc, aux_sb, aux_sr, aux_sc,
    in_per_group, out_per_group,
    OD, OH, OW, ID, IH, IW, KD, KH, KW, sd, sh, sw, pd, ph, pw, dd, dh, dw,
    x_sn, x_sc, x_sd, x_sh, x_sw, dy_sn, dy_sc, dy_sd, dy_sh, dy_sw,
    w_so, w_si, w_sd, w_sh, w_sw,
    FEEDFORWARD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    FINISH_R: tl.constexpr,
):
    """dl of a conv's IA3 vector in one launch. src and aux are read as matrices of R rows
    (pixels) x C channels, one per grid row block group (strides *_sb, *_sr, *_sc):
    program (r, c) sums src * aux over its rows for its BLOCK_C channels (feedforward dx * x,
    attention dy * y: the product holds l once); a channel whose l is 0, inf or NaN gets
    instead its exact terms over the program's share of output pixels (_direct_channel_dl).
    Each program parks its partial row and counts itself on its channel block's counter; the
    last to arrive sums the rows in a fixed order (deterministic, whoever is last), divides by
    l where l is finite and non-zero, writes dl and puts the counter back to zero."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_r = tl.num_programs(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    rc = offs_c.to(tl.int64)
    l_block = tl.load(scale_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
    # l * 0 != 0 holds for inf and NaN: sum(..) / l cannot recover dl there either.
    direct = ((l_block == 0.0) | (l_block * 0.0 != 0.0)) & mask_c

    matrix = (pid_r // row_blocks).to(tl.int64)
    row_start = (pid_r % row_blocks) * rows_per_program
    row_end = tl.minimum(R, row_start + rows_per_program)
    src = src_ptr + matrix * src_sb
    aux = aux_ptr + matrix * aux_sb
    # A tile-shaped accumulator, reduced across rows once after the loop: a reduction in every
    # step (shuffles, shared memory, a barrier) held the channels_last pass to 1.2-1.8 TB/s of
    # the H200's ~4.2 (benchmarks/results/conv-h200.md).
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rr = offs_r.to(tl.int64)
        mask = (offs_r < row_end)[:, None] & mask_c[None, :]
        v = tl.load(src + rr[:, None] * src_sr + rc[None, :] * src_sc, mask=mask, other=0.0)
        a = tl.load(aux + rr[:, None] * aux_sr + rc[None, :] * aux_sc, mask=mask, other=0.0)
        acc += v.to(tl.float32) * a.to(tl.float32)
    part = tl.sum(acc, axis=0)

    if tl.sum(direct.to(tl.int32), axis=0) > 0:
        p_start = pid_r.to(tl.int64) * pixels_per_program
        p_end = tl.minimum(pixels, p_start + pixels_per_program)
        for cc in range(0, BLOCK_C):
            c = pid_c * BLOCK_C + cc
            lc = tl.load(scale_ptr + c, mask=c < C, other=1.0)
            if (lc == 0.0) | (lc * 0.0 != 0.0):
                terms = _direct_channel_dl(
                    dy_ptr, x_ptr, w_ptr, b_ptr, c, p_start, p_end, in_per_group, out_per_group,
                    OD, OH, OW, ID, IH, IW, KD, KH, KW, sd, sh, sw, pd, ph, pw, dd, dh, dw,
                    x_sn, x_sc, x_sd, x_sh, x_sw, dy_sn, dy_sc, dy_sd, dy_sh, dy_sw,
                    w_so, w_si, w_sd, w_sh, w_sw, FEEDFORWARD, HAS_BIAS, BLOCK_P)
                part = tl.where(offs_c == c, terms, part)

    tl.store(partial_ptr + pid_r.to(tl.int64) * C + rc, part, mask=mask_c)
    is_last, total = last_arrival_row_sum(partial_ptr, counter_ptr + pid_c, n_r, C, rc, mask_c,
                                          BLOCK_C, FINISH_R)
    if is_last:
        dl = tl.where(direct, total, total / tl.where(direct, 1.0, l_block))  # no 0/0 unused
        tl.store(dl_ptr + offs_c, dl.to(dl_ptr.dtype.element_ty), mask=mask_c)


# The OpOverload itself: torch.ops.aten.convolution_backward resolves the overload packet in
# Python on every call.
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default

_WEIGHT_KERNEL, _DL_KERNEL = (
    (k if config.triton_interpreted() else FastKernel(k))
    for k in (_ia3_conv_weight_kernel, _ia3_conv_dl_kernel))

# Eager launches of both kernels replay launch plans (launch.PlanCache): an eager conv
# fwd+bwd has three launches (the forward's and the backward's weight folds, dl), which cost
# 37, 32 and 47 us of host in context on the H200 host (host-overhead-conv-h200.log) against
# ~5-10 for each aten kernel PEFT's C++ autograd launches.
_WEIGHT_PLANS = PlanCache(_WEIGHT_KERNEL, ("w_ptr", "scale_ptr", "bias_ptr", "w_out_ptr",
                                           "bias_out_ptr"))
_DL_PLANS = PlanCache(_DL_KERNEL, ("src_ptr", "aux_ptr", "dy_ptr", "x_ptr", "w_ptr", "b_ptr",
                                   "scale_ptr", "partial_ptr", "counter_ptr", "dl_ptr"))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _channel_outer(weight: torch.Tensor) -> torch.Tensor:
    """The weight with the output channel outermost in storage (contiguous or channels_last,
    as cuDNN wants it kept), copied to contiguous otherwise."""
    if weight.is_contiguous():
        return weight
    fmt = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
    if weight.dim() in (4, 5) and weight.is_contiguous(memory_format=fmt):
        return weight
    return weight.contiguous()


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def scale_conv_weight(weight, scale, feedforward: bool, groups: int, bias=None):
    """(W * l broadcast as the IA3 scaling of a conv weight, bias * l for attention or None)."""
    weight = _channel_outer(weight)
    out = torch.empty_like(weight)  # keeps the weight's memory format
    bias_out = torch.empty_like(bias) if (bias is not None and not feedforward) else None
    if weight.numel() == 0:
        return out, bias_out
    shape, strides = weight.shape, weight.stride()
    tensors = (weight, scale, bias, out, bias_out)
    pointers = pointer_key(tensors)
    key = (None if pointers is None else
           (shape, strides, scale.numel(), feedforward, groups, pointers, weight.device))
    c_out, in_per_group = shape[0], shape[1]
    taps = 1
    for d in shape[2:]:
        taps *= d
    # Tiles of up to 2048 elements (16 per thread of 4 warps): taps along one axis (3x3: 16
    # lanes, 9 used), input channels along the other; a kernel with more than 64 taps loops.
    block_k = min(_next_pow2(taps), 64)
    block_i = max(1, min(_next_pow2(in_per_group), 2048 // block_k))

    def arguments():
        # The spatial positions share one stride (the last spatial dimension's) in contiguous
        # and channels_last storage alike, the layouts _channel_outer leaves.
        stride_k = strides[-1] if len(shape) > 2 else 1
        return (tensors + (in_per_group, taps, c_out // groups, strides[0], strides[1], stride_k),
                dict(FEEDFORWARD=feedforward, HAS_BIAS=bias_out is not None,
                     BLOCK_I=block_i, BLOCK_K=block_k, num_warps=4))

    _WEIGHT_PLANS.launch(key, (c_out, cdiv(in_per_group, block_i)), tensors, arguments)
    return out, bias_out


def _rows_by_channel_strides(t: torch.Tensor, collapse: bool = True):
    """((B, rows, C), (batch, row, column) strides) reading an (N, C, *spatial) activation as
    rows of channels: (1, N*S, C) where batch and spatial positions share one stride pattern
    (channels_last), else (N, S, C) (NCHW: the rows are the contiguous spatial positions).
    None when the spatial dimensions do not flatten to one stride."""
    shape, strides = t.shape, t.stride()
    n, c = shape[0], shape[1]
    s = 1
    for d in shape[2:]:
        s *= d
    inner = [d for d in range(2, t.dim()) if shape[d] > 1]
    row_stride = strides[inner[-1]] if inner else 1
    for d in range(2, t.dim() - 1):
        if shape[d] > 1 and strides[d] != strides[d + 1] * shape[d + 1]:
            return None
    if collapse and (n == 1 or strides[0] == s * row_stride):
        return (1, n * s, c), (0, row_stride, strides[1])
    return (n, s, c), (strides[0], row_stride, strides[1])


def _matrix_views(tensors, collapse: bool = True):
    """Activations (None allowed) read as B matrices of pixel rows x channel columns:
    (the tensors, copied to contiguous where their spatial dims do not flatten to one stride,
    (B, R, C), one (batch, row, column) stride triple each, (0, 0, 0) for None). Collapsed to
    one matrix where every tensor's batch and pixels share a stride pattern (channels_last)."""
    tensors = list(tensors)
    layouts = []
    for i, t in enumerate(tensors):
        layout = None if t is None else _rows_by_channel_strides(t, collapse)
        if t is not None and layout is None:
            tensors[i] = t = t.contiguous()
            layout = _rows_by_channel_strides(t, collapse)
        layouts.append(layout)
    if len({lay[0] for lay in layouts if lay is not None}) > 1:
        # One layout collapsed (channels_last) and another did not: keep the batch axis for all.
        layouts = [None if t is None else _rows_by_channel_strides(t, collapse=False)
                   for t in tensors]
    shape = next(lay[0] for lay in layouts if lay is not None)
    return tensors, shape, [(0, 0, 0) if lay is None else lay[1] for lay in layouts]


def _channel_pass(src, *, scale=None, out=None, aux=None, scale_index=None, tiles=None):
    """_launch_scale_reduce over activations: out = src * l per channel and/or per-block sums
    of src * aux per channel. out may be src (in place). Returns the partial sums (or None).
    scale_index: a mixed-adapter batch (scale an (adapters, C) table, example n uses row
    scale_index[n]); the partial sums then come per example: (N, blocks, C)."""
    per_example = scale_index is not None
    in_place = out is src
    if in_place and _rows_by_channel_strides(src) is None:
        raise RuntimeError(f"ia3_conv: cannot scale a tensor of strides {src.stride()} in place")
    (src, out, aux), shape, (src_s, out_s, aux_s) = _matrix_views(
        (src, None if in_place else out, aux), collapse=not per_example)
    if in_place:
        out, out_s = src, src_s
    _, partial = _launch_scale_reduce(src, scale=scale, scale_axis=1, out=out, aux=aux,
                                      traceable=False, batched=(shape, src_s, out_s, aux_s),
                                      scale_index=scale_index, tiles=tiles)
    if per_example and partial is not None:
        return partial.view(shape[0], -1, shape[2])
    return partial


# --------------------------------------------------------------------------------------------
# Forward, backward, autograd
# --------------------------------------------------------------------------------------------


def conv_forward_impl(x, weight, bias, scale, feedforward: bool, geometry):
    """y = conv(x, W', b') with the IA3 scaling folded into W' (and b'). Returns (y, W')."""
    stride, padding, dilation, groups = geometry
    w_scaled, b_scaled = scale_conv_weight(weight, scale, feedforward, groups, bias)
    y = torch.convolution(x, w_scaled, bias if feedforward else b_scaled, stride, padding,
                          dilation, False, [0] * len(stride), groups)
    return y, w_scaled


def _dense(t: torch.Tensor) -> bool:
    """Contiguous, or channels_last(_3d): the layouts cuDNN and the channel pass read as they are."""
    if t.is_contiguous():
        return True
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return fmt is not None and t.is_contiguous(memory_format=fmt)


def _memory_format(t: torch.Tensor):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def conv_backward_impl(dy, x, weight, bias, scale, y, feedforward: bool, geometry,
                       need_dx: bool, need_dscale: bool, need_dweight: bool, need_dbias: bool):
    """(dx, dscale, dweight, dbias), None where not needed. x as convolved (padded for non-zero
    padding modes), y the layer's output (attention dl; None otherwise)."""
    stride, padding, dilation, groups = geometry
    out_pad = [0] * len(stride)
    if not _dense(dy):
        # An expanded or strided upstream gradient: cuDNN and the pass want a dense layout.
        dy = dy.contiguous(memory_format=_memory_format(y if y is not None else x))
    bias_sizes = [weight.shape[0]] if need_dbias else None
    dscale = None
    # dx = dy conv^T W' in both modes (exact in real arithmetic: feedforward (dy conv^T W)*l
    # scales W's input channels, attention (dy*l) conv^T W its output channels); W' is
    # rebuilt here (one weight-sized launch) rather than kept from the forward, which would
    # hold a second copy of every conv weight between a model's forward and backward.
    need_input_grad = need_dx or (feedforward and need_dscale)
    w_scaled = (scale_conv_weight(weight, scale, feedforward, groups)[0]
                if need_input_grad else weight)
    dx, dweight, dbias = _CONV_BACKWARD(
        dy, x, w_scaled, bias_sizes, stride, padding, dilation, False, out_pad, groups,
        [need_input_grad, need_dweight, need_dbias])
    if need_dbias and not feedforward:
        dbias = dbias * scale.reshape(-1)  # b' = b * l
    if need_dscale:
        # feedforward dl = sum(x * g) with g = dx / l; attention dl = sum(dy * u), u = y / l
        dscale = _dscale(dx if feedforward else dy, x if feedforward else y, dy, x, weight,
                         bias, scale, feedforward, geometry)
    if not need_dx:
        dx = None
    if need_dweight:  # dL/dW = dL/dW' * l, broadcast as the forward's
        dweight, _ = scale_conv_weight(dweight, scale, feedforward, groups)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    return dx, dscale, dweight, dbias


def _spatial3(values, fill):
    """A conv's per-spatial-dimension values as (D, H, W), `fill` for the dimensions it lacks."""
    values = list(values)
    return [fill] * (3 - len(values)) + values


# The dl kernel's grid and arguments by everything they depend on (shapes, strides, geometry,
# mode, device): the grid and ~50 integer arguments cost ~40 us of Python to build (H100
# host, a third of a small conv's whole backward); a hit costs one key.
_dl_layouts: dict = {}
_MAX_DL_LAYOUTS = 1024


def _dl_layout(src, aux, dy, x, weight, feedforward, has_bias, geometry):
    """(copy src, copy aux, grid, integer arguments, constexpr arguments) of _ia3_conv_dl_kernel."""
    stride, padding, dilation, groups = geometry
    interpreted = config.triton_interpreted()
    (src_c, aux_c), (B, R, C), (src_s, aux_s) = _matrix_views((src, aux))
    copy_src, copy_aux = src_c is not src, aux_c is not aux
    rows_contiguous = src_s[1] == 1
    # Tiles of the channel pass (benchmarks/results/tune-channel-pass-h100.log, H100, a
    # read-only sum over two bf16 activations): channels_last 64 x 64 (128 wide from 256
    # channels), 8 CTAs an SM of 4 warps; NCHW 128 rows (contiguous) x 16 channels, 16 CTAs of 8.
    if interpreted:
        block_r, block_c, ctas_per_sm, num_warps, block_p = 16, 32, 1, 4, 16
    elif rows_contiguous:
        block_r, block_c, ctas_per_sm, num_warps, block_p = 128, 16, 16, 8, 256
    else:
        block_r, block_c, ctas_per_sm, num_warps, block_p = 64, (128 if C >= 256 else 64), 8, 4, 256
    col_programs = cdiv(C, block_c)
    target = max(1, (ctas_per_sm * _sm_count(src.device)) // (col_programs * B))
    row_blocks = max(1, min(cdiv(R, block_r), target))
    rows_per_program = cdiv(cdiv(max(R, 1), row_blocks), block_r) * block_r
    row_blocks = cdiv(max(R, 1), rows_per_program)
    row_programs = B * row_blocks
    out_sp = _spatial3(dy.shape[2:], 1)
    pixels = dy.shape[0] * out_sp[0] * out_sp[1] * out_sp[2]
    pixels_per_program = cdiv(cdiv(pixels, row_programs), block_p) * block_p
    c_out, in_per_group = weight.shape[:2]
    ints = (C, R, row_blocks, rows_per_program, pixels, pixels_per_program, *src_s, *aux_s,
            in_per_group, c_out // groups,
            *out_sp, *_spatial3(x.shape[2:], 1), *_spatial3(weight.shape[2:], 1),
            *_spatial3(stride, 1), *_spatial3(padding, 0), *_spatial3(dilation, 1),
            x.stride(0), x.stride(1), *_spatial3(x.stride()[2:], 0),
            dy.stride(0), dy.stride(1), *_spatial3(dy.stride()[2:], 0),
            weight.stride(0), weight.stride(1), *_spatial3(weight.stride()[2:], 0))
    # The last program of a channel block sums row_programs partial rows: ~4K fp32 a step.
    consts = dict(FEEDFORWARD=feedforward, HAS_BIAS=has_bias and not feedforward,
                  BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_P=block_p,
                  FINISH_R=max(16, 4096 // block_c), num_warps=num_warps)
    return copy_src, copy_aux, (row_programs, col_programs), ints, consts


def _dscale(scaled_grad, other, dy, x, weight, bias, scale, feedforward, geometry):
    """dl per channel in one launch of _ia3_conv_dl_kernel: sum(scaled_grad * other) / l, the
    product holding l once (feedforward: dx = g*l against x; attention: y = u*l against dy);
    channels whose l is 0, inf or NaN (found on the device, no host sync) from a direct
    computation of their exact terms. x is the conv's input as convolved."""
    if scaled_grad.numel() == 0:
        return torch.zeros_like(scale)
    key = (scaled_grad.shape, scaled_grad.stride(), other.stride(), dy.shape, dy.stride(),
           x.shape, x.stride(), weight.shape, weight.stride(), geometry, feedforward,
           bias is not None, scaled_grad.device)
    layout = _dl_layouts.get(key)
    if layout is None:
        layout = _dl_layout(scaled_grad, other, dy, x, weight, feedforward, bias is not None,
                            geometry)
        if len(_dl_layouts) >= _MAX_DL_LAYOUTS:
            _dl_layouts.clear()
        _dl_layouts[key] = layout
    copy_src, copy_aux, grid, ints, consts = layout
    if copy_src:
        scaled_grad = scaled_grad.contiguous()
    if copy_aux:
        other = other.contiguous()
    partial = torch.empty((grid[0], scale.numel()), device=scale.device, dtype=torch.float32)
    dl = torch.empty_like(scale)
    counters = _split_k_counters(grid[1], scale.device, False)
    tensors = (scaled_grad, other, dy, x, weight, bias, scale, partial, counters, dl)
    pointers = pointer_key(tensors)
    _DL_PLANS.launch(None if pointers is None else (key, pointers), grid, tensors,
                     lambda: (tensors + ints, consts))
    return dl


def mixed_conv_forward(x, weight, bias, table, feedforward: bool, geometry, adapter_index):
    """(y, u) of a mixed-adapter batch; u = conv(x, W, b) for attention layers, else None."""
    stride, padding, dilation, groups = geometry
    src = x if feedforward else _conv(x, weight, bias, stride, padding, dilation, groups)
    scaled = torch.empty_like(src)
    _channel_pass(src, scale=table, out=scaled, scale_index=adapter_index)
    if feedforward:
        return _conv(scaled, weight, bias, stride, padding, dilation, groups), None
    return scaled, src


class _MixedConvFunction(torch.autograd.Function):
    """A mixed-adapter batch (mixed.py): l differs per example, so it cannot fold into the
    weight. Feedforward: one pass writes x*l (per example, per channel), cuDNN convolves;
    backward g = dy conv^T W, one pass turns g into dx = g*l in place and reduces each
    example's sum(g*x) per channel. Attention: cuDNN's u = conv(x, W, b), one pass writes
    y = u*l; backward one pass forms dy*l for cuDNN (dx, dW, db) and one reduces each
    example's sum(dy*u). Each adapter's gradient sums its own examples (mixed.adapter_sums)."""

    @staticmethod
    def forward(ctx, x, weight, bias, table, feedforward, geometry, adapter_index):
        y, u = mixed_conv_forward(x, weight, bias, table, feedforward, geometry, adapter_index)
        ctx.flags = (feedforward, geometry)
        ctx.save_for_backward(x, weight, table, adapter_index, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, table, adapter_index, u = ctx.saved_tensors
        feedforward, (stride, padding, dilation, groups) = ctx.flags
        need_dx, need_dweight, need_dbias, need_dtable = ctx.needs_input_grad[:4]
        if not _dense(dy):
            dy = dy.contiguous(memory_format=_memory_format(x))
        out_pad = [0] * len(stride)
        bias_sizes = [weight.shape[0]] if need_dbias else None
        dx = dweight = dbias = dtable = per_example = None
        if feedforward:
            xs = None
            if need_dweight:
                xs = torch.empty_like(x)
                _channel_pass(x, scale=table, out=xs, scale_index=adapter_index)
            g, dweight, dbias = _CONV_BACKWARD(
                dy, xs if xs is not None else x, weight, bias_sizes, stride, padding, dilation,
                False, out_pad, groups, [need_dx or need_dtable, need_dweight, need_dbias])
            if (need_dx or need_dtable) and x.numel() > 0:
                per_example = _channel_pass(g, scale=table if need_dx else None,
                                            out=g if need_dx else None,
                                            aux=x if need_dtable else None,
                                            scale_index=adapter_index)
            dx = g if need_dx else None
        else:
            if need_dx or need_dweight or need_dbias:
                dyl = torch.empty_like(dy)
                _channel_pass(dy, scale=table, out=dyl, scale_index=adapter_index)
                dx, dweight, dbias = _CONV_BACKWARD(
                    dyl, x, weight, bias_sizes, stride, padding, dilation, False, out_pad,
                    groups, [need_dx, need_dweight, need_dbias])
            if need_dtable and dy.numel() > 0:
                per_example = _channel_pass(dy, aux=u, scale_index=adapter_index)
        if need_dtable:
            dtable = (torch.zeros_like(table) if per_example is None else mixed.adapter_sums(
                per_example.sum(1), adapter_index, table.shape[0], table))
        return dx, dweight, dbias, dtable, None, None, None


class _ConvFunction(torch.autograd.Function):
    """Eager autograd entry: saves x, W, b and l (inputs and parameters, alive anyway) and,
    for an attention dl, the output y."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, feedforward, geometry):
        y, _ = conv_forward_impl(x, weight, bias, scale, feedforward, geometry)
        ctx.flags = (feedforward, geometry)
        keep_y = not feedforward and ctx.needs_input_grad[3]
        ctx.save_for_backward(x, weight, bias, scale, y if keep_y else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, y = ctx.saved_tensors
        feedforward, geometry = ctx.flags
        need = ctx.needs_input_grad
        dx, dscale, dweight, dbias = conv_backward_impl(
            dy, x, weight, bias, scale, y, feedforward, geometry, need[0], need[3], need[1],
            need[2])
        return dx, dweight, dbias, dscale, None, None


# --------------------------------------------------------------------------------------------
# Reference and public entry point
# --------------------------------------------------------------------------------------------


def _tuple(value, nd: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd


def _explicit_padding(padding, kernel_size, dilation, nd):
    """Per-dimension (left, right) padding; padding may be an int, a tuple, 'valid' or 'same'
    (nn.Conv's convention: the extra element of an odd total goes right)."""
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in _tuple(padding, nd)]


def _padding_plan(pads: tuple, padding_mode: str):
    """((F.pad's flat padding, its mode) or None where the convolution pads by itself, the
    numeric padding left for the convolution)."""
    if padding_mode == "zeros" and all(a == b for a, b in pads):
        return None, tuple(a for a, _ in pads)
    flat = tuple(p for pair in reversed(pads) for p in pair)  # F.pad: last dimension first
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return (flat, mode), (0,) * len(pads)


def _conv_geometry_uncached(nd, kernel_size, stride, padding, dilation, groups, padding_mode):
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    pads = _explicit_padding(padding, kernel_size, dilation, nd)
    explicit, num_pad = _padding_plan(tuple(pads), padding_mode)
    return explicit, (stride, num_pad, dilation, groups)


_conv_geometry_cached = functools.lru_cache(maxsize=1024)(_conv_geometry_uncached)


def _conv_geometry(nd, kernel_size, stride, padding, dilation, groups, padding_mode):
    """(F.pad's (padding, mode) or None, the hashable geometry (stride, numeric padding,
    dilation, groups) of the convolution after it) for nn.Conv's arguments. Cached: the same
    handful of layer settings come every call; building them cost 1.2-1.5 us against 0.3 for
    the lookup on the development CPU (the GPU hosts run Python ~3-6x slower, where a small
    conv's whole fwd+bwd is ~300 us); lists (unhashable) are computed each time."""
    if torch.compiler.is_compiling():  # dynamo traces through caches (and warns about them)
        return _conv_geometry_uncached(nd, kernel_size, stride, padding, dilation, groups,
                                       padding_mode)
    try:
        return _conv_geometry_cached(nd, kernel_size, stride, padding, dilation, groups,
                                     padding_mode)
    except TypeError:
        return _conv_geometry_uncached(nd, kernel_size, stride, padding, dilation, groups,
                                       padding_mode)


def _conv(x, weight, bias, stride, padding, dilation, groups):
    return torch.convolution(x, weight, bias, stride, padding, dilation, False,
                             [0] * len(stride), groups)


def torch_ia3_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   scale: torch.Tensor, feedforward: bool, stride=1, padding=0, dilation=1,
                   groups: int = 1, padding_mode: str = "zeros",
                   adapter_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure-PyTorch reference, PEFT's exact arithmetic (peft.tuners.ia3.layer._ConvNd.forward):
    feedforward `conv((x.to(l.dtype) * l).to(x.dtype), W, b)`, attention
    `(conv(x, W, b).to(l.dtype) * l).to(x.dtype)`, l of shape (1, C, 1, ...).
    adapter_index: a mixed-adapter batch, scale the (adapters, C) table (mixed.py)."""
    nd = weight.dim() - 2
    explicit, (stride, num_pad, dilation, _) = _conv_geometry(
        nd, weight.shape[2:], stride, padding, dilation, groups, padding_mode)
    # (C, 1, ...) on an unbatched x: nn.Conv's unbatched output (PEFT's (1, C, 1, ...) vector
    # would broadcast it to a batch of one).
    if adapter_index is not None:
        lvec = scale[adapter_index].reshape(adapter_index.numel(), -1, *([1] * nd))
    else:
        lvec = scale.reshape(*([1] * (x.dim() - nd - 1)), -1, *([1] * nd))
    if feedforward:
        x = (x.to(scale.dtype) * lvec).to(x.dtype)
    if explicit is not None:
        x = F.pad(x, explicit[0], mode=explicit[1])
    if x.dim() == nd + 1:
        u = _conv(x.unsqueeze(0), weight, bias, stride, num_pad, dilation, groups).squeeze(0)
    else:
        u = _conv(x, weight, bias, stride, num_pad, dilation, groups)
    if feedforward:
        return u
    return (u.to(scale.dtype) * lvec).to(u.dtype)


def _check_inputs(x, weight, bias, scale, feedforward, groups, describe, adapter_index=None):
    where = _Caller(describe, "ia3_conv")
    nd = weight.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"{where}: weight must be 3-D, 4-D or 5-D (Conv1d/2d/3d), got shape "
                         f"{tuple(weight.shape)}")
    c_out, in_per_group = weight.shape[:2]
    c_in = in_per_group * groups
    if groups < 1 or c_out % groups:
        raise ValueError(f"{where}: groups={groups} must divide out_channels={c_out}")
    if x.dim() not in (nd + 1, nd + 2) or x.shape[-nd - 1] != c_in:
        raise ValueError(f"{where}: x must be (N, {c_in}, {nd} spatial dims) or unbatched, "
                         f"got shape {tuple(x.shape)}")
    expected = c_in if feedforward else c_out
    if adapter_index is not None:
        if x.dim() != nd + 2:
            raise ValueError(f"{where}: a mixed-adapter batch needs a batched x (N, C, ...), got "
                             f"shape {tuple(x.shape)}")
        mixed.check_adapter_index(where, x, scale, adapter_index, expected, feedforward)
    elif scale.numel() != expected:
        kind = ("feedforward (scales in_channels)" if feedforward
                else "attention (scales out_channels)")
        raise ValueError(f"{where}: a {kind} layer needs {expected} scaling values, got a "
                         f"vector of shape {tuple(scale.shape)}")
    if bias is not None and bias.numel() != c_out:
        raise ValueError(f"{where}: bias must have out_channels={c_out} elements, got "
                         f"{tuple(bias.shape)}")
    _check_devices_and_dtypes(where, x, weight, bias, scale)
    return where, nd


def _kernel_refusal(x, weight, scale) -> Optional[str]:
    for name, t in (("weight", weight), ("input", x), ("scaling vector", scale)):
        if t.dtype not in _KERNEL_DTYPES:
            return f"conv {name} dtype {t.dtype} (kernels cover float16, bfloat16, float32)"
    if x.device.type != "cuda" and not config.triton_interpreted():
        return (f"backend 'triton' on a {x.device.type} tensor needs TRITON_INTERPRET=1 set before "
                "import")
    return None


def _fold_weight_torch(weight, scale, feedforward: bool, groups: int):
    """W * l broadcast as the IA3 scaling of a conv weight, in PyTorch ops (for torch.compile,
    which fuses it into one small kernel): the product in l's dtype, rounded once."""
    ones = [1] * (weight.dim() - 2)
    flat = scale.reshape(-1)
    if feedforward:
        c_out, in_pg = weight.shape[:2]
        return (weight.reshape(groups, c_out // groups, in_pg, *weight.shape[2:]).to(scale.dtype)
                * flat.view(groups, 1, in_pg, *ones)).reshape(weight.shape).to(weight.dtype)
    return (weight.to(scale.dtype) * flat.view(-1, 1, *ones)).to(weight.dtype)


class _CompiledFeedforwardConv(torch.autograd.Function):
    """Feedforward conv under torch.compile (dynamo traces both passes into the graph). The
    forward folds l into the weight, as the eager op. The backward takes the input gradient of
    the unscaled weight, g = dy conv^T W, and forms dx = g*l and dl = sum(x*g) (Inductor fuses
    both into one pass; PEFT's arithmetic, exact for every l). Differentiating through the
    folded weight instead, autograd's way, computed the weight gradient dW' (a whole extra
    convolution) to get dl: ours compiled was 1.14x (median) to 1.42x PEFT compiled's
    forward+backward on the benchmark's convs (suite-h100.md)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, geometry):
        stride, padding, dilation, groups = geometry
        ctx.geometry = geometry
        ctx.save_for_backward(x, weight, scale)
        return _conv(x, _fold_weight_torch(weight, scale, True, groups), bias, stride, padding,
                     dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_dx, need_dweight, need_dbias, need_dscale = ctx.needs_input_grad[:4]
        nd = weight.dim() - 2
        g, dweight, dbias = _CONV_BACKWARD(
            dy, x, weight, [weight.shape[0]] if need_dbias else None, stride, padding, dilation,
            False, [0] * nd, groups, [need_dx or need_dscale, need_dweight, need_dbias])
        dx = dscale = None
        if need_dx or need_dscale:
            # PEFT's (x.to(l.dtype) * l).to(x.dtype): its backward sees g in l's dtype.
            g = g.to(scale.dtype)
            if need_dx:
                dx = (g * scale.reshape(1, -1, *([1] * nd))).to(x.dtype)
            if need_dscale:
                dscale = (g * x.to(scale.dtype)).sum(dim=[0, *range(2, nd + 2)])
                dscale = dscale.reshape(scale.shape)
        if need_dweight:  # dL/dW = dL/dW' * l, broadcast as the forward's
            dweight = _fold_weight_torch(dweight, scale, True, groups)
        return dx, dweight, dbias, dscale, None


def _compiled_conv(x, weight, bias, scale, feedforward: bool, geometry):
    """The op under torch.compile, in PyTorch ops Inductor can fuse (no graph break):
    feedforward as _CompiledFeedforwardConv; attention folds l into W and b where dl is not
    needed, else PEFT's arithmetic conv(x, W, b) * l (dl = sum(dy * u) needs u, which a folded
    forward does not produce without the weight gradient's extra convolution)."""
    stride, padding, dilation, groups = geometry
    if feedforward:
        return _CompiledFeedforwardConv.apply(x, weight, bias, scale, geometry)
    if torch.is_grad_enabled() and scale.requires_grad:
        u = _conv(x, weight, bias, stride, padding, dilation, groups)
        lvec = scale.reshape(1, -1, *([1] * (weight.dim() - 2)))
        return (u.to(scale.dtype) * lvec).to(u.dtype)
    w = _fold_weight_torch(weight, scale, False, groups)
    b = (bias.to(scale.dtype) * scale.reshape(-1)).to(bias.dtype) if bias is not None else None
    return _conv(x, w, b, stride, padding, dilation, groups)


def ia3_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             scale: torch.Tensor, feedforward: bool, stride=1, padding=0, dilation=1,
             groups: int = 1, padding_mode: str = "zeros", *,
             adapter_index: Optional[torch.Tensor] = None, describe=None) -> torch.Tensor:
    """(IA)^3 convolution, as nn.Conv1d/2d/3d with the same arguments. scale: the product of
    the active IA3 vectors, C_in values (feedforward: scales the input channels) or C_out
    (attention: scales the output channels, bias included). NCHW or channels_last x; output
    in cuDNN's layout for x, dtype x's (autocast's under autocast). Differentiable in x, scale,
    weight and bias. adapter_index: a mixed-adapter batch, scale the (adapters, C) table; example
    n uses row adapter_index[n] (mixed.py)."""
    where, nd = _check_inputs(x, weight, bias, scale, feedforward, groups, describe,
                              adapter_index)
    check_matching_dtypes(where, x, weight, bias, "nn.Conv")
    backend = config.get_backend()
    use = backend != "torch" and not (backend == "auto" and x.device.type != "cuda")
    if use:
        reason = _kernel_refusal(x, weight, scale)
        if reason is not None:
            config.fallback(reason)
            use = False
    if not use or (adapter_index is not None and torch.compiler.is_compiling()):
        # Compiled mixed batches: the reference's gather, which Inductor fuses.
        return torch_ia3_conv(x, weight, bias, scale, feedforward, stride, padding, dilation,
                              groups, padding_mode, adapter_index)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):  # what nn.Conv does under autocast
        compute_dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(compute_dtype), weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    explicit, geometry = _conv_geometry(nd, weight.shape[2:], stride, padding, dilation, groups,
                                        padding_mode)  # hashable geometry: plan keys
    if explicit is not None:  # differentiable; commutes with the scaling
        x = F.pad(x, explicit[0], mode=explicit[1])
    if not scale.is_contiguous():
        scale = scale.contiguous()
    if adapter_index is not None:
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad
                                        or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _MixedConvFunction.apply(x, weight, bias, scale, feedforward, geometry,
                                            adapter_index)
        y, _ = mixed_conv_forward(x, weight, bias, scale, feedforward, geometry, adapter_index)
        return y
    if torch.compiler.is_compiling():
        y = _compiled_conv(x, weight, bias, scale, feedforward, geometry)
    elif torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _ConvFunction.apply(x, weight, bias, scale, feedforward, geometry)
    else:
        y, _ = conv_forward_impl(x, weight, bias, scale, feedforward, geometry)
    return y.squeeze(0) if unbatched else y
