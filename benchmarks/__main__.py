"""python -m benchmarks: the layer benchmark (bare vs PEFT vs ours). See benchmarks/layers.py.

On a machine without a GPU it runs a few small shapes on the reference path, in well under two
minutes, to show the pipeline works: CPU numbers are not the point of this package.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import layers, report

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="", help="comma-separated substrings of 'model layer' to keep")
    p.add_argument("--m", default="", help="comma-separated M values (default: 1,16,128,512,2048,8192)")
    p.add_argument("--modes", default="ff,attn", help="ff, attn or both")
    p.add_argument("--quick", action="store_true", help="a few shapes and M values only")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings at M <= 16")
    p.add_argument("--compare-paths", action="store_true",
                   help="also time our op with the fused and the cuBLAS strategy forced")
    p.add_argument("--out", default=str(RESULTS), help="directory for JSON + markdown")
    p.add_argument("--stem", default="", help="file name stem (default: layers-<device>)")
    return p.parse_args(argv)


def select(args, cuda: bool):
    shapes = layers.SHAPES if cuda else layers.CPU_SHAPES
    m_values = layers.M_VALUES if cuda else layers.CPU_M_VALUES
    if args.quick:
        shapes = [s for s in shapes if s.layer in ("k/v_proj", "down_proj", "c_attn (Conv1D)")] or shapes
        m_values = [m for m in m_values if m in (1, 16, 2048)] or m_values
    if args.layers:
        keys = [k.strip().lower() for k in args.layers.split(",") if k.strip()]
        shapes = [s for s in shapes if any(k in f"{s.model} {s.layer}".lower() for k in keys)]
    if args.m:
        m_values = [int(v) for v in args.m.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    return shapes, m_values, modes


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes, m_values, modes = select(args, cuda)
    if cuda:
        note = ("H100-class GPU run: bf16, medians of triton.testing.do_bench with L2 flushed; eager "
                "timings include CPU launch overhead; 'graph' rows replay a CUDA graph (M <= 16).")
    else:
        note = ("CPU-only machine: the layers run the pure-PyTorch reference path in float32 on a few "
                "small shapes, to show the benchmark works. CPU numbers are not the point of this "
                "package; run it on a CUDA GPU for the figures that matter.")
        print(note)
    env = report.environment()
    cases = [(s, m, mode) for s in shapes for m in m_values for mode in modes]
    rows, path_rows = [], []
    with layers.progress(len(cases), enabled=sys.stdout.isatty() or True) as tick:
        for shape, m, mode in cases:
            tick(f"{shape.model} {shape.layer} M={m} {mode}")
            rows += [layers.row_dict(r) for r in
                     layers.bench_case(shape, m, mode, device, dtype, graphs=not args.no_graphs)]
            if args.compare_paths and cuda:
                path_rows += layers.compare_paths(shape, m, mode, device, dtype)
            torch.cuda.empty_cache() if cuda else None
    summary = report.summarize(rows, has_graphs=not args.no_graphs) if cuda else []
    report.print_table(rows)
    print()
    for s in summary:
        print(f"{s['criterion']:<40} worst {s['worst']:>8} (limit {s['limit']}), "
              f"{s['misses']}/{s['cases']} miss; at {s['where']}")
    stem = args.stem or ("layers-" + ("".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()
                                      if cuda else "cpu"))
    extra = {"compare_paths": path_rows} if path_rows else None
    json_path, md_path = report.write(Path(args.out), stem, env, rows, summary, note, extra)
    if path_rows:
        print("\npath comparison (us):")
        for p in path_rows:
            best = "cublas" if p["cublas_us"] < p["fused_us"] else "fused"
            print(f"  {p['model']:<10} {p['layer']:<16} M={p['m']:<5} {p['mode']:<4} {p['phase']:<7} "
                  f"bare {p['bare_us']:8.1f}  fused {p['fused_us']:8.1f}  cublas {p['cublas_us']:8.1f}"
                  f"  -> {best}")
    print(f"\nwrote {json_path} and {md_path}")
    if cuda:
        try:
            from .plots import plot
            for png in plot(json_path):
                print(f"wrote {png}")
        except ImportError:
            print("matplotlib is not installed (pip install -e '.[bench]'): no plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
