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
@pytest.mark.parametrize("feedforward,k,n",
                         [(False, 4096, 1024), (False, 4096, 4096), (True, 14336, 4096)],
                         ids=["attn-kv", "attn-qo", "ff-down"])
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
    with torch.no_grad():  # serving: no u stored (attn-qo prefill: the TMA GEMM's gather)
        y_serving = op(x, b, table, feedforward, index)
    assert_within_peft_bar(y_serving, y_peft, y_ref, torch.bfloat16, "y without grad")
    # Deterministic: a second backward gives the same bits.
    _, again, _ = _run(op, x, b, table, feedforward, index, dy)
    for first, second in zip(grads, again):
        assert torch.equal(first, second)


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("feedforward,save_preact", [(True, False), (False, True), (False, False)])
def test_opcheck_mixed(path, feedforward, save_preact):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 256, generator=g).cuda().to(torch.bfloat16).reshape(36, 256)
    w = (torch.randn(96, 256, generator=g) / 16).cuda().to(torch.bfloat16)
    b = torch.randn(96, generator=g).cuda().to(torch.bfloat16)
    table = (torch.rand(5, 256 if feedforward else 96, generator=g) + 0.5).cuda()
    index = torch.tensor([3, 0, 3, 1], device="cuda")
    args = (x.requires_grad_(), w, b, table.requires_grad_(), feedforward, False, save_preact,
            index)
    with ia3_kernels.dense_path(path):
        torch.library.opcheck(torch.ops.ia3_kernels.dense_linear, args)


def test_torch_compile_mixed_batch_fullgraph():
    """A compiled layer with a mixed batch: no graph break, the eager op's outputs and grads."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 512, generator=g).cuda().to(torch.bfloat16)
    w = (torch.randn(384, 512, generator=g) / 23).cuda().to(torch.bfloat16)
    table = (torch.rand(4, 512, generator=g) + 0.5).cuda()
    index = torch.tensor([0, 2, 2, 1, 0, 3], device="cuda")

    def layer(x, t):
        return ia3_kernels.ia3_linear(x, w, None, t, True, adapter_index=index)

    results = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        xg, tg = x.clone().requires_grad_(), table.clone().requires_grad_()
        y = fn(xg, tg)
        results.append([y, *torch.autograd.grad(y.float().square().sum(), [xg, tg])])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)
