"""Mixed-adapter batches on the GPU in bf16 at Llama-3-8B sizes, through the strategies the
dispatcher picks by M (fused at decode, cuBLAS + passes at prefill): forward and every gradient
within PEFT's error bar against the float64 reference; the 4-bit and int8 bases likewise."""
import pytest
import torch

import ia3_kernels
from conftest import HAS_CUDA, assert_within_peft_bar
from test_mixed_ops import _family, _run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch,tokens", [(64, 1), (16, 256)], ids=["decode", "prefill"])
@pytest.mark.parametrize("feedforward,k,n", [(False, 4096, 1024), (True, 14336, 4096)],
                         ids=["attn-kv", "ff-down"])
@pytest.mark.parametrize("family", ["dense", "int8", "nf4"])
def test_mixed_llama_shapes_bf16(family, feedforward, k, n, batch, tokens):
    assert HAS_CUDA
    pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, k, generator=g).cuda().to(torch.bfloat16)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g).cuda().to(torch.bfloat16)
    table = (torch.rand(32, k if feedforward else n, generator=g) + 0.5).cuda()
    index = (torch.arange(batch) * 7 % 31).cuda()  # adapter 31 unused
    op, reference = _family(family, w, torch.bfloat16)
    y, grads, dy = _run(op, x, b, table, feedforward, index)
    y_peft, grads_peft, _ = _run(reference, x, b, table, feedforward, index, dy)
    y_ref, grads_ref, _ = _run(reference, x.double(), b.double(), table.double(), feedforward,
                               index, dy.double())
    assert_within_peft_bar(y, y_peft, y_ref, torch.bfloat16, "y")
    for name, g_, gp, gr in zip(["dx", "dtable", "dbias"], grads, grads_peft, grads_ref):
        assert_within_peft_bar(g_, gp, gr, torch.bfloat16, name)
    assert torch.all(grads[1][31] == 0)
    # Deterministic: a second backward gives the same bits.
    _, again, _ = _run(op, x, b, table, feedforward, index, dy)
    for first, second in zip(grads, again):
        assert torch.equal(first, second)
