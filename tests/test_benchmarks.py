"""The main job works where CI runs: `python -m benchmarks` (CPU mode: reference path, small
shapes) and `python -m benchmarks.e2e --quick` write their JSON and markdown."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run is the benchmark itself, not a test")
@pytest.mark.parametrize("module,stem", [("benchmarks", "layers-cpu"), ("benchmarks.e2e", "e2e-cpu")])
def test_main_job_runs_on_cpu(tmp_path, module, stem):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IA3_BACKEND")}
    args = [sys.executable, "-m", module, "--out", str(tmp_path)] + (["--quick"] if "e2e" in module else [])
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "not the point" in out.stdout  # says that CPU numbers are not what matters
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["rows"] and (tmp_path / f"{stem}.md").exists()
    for row in data["rows"]:
        times = [v for k, v in row.items() if k.endswith("_us") or k == "ms"]
        assert times and all(t > 0 for t in times), row
