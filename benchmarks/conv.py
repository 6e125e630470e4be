"""python -m benchmarks.conv: IA3 on convolutions from real models, bf16. The bare nn.Conv2d/3d,
PEFT's IA3 wrapper and ours: forward (eager, and as CUDA-graph replays), forward+backward (x
requires grad, the IA3 vector trains, the base is frozen) and its extra peak memory; NCHW and
channels_last; feedforward (input channels scaled) and attention (output channels scaled).
L2 is flushed between timed calls (do_bench). Ratios come from one run on one machine.

    python -m benchmarks.conv                      # every shape; JSON + markdown in results/
    python -m benchmarks.conv --layers unet --layouts nchw
    python -m benchmarks.conv --layers 1x1 --profile  # also device time per kernel, bare/ours
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from peft.tuners.ia3.layer import Conv2d as PeftConv2d
from peft.tuners.ia3.layer import Conv3d as PeftConv3d
from torch import nn

import ia3

from . import layers, report

RESULTS = Path(__file__).resolve().parent / "results"

# Issue 6's targets (H100, bf16): forward / bare, forward+backward / bare.
FWD_TARGET = 1.03
FWD_BWD_TARGET = 1.10


@dataclass(frozen=True)
class ConvShape:
    model: str
    layer: str
    c_in: int
    c_out: int
    kernel: tuple
    batch: int
    spatial: tuple
    padding: int

    @property
    def nd(self) -> int:
        return len(self.spatial)


SHAPES = [
    ConvShape("SD UNet", "3x3 320->320 @64x64", 320, 320, (3, 3), 8, (64, 64), 1),
    ConvShape("SD UNet", "3x3 640->640 @32x32", 640, 640, (3, 3), 8, (32, 32), 1),
    ConvShape("ResNet-50", "1x1 64->64 @56x56", 64, 64, (1, 1), 64, (56, 56), 0),
    ConvShape("ResNet-50", "3x3 64->64 @56x56", 64, 64, (3, 3), 64, (56, 56), 1),
    ConvShape("ResNet-50", "1x1 64->256 @56x56", 64, 256, (1, 1), 64, (56, 56), 0),
    ConvShape("ResNet-50", "1x1 256->64 @56x56", 256, 64, (1, 1), 64, (56, 56), 0),
    ConvShape("video", "3x3x3 64->64 @16x56x56", 64, 64, (3, 3, 3), 2, (16, 56, 56), 1),
]


@dataclass
class ConvRow(layers.TimedRatios):
    model: str
    layer: str
    layout: str
    mode: str
    phase: str
    timing: str
    bare_us: float
    peft_us: float
    ours_us: float
    activation_mib: float  # one output-sized bf16 tensor
    bare_peak_mib: Optional[float] = None
    peft_peak_mib: Optional[float] = None
    ours_peak_mib: Optional[float] = None
    bare_tflops: Optional[float] = None


def build_layers(shape: ConvShape, mode: str, layout, seed: int = 0, device="cuda",
                 dtype=torch.bfloat16):
    """(bare conv, PEFT's IA3 wrapper, ours) over the same weights, IA3 vector random."""
    torch.manual_seed(seed)
    conv_cls, peft_cls = (nn.Conv2d, PeftConv2d) if shape.nd == 2 else (nn.Conv3d, PeftConv3d)
    bare = conv_cls(shape.c_in, shape.c_out, shape.kernel, padding=shape.padding)
    bare = bare.to(device, dtype).to(memory_format=layout).requires_grad_(False)
    from peft import IA3Config

    wrappers = []
    for _ in range(2):
        w = peft_cls(copy.deepcopy(bare), "default", IA3Config(), is_feedforward=(mode == "ff"))
        with torch.no_grad():
            w.ia3_l["default"].uniform_(0.5, 1.5, generator=torch.Generator(device).manual_seed(seed))
        wrappers.append(w)
    peft_layer, ours = wrappers
    ia3.fuse(ours)
    return bare, peft_layer, ours


def _flop(shape: ConvShape) -> float:
    out_positions = shape.batch * math.prod(shape.spatial)  # stride 1, 'same'-sized padding
    return 2 * out_positions * shape.c_out * shape.c_in * math.prod(shape.kernel)


def bench_case(shape: ConvShape, mode: str, layout_name: str,
               profile: bool = False) -> list[ConvRow]:
    layout = {"nchw": torch.contiguous_format,
              "channels_last": torch.channels_last if shape.nd == 2 else torch.channels_last_3d}[layout_name]
    bare, peft_layer, ours = build_layers(shape, mode, layout)
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(shape.batch, shape.c_in, *shape.spatial, device="cuda", dtype=torch.bfloat16,
                    generator=g).contiguous(memory_format=layout)
    with torch.no_grad():
        dy = torch.randn_like(bare(x))
    activation_mib = dy.numel() * dy.element_size() / 2**20
    rows = []
    for phase in ("fwd", "fwd+bwd"):
        xin = x.clone().requires_grad_(phase == "fwd+bwd")
        fns = {name: layers.step_fn(layer, xin, phase, dy)
               for name, layer in (("bare", bare), ("peft", peft_layer), ("ours", ours))}
        # Graph replays leave the GPU time (eager calls here are partly host-bound).
        timings = ["eager", "graph"]
        for timing in timings:
            timer = layers.time_eager if timing == "eager" else layers.time_graph
            us = {name: timer(fn) for name, fn in fns.items()}
            row = ConvRow(shape.model, shape.layer, layout_name, mode, phase, timing,
                          us["bare"], us["peft"], us["ours"], round(activation_mib, 2))
            if phase == "fwd":
                row.bare_tflops = round(_flop(shape) / (us["bare"] * 1e-6) / 1e12, 1)
            if profile and timing == "eager":
                print_kernel_table(f"{shape.model} {shape.layer} {layout_name} {mode} {phase}",
                                   fns)
            if phase == "fwd+bwd" and timing == "eager":
                row.bare_peak_mib, row.peft_peak_mib, row.ours_peak_mib = (
                    round(layers.peak_mib(fns[k]), 2) for k in ("bare", "peft", "ours"))
            rows.append(row)
    return rows


def print_kernel_table(title: str, fns: dict) -> None:
    """Device time per kernel of one call, bare and ours side by side (--profile)."""
    print(f"\n## {title}")
    for name in ("bare", "ours"):
        table = layers.kernel_table(fns[name])
        total = sum(us for _, us, _ in table)
        print(f"{name}: {total:.1f} us of kernels per call")
        for kernel, us, count in table[:8]:
            print(f"  {us:8.1f} us  x{count:.0f}  {kernel[:110]}")


def row_dict(row: ConvRow) -> dict:
    d = asdict(row)
    d["ours_over_bare"] = round(row.ours_over_bare, 4)
    d["peft_over_bare"] = round(row.peft_over_bare, 4)
    return d


def summarize(rows: list[dict]) -> list[dict]:
    out = []

    def add(name, selected, value, limit):
        if not selected:
            return
        worst = max(selected, key=value)
        out.append({"criterion": name, "limit": limit, "worst": round(value(worst), 3),
                    "where": f"{worst['model']} {worst['layer']} {worst['layout']} {worst['mode']}",
                    "misses": sum(value(r) > limit for r in selected), "cases": len(selected)})

    fwd_eager = [r for r in rows if r["phase"] == "fwd" and r["timing"] == "eager"]
    fwd_graph = [r for r in rows if r["phase"] == "fwd" and r["timing"] == "graph"]
    fb = [r for r in rows if r["phase"] == "fwd+bwd"]
    add("fwd / bare (eager)", fwd_eager, lambda r: r["ours_over_bare"], FWD_TARGET)
    add("fwd / bare (CUDA graphs)", fwd_graph, lambda r: r["ours_over_bare"], FWD_TARGET)
    add("fwd+bwd / bare (eager)", [r for r in fb if r["timing"] == "eager"],
        lambda r: r["ours_over_bare"], FWD_BWD_TARGET)
    add("fwd+bwd / bare (CUDA graphs, ff)", [r for r in fb if r["timing"] == "graph" and r["mode"] == "ff"],
        lambda r: r["ours_over_bare"], FWD_BWD_TARGET)
    fb = [r for r in fb if r["bare_peak_mib"] is not None]
    # Extra peak memory: bare's plus one activation for attention layers (PEFT's as a ceiling).
    add("peak - (bare + allowance) [MiB]", fb,
        lambda r: r["ours_peak_mib"] - r["bare_peak_mib"]
        - (r["activation_mib"] if r["mode"] == "attn" else 0.0), 0.0)
    add("peak - PEFT's peak [MiB]", fb, lambda r: r["ours_peak_mib"] - r["peft_peak_mib"], 0.0)
    return out


def markdown(env: dict, rows: list[dict], summary: list[dict]) -> str:
    lines = ["# IA3 convolutions: bare vs PEFT vs ours (bf16)", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| model | conv | layout | mode | phase | timing | bare us | PEFT us | ours us | "
             "PEFT/bare | ours/bare | peak MiB bare / PEFT / ours |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        peak = ("" if r["bare_peak_mib"] is None else
                f"{r['bare_peak_mib']:.0f} / {r['peft_peak_mib']:.0f} / {r['ours_peak_mib']:.0f}")
        lines.append(f"| {r['model']} | {r['layer']} | {r['layout']} | {r['mode']} | {r['phase']} | "
                     f"{r['timing']} | {r['bare_us']:.1f} | {r['peft_us']:.1f} | {r['ours_us']:.1f} | "
                     f"{r['peft_over_bare']:.3f} | {r['ours_over_bare']:.3f} | {peak} |")
    lines += ["", "## Targets", "", "| criterion | limit | worst | at | misses |", "|---|---:|---:|---|---:|"]
    for s in summary:
        lines.append(f"| {s['criterion']} | {s['limit']} | {s['worst']} | {s['where']} | "
                     f"{s['misses']}/{s['cases']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.conv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="", help="comma-separated substrings of 'model layer'")
    p.add_argument("--modes", default="ff,attn")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--stem", default="conv-h100")
    p.add_argument("--profile", action="store_true",
                   help="print each case's device time per kernel (torch.profiler), bare and ours")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("benchmarks.conv times cuDNN convolutions and our kernels on a CUDA GPU; nothing to "
              "do here (the CPU path is the reference, covered by the tests).")
        return 0
    env = report.environment()
    shapes = SHAPES
    if args.layers:
        keys = [k.strip().lower() for k in args.layers.split(",") if k.strip()]
        shapes = [s for s in shapes if any(k in f"{s.model} {s.layer}".lower() for k in keys)]
    cases = [(s, mode, lay) for s in shapes for lay in args.layouts.split(",") if lay
             for mode in args.modes.split(",") if mode]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def write() -> list[dict]:
        summary = summarize(rows)
        (out_dir / f"{args.stem}.json").write_text(json.dumps(
            {"environment": env, "summary": summary, "rows": rows}, indent=1))
        (out_dir / f"{args.stem}.md").write_text(markdown(env, rows, summary))
        return summary

    with layers.progress(len(cases)) as tick:
        for shape, mode, layout in cases:
            tick(f"{shape.model} {shape.layer} {layout} {mode}")
            rows += [row_dict(r) for r in bench_case(shape, mode, layout, args.profile)]
            torch.cuda.empty_cache()
            write()  # after every case: a cut-off run keeps its rows
    summary = write()
    print(markdown(env, rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
