"""Runs `benchmarks.distributed` under torchrun with 2 processes and checks what it reports and
saves (shared by test_distributed.py on CPU/gloo and test_multigpu.py on 2 GPUs/NCCL)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(tmp_path: Path, mode: str, env: dict, timeout: int = 600) -> dict:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "benchmarks.distributed", "--quick",
           "--mode", mode, "--out", str(out), "--stem", "run", "--save", str(tmp_path / "save")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


def check_saved_adapter_reloads(tmp_path: Path, device: str, rtol: float, atol: float) -> None:
    """save_pretrained from rank 0 loads into a single-device model (patch_peft) whose logits on
    the probe batch equal the distributed model's."""
    import argparse

    import ia3
    from benchmarks import distributed
    from peft import PeftModel

    args = argparse.Namespace(quick=True, base="bf16")
    base = distributed.build(args, torch.device(device), with_ia3=False).requires_grad_(True)
    with ia3.patched_peft():
        model = PeftModel.from_pretrained(base, tmp_path / "save" / "adapter")
    assert any(isinstance(m, ia3.Linear) for m in model.modules())
    saved = torch.load(tmp_path / "save" / "probe.pt")
    with torch.no_grad():
        logits = model(input_ids=saved["probe"].to(device)).logits.float().cpu()
    torch.testing.assert_close(logits, saved["logits"], rtol=rtol, atol=atol)
