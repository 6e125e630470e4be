"""python -m benchmarks.tune_large_m: time the fused kernel's large-M tilings (the M > 256 row of
ia3_kernels.dense._matmul_config) with the fused strategy forced, forward and forward+backward
under CUDA graphs, against the bare layer. Prints one line per (shape, M, mode, phase)."""
from __future__ import annotations

import sys

import torch

import ia3_kernels

from .layers import (Shape, build_layers, case_inputs, forced_tiles, require_cuda, step_fn,
                     time_graph)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first is the table's default row
# (128x256 is its choice for wide grids without a stored u, since this sweep).
CANDIDATES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
              (64, 256, 64, 4, 4), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 32, 4, 4)]
SHAPES = [Shape("T5-base", "q/k/v/o", 768, 768), Shape("T5-base", "wo", 3072, 768),
          Shape("Llama-3.2-1B", "k/v_proj", 2048, 512), Shape("Llama-3-8B", "k/v_proj", 4096, 1024),
          Shape("Llama-3-8B", "q/o_proj", 4096, 4096)]


def main() -> int:
    require_cuda("tune_large_m")
    for shape in SHAPES:
        for m in (2048, 8192):
            for mode in ("ff", "attn"):
                bare, _, ours = build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)
                x, dy = case_inputs(shape, m, torch.device("cuda"), torch.bfloat16)
                for phase in ("fwd", "fwd+bwd"):
                    xin = x.clone().requires_grad_(phase == "fwd+bwd")
                    bare_us = time_graph(step_fn(bare, xin, phase, dy))
                    results = []
                    for cand in CANDIDATES:
                        try:
                            with forced_tiles(lambda M, N, K, e, ae, _c=cand:
                                              _c if M > 256 else None), \
                                    ia3_kernels.dense_path("fused"):
                                us = time_graph(step_fn(ours, xin, phase, dy))
                        except Exception as exc:  # noqa: BLE001 - out of shared memory, etc.
                            us = float("nan")
                            print(f"  config {cand} failed: {type(exc).__name__}")
                        results.append((us, cand))
                    current = results[0][0]
                    results.sort(key=lambda r: (r[0] != r[0], r[0]))
                    line = "  ".join(f"{c}:{us:.1f}" for us, c in results[:3])
                    print(f"{shape.k}->{shape.n} M={m} {mode} {phase}: bare {bare_us:.1f} 128x128 "
                          f"{current:.1f} | best {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
