"""(IA)^3 on convolutions (Conv2d, Conv3d; any stride, padding, dilation, groups, padding mode),
forward and backward, with its pure-PyTorch reference.

Forward: the scaling is folded into the weight, exact in real arithmetic: feedforward
W'[o, i, ...] = W[o, i, ...] * l[group(o) * C_in/groups + i], attention W'[o] = W[o] * l[o] and
b' = b * l; cuDNN then convolves with W', b'. One Triton launch over C_out*C_in/groups*k weight
elements (UNet 320->320 3x3: 0.9 M) instead of PEFT's pass over an activation (batch 8 at 64x64:
10.5 M) and the scaled copy its autograd keeps.

Backward (one Triton pass over the activations, deterministic per-channel partial sums):
- feedforward: g = dy conv^T W by cuDNN (the input gradient before the scaling); the pass turns
  g into dx = g * l in place and reduces dl = sum(x * g) per input channel.
- attention: dx = dy conv^T W' by cuDNN (exact: (dy * l) conv^T W = dy conv^T (W * l)); the pass
  reduces s = sum(dy * y) per output channel and dl = s / l, since y = u * l (sum(dy * u) =
  sum(dy * y) / l): no pre-activation u is kept. A channel with l == 0 has y == 0 and keeps no
  trace of u; its dl = sum(dy * u) needs u recomputed (one convolution). Whether l has zeros is
  known without a device sync: the forward's weight kernel also counts them into pinned host
  memory (a ring of slots), read back in the backward.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import config, mixed
from .dense import (_KERNEL_DTYPES, _check_devices_and_dtypes, _launch_matmul,
                    _launch_scale_reduce, _reduce_partials, check_matching_dtypes)
from .launch import FastKernel, cdiv


@triton.jit
def _ia3_conv_weight_kernel(
    w_ptr, scale_ptr, bias_ptr, w_out_ptr, bias_out_ptr, zeros_ptr,
    numel, stride_o, stride_i, in_per_group, out_per_group, n_scale,
    FEEDFORWARD: tl.constexpr,  # scale along input channels (group-aware), else output channels
    HAS_BIAS: tl.constexpr,  # attention: also bias_out = bias * l
    COUNT_ZEROS: tl.constexpr,  # program 0 stores how many entries of l are exactly zero
    BLOCK: tl.constexpr,
):
    """w_out = w * l broadcast over a convolution weight, read in storage order (contiguous or
    channels_last: the output channel is the outermost dimension in both; stride_i is the
    input channel's stride). The product is formed in fp32 and rounded once, as PEFT's merge."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    out_channel = offs // stride_o
    if FEEDFORWARD:
        in_channel = (offs // stride_i) % in_per_group
        channel = (out_channel // out_per_group) * in_per_group + in_channel
    else:
        channel = out_channel
    s = tl.load(scale_ptr + channel, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_out_ptr + offs, (w * s).to(w_out_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS or COUNT_ZEROS:
        if pid == 0:
            zeros = tl.zeros((BLOCK,), dtype=tl.int32)
            for c0 in range(0, n_scale, BLOCK):
                offs_c = c0 + tl.arange(0, BLOCK)
                mask_c = offs_c < n_scale
                sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
                if HAS_BIAS:  # attention: n_scale == C_out
                    b = tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                    tl.store(bias_out_ptr + offs_c, (b * sc).to(bias_out_ptr.dtype.element_ty),
                             mask=mask_c)
                zeros += (sc == 0.0).to(tl.int32)
            if COUNT_ZEROS:
                tl.store(zeros_ptr, tl.sum(zeros, axis=0))


# The OpOverload itself: torch.ops.aten.convolution_backward resolves the overload packet in
# Python on every call.
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default

_WEIGHT_KERNEL = (_ia3_conv_weight_kernel if config.triton_interpreted()
                  else FastKernel(_ia3_conv_weight_kernel))


# --------------------------------------------------------------------------------------------
# Zero counts in pinned host memory
# --------------------------------------------------------------------------------------------


class _ZeroCounts:
    """A ring of 2**16 int32 slots in pinned host memory per device, allocated once and never
    freed (a freed block could be handed to another user while a kernel still writes it). The
    host writes -1 into a slot, the forward's weight kernel overwrites it with the count of
    zeros of l, and the backward reads it: in a training step the kernel ran long before, so
    the read costs no device sync. A slot is reused after 65536 later forwards; each slot
    remembers which call owns it, and a backward that finds its slot taken, or the kernel not
    run after a second of waiting, asks the device instead."""

    SLOTS = 1 << 16
    WAIT_S = 1.0

    def __init__(self):
        self._buffers: dict = {}
        self._owners: list = [None] * self.SLOTS
        self._next = 0

    def take(self, device: torch.device):
        """(slot tensor for the kernel, ticket for read()); the slot holds -1 until written."""
        key = (device.type, device.index)
        entry = self._buffers.get(key)
        if entry is None:
            pinned = device.type == "cuda"
            buf = torch.full((self.SLOTS,), -1, dtype=torch.int32, pin_memory=pinned)
            entry = self._buffers[key] = (buf, buf.numpy())
        buf, array = entry
        slot = self._next
        self._next = (slot + 1) % self.SLOTS
        token = object()
        self._owners[slot] = token
        array[slot] = -1
        return buf[slot:slot + 1], (key, slot, token)

    def read(self, ticket, scale: torch.Tensor) -> int:
        key, slot, token = ticket
        array = self._buffers[key][1]
        if self._owners[slot] is token:
            deadline = time.perf_counter() + self.WAIT_S
            while True:
                value = int(array[slot])
                if value >= 0 and self._owners[slot] is token:
                    return value
                if self._owners[slot] is not token or time.perf_counter() > deadline:
                    break
        return int((scale == 0).sum())  # slot reused or never written: ask the device


_zero_counts = _ZeroCounts()


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


def scale_conv_weight(weight, scale, feedforward: bool, groups: int, bias=None, zero_slot=None):
    """(W * l broadcast as the IA3 scaling of a conv weight, bias * l for attention or None).
    zero_slot: a 1-element int32 tensor that receives the number of zeros of l."""
    weight = _channel_outer(weight)
    out = torch.empty_like(weight)  # keeps the weight's memory format
    bias_out = torch.empty_like(bias) if (bias is not None and not feedforward) else None
    c_out, in_per_group = weight.shape[:2]
    numel = weight.numel()
    block = 1024
    _WEIGHT_KERNEL[(max(1, cdiv(numel, block)),)](
        weight, scale, bias, out, bias_out, zero_slot,
        numel, weight.stride(0), weight.stride(1), in_per_group, c_out // groups, scale.numel(),
        FEEDFORWARD=feedforward, HAS_BIAS=bias_out is not None, COUNT_ZEROS=zero_slot is not None,
        BLOCK=block, num_warps=4,
    )
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


def _channel_pass(src, *, scale=None, out=None, aux=None, sum_dtype=torch.float32,
                  partial_shape=(), scale_index=None):
    """_launch_scale_reduce over activations: out = src * l per channel and/or per-block sums
    of src * aux per channel. out may be src (in place). Returns the partial sums (or None).
    scale_index: a mixed-adapter batch (scale an (adapters, C) table, example n uses row
    scale_index[n]); the partial sums then come per example: (N, blocks, C)."""
    per_example = scale_index is not None
    src_layout = _rows_by_channel_strides(src, collapse=not per_example)
    if src_layout is None:
        if out is src:
            raise RuntimeError(f"ia3_conv: cannot scale a tensor of strides {src.stride()} in place")
        src = src.contiguous()
        src_layout = _rows_by_channel_strides(src, collapse=not per_example)
    aux_layout = None
    if aux is not None:
        aux_layout = _rows_by_channel_strides(aux, collapse=not per_example)
        if aux_layout is None:
            aux = aux.contiguous()
            aux_layout = _rows_by_channel_strides(aux, collapse=not per_example)
    out_layout = src_layout if out is src else (
        None if out is None else _rows_by_channel_strides(out, collapse=not per_example))
    tensors = (src, out, aux)
    layouts = [src_layout, out_layout, aux_layout]
    if len({lay[0] for lay in layouts if lay is not None}) > 1:
        # One layout collapsed (channels_last) and another did not: keep the batch axis for all.
        layouts = [None if t is None else _rows_by_channel_strides(t, collapse=False)
                   for t in tensors]
    shape = layouts[0][0]
    strides = [(0, 0, 0) if lay is None else lay[1] for lay in layouts]
    _, partial = _launch_scale_reduce(src, scale=scale, scale_axis=1, out=out, aux=aux,
                                      sum_dtype=sum_dtype, traceable=False,
                                      batched=(shape, *strides), partial_shape=partial_shape,
                                      scale_index=scale_index)
    if per_example and partial is not None:
        return partial.view(shape[0], -1, shape[2])
    return partial


# --------------------------------------------------------------------------------------------
# Forward, backward, autograd
# --------------------------------------------------------------------------------------------


def conv_forward_impl(x, weight, bias, scale, feedforward: bool, geometry, zero_slot=None):
    """y = conv(x, W', b') with the IA3 scaling folded into W' (and b'). Returns (y, W')."""
    stride, padding, dilation, groups = geometry
    w_scaled, b_scaled = scale_conv_weight(weight, scale, feedforward, groups, bias, zero_slot)
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


# The feedforward backward of a pointwise conv (1x1 kernel, stride 1, no padding, one group) on
# channels_last activations is a linear layer over pixels: dx = (dy W) * l and dl = sum x*(dy W)
# as ONE fused GEMM (dense.py's kernel: reads dy and x, writes dx) instead of cuDNN's input
# gradient g plus a pass (writes g, reads g and x, writes dx: two activation-sized transfers
# more). ResNet-50's 1x1 64->64 channels_last forward+backward measured 1.85x the bare conv with
# the pass (benchmarks/results/conv-h100.md). "gemm" takes the GEMM route there; "auto" keeps
# the pass until an H100 run of `python -m benchmarks.conv --compare-paths` decides.
_CONV_PATHS = ("auto", "pass", "gemm")
_conv_path = {"path": "auto"}


def conv_path(path: str):
    """Force the pointwise feedforward backward strategy: "pass" (cuDNN + channel pass), "gemm"
    (one fused GEMM where the conv is pointwise and channels_last), "auto"."""
    return config.path_override(_conv_path, path, _CONV_PATHS)


def _pixel_rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A channels_last(_3d) activation as its (pixels, channels) matrix: a view, or None."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is None or not t.is_contiguous(memory_format=fmt):
        return None
    return t.permute(0, *range(2, t.dim()), 1).reshape(-1, t.shape[1])


def _pointwise_feedforward_grads(dy, x, weight, scale, geometry, need_dx, need_dscale):
    """(dx, dl) of a pointwise channels_last feedforward conv from one fused GEMM, or None
    where the conv or the layouts do not qualify (or the path is not "gemm")."""
    stride, padding, _, groups = geometry
    if (_conv_path["path"] != "gemm" or groups != 1 or any(k != 1 for k in weight.shape[2:])
            or any(s != 1 for s in stride) or any(p != 0 for p in padding)
            or x.numel() == 0 or scale.numel() != x.shape[1]):
        return None
    x_rows, dy_rows = _pixel_rows(x), _pixel_rows(dy.to(weight.dtype))
    if x_rows is None or dy_rows is None:
        return None
    w = weight.reshape(weight.shape[0], weight.shape[1])  # (C_out, C_in): B[n=c_out, k=c_in]
    dx_rows, _, partial, _ = _launch_matmul(
        dy_rows, (w.stride(0), w.stride(1)), w, x_rows.shape, weight.dtype, scale_c=scale,
        aux=x_rows if need_dscale else None, reduce_aux=need_dscale, store_c=need_dx,
        sum_dtype=scale.dtype, traceable=False)
    dx = (dx_rows.view(x.shape[0], *x.shape[2:], x.shape[1]).permute(0, x.dim() - 1,
                                                                     *range(1, x.dim() - 1))
          if need_dx else None)
    return dx, _reduce_partials(partial, scale) if need_dscale else None


def conv_backward_impl(dy, x, weight, w_scaled, bias, scale, y, zero_count, feedforward: bool,
                       geometry, need_dx: bool, need_dscale: bool, need_dweight: bool,
                       need_dbias: bool):
    """(dx, dscale, dweight, dbias), None where not needed. zero_count: how many entries of l
    are zero (attention dl), or None when unknown (then u is recomputed for zero channels)."""
    stride, padding, dilation, groups = geometry
    nd = len(stride)
    out_pad = [0] * nd
    if not _dense(dy):
        # An expanded or strided upstream gradient: cuDNN and the pass want a dense layout.
        dy = dy.contiguous(memory_format=_memory_format(y if y is not None else x))
    bias_sizes = [weight.shape[0]] if need_dbias else None
    dx = dscale = dweight = dbias = None
    pointwise = (_pointwise_feedforward_grads(dy, x, weight, scale, geometry, need_dx,
                                              need_dscale)
                 if feedforward and (need_dx or need_dscale) and not need_dweight else None)
    if pointwise is not None:
        dx, dscale = pointwise
        if need_dbias:
            dbias = dy.sum([0] + list(range(2, dy.dim())), dtype=torch.float32).to(weight.dtype)
    elif feedforward:
        need_g = need_dx or need_dscale
        g, dweight, dbias = _CONV_BACKWARD(
            dy, x, weight, bias_sizes, stride, padding, dilation, False, out_pad, groups,
            [need_g, need_dweight, need_dbias])
        if need_g and x.numel() > 0:
            partial = _channel_pass(g, scale=scale if need_dx else None,
                                    out=g if need_dx else None, aux=x if need_dscale else None,
                                    sum_dtype=scale.dtype, partial_shape=tuple(scale.shape))
            dscale = _sum_partials(partial, scale.dtype) if need_dscale else None
        elif need_dscale:
            dscale = torch.zeros_like(scale)
        dx = g if need_dx else None
    else:
        dx, dweight, dbias = _CONV_BACKWARD(
            dy, x, w_scaled, bias_sizes, stride, padding, dilation, False, out_pad, groups,
            [need_dx, need_dweight, need_dbias])
        if need_dbias:
            dbias = dbias * scale.reshape(-1)  # b' = b * l
        if need_dscale:
            dscale = _attention_dscale(dy, x, weight, bias, scale, y, zero_count, geometry)
    if need_dweight:  # dL/dW = dL/dW' * l, broadcast as the forward's
        dweight, _ = scale_conv_weight(dweight, scale, feedforward, groups)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)
    return dx, dscale, dweight, dbias


def _attention_dscale(dy, x, weight, bias, scale, y, zero_count, geometry):
    """dl = sum(dy * u) per output channel, from sum(dy * y) / l (y = u * l); channels with
    l == 0 from a recomputed u."""
    if dy.numel() == 0:
        return torch.zeros_like(scale)
    # Three small ops on the common path (no zeros): sum of the partials, the division, the cast.
    s = _sum_partials(_channel_pass(dy, aux=y, partial_shape=tuple(scale.shape)), torch.float32)
    dl = s / scale
    if zero_count is None or zero_count > 0:
        stride, padding, dilation, groups = geometry
        u = torch.convolution(x, weight, bias, stride, padding, dilation, False,
                              [0] * len(stride), groups)
        dims = [0] + list(range(2, u.dim()))
        exact = (dy.float() * u.float()).sum(dims)
        dl = torch.where(scale.reshape(-1) == 0, exact, dl.reshape(-1)).view(scale.shape)
    return dl.to(scale.dtype)


def _sum_partials(partial, dtype):
    """Per-block partial sums (fp32, or dtype where there is one block) -> their sum, in a
    fixed order (deterministic), in dtype."""
    if partial.shape[0] == 1:
        return partial[0] if partial.dtype == dtype else partial[0].to(dtype)
    total = partial.sum(0)
    return total if dtype == torch.float32 else total.to(dtype)


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
    """Eager autograd entry: saves x and W for feedforward; y, W' (and x, W, b for a zero l or
    a weight gradient) for attention."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, feedforward, geometry):
        need = ctx.needs_input_grad
        want_zero_count = (not feedforward and need[3] and x.is_cuda
                           and not torch.cuda.is_current_stream_capturing())
        zero_slot, ticket = (_zero_counts.take(x.device) if want_zero_count else (None, None))
        y, w_scaled = conv_forward_impl(x, weight, bias, scale, feedforward, geometry, zero_slot)
        ctx.flags = (feedforward, geometry, ticket, bool(need[3]) and not feedforward and not x.is_cuda)
        if feedforward:
            ctx.save_for_backward(x, weight, None, scale, None, None)
        else:
            ctx.save_for_backward(x, weight, bias, scale, w_scaled, y if need[3] else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, w_scaled, y = ctx.saved_tensors
        feedforward, geometry, ticket, count_on_host = ctx.flags
        zero_count = None
        if ticket is not None:
            zero_count = _zero_counts.read(ticket, scale)
        elif count_on_host:  # CPU tensors (interpreter): counting costs no device sync
            zero_count = int((scale == 0).sum())
        need = ctx.needs_input_grad
        dx, dscale, dweight, dbias = conv_backward_impl(
            dy, x, weight, w_scaled, bias, scale, y, zero_count, feedforward, geometry,
            need[0], need[3], need[1], need[2])
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


def _pad_input(x, pads, padding_mode):
    """x padded as nn.Conv pads it, and the numeric padding left for the convolution."""
    symmetric = all(a == b for a, b in pads)
    if padding_mode == "zeros" and symmetric:
        return x, [a for a, _ in pads]
    flat = [p for pair in reversed(pads) for p in pair]  # F.pad: last dimension first
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, flat, mode=mode), [0] * len(pads)


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
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    pads = _explicit_padding(padding, weight.shape[2:], dilation, nd)
    # (C, 1, ...) on an unbatched x: nn.Conv's unbatched output (PEFT's (1, C, 1, ...) vector
    # would broadcast it to a batch of one).
    if adapter_index is not None:
        lvec = scale[adapter_index].reshape(adapter_index.numel(), -1, *([1] * nd))
    else:
        lvec = scale.reshape(*([1] * (x.dim() - nd - 1)), -1, *([1] * nd))
    if feedforward:
        x = (x.to(scale.dtype) * lvec).to(x.dtype)
    x, num_pad = _pad_input(x, pads, padding_mode)
    if x.dim() == nd + 1:
        u = _conv(x.unsqueeze(0), weight, bias, stride, num_pad, dilation, groups).squeeze(0)
    else:
        u = _conv(x, weight, bias, stride, num_pad, dilation, groups)
    if feedforward:
        return u
    return (u.to(scale.dtype) * lvec).to(u.dtype)


class _Caller:
    """Names the caller in error messages; the layer's description is built only on error."""

    def __init__(self, describe):
        self.describe = describe

    def __str__(self) -> str:
        return self.describe() if self.describe is not None else "ia3_conv"


def _check_inputs(x, weight, bias, scale, feedforward, groups, describe, adapter_index=None):
    where = _Caller(describe)
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
        mixed.check_adapter_index(str(where), x, scale, adapter_index, expected, feedforward)
    elif scale.numel() != expected:
        kind = ("feedforward (scales in_channels)" if feedforward
                else "attention (scales out_channels)")
        raise ValueError(f"{where}: a {kind} layer needs {expected} scaling values, got a "
                         f"vector of shape {tuple(scale.shape)}")
    if bias is not None and bias.numel() != c_out:
        raise ValueError(f"{where}: bias must have out_channels={c_out} elements, got "
                         f"{tuple(bias.shape)}")
    _check_devices_and_dtypes(lambda: str(where), x, weight, bias, scale)
    return where, nd


def _kernel_refusal(x, weight, scale) -> Optional[str]:
    for name, t in (("weight", weight), ("input", x), ("scaling vector", scale)):
        if t.dtype not in _KERNEL_DTYPES:
            return f"conv {name} dtype {t.dtype} (kernels cover float16, bfloat16, float32)"
    if x.device.type != "cuda" and not config.triton_interpreted():
        return (f"backend 'triton' on a {x.device.type} tensor needs TRITON_INTERPRET=1 set before "
                "import")
    return None


def _folded_conv_torch(x, weight, bias, scale, feedforward, geometry):
    """The same weight folding in PyTorch ops, for torch.compile (which fuses the scaling into
    one small kernel): exact like the eager op; its backward differentiates through W', i.e.
    computes the weight gradient dW' (one convolution more than the eager op's backward) and
    dl from it."""
    stride, padding, dilation, groups = geometry
    nd = weight.dim() - 2
    ones = [1] * nd
    flat = scale.reshape(-1)
    if feedforward:
        c_out, in_pg = weight.shape[:2]
        w = (weight.reshape(groups, c_out // groups, in_pg, *weight.shape[2:]).to(scale.dtype)
             * flat.view(groups, 1, in_pg, *ones)).reshape(weight.shape).to(weight.dtype)
        b = bias
    else:
        w = (weight.to(scale.dtype) * flat.view(-1, 1, *ones)).to(weight.dtype)
        b = (bias.to(scale.dtype) * flat).to(bias.dtype) if bias is not None else None
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
    check_matching_dtypes(lambda: str(where), x, weight, bias, "nn.Conv")
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
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    pads = _explicit_padding(padding, weight.shape[2:], dilation, nd)
    x, num_pad = _pad_input(x, pads, padding_mode)  # differentiable; commutes with the scaling
    if not scale.is_contiguous():
        scale = scale.contiguous()
    geometry = (list(stride), list(num_pad), list(dilation), groups)
    if adapter_index is not None:
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad
                                        or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return _MixedConvFunction.apply(x, weight, bias, scale, feedforward, geometry,
                                            adapter_index)
        y, _ = mixed_conv_forward(x, weight, bias, scale, feedforward, geometry, adapter_index)
        return y
    if torch.compiler.is_compiling():
        y = _folded_conv_torch(x, weight, bias, scale, feedforward, geometry)
    elif torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _ConvFunction.apply(x, weight, bias, scale, feedforward, geometry)
    else:
        y, _ = conv_forward_impl(x, weight, bias, scale, feedforward, geometry)
    return y.squeeze(0) if unbatched else y
