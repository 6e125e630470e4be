"""The main job works where CI runs: `python -m benchmarks` (CPU mode: reference path, small
shapes), `python -m benchmarks.e2e --quick` and `python -m benchmarks.generate --quick` write their
JSON and markdown, and `pytest benchmarks/ --benchmark-only` runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run is the benchmark itself, not a test")
@pytest.mark.parametrize("module,stem", [("benchmarks", "suite-cpu"), ("benchmarks.e2e", "e2e-cpu"),
                                         ("benchmarks.generate", "generate-cpu")])
def test_main_job_runs_on_cpu(tmp_path, module, stem):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IA3_BACKEND")}
    args = [sys.executable, "-m", module, "--out", str(tmp_path)] + (["--quick"] if "." in module else [])
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "not the point" in out.stdout  # says that CPU numbers are not what matters
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["rows"] and (tmp_path / f"{stem}.md").exists()
    for row in data["rows"]:
        assert not row.get("error") and not row.get("errors"), row
        times = [v for k, v in row.items() if (k.endswith("_us") or k in ("ms", "ms_per_token"))
                 and v is not None]
        assert times and all(t > 0 for t in times), row
    # The plots of every result file draw from the JSON alone.
    plots = subprocess.run([sys.executable, "-m", "benchmarks.plots", str(tmp_path / f"{stem}.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plots.returncode == 0, plots.stderr[-2000:]
    assert list(tmp_path.glob(f"{stem}*.png"))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run is the benchmark itself, not a test")
def test_pytest_benchmark_entry_point_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IA3_BACKEND")}
    report = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q",
                          "-p", "no:cacheprovider", "-k", "dense", f"--benchmark-json={report}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    names = {b["extra_info"]["variant"] for b in json.loads(report.read_text())["benchmarks"]}
    assert names == {"bare", "peft", "ours"}
