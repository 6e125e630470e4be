"""The main job works where CI runs: `python -m benchmarks` (CPU mode: reference path, small
shapes), `python -m benchmarks.e2e --quick` and `python -m benchmarks.generate --quick` write their
JSON and markdown, and `pytest benchmarks/ --benchmark-only` runs."""
import json
import os
import re
import subprocess
import sys

import pytest

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
    # Not an xdist worker's variables either: pytest-benchmark reads them as "xdist is on" and
    # refuses --benchmark-only when the tests themselves run under pytest -n.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "IA3_BACKEND") and not k.startswith("PYTEST_XDIST")}
    report = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q",
                          "-p", "no:cacheprovider", "-k", "dense", f"--benchmark-json={report}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    names = {b["extra_info"]["variant"] for b in json.loads(report.read_text())["benchmarks"]}
    assert names == {"bare", "peft", "ours"}


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run is the benchmark itself, not a test")
def test_suite_resume_runs_only_the_missing_groups(tmp_path):
    """--resume (a device run cut off by its time limit goes on): groups in the file stay as
    they are, missing ones run, and a file from another device is refused."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IA3_BACKEND")}

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "benchmarks", "--out", str(tmp_path),
                               "--stem", "s", *extra], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    assert run("--layers", "dense").returncode == 0
    first = json.loads((tmp_path / "s.json").read_text())["rows"]
    out = run("--layers", "dense,conv1d", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 group(s) already measured, 2 to run" in out.stdout
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r for r in rows if r["family"] == "dense"] == first  # kept, not re-measured
    assert {r["family"] for r in rows} == {"dense", "conv1d"}
    out = run("--layers", "dense,conv1d", "--resume")
    assert out.returncode == 0 and "nothing left to run" in out.stdout
    data = json.loads((tmp_path / "s.json").read_text())
    for e in data["environments"].values():
        e["device"] = "another GPU"
    (tmp_path / "s.json").write_text(json.dumps(data))
    out = run("--layers", "dense", "--resume")
    assert out.returncode != 0 and "another GPU" in out.stdout + out.stderr


def test_quant_resume_keeps_whole_cases_of_the_same_device(tmp_path):
    from benchmarks import quant

    rows = [dict(model="Llama-3-8B", layer="k/v_proj", m=1, mode="ff", phase="fwd")]
    path = tmp_path / "nf4-h100.json"
    assert quant.resumed_rows(path, {"device": "H100"}, "nf4") == []  # nothing to resume
    path.write_text(json.dumps({"environment": {"device": "H100", "format": "nf4"},
                                "rows": rows}))
    assert quant.resumed_rows(path, {"device": "H100"}, "nf4") == rows
    with pytest.raises(SystemExit, match="H200"):
        quant.resumed_rows(path, {"device": "H200"}, "nf4")
    with pytest.raises(SystemExit, match="int8"):
        quant.resumed_rows(path, {"device": "H100"}, "int8")


def test_forced_tiles_reaches_the_launcher_and_sets_plans_aside():
    """Tile sweeps (tune_small_m, tune_large_m, quant --tune) patch dense._matmul_config through
    layers.forced_tiles; the patch must take the launcher's full call (it passes a_elem_size,
    which the sweeps' own patches once refused) and empty the launch plans, which otherwise
    replay the tiles their signature first had."""
    from benchmarks.layers import forced_tiles
    from ia3_kernels import dense

    sentinel = {"key": "plan"}
    dense._MATMUL_PLANS.plans, saved = sentinel, dense._MATMUL_PLANS.plans
    try:
        table = dense._matmul_config(64, 4096, 4096, 2, 132, False, False, 2)
        small = dense._matmul_config(16, 4096, 4096, 2, 132, False, False, 2)
        with forced_tiles(lambda M, N, K, e, ae: (32, 32, 256, 4, 3) if M == 64 else None):
            assert dense._MATMUL_PLANS.plans == {}
            forced = dense._matmul_config(64, 4096, 4096, 2, 132, False, False, 2)
            assert forced[:3] == (32, 32, 256) and forced[4:] == (4, 3)
            assert forced[3] == dense.split_k_for(64, 4096, 4096, 32, 32, 256, 2, 132)
            assert dense._matmul_config(16, 4096, 4096, 2, 132, False, False, 2) == small
        with forced_tiles(lambda M, N, K, e, ae: (64, 64, 128, 4, 4, 3) if M == 512 else None):
            assert dense._matmul_config(512, 1024, 4096, 2, 132, False, False, 2) == (
                64, 64, 128, 3, 4, 4)  # a sixth value is the split, kept as asked
        assert dense._matmul_config(64, 4096, 4096, 2, 132, False, False, 2) == table
        assert dense._MATMUL_PLANS.plans is sentinel
    finally:
        dense._MATMUL_PLANS.plans = saved


def test_host_profile_runs_on_a_tiny_model(capsys):
    """benchmarks.host_profile: step times for floor, PEFT and ours with autograd's threads on
    and off, then the cProfiles; on the CPU the reference path, which checks the pipeline."""
    from benchmarks import host_profile

    assert host_profile.main(["tiny T5"]) == 0
    out = capsys.readouterr().out
    for label in ("floor", "PEFT", "ours"):
        for threads in (True, False):
            assert f"{label:6s} autograd threads {threads}:" in out
    assert "--- cProfile ours" in out and "--- cProfile PEFT" in out
    assert host_profile.main(["no such model"]) == 1


def test_python_host_times_each_layer_and_restores_the_kernels(capsys):
    """benchmarks.python_host: int8, NF4 and dense rows with both timings, and every kernel it
    stubbed put back (the rest of the test session launches them)."""
    from benchmarks import python_host
    from ia3_kernels import config, dense, small_m

    if not config.triton_interpreted():
        pytest.skip("measures the interpreter's code paths (TRITON_INTERPRET=1)")
    before = (dense._KERNELS[False], dense._MATMUL_PLANS.kernel, small_m._KERNELS[False],
              small_m._GEMV_KERNELS[False])
    backend = config.get_backend()
    assert python_host.main(["--calls", "3"]) == 0
    assert config.get_backend() == backend
    assert (dense._KERNELS[False], dense._MATMUL_PLANS.kernel, small_m._KERNELS[False],
            small_m._GEMV_KERNELS[False]) == before
    out = capsys.readouterr().out
    for layer in ("int8", "nf4", "dense"):
        assert f"  {layer:<6} no grad" in out


def test_saved_tensors_lists_every_variant_and_the_difference(capsys):
    """benchmarks.saved: the tensors each variant's forward keeps for the backward, grouped by
    shape and dtype, and what ours keeps beyond PEFT; on the CPU both run the reference path,
    so they keep the same tensors and the floor (no vectors, no dl) keeps fewer."""
    from benchmarks import saved

    assert saved.main(["tiny Llama"]) == 0
    out = capsys.readouterr().out
    counts = {label: int(re.search(rf"^--- {label}: [\d.]+ MiB in (\d+) tensors", out, re.M)[1])
              for label in ("floor", "PEFT", "ours")}
    assert counts["PEFT"] == counts["ours"] > counts["floor"], counts
    assert "--- kept by ours, not by PEFT: 0.0 MiB" in out
    assert saved.main(["no such model"]) == 1
