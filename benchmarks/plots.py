"""python -m benchmarks.plots RESULTS.json: PNG plots of a layer benchmark — time relative to the
bare layer against M, one panel per shape, ours and PEFT, for the forward and the forward+backward
(CUDA-graph timings at M <= 16, eager above: the same rule as the targets), with the targets
drawn in. Writes <stem>-fwd.png and <stem>-fwd_bwd.png next to the JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .report import FWD_BWD_TARGET, FWD_TARGET, target_row_selected


def plot(json_path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(json_path.read_text())
    rows = [r for r in data["rows"] if target_row_selected(r)]
    shapes = sorted({(r["model"], r["layer"], r["k"], r["n"]) for r in rows},
                    key=lambda s: (s[0], s[2], s[3]))
    written = []
    for phase, target in (("fwd", FWD_TARGET), ("fwd+bwd", FWD_BWD_TARGET)):
        cols = 4
        fig, axes = plt.subplots((len(shapes) + cols - 1) // cols, cols, figsize=(16, 7.5),
                                 sharex=True, squeeze=False)
        for ax, (model, layer, k, n) in zip(axes.flat, shapes):
            for who, style in (("ours", "-"), ("peft", "--")):
                for mode, color in (("ff", "tab:blue"), ("attn", "tab:orange")):
                    pts = sorted((r["m"], r[f"{who}_us"] / r["bare_us"]) for r in rows
                                 if (r["model"], r["layer"], r["k"], r["n"]) == (model, layer, k, n)
                                 and r["phase"] == phase and r["mode"] == mode)
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", ms=3, color=color,
                                label=f"{'ours' if who == 'ours' else 'PEFT'} {mode}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.axhline(target, color="green", lw=0.8, ls=":")
            ax.axvspan(0.7, 16 * 1.4, color="0.93", zorder=0)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{model} {layer} {k}→{n}", fontsize=9)
            ax.tick_params(labelsize=8)
        for ax in axes.flat[len(shapes):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        env = data.get("environment", {})
        fig.suptitle(f"{phase}: time / bare layer vs M (tokens) — {env.get('device', '')}, "
                     f"{env.get('date', '')}. Shaded: M ≤ 16 timed with CUDA graphs; eager above. "
                     f"Green: target {target}×", fontsize=10)
        fig.supxlabel("M", fontsize=9)
        fig.supylabel("time / bare layer (log)", fontsize=9)
        fig.tight_layout()
        out = json_path.with_name(f"{json_path.stem}-{phase.replace('+', '_')}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    for path in args:
        for out in plot(Path(path)):
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
