"""The layer suite's outputs: the check of each family's targets, the terminal table, markdown
and JSON (merged per family, so families can be run separately on one machine). Plots:
benchmarks/plots.py."""
from __future__ import annotations

import json
from pathlib import Path

from .report import fmt

# Limits from the issues (H100, bf16): forward / bare and forward+backward / bare per family;
# forward+backward / PEFT for the quantized ones; forward / bare bnb at M <= 64.
FWD_OVER_BARE = {"dense": 1.05, "conv1d": 1.05, "conv2d": 1.03, "conv3d": 1.03}
FWD_BWD_OVER_BARE = {"dense": 1.10, "conv1d": 1.10, "conv2d": 1.10, "conv3d": 1.10,
                     "int8": 1.0, "nf4": 1.0, "fp4": 1.0}
FWD_BWD_OVER_PEFT = {"int8": 1 / 3, "nf4": 1 / 1.5, "fp4": 1 / 1.5}
SMALL_M_FWD_OVER_BNB = {"int8": 0.2, "nf4": 0.5, "fp4": 0.5}
MIB_SLACK = 0.5  # allocator rounding


def _ok(v) -> bool:
    return v is not None and v == v


def judged(rows: list[dict]) -> list[dict]:
    """One row per (case, phase): the CUDA-graph replay where it was taken for bare and ours (it
    leaves the kernels' time), else the eager timing."""
    best = {}
    for r in rows:
        key = (r["family"], r["model"], r["layer"], r["layout"], r["mode"], r["m"], r["phase"])
        graph_ok = r["timing"] == "graph" and _ok(r["bare_us"]) and _ok(r["ours_us"])
        if key not in best or graph_ok:
            best[key] = r
    return list(best.values())


def where(r: dict) -> str:
    layout = f" {r['layout']}" if r["layout"] else ""
    return f"{r['model']} {r['layer']}{layout} M={r['m']} {r['mode']} {r['phase']} ({r['timing']})"


def allowance_mib(r: dict) -> float:
    """Attention layers may keep one M x N output-sized tensor (the pre-scaling output, for dl)."""
    if r["mode"] != "attn":
        return 0.0
    return r["m"] * r["n"] * 2 / 2**20


def summarize(rows: list[dict]) -> list[dict]:
    out = []

    def add(family, name, selected, value, limit=None):
        selected = [r for r in selected if _ok(value(r))]
        if not selected:
            return
        worst = max(selected, key=value)
        values = sorted(value(r) for r in selected)
        out.append({"family": family, "criterion": name, "worst": round(value(worst), 3),
                    "median": round(values[len(values) // 2], 3),
                    "limit": None if limit is None else round(limit, 3), "where": where(worst),
                    "cases": len(selected),
                    "misses": None if limit is None else sum(value(r) > limit for r in selected)})

    def ratio(a, b):
        return lambda r: (r[a] / r[b]) if _ok(r[a]) and _ok(r[b]) else None

    def extra(variant, base):
        return lambda r: (r["peak_mib"].get(variant) - r["peak_mib"].get(base)
                          - (allowance_mib(r) if base == "bare" else 0.0)
                          if _ok(r["peak_mib"].get(variant)) and _ok(r["peak_mib"].get(base)) else None)

    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        best = judged(fam)
        eager = [r for r in fam if r["timing"] == "eager"]
        for phase, limits in (("fwd", FWD_OVER_BARE), ("fwd+bwd", FWD_BWD_OVER_BARE)):
            add(family, f"{phase} ours / bare", [r for r in best if r["phase"] == phase],
                ratio("ours_us", "bare_us"), limits.get(family))
        if family in SMALL_M_FWD_OVER_BNB:
            add(family, "fwd ours / bare bnb, M <= 64",
                [r for r in best if r["phase"] == "fwd" and r["m"] <= 64],
                ratio("ours_us", "bare_us"), SMALL_M_FWD_OVER_BNB[family])
        for phase in ("fwd", "fwd+bwd"):
            limit = FWD_BWD_OVER_PEFT.get(family, 1.0) if phase == "fwd+bwd" else 1.0
            add(family, f"{phase} ours / PEFT (eager)", [r for r in eager if r["phase"] == phase],
                ratio("ours_us", "peft_us"), limit)
            add(family, f"{phase} ours compiled / PEFT compiled", [r for r in best if r["phase"] == phase],
                ratio("ours_compiled_us", "peft_compiled_us"), 1.0)
        mem = [r for r in eager if r["phase"] == "fwd+bwd"]
        add(family, "extra peak MiB: ours - (bare + allowance)", mem, extra("ours", "bare"), MIB_SLACK)
        add(family, "extra peak MiB: ours - PEFT", mem, extra("ours", "peft"), MIB_SLACK)
        add(family, "extra peak MiB: ours compiled - PEFT compiled", mem,
            extra("ours_compiled", "peft_compiled"), MIB_SLACK)
        memory_bound = [r for r in best if r.get("bound") == "memory" and r["phase"] == "fwd"]
        add(family, "fwd % of memory roofline (higher is better; worst = best case)", memory_bound,
            lambda r: r["roofline_pct"])
    return out


HEADER = ["family", "model", "layer", "layout", "M", "mode", "phase", "timing", "bare us",
          "PEFT us", "PEFT-c us", "ours us", "ours-c us", "ours/bare", "ours/PEFT",
          "ours-c/PEFT-c", "+MiB PEFT", "+MiB ours", "TFLOP/s", "GB/s", "% roof"]


def _extra_mib(r, variant):
    p = r["peak_mib"]
    return p[variant] - p["bare"] if _ok(p.get(variant)) and _ok(p.get("bare")) else None


def table_rows(rows: list[dict]) -> list[list[str]]:
    def div(a, b):
        return a / b if _ok(a) and _ok(b) else None
    body = []
    for r in rows:
        roof = "" if r["roofline_pct"] is None else f"{r['roofline_pct']:.0f} ({r['bound'][:3]})"
        body.append([r["family"], r["model"], r["layer"], r["layout"] or "-", str(r["m"]), r["mode"],
                     r["phase"], r["timing"], fmt(_num(r["bare_us"])), fmt(_num(r["peft_us"])),
                     fmt(_num(r["peft_compiled_us"])), fmt(_num(r["ours_us"])),
                     fmt(_num(r["ours_compiled_us"])), fmt(div(r["ours_us"], r["bare_us"]), 2),
                     fmt(div(r["ours_us"], r["peft_us"]), 2),
                     fmt(div(r["ours_compiled_us"], r["peft_compiled_us"]), 2),
                     fmt(_extra_mib(r, "peft")), fmt(_extra_mib(r, "ours")),
                     fmt(r["ours_tflops"]), fmt(r["ours_gbps"], 0), roof])
    return body


def _num(v):
    return v if _ok(v) else None


def print_table(rows: list[dict]) -> None:
    body = table_rows(rows)
    if not body:
        return
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEADER)]
    line = "  ".join(h.rjust(w) for h, w in zip(HEADER, widths))
    print(line)
    print("-" * len(line))
    for b in body:
        print("  ".join(c.rjust(w) for c, w in zip(b, widths)))


def print_summary(summary: list[dict]) -> None:
    for s in summary:
        limit = "" if s["limit"] is None else f" (limit {s['limit']}, {s['misses']}/{s['cases']} miss)"
        print(f"{s['family']:<7} {s['criterion']:<52} worst {s['worst']:>9}, median {s['median']:>8}"
              f"{limit}; worst at {s['where']}")


def markdown(data: dict) -> str:
    lines = ["# Layer suite: bare base layer vs PEFT vs PEFT compiled vs ia3-kernels (eager, compiled)",
             ""]
    for family, env in data["environments"].items():
        lines.append(f"- **{family}**: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines += ["", data.get("note", ""), "",
              "Columns: times in µs (`-c`: torch.compile'd); `+MiB`: peak memory of a "
              "forward+backward over the bare layer's; `% roof`: time at this GPU's measured "
              "roofline (copy bandwidth or bf16 matmul rate, whichever binds) over ours. "
              "Targets are judged on CUDA-graph replays where taken (M <= 16 for linear layers, "
              "every convolution), eager above.", "", "## Targets", "",
              "| family | criterion | worst | median | limit | misses / cases | worst at |",
              "|---|---|---:|---:|---:|---:|---|"]
    for s in data["summary"]:
        misses = "" if s["limit"] is None else f"{s['misses']} / {s['cases']}"
        lines.append(f"| {s['family']} | {s['criterion']} | {s['worst']} | {s['median']} | "
                     f"{'' if s['limit'] is None else s['limit']} | {misses} | {s['where']} |")
    failures = sorted({f"{r['family']} {v}: {e}" for r in data["rows"] for v, e in r["errors"].items()})
    if failures:
        lines += ["", "## Variants without a timing", ""] + [f"- {f}" for f in failures]
    lines += ["", "## All cases", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(b) + " |" for b in table_rows(data["rows"])]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, stem: str, env: dict, rows: list[dict], note: str, merge: bool,
          targets: bool = True):
    """Write <stem>.json and .md. With merge, rows of families not run now are kept from the
    existing JSON (each family's environment is recorded with it). targets=False (a CPU run)
    leaves the check of the GPU targets out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    families = list(dict.fromkeys(r["family"] for r in rows))
    data = {"environments": {}, "rows": []}
    if merge and json_path.exists():
        old = json.loads(json_path.read_text())
        data["environments"] = {f: e for f, e in old["environments"].items() if f not in families}
        data["rows"] = [r for r in old["rows"] if r["family"] not in families]
    data["environments"].update({f: env for f in families})
    data["rows"] += rows
    data["note"] = note
    data["summary"] = summarize(data["rows"]) if targets else []
    json_path.write_text(json.dumps(data, indent=1))
    md_path.write_text(markdown(data))
    return json_path, md_path, data
