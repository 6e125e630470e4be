"""Determinism beyond run-to-run repeats (those are in test_gpu*.py, test_small_m.py and
test_mixed_ops.py): batch splits, and convolutions.

Batch splits. The rows of y and dx depend only on their own rows of x (and dy), so splitting a
batch must give the same rows, bit for bit, wherever the kernels reduce each row in the same
order. The launchers choose tiles (BLOCK_M/N/K, split-K, GEMV or tl.dot) by M: within one
choice (same kernels, same constexpr tiles, warps and stages) a row comes out the same whatever
batch it is in; across choices its K-reduction order differs, as cuBLAS's does across its own
heuristics (the bare nn.Linear is not batch-invariant either). The test records every launch's
kernel and compile-time configuration, and checks bitwise equality for each split whose parts
run the same configuration as the whole batch; it must find such splits for every layer kind.
dl and dbias are sums over rows: splitting the batch reorders those sums, so no bitwise claim
is made for them (they are bitwise repeatable run to run: the tests named above).
"""
import inspect

import pytest
import torch

import ia3_kernels
from conftest import DEVICE, HAS_CUDA
from helpers import quantize_4bit, quantize_rows
from ia3_kernels import dense, fourbit, small_m
from ia3_kernels.launch import FastKernel

DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
# Llama-3-8B k/v_proj on the GPU; off-block sizes on the interpreter.
K, N = (4096, 1024) if HAS_CUDA else (100, 70)
BATCHES = [2, 4, 16, 33, 64, 96, 128, 512, 2048] if HAS_CUDA else [2, 4, 16, 33, 64]


class _Recording:
    """Stands in for a kernel launcher; logs (kernel, constexpr arguments, warps, stages)."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log
        jit = kernel.fn if isinstance(kernel, FastKernel) else kernel  # JIT or interpreted
        self.fn = jit.fn  # the Python function: its annotations mark the constexprs
        params = inspect.signature(self.fn).parameters.values()
        self.names = [p.name for p in params]
        self.constexprs = [p.name for p in params if "constexpr" in str(p.annotation)]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = dict(zip(self.names, args), **kwargs)
            self.log.append((self.fn.__name__,
                             tuple((n, bound[n]) for n in self.constexprs if n in bound),
                             kwargs.get("num_warps"), kwargs.get("num_stages")))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    log = []
    matmul, scale_reduce = dense._KERNELS[False]
    monkeypatch.setitem(dense._KERNELS, False,
                        (_Recording(matmul, log), _Recording(scale_reduce, log)))
    monkeypatch.setitem(small_m._KERNELS, False, _Recording(small_m._KERNELS[False], log))
    # A launch plan (CUDA) replays its kernel without looking it up in _KERNELS, so it would go
    # unrecorded and every split would look like the whole batch's configuration. A plan
    # launches what the full launch would (tests/test_launch.py), so plans off changes no result.
    monkeypatch.setattr(dense, "_PLANS_ENABLED", False)
    return log


def layer(kind, feedforward):
    g = torch.Generator().manual_seed(0)
    if kind == "dense":
        w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, DTYPE)
        return lambda x, b, s: ia3_kernels.ia3_linear(x, w, b, s, feedforward)
    if kind == "int8":
        cb, scb = (t.to(DEVICE) for t in quantize_rows(torch.randn(N, K, generator=g) / K**0.5))
        return lambda x, b, s: ia3_kernels.ia3_linear_int8(x, cb, scb, b, s, feedforward)
    pytest.importorskip("bitsandbytes")
    w4 = fourbit.FourBitWeight.from_bnb(*quantize_4bit(N, K, "nf4", True, 64))
    return lambda x, b, s: ia3_kernels.ia3_linear_4bit(x, w4, b, s, feedforward)


def run(op, x, b, s, dy, log):
    """(y, dx, the launches' configurations) of a forward and backward on these rows."""
    start = len(log)
    x = x.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    y = op(x, b, s)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y.detach(), dx, log[start:]


def _numpy_matmul_rows_depend_on_batch() -> bool:
    """The interpreter's tl.dot is numpy's matmul. Some OpenBLAS builds sum a product of few
    rows in another order than the same rows inside a larger product (numpy 2.4.6's
    OpenBLAS 0.3.31, Haswell kernels: a 1-row float32 product differs from row 0 of a 16-row
    one), so there no kernel could give batch-split-invariant rows under the interpreter."""
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 128)).astype(np.float32)
    b = rng.standard_normal((128, 64)).astype(np.float32)
    whole = np.matmul(a, b)
    return any(not np.array_equal(np.matmul(a[:rows], b), whole[:rows]) for rows in (1, 2, 4))


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("kind", ["dense", "int8", "nf4"])
def test_rows_are_bitwise_the_same_in_any_split_of_one_configuration(triton_backend, launches,
                                                                     kind, feedforward):
    if not HAS_CUDA and _numpy_matmul_rows_depend_on_batch():
        pytest.skip("numpy's BLAS here sums a row differently by batch size (the interpreter's "
                    "tl.dot); the GPU run checks this")
    op = layer(kind, feedforward)
    g = torch.Generator().manual_seed(1)
    b = torch.randn(N, generator=g).to(DEVICE, DTYPE)
    s = (torch.rand(K if feedforward else N, generator=g) + 0.5).to(DEVICE)
    same, different = [], []
    ia3_kernels.set_strict(True)
    with ia3_kernels.dense_path("fused"):  # Triton kernels only: cuBLAS picks by M on its own
        for m in BATCHES:
            x = torch.randn(m, K, generator=g).to(DEVICE, DTYPE)
            dy = torch.randn(m, N, generator=g).to(DEVICE, DTYPE)
            y, dx, plan = run(op, x, b, s, dy, launches)
            for cut in sorted({m // 2, m // 4, 1} - {0}):
                parts = [run(op, x[rows], b, s, dy[rows], launches)
                         for rows in (slice(0, cut), slice(cut, m))]
                if all(part[2] == plan for part in parts):
                    assert torch.equal(torch.cat([p[0] for p in parts]), y), (m, cut)
                    assert torch.equal(torch.cat([p[1] for p in parts]), dx), (m, cut)
                    same.append((m, cut))
                else:
                    different.append((m, cut))
    print(f"{kind} {'ff' if feedforward else 'attn'}: bitwise-equal splits (M, cut) {same}; "
          f"splits across configurations {different}")
    assert same, "no split ran the whole batch's configuration: the test would prove nothing"


@pytest.mark.gpu
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_conv_forward_and_backward_are_bitwise_repeatable(feedforward):
    """Our part of a convolution (the scaled weight, the channel passes of the backward) is
    deterministic; cuDNN's convolution and its data gradient are too once
    torch.backends.cudnn.deterministic is set, as for the bare Conv2d."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 64, 56, 56, device="cuda", generator=g, dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 3, 3, device="cuda", generator=g) / 24).bfloat16()
    b = torch.randn(64, device="cuda", generator=g, dtype=torch.bfloat16)
    s = (torch.rand(1, 64, 1, 1, device="cuda", generator=g) + 0.5)
    dy = torch.randn(8, 64, 56, 56, device="cuda", generator=g, dtype=torch.bfloat16)
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        results = []
        for _ in range(3):
            xx, ss, bb = (t.detach().clone().requires_grad_() for t in (x, s, b))
            y = ia3_kernels.ia3_conv(xx, w, bb, ss, feedforward, padding=1)
            results.append([y.detach(), *torch.autograd.grad(y, (xx, ss, bb), dy)])
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old
    for again in results[1:]:
        for name, a, b_ in zip(["y", "dx", "dl", "dbias"], results[0], again):
            assert torch.equal(a, b_), name
