"""python -m benchmarks.tune_small_m [--m 32,64] [--phase fwd,fwd+bwd]: time the fused kernel's
tile candidates at one M against the bare layer, under CUDA graphs, to choose the rows of
ia3_kernels.dense._matmul_config. Prints one line per (shape, M, mode, phase): the bare layer,
the shipped dispatch ("current"), and the best candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps,
stages[, SPLIT_K]); from M = 65 also the fused kernel with the table's tiles and the cuBLAS
route, each forced ("fused table", "cublas"), since the dispatch sends some phases to cuBLAS
there and a candidate only changes the fused kernel.

M = 17..64 (swept in stop 29, tune-small-m64-stop29-h100.log): the 64x64x128 row gave 64 CTAs
on 4096 columns and no split-K (its fp32 workspace would pass 512 KiB); 32x32x256 took the
feedforward forward on 4096->4096 from 52.3 to 24.0 us (bare 22.2).
M = 65..512 (--m 128,256,512): the eager suite of stop 29 read the feedforward forward at
1.6-3.0x the bare layer (k/v_proj 4096->1024 at M = 512: 45.1 us against 14.9), GPU-bound:
128x128 tiles give 32 CTAs there and split-K stops at M = 64. The candidates add split-K.
A candidate applies to every fused GEMM of the step (forward, and the backward's dx)."""
from __future__ import annotations

import argparse
import sys

import torch

from ia3_kernels import dense

from .layers import (ADAPTER_DTYPES, SHAPES, add_adapter_dtype_option, build_layers, case_inputs,
                     forced_tiles, pick_shapes, require_cuda, step_fn, time_graph)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M below M re-reads W from L2.
CANDIDATES = [(64, 64, 128, 4, 4), (64, 32, 128, 4, 4), (64, 32, 256, 4, 3),
              (32, 32, 256, 4, 4), (32, 64, 128, 4, 4), (16, 32, 512, 4, 3),
              (16, 32, 256, 4, 4), (32, 32, 512, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
# M > 64: the table's tiles, smaller ones for more CTAs, and split-K (fp32 workspace splits x M
# x N: 4 MiB at 2 x 512 x 1024, above SPLIT_K_WORKSPACE_BYTES, which the rule would keep).
MID_CANDIDATES = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 128, 4, 4),
                  (64, 64, 64, 4, 4), (32, 64, 128, 4, 4), (32, 32, 256, 4, 4),
                  (128, 128, 64, 8, 3, 2), (128, 128, 64, 8, 3, 4), (64, 128, 64, 4, 4, 2),
                  (64, 128, 64, 4, 4, 4), (64, 64, 128, 4, 4, 2), (64, 64, 128, 4, 4, 4),
                  (128, 64, 64, 4, 4), (32, 32, 256, 4, 4, 2), (32, 64, 128, 4, 4, 2),
                  (64, 64, 64, 4, 4, 2)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_small_m")
    parser.add_argument("--m", default="32,64", help="comma-separated M values")
    parser.add_argument("--phase", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    parser.add_argument("--modes", default="ff,attn")
    parser.add_argument("--layers", default="",
                        help="comma-separated substrings of 'model layer' to keep, in this order")
    parser.add_argument("--rep-ms", type=int, default=30)
    add_adapter_dtype_option(parser)
    parser.add_argument("--no-candidates", action="store_true",
                        help="time only the bare layer, the shipped dispatch and (M > 64) the "
                             "forced routes: a check of the table's rows")
    args = parser.parse_args(argv)
    require_cuda("tune_small_m")
    device, dtype = torch.device("cuda"), torch.bfloat16
    vectors = ADAPTER_DTYPES[args.adapter_dtype]
    shapes = pick_shapes([s for s in SHAPES if not s.conv1d], args.layers)
    for shape in shapes:
        for m in (int(v) for v in args.m.split(",")):
            for mode in args.modes.split(","):
                bare, _, ours = build_layers(shape, mode, device, dtype, adapter_dtype=vectors)
                x, dy = case_inputs(shape, m, device, dtype)
                for phase in args.phase.split(","):
                    xin = x.clone().requires_grad_(phase == "fwd+bwd")
                    bare_us = time_graph(step_fn(bare, xin, phase, dy), rep_ms=args.rep_ms)
                    current_us = time_graph(step_fn(ours, xin, phase, dy), rep_ms=args.rep_ms)
                    forced = ""
                    if m > 64:
                        for path, label in (("fused", "fused table"), ("cublas", "cublas")):
                            with dense.dense_path(path):
                                us = time_graph(step_fn(ours, xin, phase, dy), rep_ms=args.rep_ms)
                            forced += f" {label} {us:.1f}"
                    results = []
                    candidates = CANDIDATES if m <= 64 else MID_CANDIDATES
                    for cand in [] if args.no_candidates else candidates:
                        try:
                            # At M > 64 the fused kernel forced, where the dispatch may not go.
                            path = dense.dense_path("fused" if m > 64 else "auto")
                            with path, forced_tiles(lambda M, N, K, e, ae, _c=cand, _m=m: _c
                                                    if M == _m and e == 2 else None):
                                us = time_graph(step_fn(ours, xin, phase, dy),
                                                rep_ms=args.rep_ms)
                        except Exception as exc:  # noqa: BLE001 - out of shared memory, etc.
                            us = float("nan")
                            print(f"  {cand} failed: {type(exc).__name__}", flush=True)
                        results.append((us, cand))
                    results.sort(key=lambda r: (r[0] != r[0], r[0]))
                    best = "  ".join(f"{c}:{us:.1f}" for us, c in results[:4])
                    best = (f" | best {best} ({results[0][0] / bare_us:.2f})" if results
                            else "")
                    print(f"{shape.model} {shape.layer} {shape.k}->{shape.n} M={m} {mode} "
                          f"{phase}: bare {bare_us:.1f} current {current_us:.1f} "
                          f"({current_us / bare_us:.2f}){forced}{best}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
