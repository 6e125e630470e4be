"""Shared by the benchmarks: the environment record (versions, device, this GPU's measured copy
bandwidth and bf16 matmul rate), the timing rule of the targets, number formatting, and the
markdown of a fused-vs-cuBLAS strategy comparison."""
from __future__ import annotations

import argparse
import datetime
import platform

import torch


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


def measure_copy_tb_per_s() -> float:
    """TB/s of a 1 GiB device-to-device copy (bytes read + written); its 2 GiB are freed."""
    from triton.testing import do_bench

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e12


def measure_ceilings() -> dict:
    """The two ceilings of this GPU, measured: copy bandwidth and a large bf16 matmul."""
    from triton.testing import do_bench

    bandwidth = measure_copy_tb_per_s()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    return {"copy_tb_per_s": round(bandwidth, 3),
            "bf16_matmul_tflops": round(2 * 8192**3 / (ms * 1e-3) / 1e12, 1)}


def argument_parser(prog: str, doc: str, quick_help: str, out_dir, *, models: bool = False,
                    stem_help: str = "file name stem") -> argparse.ArgumentParser:
    """The arguments every benchmark entry point shares: --quick, --out, --stem (and --models
    for the whole-model benchmarks); each adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    if models:
        p.add_argument("--models", default="", help="comma-separated substrings of model names")
    p.add_argument("--out", default=str(out_dir), help="directory for JSON + markdown + plots")
    p.add_argument("--stem", default="", help=stem_help)
    return p


def run_device() -> tuple[bool, torch.device, torch.dtype]:
    """(has CUDA, device, dtype) of a benchmark run: bf16 on the GPU, float32 on a CPU (the
    reference path, whose numbers are not the point)."""
    cuda = torch.cuda.is_available()
    return cuda, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32


def select_by_name(specs: list, csv: str) -> list:
    """The specs whose name contains one of the comma-separated, case-insensitive `csv` keys."""
    keys = [k.strip().lower() for k in csv.split(",") if k.strip()]
    return [s for s in specs if not keys or any(k in s.name.lower() for k in keys)]


def draw(plot_name: str, json_path) -> None:
    """Draw a result file's PNGs with benchmarks.plots.<plot_name>, if matplotlib is there."""
    from . import plots
    try:
        written = getattr(plots, plot_name)(json_path)
    except ImportError:  # matplotlib, imported when a plot is drawn
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return
    for png in written if isinstance(written, list) else [written]:
        print(f"wrote {png}")


def target_row_selected(row: dict) -> bool:
    """The timing a target is judged on: CUDA graphs at M <= 16, eager above."""
    return row["timing"] == ("graph" if row["m"] <= 16 else "eager")


def where(r: dict) -> str:
    return f"{r['model']} {r['layer']} {r['k']}->{r['n']} M={r['m']} {r['mode']} {r['phase']} ({r['timing']})"


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


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
