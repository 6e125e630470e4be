"""python -m benchmarks.tune_tma: the persistent TMA GEMM (ia3_kernels.tma_gemm) against cuBLAS
and the shipped large-M paths, bf16, CUDA graphs (GPU time only), on the Llama-3-8B and T5-base
shapes at large M. One line per (shape, M, phase): bare cuBLAS, the shipped path of our op, and
the TMA kernel's tilings (best first), each with its max relative error against float64.

Phases (what the dense op computes at large M):
  plain     x W^T                       (no IA3: how far the kernel is from cuBLAS by itself)
  attn      (x W^T + b) * l             (inference: y only)
  attn+u    the same, also storing u    (training: u is saved for dl)
  ff        (x*l) W^T + b               (the scaling inside the K-loop)
  ff_dx     g = dy W; dx = g*l; partial sums of g*x for dl (feedforward backward)
  attn_dx   dx = (dy*l) W               (attention backward; dl is a separate pass either way)
`--quick` times one tiling on two shapes (a smoke run)."""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from ia3_kernels import dense, tma_gemm

from .layers import require_cuda, time_graph

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SUBTILE)
TILES = [(128, 256, 64, 8, 3, True), (128, 256, 64, 8, 4, True), (128, 256, 64, 8, 3, False),
         (128, 128, 64, 8, 4, False), (128, 128, 64, 4, 4, True), (128, 128, 128, 8, 3, True),
         (256, 128, 64, 8, 3, True)]
SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (768, 768), (3072, 768)]
PHASES = ("plain", "attn", "attn+u", "ff", "ff_dx", "attn_dx")


def cases(K, N, M, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g)
    w = (torch.randn(N, K, device=dev, generator=g) / K ** 0.5).to(torch.bfloat16)
    b = torch.randn(N, device=dev, dtype=torch.bfloat16, generator=g)
    l_in = torch.rand(K, device=dev, generator=g) + 0.5
    l_out = torch.rand(N, device=dev, generator=g) + 0.5
    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16, generator=g)
    return x, w, b, l_in, l_out, dy


def phase_calls(phase, x, w, b, l_in, l_out, dy):
    """(bare cuBLAS call, shipped call, tma call(tiles), float64 reference of the checked output)."""
    N, K = w.shape
    if phase in ("plain", "attn", "attn+u", "ff"):
        bare = lambda: F.linear(x, w, b)
        ref64 = x.double() @ w.double().t()
        if phase == "plain":
            return (lambda: F.linear(x, w), lambda: F.linear(x, w),
                    lambda t: tma_gemm.launch_tma_gemm(x, w, False, N, tiles=t)[0], ref64)
        if phase == "ff":
            ref = (x.double() * l_in.double()) @ w.double().t() + b.double()
            return (bare, lambda: dense.dense_forward_impl(x, w, b, l_in, True, False, False),
                    lambda t: tma_gemm.launch_tma_gemm(x, w, False, N, scale_a=l_in, bias=b,
                                                       tiles=t)[0], ref)
        store_u = phase == "attn+u"
        ref = (ref64 + b.double()) * l_out.double()
        return (bare, lambda: dense.dense_forward_impl(x, w, b, l_out, False, False, store_u),
                lambda t: tma_gemm.launch_tma_gemm(x, w, False, N, bias=b, scale_c=l_out,
                                                   store_preact=store_u, tiles=t)[0], ref)
    bare = lambda: dy @ w
    if phase == "ff_dx":
        ref = (dy.double() @ w.double()) * l_in.double()
        return (bare, lambda: dense.dense_backward_impl(
                    dy, x, w, b, l_in, None, True, False, True, True, False, False, x.dtype),
                lambda t: _ff_dx(dy, w, l_in, x, t), ref)
    ref = (dy.double() * l_out.double()) @ w.double()
    u = F.linear(x, w, b)
    return (bare, lambda: dense.dense_backward_impl(
                dy, x, w, b, l_out, u, False, False, True, True, False, False, x.dtype),
            lambda t: tma_gemm.launch_tma_gemm(dy, w, True, K, scale_a=l_out, tiles=t)[0], ref)


def _ff_dx(dy, w, l_in, x, tiles):
    """dx and dl as the op would form them: the kernel, then the fixed-order sum of partials."""
    dx, _, partial = tma_gemm.launch_tma_gemm(dy, w, True, w.shape[1], scale_c=l_in, aux=x,
                                              tiles=tiles)
    partial.sum(0)
    return dx


def rel_err(y, ref):
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args(argv)
    require_cuda("tune_tma")
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}", flush=True)
    tiles = TILES[:1] if args.quick else TILES
    plan = [(s, 8192) for s in SHAPES] + [((4096, 4096), 2048), ((768, 768), 2048)]
    if args.quick:
        plan = [((4096, 4096), 8192), ((768, 768), 8192)]
    for (K, N), M in plan:
        x, w, b, l_in, l_out, dy = cases(K, N, M, dev)
        for phase in args.phases.split(","):
            bare, shipped, tma, ref = phase_calls(phase, x, w, b, l_in, l_out, dy)
            bare_us = time_graph(bare)
            shipped_us = time_graph(shipped)
            shipped_out = shipped()
            shipped_out = shipped_out[0] if isinstance(shipped_out, tuple) else shipped_out
            results = []
            for t in tiles:
                try:
                    err = rel_err(tma(t), ref)
                    us = time_graph(lambda: tma(t))
                except Exception as exc:  # out of shared memory, a Triton without descriptors
                    print(f"  {K}->{N} M={M} {phase} {t}: {type(exc).__name__}: "
                          f"{str(exc)[:120]}", flush=True)
                    continue
                results.append((us, t, err))
            results.sort()
            cells = "  ".join(f"{t}:{us:.1f}({us / bare_us:.3f}x,e{err:.0e})"
                              for us, t, err in results[:4])
            print(f"{K}->{N} M={M} {phase}: bare {bare_us:.1f} shipped {shipped_us:.1f} "
                  f"({shipped_us / bare_us:.3f}x, e{rel_err(shipped_out, ref):.0e}) | tma {cells}",
                  flush=True)
        del x, w, b, dy
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
