"""python -m benchmarks.quant: IA3 on bitsandbytes 8-bit and 4-bit bases. The bare bnb layer
(Linear8bitLt, LLM.int8 with threshold 6.0 as transformers loads it; or Linear4bit, NF4/FP4 with
double quantization and bf16 compute as QLoRA loads it), the bare bf16 nn.Linear of the same
weights, PEFT's IA3 wrapper on bnb and ours: forward and forward+backward (x requires grad, the
IA3 vector trains), extra peak memory, and at M <= 16 the share of the weight-bytes roofline
(stored weights + statistics over the measured copy bandwidth). L2 is flushed between timed
calls (do_bench); M <= 16 is also timed as CUDA-graph replays, which leaves the kernels' time.
Ratios come from one run.

    python -m benchmarks.quant                 # int8: every shape and M; JSON + markdown in results/
    python -m benchmarks.quant --format nf4    # NF4 + double quantization (fp4: FP4)
    python -m benchmarks.quant --format nf4 --resume   # go on where a run cut off stopped
    python -m benchmarks.quant --tune          # small-M kernel configurations (CUDA graphs)
    python -m benchmarks.quant --compare-paths # fused GEMM vs dequantize + cuBLAS, by M
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import layers, report

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [s for s in layers.SHAPES if not s.conv1d]  # bnb replaces nn.Linear layers only
M_VALUES = [1, 16, 64, 128, 512, 2048, 8192]

FORMATS = ("int8", "nf4", "fp4")


@dataclass(frozen=True)
class Targets:
    """An issue's targets (H100, bf16): forward at M = 1 on 14336->4096 within m1_us of kernel
    time; forward / bare bnb at M <= 64 and forward / `large_m_base` at M >= 2048; fwd+bwd /
    PEFT and / bare bnb; extra peak <= bare bnb's."""
    m1_us: float
    fwd_over_bnb_small_m: float
    large_m_base: str  # "bf16" or "bnb"
    fwd_over_base_large_m: float
    fwd_bwd_over_peft: float
    judge_timing: str  # bnb int8 cannot be graph-captured: eager; else graphs where timed


TARGETS = {
    "int8": Targets(24.0, 1 / 5, "bf16", 1.10, 1 / 3, "eager"),
    "nf4": Targets(12.5, 1 / 2, "bnb", 1.02, 1 / 1.5, "graph"),
    "fp4": Targets(12.5, 1 / 2, "bnb", 1.02, 1 / 1.5, "graph"),
}


@dataclass
class QuantRow:
    model: str
    layer: str
    k: int
    n: int
    m: int
    mode: str
    phase: str
    timing: str
    bnb_us: float
    bf16_us: float
    peft_us: float
    ours_us: float
    bnb_peak_mib: Optional[float] = None
    bf16_peak_mib: Optional[float] = None
    peft_peak_mib: Optional[float] = None
    ours_peak_mib: Optional[float] = None
    roofline_pct: Optional[float] = None


def build_layers(shape, mode: str, fmt: str, seed: int = 0, dtype=torch.bfloat16):
    """(bare bnb layer, bare bf16 nn.Linear with the same float weights, PEFT's IA3 wrapper on
    the bnb layer, ours on a copy of it). int8: Linear8bitLt, threshold 6.0; nf4/fp4:
    Linear4bit, compute dtype `dtype` (bf16 by default), double quantization, blocksize 64."""
    import bitsandbytes as bnb
    from peft import IA3Config
    from peft.tuners.ia3 import bnb as peft_bnb

    import ia3

    torch.manual_seed(seed)
    linear = nn.Linear(shape.k, shape.n).to(dtype)
    if fmt == "int8":
        q = bnb.nn.Linear8bitLt(shape.k, shape.n, has_fp16_weights=False, threshold=6.0)
        peft_class = peft_bnb.Linear8bitLt
    else:
        q = bnb.nn.Linear4bit(shape.k, shape.n, compute_dtype=dtype, quant_type=fmt,
                              compress_statistics=True)
        peft_class = peft_bnb.Linear4bit
    q.load_state_dict(linear.state_dict())
    q = q.to("cuda").requires_grad_(False)
    bf16 = linear.to("cuda").requires_grad_(False)
    feedforward = mode == "ff"
    config = IA3Config(target_modules=["x"], feedforward_modules=["x"] if feedforward else [])
    wrappers = []
    for base in (q, copy.deepcopy(q)):
        layer = peft_class(base, "default", config=config, is_feedforward=feedforward)
        with torch.no_grad():
            param = layer.ia3_l["default"]
            param.copy_(torch.rand(param.shape, generator=torch.Generator().manual_seed(seed)) + 0.5)
        wrappers.append(layer)
    peft_layer, ours = wrappers
    ia3.fuse(ours)
    return q, bf16, peft_layer, ours


def weight_bytes(shape, fmt: str = "int8") -> int:
    if fmt == "int8":
        return shape.n * shape.k + 4 * shape.n  # int8 CB + fp32 SCB
    # Packed codes, uint8 absmax per 64 weights, fp32 absmax per 256 blocks, 256 + 16 floats.
    blocks = -(-shape.n * shape.k // 64)
    return shape.n * shape.k // 2 + blocks + 4 * -(-blocks // 256) + 4 * (256 + 16 + 1)


def _safe(timer, fn) -> float:
    try:
        return timer(fn)
    except Exception as exc:  # bnb's int8 path under CUDA-graph capture, say
        print(f"\n  timing failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        return float("nan")


def bench_case(shape, m: int, mode: str, copy_tb_per_s: float, fmt: str = "int8") -> list[QuantRow]:
    bnb_layer, bf16, peft_layer, ours = build_layers(shape, mode, fmt)
    x, dy = layers.case_inputs(shape, m, torch.device("cuda"), torch.bfloat16)
    rows = []
    # bnb's LLM.int8 forward (bare or under PEFT) synchronises with the host, so its capture
    # always fails (cudaErrorStreamCaptureInvalidated); it is not attempted.
    # Attempting it did worse than waste time: on 2026-12-06 every eager timing after the first
    # failed capture of a process ran 2-20x slower (bnb M = 1 forward 163 -> 703 us, ours 22 ->
    # 510 us), while the graphs of our layer stayed at 17 us.
    uncapturable = {"bnb", "peft"} if fmt == "int8" else set()
    for phase in ("fwd", "fwd+bwd"):
        xin = x.clone().requires_grad_(phase == "fwd+bwd")
        fns = {name: layers.step_fn(layer, xin, phase, dy) for name, layer in
               (("bnb", bnb_layer), ("bf16", bf16), ("peft", peft_layer), ("ours", ours))}
        timings = ["eager"] + (["graph"] if m <= layers.GRAPH_MAX_M else [])
        for timing in timings:
            timer = layers.time_eager if timing == "eager" else layers.time_graph
            us = {name: (float("nan") if timing == "graph" and name in uncapturable
                         else _safe(timer, fn)) for name, fn in fns.items()}
            row = QuantRow(shape.model, shape.layer, shape.k, shape.n, m, mode, phase, timing,
                           us["bnb"], us["bf16"], us["peft"], us["ours"])
            if phase == "fwd+bwd" and timing == "eager":
                row.bnb_peak_mib, row.bf16_peak_mib, row.peft_peak_mib, row.ours_peak_mib = (
                    layers.peak_mib(fns[k]) for k in ("bnb", "bf16", "peft", "ours"))
            if phase == "fwd" and m <= 16:
                roof_us = weight_bytes(shape, fmt) / (copy_tb_per_s * 1e12) * 1e6
                row.roofline_pct = 100 * roof_us / row.ours_us
            rows.append(row)
    return rows


def summarize(rows: list[dict], fmt: str = "int8") -> list[dict]:
    t = TARGETS[fmt]
    out = []

    def add(name, selected, key, limit, detail=""):
        selected = [r for r in selected if key(r) == key(r)]  # drop NaN timings
        if not selected:
            return
        w = max(selected, key=key)
        misses = sum(key(r) > limit for r in selected)
        out.append({"criterion": name, "worst": round(key(w), 3), "limit": round(limit, 3),
                    "where": report.where({**w, "timing": w["timing"]}), "cases": len(selected),
                    "misses": misses, "detail": detail})

    judged = [r for r in rows if report.target_row_selected(r)]
    fwd = [r for r in judged if r["phase"] == "fwd"]
    add("M=1 14336->4096 forward us", [r for r in fwd if r["m"] == 1 and r["k"] == 14336],
        lambda r: r["ours_us"], t.m1_us, "CUDA graphs")
    if fmt != "int8":
        add("M=16 / M=1 forward time", _growth_to_m16(rows), lambda r: r["growth"], 1.05,
            "CUDA graphs; ours at M = 16 over ours at M = 1, same layer; 5% for timing noise")
    # Ratios against bnb in the timing the issue judges: graphs where they were taken (M <= 16)
    # for 4-bit; eager for int8, whose bnb layer cannot be graph-captured.
    def judged_rows(phase):
        if t.judge_timing == "eager":
            return [r for r in rows if r["phase"] == phase and r["timing"] == "eager"]
        return [r for r in judged if r["phase"] == phase]
    add("forward ours/bnb at M <= 64", [r for r in judged_rows("fwd") if r["m"] <= 64],
        lambda r: r["ours_us"] / r["bnb_us"], t.fwd_over_bnb_small_m, t.judge_timing)
    base = t.large_m_base
    add(f"forward ours/{base} at M >= 2048", [r for r in fwd if r["m"] >= 2048],
        lambda r: r["ours_us"] / r[f"{base}_us"], t.fwd_over_base_large_m, "eager")
    eager_fb = [r for r in rows if r["phase"] == "fwd+bwd" and r["timing"] == "eager"]
    add("fwd+bwd ours/PEFT", eager_fb, lambda r: r["ours_us"] / r["peft_us"], t.fwd_bwd_over_peft,
        "eager")
    add("fwd+bwd ours/bnb", judged_rows("fwd+bwd"), lambda r: r["ours_us"] / r["bnb_us"], 1.0,
        t.judge_timing)
    mem = [r for r in rows if r.get("ours_peak_mib") is not None]
    add("extra peak MiB ours - bnb", mem, lambda r: r["ours_peak_mib"] - r["bnb_peak_mib"], 0.5,
        "0.5 MiB slack for allocator rounding")
    return out


def _growth_to_m16(rows: list[dict]) -> list[dict]:
    """Forward kernel time at M = 16 over M = 1 per layer and mode (CUDA graphs)."""
    graph = {(r["model"], r["layer"], r["mode"], r["m"]): r for r in rows
             if r["phase"] == "fwd" and r["timing"] == "graph"}
    out = []
    for (model, layer, mode, m), r in graph.items():
        one = graph.get((model, layer, mode, 1))
        if m == 16 and one is not None:
            out.append({**r, "growth": r["ours_us"] / one["ours_us"]})
    return out


HEADER = ["model", "layer", "K->N", "M", "mode", "phase", "timing", "bnb us", "bf16 us", "PEFT us",
          "ours us", "ours/bnb", "ours/bf16", "ours/PEFT", "bnb MiB", "PEFT MiB", "ours MiB",
          "% roofline"]


def table(rows: list[dict]) -> list[list[str]]:
    f = report.fmt
    return [[r["model"], r["layer"], f"{r['k']}->{r['n']}", str(r["m"]), r["mode"], r["phase"],
             r["timing"], f(r["bnb_us"]), f(r["bf16_us"]), f(r["peft_us"]), f(r["ours_us"]),
             f(r["ours_us"] / r["bnb_us"], 3), f(r["ours_us"] / r["bf16_us"], 2),
             f(r["ours_us"] / r["peft_us"], 3), f(r["bnb_peak_mib"]), f(r["peft_peak_mib"]),
             f(r["ours_peak_mib"]), f(r["roofline_pct"], 0)] for r in rows]


def markdown(env, rows, summary, extra_sections="", fmt="int8") -> str:
    title = ("int8 (LLM.int8)" if fmt == "int8"
             else f"4-bit ({fmt.upper()}, double quantization, blocksize 64)")
    lines = [f"# IA3 on bitsandbytes {title} bases: bare bnb vs bare bf16 vs PEFT vs ours", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", __doc__.split("\n\n")[0].replace("\n", " "), "", "## Targets", "",
              "| criterion | worst | limit | misses / cases | where | timing |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {s['criterion']} | {s['worst']} | {s['limit']} | {s['misses']} / {s['cases']} | "
              f"{s['where']} | {s['detail']} |" for s in summary]
    lines += ["", "## All cases", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(b) + " |" for b in table(rows)]
    return "\n".join(lines) + "\n" + extra_sections


# ---- tuning aids -------------------------------------------------------------------------------

# (BLOCK_N, BLOCK_K, num_warps, num_stages). M = 1 runs the GEMV kernel (BLOCK_M = 1), larger
# M the tl.dot kernel at BLOCK_M = 16; split-K by the usual rule.
GEMV_CANDIDATES = [(16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 4, 3), (64, 256, 4, 3),
                   (16, 1024, 4, 2), (8, 1024, 4, 3), (16, 2048, 8, 2), (32, 512, 8, 3),
                   (16, 256, 2, 4), (64, 128, 4, 4)]
DOT_CANDIDATES = [(32, 256, 4, 4), (64, 256, 4, 4), (64, 512, 4, 3), (32, 512, 4, 3)]


def tune_small_m(m_values=(1, 16)) -> list[str]:
    lines = []
    for shape in SHAPES[:4]:
        for m in m_values:
            mode = "ff"  # the forward GEMM is the same for both modes but its epilogue
            _, _, _, ours = build_layers(shape, mode, "int8")
            x = torch.randn(m, shape.k, device="cuda", dtype=torch.bfloat16)
            roof = weight_bytes(shape) / 3.0e12 * 1e6
            bm = 1 if m == 1 else 16
            results = []
            for cand in (GEMV_CANDIDATES if m == 1 else DOT_CANDIDATES):
                try:
                    with layers.forced_tiles(lambda M, N, K, e, ae, _c=cand:
                                             (bm, _c[0], _c[1], _c[2], _c[3])):
                        us = layers.time_graph(layers.step_fn(ours, x, "fwd", None))
                except Exception as exc:  # noqa: BLE001 - out of shared memory, etc.
                    us = float("nan")
                    print(f"  {cand} failed: {type(exc).__name__}", flush=True)
                results.append((us, cand))
            results.sort(key=lambda r: (r[0] != r[0], r[0]))
            default_us = layers.time_graph(layers.step_fn(ours, x, "fwd", None))
            line = (f"{shape.k}->{shape.n} M={m} {mode}: roof(3TB/s) {roof:.1f} current "
                    f"{default_us:.1f} | " + "  ".join(f"{c}:{u:.1f}" for u, c in results[:6]))
            print(line, flush=True)
            lines.append(line)
    return lines


def compare_paths(m_values=(256, 1024, 2048, 4096, 8192), fmt: str = "int8") -> list[dict]:
    import ia3_kernels

    out = []
    for shape in SHAPES[:4]:
        for m in m_values:
            for mode in ("ff", "attn"):
                _, bf16, _, ours = build_layers(shape, mode, fmt)
                x, dy = layers.case_inputs(shape, m, torch.device("cuda"), torch.bfloat16)
                for phase in ("fwd", "fwd+bwd"):
                    xin = x.clone().requires_grad_(phase == "fwd+bwd")
                    entry = dict(model=shape.model, layer=shape.layer, k=shape.k, n=shape.n, m=m,
                                 mode=mode, phase=phase,
                                 bare_us=layers.time_graph(layers.step_fn(bf16, xin, phase, dy)))
                    for path in ("fused", "cublas"):
                        with ia3_kernels.dense_path(path):
                            entry[f"{path}_us"] = layers.time_graph(
                                layers.step_fn(ours, xin, phase, dy))
                    print(f"{shape.k}->{shape.n} M={m} {mode} {phase}: bf16 {entry['bare_us']:.1f} "
                          f"fused {entry['fused_us']:.1f} cublas {entry['cublas_us']:.1f}", flush=True)
                    out.append(entry)
                torch.cuda.empty_cache()
    return out


def resumed_rows(json_path: Path, env: dict, fmt: str) -> list[dict]:
    """--resume: the rows of an earlier run of this stem, so that a run cut off by a time limit
    goes on with the case it was in (a case's rows are written together, so every kept case is
    whole). Refuses a file from another device or format: one table, one machine."""
    if not json_path.exists():
        return []
    old = json.loads(json_path.read_text())
    then = old["environment"]
    if then.get("device") != env.get("device") or then.get("format", fmt) != fmt:
        raise SystemExit(f"--resume: {json_path} was measured on {then.get('device')} "
                         f"({then.get('format', '?')}); this run: {env.get('device')} ({fmt})")
    print(f"resuming {json_path}: {len({(r['model'], r['layer'], r['m'], r['mode']) for r in old['rows']})} "
          "case(s) already measured")
    return old["rows"]


def _write(out_dir: Path, args, env: dict, rows: list[dict]) -> list[dict]:
    summary = summarize(rows, args.format)
    (out_dir / f"{args.stem}.json").write_text(json.dumps(
        {"environment": env, "summary": summary, "rows": rows}, indent=1))
    (out_dir / f"{args.stem}.md").write_text(markdown(env, rows, summary, fmt=args.format))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="", help="comma-separated substrings of 'model layer'")
    p.add_argument("--m", default="", help=f"comma-separated M values (default {M_VALUES})")
    p.add_argument("--modes", default="ff,attn")
    p.add_argument("--tune", action="store_true", help="small-M configuration sweep only (int8)")
    p.add_argument("--compare-paths", action="store_true", help="fused vs cuBLAS sweep only")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--format", default="int8", choices=FORMATS)
    p.add_argument("--stem", default="", help="output file stem (default: <format>-h100)")
    p.add_argument("--resume", action="store_true",
                   help="go on from an existing <stem>.json of this device and format: its "
                        "cases are kept and not re-run")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    args.stem = args.stem or f"{args.format}-h100"
    if not torch.cuda.is_available():
        print("benchmarks.quant needs a CUDA GPU (bitsandbytes' quantized kernels and ours); "
              "nothing to do.")
        return 0
    import logging
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "cast to float16" every call
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.tune:
        (out_dir / f"{args.stem}-tune.log").write_text("\n".join(tune_small_m()) + "\n")
        return 0
    if args.compare_paths:
        rows = compare_paths(fmt=args.format)
        (out_dir / f"{args.stem}-paths.md").write_text(report.paths_markdown(rows))
        (out_dir / f"{args.stem}-paths.json").write_text(json.dumps(rows, indent=1))
        return 0
    env = report.environment()
    env["bitsandbytes"] = __import__("bitsandbytes").__version__
    env["format"] = args.format
    shapes = SHAPES
    if args.layers:
        keys = [k.strip().lower() for k in args.layers.split(",") if k.strip()]
        shapes = [s for s in shapes if any(k in f"{s.model} {s.layer}".lower() for k in keys)]
    m_values = [int(v) for v in args.m.split(",")] if args.m else M_VALUES
    modes = [m for m in args.modes.split(",") if m]
    cases = [(s, m, mode) for s in shapes for m in m_values for mode in modes]
    rows = resumed_rows(out_dir / f"{args.stem}.json", env, args.format) if args.resume else []
    done = {(r["model"], r["layer"], r["m"], r["mode"]) for r in rows}
    cases = [c for c in cases if (c[0].model, c[0].layer, c[1], c[2]) not in done]
    with layers.progress(len(cases)) as tick:
        for shape, m, mode in cases:
            tick(f"{shape.model} {shape.layer} M={m} {mode}")
            rows += [asdict(r) for r in bench_case(shape, m, mode, env["copy_tb_per_s"],
                                                   args.format)]
            torch.cuda.empty_cache()
            _write(out_dir, args, env, rows)  # after every case: a cut-off run keeps its rows
    summary = _write(out_dir, args, env, rows)
    for b in table(rows):
        print("  ".join(b))
    for s in summary:
        print(f"{s['criterion']:<36} worst {s['worst']:>9} (limit {s['limit']}), "
              f"{s['misses']}/{s['cases']} miss; at {s['where']}")
    print(f"wrote {out_dir / (args.stem + '.json')} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
