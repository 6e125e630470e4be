"""python -m benchmarks.host_profile [MODEL]: where an eager training step spends host time —
floor, PEFT and ours for one of benchmarks.e2e's models (default "T5-base"): step times with
autograd's device threads on and off (wall, and the host loop before the final sync: equal
when the host is the bottleneck), then cProfiles of 3 steps of ours and PEFT (threads off, so
the profiler sees the backward's Python), by own time and, for ours, cumulative.

Why: T5-base's eager step is host-bound at the floor itself (H100, 2026-12-06: 37.6 ms of GPU
a 70.8 ms step), so adapters differ there by their host time per layer, not their kernels
(benchmarks/results/t5-host-profile-stop29-h100.log)."""
from __future__ import annotations

import cProfile
import pstats
import sys
import time

import torch

from . import e2e


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    name = argv[0] if argv else "T5-base"
    spec = e2e.spec_named(name, e2e.FULL + e2e.QUICK)
    if spec is None:
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch, _, variants = e2e.build_variants(spec, device, torch.bfloat16)

    def timed(step, model, steps=6):
        for _ in range(3):
            step(model, batch)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            step(model, batch)
        host = (time.perf_counter() - start) / steps * 1e3
        sync()
        return (time.perf_counter() - start) / steps * 1e3, host

    try:
        for threads in (True, False):
            torch.autograd.set_multithreading_enabled(threads)
            for label, (step, model) in variants.items():
                wall, host = timed(step, model)
                print(f"{label:6s} autograd threads {threads}: {wall:6.1f} ms a step, "
                      f"host loop {host:6.1f} ms")
        torch.autograd.set_multithreading_enabled(False)
        for label in ("ours", "PEFT"):
            step, model = variants[label]
            prof = cProfile.Profile()
            prof.runcall(lambda: [step(model, batch) for _ in range(3)])
            print(f"--- cProfile {label}, 3 steps, autograd threads off (own time)")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(30)
            if label == "ours":
                print(f"--- cProfile {label}, cumulative")
                pstats.Stats(prof, stream=sys.stdout).sort_stats("cumtime").print_stats(60)
    finally:
        torch.autograd.set_multithreading_enabled(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
