"""Multi-GPU training over NCCL (issue 10): `torchrun --nproc-per-node 2 -m benchmarks.distributed`
with DDP and FSDP2 on a tiny bf16 Llama with fused IA3 (strict mode: the kernels ran), every IA3
gradient of one distributed step against one process's on the full batch, and the adapter saved
from rank 0 reloaded on one GPU with the distributed model's logits. Skipped with fewer than 2
GPUs (the CPU/gloo twin is in test_distributed.py)."""
import pytest
import torch

from distributed_script import check_saved_adapter_reloads, run_two_processes

pytestmark = [pytest.mark.multigpu, pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_gpus_match_one_process(tmp_path, mode):
    result = run_two_processes(tmp_path, mode, dict(IA3_STRICT="1"))
    assert result["world"] == 2 and result["dtype"] == "torch.bfloat16"
    # bf16 activations, reduction order across 2 ranks vs 1: a few bf16 ulps of each vector.
    assert result["ia3_grad_rel_error_vs_one_process"] < 2e-2, result
    check_saved_adapter_reloads(tmp_path, "cuda", rtol=2e-2, atol=2e-2)
