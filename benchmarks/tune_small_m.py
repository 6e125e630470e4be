"""python -m benchmarks.tune_small_m: time the fused kernel's small-M (GEMV-like) configurations
against the bare layer, under CUDA graphs, to choose the table in ia3_kernels.dense._matmul_config.
Prints one line per (shape, M, mode, config)."""
from __future__ import annotations

import sys

import torch

from ia3_kernels import dense

from .layers import SHAPES, build_layers, require_cuda, step_fn, time_graph

# (BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M is 16 and split-K follows the usual rule.
CANDIDATES = [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 128, 8, 4),
              (32, 256, 4, 4), (64, 128, 8, 4), (128, 256, 8, 3), (32, 512, 4, 3)]


def main() -> int:
    require_cuda("tune_small_m")
    real = dense._matmul_config
    shapes = [s for s in SHAPES if s.layer in ("q/o_proj", "k/v_proj", "gate/up_proj", "down_proj")]
    for shape in shapes:
        for m in (1, 16):
            for mode in ("ff", "attn"):
                bare, _, ours = build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)
                x = torch.randn(m, shape.k, device="cuda", dtype=torch.bfloat16)
                bare_us = time_graph(step_fn(bare, x, "fwd", None))
                results = []
                for bn, bk, warps, stages in CANDIDATES:
                    def config(M, N, K, elem, n_sm, interpret, stores_preact=False,
                               _c=(bn, bk, warps, stages)):
                        split = dense.split_k_for(M, N, K, 16, _c[0], _c[1], elem, n_sm, interpret)
                        return 16, _c[0], _c[1], split, _c[2], _c[3]
                    dense._matmul_config = config
                    try:
                        us = time_graph(step_fn(ours, x, "fwd", None))
                    except Exception as exc:  # out of shared memory, etc.
                        us = float("nan")
                        print(f"  config {bn, bk, warps, stages} failed: {type(exc).__name__}")
                    finally:
                        dense._matmul_config = real
                    results.append((us, (bn, bk, warps, stages)))
                results.sort(key=lambda r: (r[0] != r[0], r[0]))
                line = "  ".join(f"{c}:{us:.1f}" for us, c in results[:4])
                print(f"{shape.k}->{shape.n} M={m} {mode}: bare {bare_us:.1f} | best {line}", flush=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
