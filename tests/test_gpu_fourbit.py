"""GPU tests of the 4-bit (bitsandbytes Linear4bit base) op and layer: bf16 at real shapes on
both strategies for NF4 and FP4 with and without double quantization, our dequantization against
bnb's CUDA kernel for every blocksize (blocks straddling rows included), the layer against bnb's
own forward, opcheck, torch.compile, CUDA-graph capture, and a tiny Llama with NF4 bases trained
in bf16 with and without autocast."""

import pytest
import torch
from peft import get_peft_model

import ia3
import ia3_kernels
from conftest import capture_cuda_graph
from helpers import (check_quantized_llama_trains, ia3_grads, output_and_grads, randomize_ia3,
                     to_4bit)
from ia3_kernels import fourbit
from ia3_kernels.fourbit import FourBitWeight
from test_fourbit import FORMATS, check_against_reference, make_case

bnb = pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not ia3.HAS_BNB_4BIT, reason="PEFT found no bitsandbytes")]

# Llama-3-8B down_proj and k/v_proj at GEMV-like M, T5/GPT-2 widths at mid M, and GEMMs large
# enough for the dequantize + cuBLAS strategy under "auto" (forward from M = 512, backward from
# 2048).
GPU_SHAPES = [(1, 14336, 4096), (8, 4096, 1024), (16, 4096, 1024), (200, 768, 2304),
              (1100, 3072, 768), (4096, 4096, 1024)]


@pytest.mark.parametrize("path", ["auto", "fused", "cublas"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
def test_bf16_against_reference(M, K, N, feedforward, path):
    x, w, b, scale = make_case(M, K, N, feedforward, True, torch.bfloat16)
    check_against_reference(x, w, b, scale, feedforward, torch.bfloat16, path)


@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_formats_and_blocksizes_bf16(quant_type, nested, blocksize):
    for M, K in ((1, 4096), (5, 4096), (3, 200), (64, 1000)):
        for feedforward in (True, False):
            x, w, b, scale = make_case(M, K, 96, feedforward, True, torch.bfloat16, quant_type,
                                       nested, blocksize)
            check_against_reference(x, w, b, scale, feedforward, torch.bfloat16, "fused")


@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("blocksize", fourbit.BLOCKSIZES)
def test_dequantize_matches_bnb_cuda(quant_type, nested, blocksize):
    """bnb's CUDA dequantization indexes blocks over the flattened matrix, as ours: bit-identical
    for every shape, blocks straddling rows or not, and our Triton pass gives the same bf16."""
    for N, K in ((3, blocksize), (7, 200), (16, 96), (5, 105)):
        g = torch.Generator().manual_seed(N)
        w = torch.randn(N, K, generator=g).cuda()
        packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize,
                                                     compress_statistics=nested,
                                                     quant_type=quant_type)
        theirs = bnb.functional.dequantize_4bit(packed, state).float()
        weight = FourBitWeight.from_bnb(packed, state)
        torch.testing.assert_close(fourbit.dequantize_4bit(weight, torch.float32), theirs,
                                   rtol=0, atol=0)
        kernel = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
        fourbit._as_kernel_weight(weight).dequantize_into(kernel)
        torch.testing.assert_close(kernel, theirs.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_other_dtypes_gpu(dtype):
    for path in ("fused", "cublas"):
        for feedforward in (True, False):
            x, w, b, scale = make_case(64, 768, 300, feedforward, True, dtype)
            check_against_reference(x, w, b, scale, feedforward, dtype, path)


@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_layer_matches_bare_bnb(M, feedforward):
    """With l = 1 our layer computes what bare bnb's Linear4bit computes (its GEMV at M = 1,
    its dequantize + F.linear above), in bf16, to bf16 rounding."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 1024).to(torch.bfloat16)
    q = bnb.nn.Linear4bit(4096, 1024, compute_dtype=torch.bfloat16, quant_type="nf4",
                          compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    q = q.cuda()
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    w = FourBitWeight.from_bnb(q.weight.data, q.weight.quant_state)
    ones = torch.ones(4096 if feedforward else 1024, device="cuda")
    ours = ia3_kernels.ia3_linear_4bit(x, w, q.bias, ones, feedforward)
    theirs = q(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("feedforward,save_preact", [(True, False), (False, True), (False, False)])
def test_opcheck(path, feedforward, save_preact):
    x, w, b, scale = make_case(33, 256, 96, feedforward, True, torch.bfloat16)
    args = (x.requires_grad_(), *w.tensors(), fourbit._shape(w), b, scale.requires_grad_(),
            feedforward, save_preact)
    with ia3_kernels.dense_path(path):
        torch.library.opcheck(torch.ops.ia3_kernels.fourbit_linear, args)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_torch_compile_fullgraph(feedforward):
    x, w, b, scale = make_case(64, 512, 256, feedforward, True, torch.bfloat16)

    def f(x, s):
        return ia3_kernels.ia3_linear_4bit(x, w, b, s, feedforward)

    y_e, g_e = output_and_grads(lambda s: f(x, s), scale)
    compiled = torch.compile(f, fullgraph=True)
    y_c, g_c = output_and_grads(lambda s: compiled(x, s), scale)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(g_c, g_e)


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_cuda_graph_capture_and_determinism(M, feedforward):
    """Split-K (counters reset in-kernel) replays under a graph, bit for bit."""
    x, w, b, scale = make_case(M, 14336, 1024, feedforward, True, torch.bfloat16)
    eager = ia3_kernels.ia3_linear_4bit(x, w, b, scale, feedforward)
    graph, out = capture_cuda_graph(
        lambda: ia3_kernels.ia3_linear_4bit(x, w, b, scale, feedforward))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def nf4_llama(compute_dtype=torch.bfloat16):
    from test_models import llama

    torch.manual_seed(0)
    base, config = llama()
    base = to_4bit(base.to(torch.bfloat16), device="cuda", compute_dtype=compute_dtype).to("cuda")
    return randomize_ia3(get_peft_model(base, config))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "autocast"])
def test_nf4_llama_trains_in_bf16(autocast):
    """Ours returns bf16 and trains both ways (see helpers.check_quantized_llama_trains)."""
    check_quantized_llama_trains(nf4_llama(), ia3.Linear4bit, autocast)


def test_peft_nf4_llama_crashes_without_autocast_ours_does_not():
    """The anchor's crash, reproduced: stock PEFT's 4-bit IA3 returns float32 k/v."""
    from test_models import batch

    stock = nf4_llama()
    inputs = {k: v.cuda() for k, v in batch("llama", 0).items()}
    with pytest.raises(RuntimeError):
        stock(**inputs).loss.backward()
    fused = ia3.fuse(stock)
    fused(**inputs).loss.backward()
    assert all(torch.isfinite(g).all() for g in ia3_grads(fused).values())
