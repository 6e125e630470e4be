"""python -m benchmarks.tune_gemv: sweep ia3_kernels.small_m's M = 1 GEMV kernel (code lookup,
tiles, prefetch, split-K) for NF4 (double quantization) and LLM.int8 weights on the Llama-3-8B
shapes, against the bare bitsandbytes layer, the shipped path and the weight-bytes roofline.
L2-cold CUDA graphs (tune_quant_small_m.time_rotated: each replay walks >= 150 MB of weights).

Stage 1 compares the code lookups at one tile; stage 2 sweeps tiles with the best lookup of
each format; stage 3 the split count of the best tile. Each candidate is checked against the
float64 product of the dequantized weight (max relative error printed). `--pipeline-only`:
instead, each prefetch mode (none, registers, the K-loop pipelined 2-4 stages deep) at each
shape's shipped tiles."""
from __future__ import annotations

import argparse
import itertools
import sys
from types import SimpleNamespace

import torch

from benchmarks.quant import weight_bytes
from benchmarks.layers import require_cuda
from benchmarks.report import measure_copy_tb_per_s
from benchmarks.tune_quant_small_m import SHAPES, build, time_rotated, weights_of
from ia3_kernels import small_m


def gemv_call(fmt, w, x, scale, tiles):
    kw = w.small_m_args()
    return lambda: small_m.launch_gemv(x, N=w.out_features, out_dtype=x.dtype, traceable=False,
                                       scale_a=scale, tiles=tiles, **kw)


def _new_registers(before: set):
    """Registers a thread of the GEMV kernel compiled since `before` (its cache's keys)."""
    cache = small_m._GEMV_KERNELS[False]._compiled
    fresh = [cache[k] for k in cache if k not in before]
    return getattr(fresh[-1], "n_regs", "?") if fresh else "?"


def occupancy_sweep(fmt, per_shape, run):
    """ncu on the H100 (2026-12-06): the NF4 GEMV on 14336->4096 (128x128 tiles, 8 splits: 256
    CTAs, 153 registers a thread) kept 1.8 warps a scheduler, issued on 42% of cycles and read
    34% of DRAM's bandwidth: latency-bound, not issue- or memory-bound; int8's (32x256, 640
    CTAs, 72 registers) kept 4.3 and read 73%. The split rule (2 CTAs an SM) was swept only at
    2-8 splits of 64-128-row tiles, so this sweep varies the CTAs an SM (2-8) at every tile,
    with and without register prefetch (which holds a second tile of words)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = ([(128, 128, 4), (64, 128, 4), (64, 256, 4), (32, 256, 4), (32, 128, 4)]
             if fmt == "nf4" else [(32, 256, 4), (64, 256, 4), (32, 128, 4), (16, 256, 4)])
    ctas = (2, 3, 4, 6, 8)
    cache = small_m._GEMV_KERNELS[False]._compiled
    for ps in list(per_shape):
        k, n = ps[0], ps[1]
        shipped = small_m.gemv_tiles(n, k, fmt == "nf4", torch.device("cuda"))
        keep = per_shape[:]
        per_shape[:] = [ps]
        auto = run(None)
        rows = []
        for (bn, bk, warps), pre in itertools.product(tiles, (0, 1)):
            n_tiles = -(-n // bn)
            seen = set()
            for c in ctas:
                split = max(1, min(64, round(c * sms / n_tiles), k // (2 * bk)))
                if split in seen:
                    continue
                seen.add(split)
                before = set(cache)
                res = run((bn, bk, split, warps, 2, pre))
                if res:
                    rows.append((res[0][0], (bn, bk, split, warps, pre), n_tiles * split,
                                 _new_registers(before)))
        per_shape[:] = keep
        rows.sort()
        print(f"{fmt} {k}->{n} (roofline {ps[9]:.1f} us, shipped {shipped} "
              f"{ps[8]:.1f} us before it; shipped now "
              f"{auto[0][0] if auto else float('nan'):.1f} us): best of {len(rows)}", flush=True)
        for us, t, grid, regs in rows[:12]:
            print(f"  {us:6.1f} us {ps[9] / us:4.0%}  (bn, bk, split, warps, prefetch) {t}  "
                  f"{grid} CTAs, {regs} registers", flush=True)
        for us, t, grid, regs in rows:
            if t[:2] == shipped[:2] and t[3] == shipped[3] and t[4] == shipped[5]:
                print(f"  shipped tile {t}: {us:.1f} us, {grid} CTAs, {regs} registers")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="nf4,int8")
    parser.add_argument("--stage1-only", action="store_true",
                        help="the decodes at one tile only (a short device run)")
    parser.add_argument("--decode", type=int, default=None,
                        help="skip stage 1: sweep tiles with this code lookup (0, 1, 2, 3)")
    parser.add_argument("--occupancy", action="store_true",
                        help="only CTAs an SM: tiles x prefetch x split counts giving 2-8 CTAs "
                             "an SM (registers printed)")
    parser.add_argument("--pipeline-only", action="store_true",
                        help="only the prefetch modes at each shape's shipped tiles: none, "
                             "registers (1), the K-loop pipelined 2-4 stages deep")
    args = parser.parse_args(argv)
    require_cuda("tune_gemv")
    from ia3_kernels import fourbit
    bw = measure_copy_tb_per_s() * 1e12
    print(f"device {torch.cuda.get_device_name()} copy {bw / 1e12:.2f} TB/s, torch "
          f"{torch.__version__}", flush=True)
    for fmt in args.formats.split(","):
        per_shape = []
        for k, n in SHAPES:
            copies = max(3, int(150e6 // ((0.52 if fmt == "nf4" else 1.0) * k * n)) + 1)
            layers = build(fmt, k, n, copies)
            weights = weights_of(fmt, layers)
            scale = torch.rand(k, device="cuda") + 0.5
            x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
            w0 = weights[0]
            dq = (fourbit.dequantize_4bit(w0, torch.float64) if fmt == "nf4"
                  else w0.cb.double() * w0.scb.double()[:, None] / 127)
            ref = (x.double() * scale.double()) @ dq.t()
            # LLM.int8's forward is not timed under graphs here (tune_quant_small_m: no bare int8).
            bare = (time_rotated([lambda q=q: q(x) for q in layers], 25) if fmt == "nf4"
                    else float("nan"))
            # "before": the M = 1 path before this kernel (4-bit: small_m's tiled GEMV at its
            # table's tiles; int8: dense.py's GEMV).
            if fmt == "nf4":
                old_tiles = ((16, 512, 4, 2, 0, True) if n >= 8192 else
                             (64, 256, 4, 2, 0, True) if k >= 8192 else (64, 128, 4, 2, 0, True))
                shipped = time_rotated([lambda w=w: small_m.launch_small_m(
                    x, N=n, out_dtype=x.dtype, traceable=False, scale_a=scale, tiles=old_tiles,
                    **w.small_m_args()) for w in weights], 25)
            else:
                from ia3_kernels.dense import _launch_matmul
                shipped = time_rotated([lambda w=w: _launch_matmul(
                    x, out_shape=(1, n), out_dtype=x.dtype, scale_a=scale, traceable=False,
                    **w.fused_args(1, "fwd", x.dtype)) for w in weights], 25)
            roof = weight_bytes(SimpleNamespace(n=n, k=k), fmt) / bw * 1e6
            per_shape.append((k, n, layers, weights, scale, x, ref, bare, shipped, roof))
            print(f"{fmt} {k}->{n}: bare bnb {bare:.1f} us, before {shipped:.1f} us, "
                  f"roofline {roof:.1f} us", flush=True)

        def run(tiles):
            out = []
            for k, n, layers, weights, scale, x, ref, bare, shipped, roof in per_shape:
                try:
                    y = gemv_call(fmt, weights[0], x, scale, tiles)()[0]
                    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    us = time_rotated([gemv_call(fmt, w, x, scale, tiles) for w in weights], 25)
                except Exception as exc:  # out of resources
                    print(f"  {tiles} {k}->{n} failed: {type(exc).__name__}: {str(exc)[:100]}")
                    return None
                out.append((us, err))
            return out

        def show(tag, tiles, res):
            # us / the path before / share of the roofline / max relative error
            cells = "  ".join(f"{us:.1f}us/{ps[8]:.1f}/{ps[9] / us:.0%} e{err:.0e}"
                              for (us, err), ps in zip(res, per_shape))
            print(f"{fmt} {tag} {tiles}: {cells}", flush=True)

        if args.occupancy:
            occupancy_sweep(fmt, per_shape, run)
            per_shape.clear()
            torch.cuda.empty_cache()
            continue
        if args.pipeline_only:
            # PREFETCH >= 2: cp.async stages through shared memory (small_m's kernel note). The
            # int8 GEMV reads 69% of the roofline with ~4.3 SASS instructions a weight, so
            # bytes in flight may be what it lacks; NF4's loop issues 6.5-7 a weight and its
            # pipelined form 7.9-10 (sass_loop, Triton 3.6), so it is likely to lose there.
            for i, ps in enumerate(per_shape):
                k, n = ps[0], ps[1]
                shipped_tiles = small_m.gemv_tiles(n, k, fmt == "nf4", torch.device("cuda"))
                lines = []
                for pre in (0, 1, 2, 3, 4):
                    tiles = (*shipped_tiles[:2], 0, shipped_tiles[3], shipped_tiles[4], pre)
                    keep = per_shape[:]
                    per_shape[:] = [ps]
                    res = run(tiles)
                    per_shape[:] = keep
                    lines.append(f"prefetch {pre}: " + ("failed" if not res else
                                 f"{res[0][0]:.1f} us {ps[9] / res[0][0]:.0%} e{res[0][1]:.0e}"))
                print(f"{fmt} {k}->{n} tiles {shipped_tiles[:2]} (roofline {ps[9]:.1f} us, "
                      f"before {ps[8]:.1f}): " + " | ".join(lines), flush=True)
            per_shape.clear()
            torch.cuda.empty_cache()
            continue
        # Stage 1: the decodes (lookup modes) and prefetch at a middle tile.
        luts = (0, 1, 2, 3) if fmt == "nf4" else (0, 2)
        if args.decode is not None:
            luts = ()
        stage1 = []
        for lut, pre in itertools.product(luts, (0, 1)):
            tiles = (64, 256, 0, 4, lut, pre)
            res = run(tiles)
            if res:
                show("decode", tiles, res)
                stage1.append((sum(us for us, _ in res), lut))
        stage1.sort()
        if args.stage1_only:
            per_shape.clear()
            torch.cuda.empty_cache()
            continue
        best_luts = ([args.decode] if args.decode is not None
                     else list(dict.fromkeys(lut for _, lut in stage1))[:1])
        # Stage 2: tiles, for the best decode(s).
        # 512-deep tiles spill at 4 warps (LDL in the loop, sass_loop; 1.2-19x slower on the
        # H100, tune-gemv-h100.log): 128 and 256 deep, 4 and 8 warps (more loads in flight).
        bns = (32, 64, 128) if fmt == "nf4" else (16, 32, 64)
        stage2 = []
        for lut, bn, bk, warps, pre in itertools.product(best_luts, bns, (128, 256), (4, 8), (0, 1)):
            tiles = (bn, bk, 0, warps, lut, pre)
            res = run(tiles)
            if res:
                stage2.append((sum(us for us, _ in res), tiles, res))
        stage2.sort(key=lambda t: t[0])
        for total, tiles, res in stage2[:8]:
            show("tiles", tiles, res)
        # Per shape, the best tile.
        for i, ps in enumerate(per_shape):
            best = min(stage2, key=lambda t: t[2][i][0])
            print(f"{fmt} {ps[0]}->{ps[1]} best {best[1]}: {best[2][i][0]:.1f} us "
                  f"(bare {ps[7]:.1f}, before {ps[8]:.1f}, roofline {ps[9]:.1f})", flush=True)
        # Stage 3: splits of the best overall tile.
        best_tiles = stage2[0][1]
        for split in (2, 4, 8):
            tiles = (*best_tiles[:2], split, *best_tiles[3:])
            res = run(tiles)
            if res:
                show("split", tiles, res)
        per_shape.clear()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
