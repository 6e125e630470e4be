"""GPU tests of the int8 (LLM.int8 base) op and layer: bf16 at real shapes on both strategies,
accuracy against bitsandbytes' own LLM.int8 matmul, opcheck, torch.compile, CUDA-graph capture,
and a tiny Llama with int8 bases trained in bf16 with and without autocast."""
import copy

import pytest
import torch
from peft import get_peft_model

import ia3
import ia3_kernels
from conftest import capture_cuda_graph
from helpers import check_quantized_llama_trains, output_and_grads, randomize_ia3, to_int8
from ia3_kernels import int8
from test_int8 import check_against_reference, make_case

bnb = pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not ia3.HAS_BNB_8BIT, reason="PEFT found no bitsandbytes")]

# Llama-3-8B down_proj and k/v_proj at GEMV-like M, T5/GPT-2 widths at mid M, and GEMMs large
# enough for the dequantize + cuBLAS strategy under "auto".
GPU_SHAPES = [(1, 14336, 4096), (16, 4096, 1024), (200, 768, 2304), (1100, 3072, 768),
              (4096, 4096, 1024)]


@pytest.mark.parametrize("path", ["auto", "fused", "cublas"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
def test_bf16_against_reference(M, K, N, feedforward, path):
    x, cb, scb, b, scale = make_case(M, K, N, feedforward, True, torch.bfloat16, device="cuda")
    check_against_reference(x, cb, scb, b, scale, feedforward, torch.bfloat16, path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_other_dtypes_gpu(dtype):
    for path in ("fused", "cublas"):
        for feedforward in (True, False):
            x, cb, scb, b, scale = make_case(64, 768, 300, feedforward, True, dtype, device="cuda")
            check_against_reference(x, cb, scb, b, scale, feedforward, dtype, path)


@pytest.mark.parametrize("M", [1, 16, 512])
def test_weight_only_is_more_accurate_than_llm_int8(M):
    """Against the float64 product with the same dequantized weight, our bf16 output is closer
    than bnb's LLM.int8 (which also quantizes the activations to int8)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 1024, bias=False).to(torch.bfloat16)
    q = bnb.nn.Linear8bitLt(4096, 1024, bias=False, has_fp16_weights=False, threshold=6.0)
    q.load_state_dict(lin.state_dict())
    q = q.cuda()
    cb, scb = ia3.bnb.int8_weight(q)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    ones = torch.ones(4096, device="cuda")
    ref = x.double() @ int8.dequantize_int8(cb, scb, torch.float64).t()
    ours = ia3_kernels.ia3_linear_int8(x, cb, scb, None, ones, True)
    theirs = q(x)
    err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(ours) < 0.5 * err(theirs), (err(ours), err(theirs))


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("feedforward,save_preact", [(True, False), (False, True), (False, False)])
def test_opcheck(path, feedforward, save_preact):
    x, cb, scb, b, scale = make_case(33, 200, 96, feedforward, True, torch.bfloat16, device="cuda")
    args = (x.requires_grad_(), cb, scb, b, scale.requires_grad_(), feedforward, save_preact)
    with ia3_kernels.dense_path(path):
        torch.library.opcheck(torch.ops.ia3_kernels.int8_linear, args)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_torch_compile_fullgraph(feedforward):
    x, cb, scb, b, scale = make_case(64, 512, 256, feedforward, True, torch.bfloat16, device="cuda")

    def f(x, s):
        return ia3_kernels.ia3_linear_int8(x, cb, scb, b, s, feedforward)

    y_e, g_e = output_and_grads(lambda s: f(x, s), scale)
    compiled = torch.compile(f, fullgraph=True)
    y_c, g_c = output_and_grads(lambda s: compiled(x, s), scale)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(g_c, g_e)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_cuda_graph_capture_and_determinism(feedforward):
    """Split-K at M = 4 (counters reset in-kernel) replays under a graph, bit for bit."""
    x, cb, scb, b, scale = make_case(4, 14336, 1024, feedforward, True, torch.bfloat16,
                                     device="cuda")
    eager = ia3_kernels.ia3_linear_int8(x, cb, scb, b, scale, feedforward)
    graph, out = capture_cuda_graph(
        lambda: ia3_kernels.ia3_linear_int8(x, cb, scb, b, scale, feedforward))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def int8_llama():
    from test_models import llama

    torch.manual_seed(0)
    base, config = llama()
    base = to_int8(base.to(torch.bfloat16), device="cuda").to("cuda")
    return randomize_ia3(get_peft_model(base, config))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_int8_llama_trains_in_bf16(autocast):
    """Ours returns bf16 and trains both ways (see helpers.check_quantized_llama_trains)."""
    check_quantized_llama_trains(int8_llama(), ia3.Linear8bitLt, autocast)


def test_layer_matches_bnb_dequantized_reference_gpu():
    """The layer reads bnb's state (CB in weight.data, SCB on the weight or in state) on CUDA."""
    stock = int8_llama()
    fused = ia3.fuse(copy.deepcopy(stock))
    layer = fused.base_model.model.model.layers[0].self_attn.k_proj
    x = torch.randn(5, 32, device="cuda", dtype=torch.bfloat16)
    cb, scb = ia3.bnb.int8_weight(layer.get_base_layer())
    want = int8.torch_ia3_linear_int8(x, cb, scb, None, layer.ia3_l["default"], False)
    torch.testing.assert_close(layer(x), want, rtol=1e-2, atol=1e-2)
    assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("M", [1, 16, 21, 64, 200])
def test_fp32_tiles_fit_shared_memory(M):
    """fp32 activations on int8 weights in every M bucket, forward and backward, from one
    feature to Llama widths: the GPU fuzz test found dense.py's int8 64x64x128 4-stage tile
    asking 263,680 bytes of shared memory (H100: 232,448) for an fp32 dy at M = 21."""
    for K, N in ((1, 1), (100, 70), (4096, 1024)):
        for feedforward in (True, False):
            x, cb, scb, b, scale = make_case(M, K, N, feedforward, True, torch.float32,
                                             device="cuda")
            check_against_reference(x, cb, scb, b, scale, feedforward, torch.float32, "fused")
