"""python -m benchmarks.python_host: the Python host time of our eager layer calls, with every
Triton launch replaced by a no-op, on a machine without a GPU (the layers' code paths as under
`TRITON_INTERPRET=1`, which must be set before Triton is imported; the backend is set to
"triton" here). What it measures is the layers' own Python (checks, dispatch, argument
building, autograd.Function): the part of an eager call that a CPU profile can find and a
change can be judged by. A GPU host adds the launches themselves (`benchmarks.overhead`
measures whole calls there).

    TRITON_INTERPRET=1 python -m benchmarks.python_host              # int8, NF4, dense
    TRITON_INTERPRET=1 python -m benchmarks.python_host --calls 200 --m 16

Why: in the 2026-12-06 layer benchmark our NF4 eager forward read ~30 us above int8's
same-path one; this found the excess in Python (the per-call weight checks and layout, now kept
per layer by ia3.Linear4bit: a no-grad call went from 77-87 to 53-55 us on the development CPU,
T5-base 768->768, M = 1, against int8's 50-53)."""
from __future__ import annotations

import argparse
import contextlib
import sys
import timeit

import torch
from torch import nn

from . import models

K = N = 768  # T5-base q/k/v/o: layers whose eager calls are host-bound on every GPU host


class _NoLaunch:
    """Stands in for a kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernels_stubbed():
    """Every launcher the measured layers reach at small M launches nothing; restored after."""
    from ia3_kernels import dense, small_m

    saved = (dense._KERNELS[False], dense._MATMUL_PLANS.kernel, small_m._KERNELS[False],
             small_m._GEMV_KERNELS[False])
    dense._KERNELS[False] = (_NoLaunch(), _NoLaunch())
    dense._MATMUL_PLANS.kernel = _NoLaunch()
    small_m._KERNELS[False] = small_m._GEMV_KERNELS[False] = _NoLaunch()
    try:
        yield
    finally:
        (dense._KERNELS[False], dense._MATMUL_PLANS.kernel, small_m._KERNELS[False],
         small_m._GEMV_KERNELS[False]) = saved


def build_layer(kind: str) -> nn.Module:
    """Our fused layer on a CPU base quantized by bitsandbytes as benchmarks.models does (int8
    LLM.int8, NF4 with double quantization) or dense; feedforward."""
    from peft import IA3Config
    from peft.tuners.ia3 import bnb as peft_bnb
    from peft.tuners.ia3 import layer as peft_layer

    import ia3

    torch.manual_seed(0)
    linear = nn.Linear(K, N)
    if kind == "dense":
        base, cls = linear, peft_layer.Linear
    elif kind == "nf4":
        base = models.to_4bit(nn.Sequential(linear), "cpu", compute_dtype=torch.float32)[0]
        cls = peft_bnb.Linear4bit
    else:
        base = models.to_int8(nn.Sequential(linear), "cpu")[0]
        cls = peft_bnb.Linear8bitLt
    config = IA3Config(target_modules=["x"], feedforward_modules=["x"])
    layer = cls(base, "default", config=config, is_feedforward=True)
    return ia3.fuse(nn.Sequential(layer))[0]


def best_us(fn, calls: int, repeats: int = 5) -> float:
    return min(timeit.repeat(fn, number=calls, repeat=repeats)) / calls * 1e6


def measure(kinds=("int8", "nf4", "dense"), m: int = 1, calls: int = 2000) -> list[dict]:
    """Best-of-5 us per call of each layer's forward, without and with grad (its IA3 vector
    trains), kernels stubbed."""
    import ia3_kernels
    from ia3_kernels import config

    rows = []
    x = torch.randn(m, K)
    previous = config.get_backend()
    ia3_kernels.set_backend("triton")
    try:
        with kernels_stubbed():
            for kind in kinds:
                layer = build_layer(kind)
                with torch.no_grad():
                    layer(x)
                    no_grad = best_us(lambda: layer(x), calls)
                grad = best_us(lambda: layer(x), calls)
                rows.append({"layer": kind, "m": m, "no_grad_us": no_grad, "grad_us": grad})
    finally:
        ia3_kernels.set_backend(previous)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.python_host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="calls per timing (best of 5)")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--layers", default="int8,nf4,dense")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    from ia3_kernels import config
    if not config.triton_interpreted():
        print("benchmarks.python_host runs the layers' code paths under Triton's interpreter: "
              "set TRITON_INTERPRET=1 before starting Python.")
        return 2
    rows = measure(tuple(k for k in args.layers.split(",") if k), args.m, args.calls)
    print(f"Python host time of our layers' eager forward, kernels stubbed "
          f"(T5-base {K}->{N}, M = {args.m}, best of 5 x {args.calls} calls):")
    for r in rows:
        print(f"  {r['layer']:<6} no grad {r['no_grad_us']:7.1f} us   with grad "
              f"{r['grad_us']:7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
