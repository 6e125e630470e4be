"""pytest benchmarks/ --benchmark-only: the layer suite's quick cases under pytest-benchmark, one
benchmark per (family, shape, mode, M, variant, phase). Each call synchronises the GPU, so these are
wall-clock times of eager calls (host overhead included); `python -m benchmarks` is the place for
CUDA-graph timings, peak memory and the roofline. On a CPU-only machine: the reference path on
small shapes, bare / PEFT / ours only."""
import functools

import pytest
import torch

from benchmarks import suite

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
VARIANTS = suite.VARIANTS if CUDA else ("bare", "peft", "ours")
M_VALUES = suite.QUICK_M_VALUES if CUDA else suite.CPU_M_VALUES


def _families():
    if not CUDA:
        return tuple(suite.CPU_SHAPES)
    try:
        import bitsandbytes  # noqa: F401
        return suite.FAMILIES
    except ImportError:
        return tuple(f for f in suite.FAMILIES if f not in suite.QUANT)


CASES = [(g, m) for g in suite.groups(_families(), ("ff", "attn"), CUDA, quick=True)
         for m in suite.m_values_of(g, M_VALUES)]


@functools.lru_cache(maxsize=4)
def _built(group):
    return suite.build(group, DEVICE, DTYPE)


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("group,m", CASES, ids=[f"{g.label.replace(' ', '-')}-M{m}" for g, m in CASES])
def test_layer(benchmark, group, m, variant, phase):
    bare, peft_layer, ours = _built(group)
    layer = {"bare": bare, "peft": peft_layer, "ours": ours}[variant.split("_")[0]]
    x, dy = suite.inputs(group, m, bare, DEVICE, DTYPE)
    x.requires_grad_(phase == "fwd+bwd")
    fn = suite.step(layer, x, phase, dy, compiled=variant.endswith("_compiled"))

    def call():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(family=group.family, model=group.shape.model, layer=group.shape.layer,
                                layout=group.layout, mode=group.mode, m=m, variant=variant,
                                phase=phase, dtype=str(DTYPE), device=str(DEVICE))
    out = benchmark.pedantic(call, rounds=20 if CUDA else 5, warmup_rounds=3 if CUDA else 1)
    assert all(t is None or torch.isfinite(t).all() for t in (out if isinstance(out, tuple) else (out,)))
