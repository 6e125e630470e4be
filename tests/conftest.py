"""Test setup. Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before ia3_kernels is imported, hence here). bf16 is tested on
the GPU only: the interpreter's bf16 tl.dot and bf16 casts give wrong numbers (open Triton issue).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ia3_kernels  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Interpreter-safe dtypes on CPU; bf16 joins on the GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def triton_backend():
    """Run the Triton kernels whatever the device (interpreter on CPU), restore afterwards."""
    old = ia3_kernels.get_backend()
    ia3_kernels.set_backend("triton")
    yield
    ia3_kernels.set_backend(old)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts forward launches of the dense kernels' entry point, to prove a test used them."""
    from ia3_kernels import dense

    calls = {"forward": 0}
    real = dense.dense_forward_impl

    def counting(*args, **kwargs):
        calls["forward"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dense, "dense_forward_impl", counting)
    return calls


@pytest.fixture(autouse=True)
def _fresh_state():
    ia3_kernels.reset_warnings()
    strict = ia3_kernels.is_strict()
    yield
    ia3_kernels.set_strict(strict)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (0 when both are empty)."""
    a, ref = a.double(), ref.double()
    denom = ref.norm().item()
    if ref.numel() == 0:
        return 0.0
    return (a - ref).norm().item() / max(denom, 1e-30)


# The numerics rule: error against a float64 reference at most twice PEFT's own path in the same
# dtype, plus a tiny floor (a fraction of the dtype's rounding unit) for near-exact results.
ERR_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_within_peft_bar(ours: torch.Tensor, peft: torch.Tensor, ref: torch.Tensor, dtype, what=""):
    e_ours, e_peft = rel_err(ours, ref), rel_err(peft, ref)
    assert torch.isfinite(ours.double()).all() or not torch.isfinite(ref).all(), f"{what}: non-finite"
    bar = 2 * e_peft + ERR_FLOOR[dtype]
    assert e_ours <= bar, f"{what}: error {e_ours:.3e} > 2 x PEFT's {e_peft:.3e} + floor"
