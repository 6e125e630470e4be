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
    config.addinivalue_line("markers", "multigpu: needs 2 or more CUDA GPUs (skipped otherwise)")


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


def count_calls(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that appends its arguments to the returned list and
    calls the original: `len(calls)` proves (or disproves) that a test reached that code."""
    calls = []
    real = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def capture_cuda_graph(fn):
    """(graph, fn's output inside it): fn runs once on a side stream first (kernels compile and
    allocators warm outside the capture), then is captured, as the benchmarks capture
    (benchmarks.layers.capture_graph: garbage collected first, the collector paused during
    the capture). The caller replays."""
    from benchmarks.layers import capture_graph

    return capture_graph(fn, warmup=1)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Forward launches of the dense kernels' entry point, to prove a test used them."""
    from ia3_kernels import dense

    return count_calls(monkeypatch, dense, "dense_forward_impl")


@pytest.fixture(autouse=True)
def _fresh_state():
    ia3_kernels.reset_warnings()
    strict = ia3_kernels.is_strict()
    yield
    ia3_kernels.set_strict(strict)


# The numerics rule: error against a float64 reference at most twice PEFT's own path in the same
# dtype, plus a floor of one unit in the last place: the dtype's unit roundoff u (2**-11 fp16,
# 2**-8 bf16; 1e-6 for fp32) times each output's error scale rounded up to a power of two, which
# is the spacing of that dtype's numbers there, so a faithfully rounded result (within one ulp)
# always passes. The error scale is the float64 reference run on the absolute values of every
# input, i.e. sum |terms| of each output: without it a cancelling sum fails by luck of order
# (fuzzing: a 31-term dl with sum|t| / |sum t| = 285). Why one ulp and not the half ulp of a
# correctly rounded value: a 16-bit kernel rounds an operand before its dot (x*l, dy*l*SCB/127,
# W*l) and then its output, as PEFT's own path rounds x*l or a dequantized weight; on a single
# output either may land a whole ulp off while the other lands exactly, by luck. Fuzzing found
# both ways round: M=K=N=1 fp16 where PEFT's double rounding landed closer, and an fp16 int8
# attention dx at 0.2646 (bottom of its binade: one ulp there is 1.9 u |x|) where ours was one
# ulp off and PEFT exact (tests/test_fuzz.py keeps it as an example).
ERR_FLOOR = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _ulp_scale(magnitude: torch.Tensor) -> float:
    """||2**ceil(log2 |m|)|| over the elements (0 where m is 0): ERR_FLOOR[dtype] times it is the
    norm of each element's ulp in that 16-bit dtype."""
    m = magnitude.double().abs()
    _, exponent = torch.frexp(m)  # m = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.where(m > 0, torch.ldexp(torch.ones_like(m), exponent), m).norm().item()


def assert_within_peft_bar(ours, peft, ref, dtype, what="", magnitude=None):
    """||ours - ref|| <= 2 ||peft - ref|| + floor * ||ulp scale of magnitude||, with magnitude the
    reference on absolute inputs (defaults to ref itself). NaN never passes where the reference
    is finite."""
    ours, peft, ref = ours.double(), peft.double(), ref.double()
    assert torch.isfinite(ours).all() or not torch.isfinite(ref).all(), f"{what}: non-finite"
    scale = _ulp_scale(ref if magnitude is None else magnitude)
    e_ours, e_peft = (ours - ref).norm().item(), (peft - ref).norm().item()
    bar = 2 * e_peft + ERR_FLOOR[dtype] * scale
    assert e_ours <= bar, (f"{what}: error {e_ours:.3e} > 2 x PEFT's {e_peft:.3e} + "
                           f"{ERR_FLOOR[dtype]:.1e} x {scale:.3e} (ulp scale; |ref| = {ref.norm().item():.3e})")
