"""Property test over every fused layer kind: any draw of kind (dense linear and GPT-2's
fan_in_fan_out layout, LLM.int8, NF4/FP4 with any blocksize and double quantization, Conv2d,
Conv3d), mode, shape (empty and single-row batches included), dtype, input layout (contiguous,
transposed, stride 0, strided slices, channels_last), bias, strategy, and adapters (1-3 stacked
active adapters, or a mixed-adapter batch over a table of 1-3) gives outputs and every gradient
within the numerics bar of the float64 reference. Strict mode is on, so a draw that the kernels
would hand to the reference path fails instead of passing trivially.

Profiles: "ci" (default, bounded for 2 CPU cores under the interpreter) and "long"
(HYPOTHESIS_PROFILE=long, 3000 cases or IA3_FUZZ_EXAMPLES, run on the GPU; README, Testing)."""
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ia3_kernels
from conftest import DEVICE, KERNEL_DTYPES, assert_within_peft_bar
from helpers import quantize_4bit, quantize_rows
from ia3_kernels import fourbit, int8

settings.register_profile("ci", max_examples=80, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=int(os.environ.get("IA3_FUZZ_EXAMPLES", 3000)),
                          deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LINEAR_KINDS = ("dense", "int8", "nf4", "fp4")
KINDS = LINEAR_KINDS + ("conv2d", "conv3d")
# Blocksizes bnb offers that small in_features still reach; straddling and aligned rows both.
FOURBIT_BLOCKSIZES = (32, 64, 128, 256)


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(KINDS))
    c = dict(kind=kind, feedforward=draw(st.booleans()), has_bias=draw(st.booleans()),
             dtype=draw(st.sampled_from(KERNEL_DTYPES)), adapters=draw(st.integers(1, 3)),
             mixed=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
             path=draw(st.sampled_from(["auto", "fused", "cublas"])))
    if kind in LINEAR_KINDS:
        c.update(batch=draw(st.integers(0, 5)), tokens=draw(st.sampled_from([None, 1, 2, 7])),
                 K=draw(st.integers(1, 160)), N=draw(st.integers(1, 96)),
                 layout=draw(st.sampled_from(["contiguous", "transposed", "stride0", "sliced"])),
                 fan_in_fan_out=kind == "dense" and draw(st.booleans()))
        if kind in ("nf4", "fp4"):
            c.update(blocksize=draw(st.sampled_from(FOURBIT_BLOCKSIZES)),
                     nested=draw(st.booleans()))
        return c
    nd = 2 if kind == "conv2d" else 3
    groups = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(nd)]
    dilation = [draw(st.integers(1, 2)) for _ in range(nd)]
    stride = [draw(st.integers(1, 2)) for _ in range(nd)]
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if draw(st.booleans()) and stride == [1] * nd:
        padding, pads = "same", [d * (k - 1) // 2 + 1 for d, k in zip(dilation, kernel)]
    else:
        padding = pads = [draw(st.integers(0, 2)) for _ in range(nd)]
    # Spatial sizes that give at least one output and satisfy the padding mode (reflect: pad < size).
    spatial = [max(d * (k - 1) + 1 - 2 * p, p + 1, 1) + draw(st.integers(0, 3 if nd == 2 else 1))
               for d, k, p in zip(dilation, kernel, pads)]
    c.update(nd=nd, groups=groups, c_in_per_group=draw(st.integers(1, 5)),
             c_out=groups * draw(st.integers(1, 4)), kernel=kernel, spatial=spatial,
             batch=draw(st.integers(0 if not c["mixed"] else 1, 3)),
             conv=dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                       padding_mode=mode),
             layout=draw(st.sampled_from(["contiguous", "channels_last", "stride0", "sliced"])))
    return c


@dataclass
class Problem:
    """One draw made concrete. ops take (x, bias, scale, adapter_index): `ours` the op under
    test, `peft` PEFT's arithmetic in the same dtype, `exact(weight)` the dense reference with
    the (dequantized) weight passed in, run in float64 on the inputs or on their absolute values."""
    ours: Callable
    peft: Callable
    exact: Callable
    weight64: torch.Tensor
    x_base: torch.Tensor      # the leaf whose gradient is compared
    x_view: Callable          # base -> the x the op sees (a transpose, expand or slice of it)
    bias: Optional[torch.Tensor]
    vectors: list             # stacked active adapters, or [table] for a mixed batch
    index: Optional[torch.Tensor]


def linear_problem(c, g) -> Problem:
    kind, K, N, dtype, ff = c["kind"], c["K"], c["N"], c["dtype"], c["feedforward"]
    lead = (c["batch"],) if c["tokens"] is None else (c["batch"], c["tokens"])
    if c["layout"] == "transposed":  # x's last dimension has stride rows (2-D) / is permuted (3-D)
        x_base = torch.randn(K, *lead, generator=g)
        x_view = lambda t: t.permute(*range(1, t.dim()), 0)  # noqa: E731
    elif c["layout"] == "stride0":  # every token of an example is the same row: stride 0
        x_base = torch.randn(lead[0], 1, K, generator=g) if len(lead) == 2 else \
            torch.randn(1, K, generator=g)
        x_view = lambda t: t.expand(*lead, K)  # noqa: E731
    elif c["layout"] == "sliced":  # every other feature of a wider tensor
        x_base = torch.randn(*lead, 2 * K, generator=g)
        x_view = lambda t: t[..., ::2]  # noqa: E731
    else:
        x_base = torch.randn(*lead, K, generator=g)
        x_view = lambda t: t  # noqa: E731
    w = torch.randn(N, K, generator=g) / K**0.5
    bias = torch.randn(N, generator=g) if c["has_bias"] else None
    x_base, bias = x_base.to(DEVICE, dtype), None if bias is None else bias.to(DEVICE, dtype)
    dense_ref = lambda weight: (lambda x, b, s, i: ia3_kernels.torch_ia3_linear(  # noqa: E731
        x, weight, b, s, ff, adapter_index=i))
    if kind == "dense":
        fifo = c["fan_in_fan_out"]
        wd = (w.t().contiguous() if fifo else w).to(DEVICE, dtype)
        ours = lambda x, b, s, i: ia3_kernels.ia3_linear(x, wd, b, s, ff, fifo,  # noqa: E731
                                                         adapter_index=i)
        peft = lambda x, b, s, i: ia3_kernels.torch_ia3_linear(x, wd, b, s, ff, fifo,  # noqa: E731
                                                               adapter_index=i)
        weight64 = (wd.t() if fifo else wd).double()
    elif kind == "int8":
        cb, scb = (t.to(DEVICE) for t in quantize_rows(w))
        ours = lambda x, b, s, i: ia3_kernels.ia3_linear_int8(x, cb, scb, b, s, ff,  # noqa: E731
                                                              adapter_index=i)
        peft = lambda x, b, s, i: int8.torch_ia3_linear_int8(x, cb, scb, b, s, ff,  # noqa: E731
                                                             adapter_index=i)
        weight64 = cb.double() * (scb.double()[:, None] / 127.0)
    else:
        packed, state = quantize_4bit(N, K, c["kind"], c["nested"], c["blocksize"],
                                      seed=c["seed"])
        w4 = fourbit.FourBitWeight.from_bnb(packed, state)
        ours = lambda x, b, s, i: ia3_kernels.ia3_linear_4bit(x, w4, b, s, ff,  # noqa: E731
                                                              adapter_index=i)
        peft = lambda x, b, s, i: fourbit.torch_ia3_linear_4bit(x, w4, b, s, ff,  # noqa: E731
                                                                adapter_index=i)
        weight64 = fourbit.dequantize_4bit(w4, torch.float64)
    features = K if ff else N
    shape = (1, K) if ff else (N, 1)  # PEFT's parameter shapes
    return Problem(ours, peft, dense_ref, weight64, x_base, x_view, bias,
                   *adapter_scales(c, g, features, shape, lead[0]))


def conv_problem(c, g) -> Problem:
    nd, groups, dtype, ff = c["nd"], c["groups"], c["dtype"], c["feedforward"]
    c_in, c_out = c["c_in_per_group"] * groups, c["c_out"]
    full = (c["batch"], c_in, *c["spatial"])
    if c["layout"] == "stride0":  # one image repeated over the batch: batch stride 0
        x_base = torch.randn(1, *full[1:], generator=g)
        x_view = lambda t: t.expand(*full)  # noqa: E731
    elif c["layout"] == "sliced":  # every other column of a wider image
        x_base = torch.randn(*full[:-1], 2 * full[-1], generator=g)
        x_view = lambda t: t[..., ::2]  # noqa: E731
    elif c["layout"] == "channels_last":
        fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
        x_base = torch.randn(*full, generator=g).contiguous(memory_format=fmt)
        x_view = lambda t: t.contiguous(memory_format=fmt)  # noqa: E731 (clone() keeps it too)
    else:
        x_base = torch.randn(*full, generator=g)
        x_view = lambda t: t  # noqa: E731
    w = torch.randn(c_out, c["c_in_per_group"], *c["kernel"], generator=g)
    w = (w / (c["c_in_per_group"] * w[0, 0].numel()) ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(c_out, generator=g).to(DEVICE, dtype) if c["has_bias"] else None
    kw = c["conv"]
    ours = lambda x, b, s, i: ia3_kernels.ia3_conv(x, w, b, s, ff, **kw,  # noqa: E731
                                                   adapter_index=i)
    peft = lambda x, b, s, i: ia3_kernels.torch_ia3_conv(x, w, b, s, ff, **kw,  # noqa: E731
                                                         adapter_index=i)
    exact = lambda weight: (lambda x, b, s, i: ia3_kernels.torch_ia3_conv(  # noqa: E731
        x, weight, b, s, ff, **kw, adapter_index=i))
    features = c_in if ff else c_out
    shape = (1, features) + (1,) * nd  # PEFT's _ConvNd parameter shape
    return Problem(ours, peft, exact, w.double(), x_base.to(DEVICE, dtype), x_view, bias,
                   *adapter_scales(c, g, features, shape, c["batch"]))


def adapter_scales(c, g, features, shape, examples):
    """Stacked active adapters (PEFT multiplies their vectors), or one (adapters, F) table and an
    index per example. Values in [0.5, 1.5) with a sign flip now and then."""
    def vector(size):
        v = torch.rand(size, generator=g) + 0.5
        return (v * torch.where(torch.rand(size, generator=g) < 0.1, -1.0, 1.0)).to(DEVICE)
    if c["mixed"]:
        index = torch.randint(0, c["adapters"], (examples,), generator=g).to(DEVICE)
        return [vector((c["adapters"], features))], index
    return [vector(shape) for _ in range(c["adapters"])], None


def forward_backward(op, p: Problem, cast, dy_seed, dy_dtype):
    """op on leaves cast by `cast`; returns y and the gradients of x's base, the vectors, bias.
    The upstream gradient is drawn in dy_dtype (the layer's dtype) for every variant, so that the
    float64 references differentiate at the dy the layers receive, as they take x and W as
    rounded to that dtype: a reference at the unrounded fp32 dy credited PEFT's attention path,
    which rounds dy*l afresh, with undoing part of dy's own rounding (fp16 Conv3d, one 3x3 tap
    dominating the weight: PEFT 7.3e-5 against ours 5.4e-4 there, over the bar by 0.2%)."""
    x_base = cast(p.x_base).detach().clone().requires_grad_()
    vectors = [cast(v).detach().clone().requires_grad_() for v in p.vectors]
    bias = None if p.bias is None else cast(p.bias).detach().clone().requires_grad_()
    scale = vectors[0]
    for v in vectors[1:]:
        scale = scale * v
    y = op(p.x_view(x_base), bias, scale, p.index)
    inputs = [x_base] + vectors + ([bias] if bias is not None else [])
    if y.numel() == 0:
        return y, [torch.zeros_like(t) for t in inputs]
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed))
    dy = dy.to(y.device, dy_dtype)
    dy = cast(dy) if y.dtype == torch.float64 else dy.to(y.dtype)
    return y, list(torch.autograd.grad(y, inputs, dy))


# Found by the long profile (seed 27, 2026-12-05) before forward_backward drew dy in the layer's
# dtype for the references too: kept as a fixed case.
FP16_CONV3D_ONE_TAP = {
    "kind": "conv3d", "feedforward": False, "has_bias": False, "dtype": torch.float16,
    "adapters": 2, "mixed": False, "seed": 1362, "path": "auto", "nd": 3, "groups": 1,
    "c_in_per_group": 1, "c_out": 1, "kernel": [1, 3, 3], "spatial": [2, 5, 5], "batch": 2,
    "conv": {"stride": [2, 1, 1], "padding": [0, 0, 0], "dilation": [1, 2, 2], "groups": 1,
             "padding_mode": "zeros"},
    "layout": "contiguous"}


# Found by the long profile (seed 99, 2026-12-05) before the bar's floor became one ulp: a
# scalar layer whose dx (0.2646, at the bottom of its binade) ours rounded one ulp off, twice
# (dy*l*SCB/127 before the dot, then the output), where PEFT's double rounding landed exactly.
FP16_INT8_SCALAR_ATTENTION = {
    "kind": "int8", "feedforward": False, "has_bias": False, "dtype": torch.float16,
    "adapters": 1, "mixed": True, "seed": 798, "path": "auto", "batch": 1, "tokens": None,
    "K": 1, "N": 1, "layout": "sliced", "fan_in_fan_out": False}


@given(cases())
@example(c=FP16_CONV3D_ONE_TAP)
@example(c=FP16_INT8_SCALAR_ATTENTION)
def test_fuzz_against_reference(triton_backend, c):
    g = torch.Generator().manual_seed(c["seed"])
    p = linear_problem(c, g) if c["kind"] in LINEAR_KINDS else conv_problem(c, g)
    dtype = c["dtype"]
    same = lambda t: t  # noqa: E731
    f64 = lambda t: t.double()  # noqa: E731
    f64_abs = lambda t: t.double().abs()  # noqa: E731
    ia3_kernels.set_strict(True)  # a fallback to the reference would make the comparison moot
    try:
        with ia3_kernels.dense_path(c["path"]):
            y, grads = forward_backward(p.ours, p, same, c["seed"], dtype)
    finally:
        ia3_kernels.set_strict(False)
    y_peft, grads_peft = forward_backward(p.peft, p, same, c["seed"], dtype)
    y_ref, grads_ref = forward_backward(p.exact(p.weight64), p, f64, c["seed"], dtype)
    y_abs, grads_abs = forward_backward(p.exact(p.weight64.abs()), p, f64_abs, c["seed"], dtype)
    assert y.shape == y_peft.shape and y.dtype == y_peft.dtype == dtype, c
    assert_within_peft_bar(y, y_peft, y_ref, dtype, f"y {c}", y_abs)
    names = ["dx"] + [f"dl{i}" for i in range(len(p.vectors))] + ["dbias"]
    for name, a, pe, r, m in zip(names, grads, grads_peft, grads_ref, grads_abs):
        assert a.shape == pe.shape and a.dtype == pe.dtype, (name, c)
        assert_within_peft_bar(a, pe, r, dtype, f"{name} {c}", m)
