"""python -m benchmarks.tune_quant_small_m: sweep ia3_kernels.small_m's tiles for quantized
weights at small M (NF4 with double quantization, LLM.int8) on the Llama-3-8B shapes, against
the bare bitsandbytes layer and the dense.py fused path, under CUDA graphs.

L2: each graph replays the call over R copies of the layer (R x weight bytes >= 150 MB, three
times the H100's 50 MB L2), so every call streams its weight from HBM, as in a model where 32
layers' weights pass through the cache between two visits. Time per call = replay / R.
Prints one line per case: bare bnb, dense.py's path, the best small_m tiles (and the next 3).
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch

from ia3_kernels import dense, small_m
from ia3_kernels.fourbit import FourBitWeight
from ia3_kernels.int8 import Int8Weight

from .layers import capture_graph, require_cuda

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
NF4_TILES = [(bn, bk, w, 2) for bn, bk, w in itertools.product((32, 64, 128), (128, 256, 512), (4, 8))]
INT8_TILES = [(bn, bk, 4, s) for bn, bk, s in itertools.product((32, 64, 128), (128, 256, 512),
                                                                    (3, 4))]
INT8_TILES += [(64, 256, 8, 4), (128, 256, 8, 4), (64, 512, 8, 3)]
# M = 1 without tensor cores (fp32 FMAs).
NF4_GEMV_TILES = [(bn, bk, w, 2) for bn, bk, w in itertools.product((16, 32, 64), (128, 256, 512), (4, 8))]


def time_rotated(calls, rep_ms=40) -> float:
    """us per call: one CUDA graph replays every call of `calls` once (each on its own weight)."""
    from triton.testing import do_bench

    def every_call():
        for fn in calls:
            fn()
    graph, _ = capture_graph(every_call, warmup=1)
    us = do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median") * 1e3
    return us / len(calls)


def build(fmt: str, k: int, n: int, copies: int):
    import bitsandbytes as bnb
    layers = []
    for i in range(copies):
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        if fmt == "nf4":
            q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4", compress_statistics=True)
        else:
            q = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        q.load_state_dict(lin.state_dict())
        layers.append(q.to("cuda").requires_grad_(False))
    return layers


def weights_of(fmt, layers):
    if fmt == "nf4":
        return [FourBitWeight.from_bnb(q.weight.data, q.weight.quant_state) for q in layers]
    return [Int8Weight(q.weight.CB, q.weight.SCB) for q in layers]


def ours_small_m(w, x, scale, tiles):
    return lambda: small_m.launch_small_m(x, N=w.out_features, out_dtype=x.dtype,
                                          traceable=False, scale_a=scale, tiles=tiles,
                                          **w.small_m_args())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="nf4,int8")
    parser.add_argument("--m", default="1,4,16,64")
    args = parser.parse_args(argv)
    require_cuda("tune_quant_small_m")
    import ia3_kernels
    for fmt in args.formats.split(","):
        bytes_per_weight = 0.52 if fmt == "nf4" else 1.0
        for k, n in SHAPES:
            copies = max(3, int(150e6 // (bytes_per_weight * k * n)) + 1)
            layers = build(fmt, k, n, copies)
            weights = weights_of(fmt, layers)
            scale = torch.rand(k, device="cuda") + 0.5
            for m in map(int, args.m.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                bare = time_rotated([lambda q=q: q(x) for q in layers]) if fmt == "nf4" else float("nan")
                op = ia3_kernels.ia3_linear_4bit if fmt == "nf4" else None
                if fmt == "nf4":
                    dense_us = time_rotated([lambda w=w: op(x, w, None, scale, True)
                                             for w in weights])
                else:
                    dense_us = time_rotated([lambda w=w: ia3_kernels.ia3_linear_int8(
                        x, w.cb, w.scb, None, scale, True) for w in weights])
                results = []
                candidates = [(*t, False) for t in (NF4_TILES if fmt == "nf4" else INT8_TILES)]
                if m == 1 and fmt == "nf4":
                    candidates += [(*t, True) for t in NF4_GEMV_TILES]
                for tiles in candidates:
                    try:
                        us = time_rotated([ours_small_m(w, x, scale, (*tiles[:4], 0, tiles[4]))
                                           for w in weights])
                    except Exception as exc:  # out of shared memory, registers
                        print(f"  {tiles} failed: {type(exc).__name__}: {str(exc)[:80]}")
                        continue
                    results.append((us, tiles))
                results.sort()
                best_us, best = results[0]
                splits = []
                for split in (1, 2, 4, 8, 16, 32):
                    try:
                        us = time_rotated([ours_small_m(w, x, scale, (*best[:4], split, best[4]))
                                           for w in weights])
                        splits.append(f"{split}:{us:.1f}")
                    except Exception as exc:
                        splits.append(f"{split}:fail")
                auto = small_m.small_m_tiles(m, n, k, fmt == "nf4", x.device, (*best[:4], 0, best[4]))[3]
                top = "  ".join(f"{t}:{us:.1f}" for us, t in results[:4])
                print(f"{fmt} {k}->{n} M={m}: bare {bare:.1f} dense {dense_us:.1f} | "
                      f"best {top} | split(auto {auto}) {' '.join(splits)}", flush=True)
            del layers, weights
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
