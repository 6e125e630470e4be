"""python -m benchmarks: the layer suite — every fused layer type (dense, GPT-2 Conv1D, bitsandbytes
int8 / NF4 / FP4, Conv2d, Conv3d) against the bare base layer, PEFT's IA3 wrapper, PEFT's wrapper
under torch.compile, and ours eager and compiled: forward, forward+backward, extra peak memory,
TFLOP/s, GB/s and % of the roofline. See benchmarks/suite.py.

    python -m benchmarks                                  # everything (GPU: ~30 min on an H100)
    python -m benchmarks --layers dense,conv1d --quick    # filters; --quick: few shapes and M
    python -m benchmarks --layers nf4 --merge             # add a family to the existing results
    python -m benchmarks --stem s --resume                # go on where a run cut off stopped

On a machine without a GPU it runs a few small shapes on the reference path (no compile, no
bitsandbytes), in well under two minutes, to show the pipeline works: CPU numbers are not the
point of this package. Other entry points: benchmarks.e2e (training steps), benchmarks.generate
(decode latency), benchmarks.quant / benchmarks.conv (each family with its issue's targets).
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from . import layers, report, suite, suite_report

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv):
    p = report.argument_parser("python -m benchmarks", __doc__,
                               "a few shapes and M values per family", RESULTS,
                               stem_help="file name stem (default: suite-<device>)")
    p.add_argument("--layers", default="",
                   help=f"comma-separated families ({', '.join(suite.FAMILIES)}) or substrings of "
                        "'family model layer' to keep")
    p.add_argument("--dtypes", default="", help="comma-separated: bf16, fp16, fp32 (default: bf16 on "
                                                "a GPU, fp32 on a CPU)")
    p.add_argument("--m", default="", help=f"comma-separated M values (default {suite.M_VALUES})")
    p.add_argument("--modes", default="ff,attn", help="ff, attn or both")
    p.add_argument("--layouts", default="nchw,channels_last", help="convolutions: nchw, channels_last")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd variants")
    p.add_argument("--rep-ms", type=float, default=40.0, help="do_bench repetition time per timing")
    p.add_argument("--compare-paths", action="store_true",
                   help="dense only: also time our op with the fused and the cuBLAS strategy forced")
    p.add_argument("--merge", action="store_true",
                   help="keep the other families' rows of an existing <stem>.json")
    p.add_argument("--resume", action="store_true",
                   help="go on from an existing <stem>.json of this device: its layer groups are "
                        "kept and not re-run (implies --merge)")
    return p.parse_args(argv)


def select(args, cuda: bool):
    keys = [k.strip().lower() for k in args.layers.split(",") if k.strip()]
    families = [f for f in suite.FAMILIES if f in keys] or list(suite.FAMILIES)
    layer_keys = [k for k in keys if k not in suite.FAMILIES]
    skipped = []
    if not cuda:
        skipped = [f for f in families if f not in suite.CPU_SHAPES]
        families = [f for f in families if f in suite.CPU_SHAPES]
    elif any(f in suite.QUANT for f in families):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            skipped = [f for f in families if f in suite.QUANT]
            families = [f for f in families if f not in suite.QUANT]
    if args.m:
        m_values = [int(v) for v in args.m.split(",")]
    elif not cuda:
        m_values = suite.CPU_M_VALUES
    else:
        m_values = suite.QUICK_M_VALUES if args.quick else suite.M_VALUES
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    layouts = [v.strip() for v in args.layouts.split(",") if v.strip()]
    groups = suite.groups(families, modes, cuda, args.quick, layer_keys, layouts)
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()] or (["bf16"] if cuda else ["fp32"])
    dtypes = [DTYPES[d] for d in names]
    return groups, m_values, dtypes, skipped


def _group_key(family, model, layer, mode, layout, dtype_name) -> tuple:
    return (family, model, layer, mode, layout or "", dtype_name)


def resume(json_path: Path, env: dict, groups, m_values, dtypes):
    """--resume: ({dtype: groups still to run}, the existing rows of the selected families).
    A group (family, shape, mode, layout, dtype) counts as done when the file has a row for each
    of its M values: the suite writes a group's rows together, so a run cut off by a time
    limit goes on with the group it was in. Only a file from this device is resumed (ratios are
    compared within a case, but a table should come from one machine)."""
    if not json_path.exists():
        return {dtype: groups for dtype in dtypes}, []
    old = json.loads(json_path.read_text())
    devices = {e.get("device") for e in old.get("environments", {}).values()}
    if devices - {env.get("device")}:
        raise SystemExit(f"--resume: {json_path} holds results from {sorted(map(str, devices))}, "
                         f"this run is on {env.get('device')}; use another --stem")
    measured: dict = {}
    for r in old["rows"]:
        key = _group_key(r["family"], r["model"], r["layer"], r["mode"], r.get("layout"), r["dtype"])
        measured.setdefault(key, set()).add(r["m"])
    todo, rerun, done = {}, set(), 0
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        todo[dtype] = []
        for g in groups:
            key = _group_key(g.family, g.shape.model, g.shape.layer, g.mode, g.layout, name)
            if set(suite.m_values_of(g, m_values)) <= measured.get(key, set()):
                done += 1
            else:
                todo[dtype].append(g)
                rerun.add(key)
    # Every other row of the families run now stays (write() replaces those families' rows).
    families = {g.family for g in groups}
    kept = [r for r in old["rows"] if r["family"] in families
            and _group_key(r["family"], r["model"], r["layer"], r["mode"], r.get("layout"),
                           r["dtype"]) not in rerun]
    print(f"resuming {json_path}: {done} group(s) already measured, {len(rerun)} to run")
    return todo, kept


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    groups, m_values, dtypes, skipped = select(args, cuda)
    compiled = cuda and not args.no_compile
    if cuda:
        note = ("GPU run: medians of triton.testing.do_bench with L2 flushed; eager timings include "
                "the CPU's launch overhead; 'graph' rows replay a CUDA graph (M <= 16, and every "
                "convolution). Compiled variants: torch.compile(dynamic=True), default mode. "
                "bitsandbytes' int8 layer cannot be captured in a CUDA graph: its graph rows are empty.")
    else:
        note = ("CPU-only machine: the layers run the pure-PyTorch reference path on a few small "
                "shapes, with no torch.compile variants and no bitsandbytes families, to show the "
                "suite works. CPU numbers are not the point of this package; run it on a CUDA GPU "
                "for the figures that matter.")
    print(note)
    if skipped:
        print(f"skipped families: {', '.join(skipped)} "
              f"({'need a CUDA GPU' if not cuda else 'bitsandbytes is not installed'})")
    env = report.environment()
    if any(g.family in suite.QUANT for g in groups):
        env["bitsandbytes"] = __import__("bitsandbytes").__version__
        # "MatMul8bitLt: inputs will be cast ... to float16" on every call of bnb's int8 layer.
        warnings.filterwarnings("ignore", message=".*will be cast from.*")
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    ceilings = {k: env[k] for k in ("copy_tb_per_s", "bf16_matmul_tflops") if k in env}
    stem = args.stem or ("suite-" + ("".join(c if c.isalnum() else "-" for c in env["device"])
                                     .strip("-").lower() if cuda else "cpu"))
    rows: list[dict] = []
    if args.resume:
        groups_by_dtype, rows = resume(Path(args.out) / f"{stem}.json", env, groups, m_values, dtypes)
    else:
        groups_by_dtype = {dtype: groups for dtype in dtypes}
    total = sum(len(suite.m_values_of(g, m_values)) for gs in groups_by_dtype.values() for g in gs)
    data = None
    with layers.progress(total) as tick:
        for dtype in dtypes:
            for group in groups_by_dtype[dtype]:
                rows += [suite.row_dict(r) for r in suite.bench_group(
                    group, m_values, device, dtype, graphs=not args.no_graphs, compiled=compiled,
                    ceilings=ceilings, rep_ms=args.rep_ms, tick=tick)]
                # After every group: a run cut off keeps what it measured.
                json_path, md_path, data = suite_report.write(Path(args.out), stem, env, rows, note,
                                                              args.merge or args.resume,
                                                              targets=cuda)
    if data is None:
        if args.resume and rows:
            print("nothing left to run: every selected group is in the file already")
            return 0
        print("nothing selected")
        return 1
    print()
    suite_report.print_table(rows)
    print()
    suite_report.print_summary([s for s in data["summary"] if s["family"] in {r["family"] for r in rows}])
    if args.compare_paths and cuda:
        path_rows = [p for g in groups if g.family in ("dense", "conv1d")
                     for m in m_values for p in layers.compare_paths(g.shape, m, g.mode, device, dtypes[0])]
        (Path(args.out) / f"{stem}-paths.md").write_text(report.paths_markdown(path_rows))
    print(f"\nwrote {json_path} and {md_path}")
    if cuda:
        report.draw("plot_suite", json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
