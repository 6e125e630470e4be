"""PNG plots of the benchmarks' JSON (matplotlib):

    python -m benchmarks.plots benchmarks/results/suite-h100.json     # layer suite
    python -m benchmarks.plots benchmarks/results/e2e-h100.json       # training steps
    python -m benchmarks.plots benchmarks/results/generate-h100.json  # decode latency

Each entry point also draws its own plots when it finishes on a GPU."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from .suite_report import _ok, judged


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_suite(json_path: Path) -> list[Path]:
    """<stem>-fwd.png and <stem>-fwd_bwd.png: PEFT's time over ours against M, one column per
    layer family; top row eager, bottom row both torch.compile'd."""
    plt = _pyplot()
    data = json.loads(json_path.read_text())
    rows = judged(data["rows"])
    families = list(dict.fromkeys(r["family"] for r in rows))
    written = []
    for phase in ("fwd", "fwd+bwd"):
        fig, axes = plt.subplots(2, len(families), figsize=(3.2 * len(families) + 1, 6.5),
                                 squeeze=False, sharey="row")
        for col, family in enumerate(families):
            fam = [r for r in rows if r["family"] == family and r["phase"] == phase]
            curves = dict.fromkeys((r["layer"], r["layout"], r["mode"]) for r in fam)
            colors = {}
            for row_i, (num, den, title) in enumerate((("peft_us", "ours_us", "eager"),
                                                       ("peft_compiled_us", "ours_compiled_us",
                                                        "compiled"))):
                ax = axes[row_i][col]
                for layer, layout, mode in curves:
                    pts = sorted((r["m"], r[num] / r[den]) for r in fam
                                 if (r["layer"], r["layout"], r["mode"]) == (layer, layout, mode)
                                 and _ok(r[num]) and _ok(r[den]))
                    if not pts:
                        continue
                    color = colors.setdefault((layer, layout), f"C{len(colors) % 10}")
                    label = f"{layer}{' ' + layout if layout else ''}"
                    ax.plot(*zip(*pts), "-" if mode == "ff" else "--", marker="o", ms=3,
                            color=color, label=label if mode == "ff" else None)
                ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{family} ({title})", fontsize=9)
                ax.tick_params(labelsize=7)
                if row_i == 0 and ax.lines:
                    ax.legend(fontsize=6)
        env = next(iter(data["environments"].values()), {})
        fig.suptitle(f"{phase}: speed-up of ia3-kernels over PEFT against M (rows multiplied) — "
                     f"{env.get('device', '')}, {env.get('date', '')}; solid: feedforward, dashed: "
                     f"attention; CUDA graphs at M <= 16 and for convolutions, eager above",
                     fontsize=9)
        fig.supxlabel("M", fontsize=9)
        fig.supylabel("PEFT time / ours (log; > 1 is faster)", fontsize=9)
        fig.tight_layout()
        out = json_path.with_name(f"{json_path.stem}-{phase.replace('+', '_')}.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def _bars(ax, groups, variants, values, colors, ylabel, title, ref=None):
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        xs = [g + (i - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get((grp, variant), float("nan")) for grp in groups]
        ax.bar(xs, ys, width, label=variant, color=colors.get(variant, f"C{i}"))
    if ref is not None:
        ax.axhline(ref, color="gray", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(["\n".join(g) if isinstance(g, tuple) else g for g in groups], fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


COLORS = {"floor": "0.55", "base": "0.55", "merged": "0.75", "PEFT": "tab:red",
          "PEFT compiled": "salmon", "ours": "tab:blue", "ours compiled": "lightskyblue"}


def _save(fig, data: dict, json_path: Path, title: str) -> Path:
    """Title with the run's device and date, written next to the JSON as <stem>.png."""
    env = data.get("environment", {})
    fig.suptitle(f"{title}{env.get('device', '')}, {env.get('date', '')}", fontsize=10)
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def plot_e2e(json_path: Path) -> Path:
    """<stem>.png: step time over the no-adapter floor, and peak memory over the floor's, for every
    model, checkpointing setting and variant."""
    plt = _pyplot()
    data = json.loads(json_path.read_text())
    rows = data["rows"]

    def group(r):  # model names wrapped: "Llama-3-8B dims x4 layers, NF4" overran its neighbours
        return textwrap.fill(r["model"], 20), "grad ckpt" if r["grad_ckpt"] else "no ckpt"
    groups = list(dict.fromkeys(map(group, rows)))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    time_over = {(group(r), r["variant"]): r["over_floor"] for r in rows}
    mem_over = {(group(r), r["variant"]): r["mem_over_floor_mib"] / 1024 for r in rows}
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 7.5))
    _bars(axes[0], groups, variants, time_over, COLORS, "step time / floor",
          "Training step time over the no-adapter floor (lower is better)", ref=1.0)
    axes[0].set_ylim(bottom=0.8)
    axes[0].legend(fontsize=7, ncol=len(variants))
    _bars(axes[1], groups, variants, mem_over, COLORS, "GiB over the floor",
          "Peak memory over the floor's (lower is better)", ref=0.0)
    return _save(fig, data, json_path, "End-to-end IA3 training — ")


def plot_generate(json_path: Path) -> Path:
    """<stem>.png: per-token decode latency over the merged model's, per model and batch."""
    plt = _pyplot()
    data = json.loads(json_path.read_text())
    rows = [r for r in data["rows"] if _ok(r.get("over_reference"))]

    def group(r):
        return r["model"], f"batch {r['batch']}", r["timing"]
    groups = list(dict.fromkeys(map(group, rows)))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    values = {(group(r), r["variant"]): r["over_reference"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 1.5 * len(groups)), 4.5))
    _bars(ax, groups, variants, values, COLORS,
          "latency / merged model's", "Per-token decode latency with a KV cache over the merged "
          "model's (lower is better)", ref=1.0)
    ax.set_ylim(bottom=0.8)
    ax.legend(fontsize=7, ncol=len(variants))
    return _save(fig, data, json_path, "Decode latency — ")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    for path in map(Path, args):
        data = json.loads(path.read_text())
        if "environments" in data:
            written = plot_suite(path)
        elif data["rows"] and "batch" in data["rows"][0]:
            written = [plot_generate(path)]
        else:
            written = [plot_e2e(path)]
        for out in written:
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
