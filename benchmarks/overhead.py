"""python -m benchmarks.overhead: host (CPU) time per eager layer call — bare, PEFT, ours — on a
layer small enough that the GPU never holds the CPU back, plus a cProfile of ours. Eager timings
of small layers measure exactly this."""
from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from .layers import Shape, build_layers


def host_us(fn, calls=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> int:
    shape = Shape("T5-base", "q/k/v/o", 768, 768)
    for mode in ("ff", "attn"):
        bare, peft_layer, ours = build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)
        x = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
        xg = x.clone().requires_grad_()
        dy = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
        for name, layer in (("bare", bare), ("peft", peft_layer), ("ours", ours)):
            with torch.no_grad():
                fwd = host_us(lambda: layer(x))
            params = [xg] + [p for p in layer.parameters() if p.requires_grad]
            fb = host_us(lambda: torch.autograd.grad(layer(xg), params, dy), calls=500)
            print(f"{mode:<4} {name:<5} host us/call: forward {fwd:7.1f}   forward+backward {fb:7.1f}")
        if mode == "ff":
            prof = cProfile.Profile()
            with torch.no_grad():
                prof.runcall(lambda: [ours(x) for _ in range(500)])
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
