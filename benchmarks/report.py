"""Environment record, terminal table, markdown and JSON for the layer benchmark, and the check of
the foundation's speed and memory targets."""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch

FWD_TARGET = 1.05  # forward / bare (CUDA graphs at M <= 16, eager above)
FWD_BWD_TARGET = 1.10  # forward+backward / bare


def environment() -> dict:
    import peft
    import transformers
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
        env.update(measure_ceilings())
    return env


def measure_ceilings() -> dict:
    """The two ceilings of this GPU, measured: copy bandwidth and a large bf16 matmul."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    bandwidth = 2 * src.numel() / (ms * 1e-3) / 1e12
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    return {"copy_tb_per_s": round(bandwidth, 3),
            "bf16_matmul_tflops": round(2 * 8192**3 / (ms * 1e-3) / 1e12, 1)}


def target_row_selected(row: dict) -> bool:
    """The timing a target is judged on: CUDA graphs at M <= 16, eager above."""
    return row["timing"] == ("graph" if row["m"] <= 16 else "eager")


def memory_allowance_mib(row: dict) -> float:
    """Attention layers may keep one M x N tensor (the pre-scaling output) for dl."""
    return row["m"] * row["n"] * 2 / 2**20 if row["mode"] == "attn" else 0.0


def summarize(rows: list[dict], has_graphs: bool) -> list[dict]:
    """Worst ratio of each target column, where it happens, and how many cases miss."""
    out = []

    def worst(name, selected, key, limit=None, detail=""):
        if not selected:
            return
        w = max(selected, key=key)
        misses = [r for r in selected if limit is not None and key(r) > limit]
        out.append({"criterion": name, "worst": round(key(w), 3), "limit": limit,
                    "where": where(w), "cases": len(selected), "misses": len(misses),
                    "detail": detail})

    def pick(phase, timing_rule):
        return [r for r in rows if r["phase"] == phase and timing_rule(r)]

    rule = target_row_selected if has_graphs else (lambda r: r["timing"] == "eager")
    worst("forward / bare", pick("fwd", rule), lambda r: r["ours_over_bare"], FWD_TARGET,
          "CUDA graphs at M <= 16, eager above" if has_graphs else "eager")
    worst("forward+backward / bare", pick("fwd+bwd", rule), lambda r: r["ours_over_bare"],
          FWD_BWD_TARGET, "CUDA graphs at M <= 16, eager above" if has_graphs else "eager")
    for phase in ("fwd", "fwd+bwd"):
        worst(f"{phase} eager / PEFT eager", pick(phase, lambda r: r["timing"] == "eager"),
              lambda r: r["ours_us"] / r["peft_us"], 1.0)
    mem = [r for r in rows if r.get("ours_peak_mib") is not None]
    worst("extra peak MiB over bare + allowance", mem,
          lambda r: r["ours_peak_mib"] - r["bare_peak_mib"] - memory_allowance_mib(r), 0.5,
          "allowance: one M x N bf16 tensor for attention layers; 0.5 MiB slack for allocator rounding")
    worst("extra peak MiB over PEFT", mem, lambda r: r["ours_peak_mib"] - r["peft_peak_mib"], 0.5)
    return out


def where(r: dict) -> str:
    return f"{r['model']} {r['layer']} {r['k']}->{r['n']} M={r['m']} {r['mode']} {r['phase']} ({r['timing']})"


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


HEADER = ["model", "layer", "K->N", "M", "mode", "phase", "timing", "bare us", "PEFT us", "ours us",
          "PEFT/bare", "ours/bare", "ours/PEFT", "bare MiB", "PEFT MiB", "ours MiB", "ours GB/s"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["model"], r["layer"], f"{r['k']}->{r['n']}", str(r["m"]), r["mode"], r["phase"],
             r["timing"], fmt(r["bare_us"]), fmt(r["peft_us"]), fmt(r["ours_us"]),
             fmt(r["peft_over_bare"], 2), fmt(r["ours_over_bare"], 2),
             fmt(r["ours_us"] / r["peft_us"], 2), fmt(r["bare_peak_mib"]), fmt(r["peft_peak_mib"]),
             fmt(r["ours_peak_mib"]), fmt(r["ours_gbps"], 0)] for r in rows]


def print_table(rows: list[dict]) -> None:
    body = table_rows(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEADER)]
    line = "  ".join(h.rjust(w) for h, w in zip(HEADER, widths))
    print(line)
    print("-" * len(line))
    for b in body:
        print("  ".join(c.rjust(w) for c, w in zip(b, widths)))


def markdown(env: dict, rows: list[dict], summary: list[dict], note: str) -> str:
    lines = ["# Layer benchmark: bare base layer vs PEFT's IA3 wrapper vs ia3-kernels", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", note, "", "## Targets", "",
              "| criterion | worst | limit | misses / cases | where | timing |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['criterion']} | {s['worst']} | {s['limit']} | {s['misses']} / {s['cases']} "
                     f"| {s['where']} | {s['detail']} |")
    lines += ["", "## All cases", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(b) + " |" for b in table_rows(rows)]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, stem: str, env: dict, rows: list[dict], summary: list[dict], note: str,
          extra: dict | None = None) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    payload = {"environment": env, "note": note, "summary": summary, "rows": rows}
    if extra:
        payload.update(extra)
    json_path.write_text(json.dumps(payload, indent=1))
    text = markdown(env, rows, summary, note)
    if extra and extra.get("compare_paths"):
        text += paths_markdown(extra["compare_paths"])
    md_path.write_text(text)
    return json_path, md_path


def paths_markdown(path_rows: list[dict]) -> str:
    """Our op with each strategy forced, CUDA graphs at every M (--compare-paths)."""
    lines = ["", "## Strategy comparison (our op, each strategy forced, CUDA graphs)", "",
             "| model | layer | M | mode | phase | bare us | fused us | cublas us | faster |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in path_rows:
        best = "cublas" if p["cublas_us"] < p["fused_us"] else "fused"
        bare = f"{p['bare_us']:.1f}" if "bare_us" in p else "-"
        lines.append(f"| {p['model']} | {p['layer']} | {p['m']} | {p['mode']} | {p['phase']} | "
                     f"{bare} | {p['fused_us']:.1f} | {p['cublas_us']:.1f} | {best} |")
    return "\n".join(lines) + "\n"
