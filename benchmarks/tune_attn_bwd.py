"""python -m benchmarks.tune_attn_bwd [--m 1,16,64] [--layers ...]: the attention layer's
forward+backward at small M under CUDA graphs (GPU time), each way our op can take it, beside
the bare layer and our feedforward layer on the same GEMMs. Prints one line per (shape, M).

Why: under graphs our attention fwd+bwd at M <= 16 reads 1.31-1.59x the bare layer on k/v_proj
and T5 (H100, suite-dense-stop26-partial-h100.md, and the same on 2026-11-25) and 1.54x on
gate/up_proj at M = 16, where the feedforward layer, whose backward streams the same weight
through the same kernel, reads 1.00-1.07x on the Llama shapes (T5: 1.14-1.20). The attention
backward's K-loop also scales the dy tile by l and, on one column block of CTAs a k block,
reduces dl = sum_rows dy*u (`python -m benchmarks.sass_loop --dense`, Triton 3.6 as on the
device, 16x32x256 tiles, bf16 l: 597 loop instructions with the conditional dl block, 8
barriers and 148 registers a thread, against 224, 2 and 64 for the feedforward's and 307, 2
and 56 without dl; no spills). Variants timed:
  auto      the shipped rule (dl by programs of their own in the dx GEMM's launch up to
            dense.ATTN_BWD_DL_IN_KERNEL_MAX_M rows, else by a pass);
  dl pass   dl by a pass of its own after the dx GEMM (ATTN_BWD_DL_IN_KERNEL_MAX_M = 0);
  dl programs  dl by the launch's programs at every M (the bar lifted);
  cublas    dense_path("cublas"): dy*l by a pass into an M x N scratch, cuBLAS's dx;
  fused     dense_path("fused"): the fused kernel (dl by programs at M <= 64) also where the
            rule takes cuBLAS (N > 1024), to see whether the programs moved that crossover.
GPT-2's Conv1D shapes are timed too: their attention fwd+bwd at M <= 16 read 1.20-1.29x bare
under graphs in stop 29's suite (N = 2304 and 3072 > 1024: the cuBLAS route).
(stop 27 also timed BLOCK_K 128 at M <= 16: no better than the table's 256/512. Until stop 31 a
"dl loop" variant timed dl summed inside the K-loop, the rule past M = 64 then; it lost to
the programs and to the pass wherever timed and went from the kernel.)"""
from __future__ import annotations

import argparse
import contextlib
import sys
from unittest.mock import patch

import torch

import ia3_kernels
from ia3_kernels import dense

from .layers import (ADAPTER_DTYPES, SHAPES, add_adapter_dtype_option, build_layers, case_inputs,
                     pick_shapes, require_cuda, step_fn, time_graph)


VARIANTS = {
    "auto": contextlib.nullcontext,
    "dl programs": lambda: patch.object(dense, "ATTN_BWD_DL_IN_KERNEL_MAX_M", 1 << 30),
    "dl pass": lambda: patch.object(dense, "ATTN_BWD_DL_IN_KERNEL_MAX_M", 0),
    "cublas": lambda: ia3_kernels.dense_path("cublas"),
    "fused": lambda: ia3_kernels.dense_path("fused"),
}


def _aux_blocks_variant(rows: int, cols: int):
    """A variant whose dl programs sum rows x cols blocks past M = 64 (the row sums'
    parallelism against their serial steps; 4096->14336 at M = 256 lost to the pass with
    128 x 32, tune-attn-bwd-stop31c-h100.log)."""
    real = dense._a_aux_blocks

    def blocks(M, bm, bk):
        return real(M, bm, bk) if M <= 64 else (rows, cols)

    @contextlib.contextmanager
    def variant():
        # Launch plans keep the constexprs of their first launch, blocks included: off here
        # (host time only; the timings are graph replays).
        with patch.object(dense, "_a_aux_blocks", blocks), \
                patch.object(dense, "_PLANS_ENABLED", False):
            yield
    return variant


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_attn_bwd")
    parser.add_argument("--m", default="1,16,64", help="comma-separated M values")
    parser.add_argument("--layers", default="",
                        help="comma-separated substrings of 'model layer' to keep, in this order")
    parser.add_argument("--aux-blocks", default="",
                        help="comma-separated RxC: also time the shipped rule with dl's programs "
                             "summing R x C blocks past M = 64 (dense._a_aux_blocks; 128x32 "
                             "shipped), e.g. 256x64,64x64")
    add_adapter_dtype_option(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    require_cuda("tune_attn_bwd")
    device, dtype = torch.device("cuda"), torch.bfloat16
    vectors = ADAPTER_DTYPES[args.adapter_dtype]
    variants = dict(VARIANTS)
    for blocks in filter(None, args.aux_blocks.split(",")):
        rows, cols = (int(v) for v in blocks.lower().split("x"))
        variants[f"dl blocks {rows}x{cols}"] = _aux_blocks_variant(rows, cols)
    shapes = pick_shapes(SHAPES, args.layers)
    for shape in shapes:
        for m in (int(v) for v in args.m.split(",")):
            bare, _, ours = build_layers(shape, "attn", device, dtype, adapter_dtype=vectors)
            _, _, ours_ff = build_layers(shape, "ff", device, dtype, adapter_dtype=vectors)
            x, dy = case_inputs(shape, m, device, dtype)
            x = x.clone().requires_grad_(True)
            times = {"bare": time_graph(step_fn(bare, x, "fwd+bwd", dy)),
                     "ours ff": time_graph(step_fn(ours_ff, x, "fwd+bwd", dy))}
            for name, variant in variants.items():
                with variant():
                    try:
                        times[name] = time_graph(step_fn(ours, x, "fwd+bwd", dy))
                    except Exception as exc:  # a config out of shared memory, say
                        print(f"  {name} failed: {type(exc).__name__}: {exc}"[:200])
                        times[name] = float("nan")
            bare_us = times["bare"]
            cells = "  ".join(f"{k} {v:6.1f} ({v / bare_us:.2f})" for k, v in times.items())
            print(f"{shape.model} {shape.layer} {shape.k}->{shape.n} M={m} attn fwd+bwd us: {cells}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
