"""Property test: any draw of mode, shape (M = 0 and 1 included), dtype, layout, bias, strategy
and number of stacked adapters gives outputs and gradients within the numerics bar of the
reference. Profiles: "ci" (default, bounded for 2 CPU cores) and "long" (HYPOTHESIS_PROFILE=long,
thousands of cases, meant for the GPU)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ia3_kernels
from conftest import DEVICE, KERNEL_DTYPES, assert_within_peft_bar

settings.register_profile("ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@st.composite
def cases(draw):
    return dict(
        M=draw(st.integers(0, 40)), K=draw(st.integers(1, 96)), N=draw(st.integers(1, 96)),
        feedforward=draw(st.booleans()), fan_in_fan_out=draw(st.booleans()),
        has_bias=draw(st.booleans()), dtype=draw(st.sampled_from(KERNEL_DTYPES)),
        path=draw(st.sampled_from(["auto", "fused", "cublas"])), adapters=draw(st.integers(1, 3)),
        transposed_x=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def forward_backward(fn, x, w, b, vectors, c, dy):
    x = x.detach().clone().requires_grad_()
    vectors = [v.detach().clone().requires_grad_() for v in vectors]
    b = b.detach().clone().requires_grad_() if b is not None else None
    scale = vectors[0]
    for v in vectors[1:]:
        scale = scale * v  # several active adapters: PEFT multiplies their vectors
    y = fn(x, w, b, scale, c["feedforward"], c["fan_in_fan_out"])
    inputs = [x] + vectors + ([b] if b is not None else [])
    if y.numel() == 0:
        return y, [torch.zeros_like(t) for t in inputs]
    return y, list(torch.autograd.grad(y, inputs, dy.to(y.dtype)))


@given(cases())
def test_fuzz_against_reference(triton_backend, c):
    g = torch.Generator().manual_seed(c["seed"])
    M, K, N, dtype = c["M"], c["K"], c["N"], c["dtype"]
    x = torch.randn(K, M, generator=g).t() if c["transposed_x"] else torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    w = w.t().contiguous() if c["fan_in_fan_out"] else w
    b = torch.randn(N, generator=g) if c["has_bias"] else None
    size = (1, K) if c["feedforward"] else (N, 1)  # PEFT's parameter shapes
    vectors = [(torch.rand(size, generator=g) + 0.5).to(DEVICE) for _ in range(c["adapters"])]
    dy = torch.randn(M, N, generator=g).to(DEVICE)
    x, w = x.to(DEVICE, dtype), w.to(DEVICE, dtype)
    b = b.to(DEVICE, dtype) if b is not None else None
    with ia3_kernels.dense_path(c["path"]):
        y, grads = forward_backward(ia3_kernels.ia3_linear, x, w, b, vectors, c, dy)
    y_peft, grads_peft = forward_backward(ia3_kernels.torch_ia3_linear, x, w, b, vectors, c, dy)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref, grads_ref = forward_backward(ia3_kernels.torch_ia3_linear, f64(x), f64(w), f64(b),
                                        [v.double() for v in vectors], c, dy.double())
    abs64 = lambda t: None if t is None else t.double().abs()  # noqa: E731
    y_abs, grads_abs = forward_backward(ia3_kernels.torch_ia3_linear, abs64(x), abs64(w), abs64(b),
                                        [v.double().abs() for v in vectors], c, dy.double().abs())
    assert y.shape == (M, N) and y.dtype == dtype
    assert_within_peft_bar(y, y_peft, y_ref, dtype, f"y {c}", y_abs)
    for i, (a, p, r, m) in enumerate(zip(grads, grads_peft, grads_ref, grads_abs)):
        assert a.shape == p.shape, (i, c)
        assert_within_peft_bar(a, p, r, dtype, f"grad {i} {c}", m)
