"""python -m benchmarks.tune_small_m [--m 32,64] [--phase fwd,fwd+bwd]: time the fused kernel's
tile candidates for small M against the bare layer, under CUDA graphs, to choose the rows of
ia3_kernels.dense._matmul_config. Prints one line per (shape, M, mode, phase): the bare layer,
the table's current choice, and the best candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).

Why M = 17..64 now: the table's 64x64x128 row there was never swept, and at M = 64 our fwd+bwd
read 1.98x the bare layer on 4096->4096 in the feedforward mode (H100, CUDA graphs,
tune-attn-gemv-e2e-stop27-h100.log), where M <= 16 reads 1.00-1.07x: 64 column tiles of 64 on
132 SMs and no split-K (its fp32 workspace would pass 512 KiB) leave half the GPU idle while W
streams. A candidate applies to every GEMM of the step (forward, and the backward's dx)."""
from __future__ import annotations

import argparse
import sys

import torch

from .layers import (SHAPES, build_layers, case_inputs, forced_tiles, require_cuda, step_fn,
                     time_graph)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M below M re-reads W from L2.
CANDIDATES = [(64, 64, 128, 4, 4), (64, 32, 128, 4, 4), (64, 32, 256, 4, 3),
              (32, 32, 256, 4, 4), (32, 64, 128, 4, 4), (16, 32, 512, 4, 3),
              (16, 32, 256, 4, 4), (32, 32, 512, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_small_m")
    parser.add_argument("--m", default="32,64", help="comma-separated M values")
    parser.add_argument("--phase", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    parser.add_argument("--modes", default="ff,attn")
    parser.add_argument("--rep-ms", type=int, default=30)
    args = parser.parse_args(argv)
    require_cuda("tune_small_m")
    device, dtype = torch.device("cuda"), torch.bfloat16
    shapes = [s for s in SHAPES if not s.conv1d]
    for shape in shapes:
        for m in (int(v) for v in args.m.split(",")):
            for mode in args.modes.split(","):
                bare, _, ours = build_layers(shape, mode, device, dtype)
                x, dy = case_inputs(shape, m, device, dtype)
                for phase in args.phase.split(","):
                    xin = x.clone().requires_grad_(phase == "fwd+bwd")
                    bare_us = time_graph(step_fn(bare, xin, phase, dy), rep_ms=args.rep_ms)
                    current_us = time_graph(step_fn(ours, xin, phase, dy), rep_ms=args.rep_ms)
                    results = []
                    for cand in CANDIDATES:
                        try:
                            with forced_tiles(lambda M, N, K, e, ae, _c=cand: _c
                                              if 16 < M <= 64 and e == 2 else None):
                                us = time_graph(step_fn(ours, xin, phase, dy),
                                                rep_ms=args.rep_ms)
                        except Exception as exc:  # noqa: BLE001 - out of shared memory, etc.
                            us = float("nan")
                            print(f"  {cand} failed: {type(exc).__name__}", flush=True)
                        results.append((us, cand))
                    results.sort(key=lambda r: (r[0] != r[0], r[0]))
                    best = "  ".join(f"{c}:{us:.1f}" for us, c in results[:4])
                    print(f"{shape.model} {shape.layer} {shape.k}->{shape.n} M={m} {mode} "
                          f"{phase}: bare {bare_us:.1f} current {current_us:.1f} "
                          f"({current_us / bare_us:.2f}) | best {best} "
                          f"({results[0][0] / bare_us:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
