"""GPU tests: bf16 at real model shapes on both strategies, opcheck, torch.compile(fullgraph=True),
bitwise determinism, CUDA-graph capture, and a bf16 tiny-Llama training run against PEFT."""
import copy

import pytest
import torch

import ia3
import ia3_kernels
from conftest import capture_cuda_graph
from ia3_kernels import dense
from peft import IA3Config, get_peft_model
from test_dense_op import check_against_reference, make_case
from test_models import batch, gpt2, llama, t5, train
from helpers import output_and_grads, randomize_ia3

pytestmark = pytest.mark.gpu

# Real shapes (Llama-3-8B k/v_proj and down_proj, T5 ff, GPT-2 c_attn) with M across the
# regimes: split-K GEMV-like (1, 16), mid (130, 200, 300: each of the M = 65..512 tile rows,
# 32x32x256, 64x64x128 and 64x128x64, in the forward or the backward's dx GEMM), cuBLAS + pass
# (>= CUBLAS_MIN_M).
GPU_SHAPES = [(1, 4096, 1024), (16, 14336, 4096), (130, 4096, 1000), (200, 768, 2304),
              (300, 1000, 777), (1100, 3072, 768), (2048, 1000, 777)]


@pytest.mark.parametrize("path", ["auto", "fused", "cublas", "aten"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
def test_bf16_against_reference(M, K, N, feedforward, path):
    check_against_reference(M, K, N, feedforward, False, True, torch.bfloat16, path)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fan_in_fan_out_gpu(feedforward, dtype):
    for path in ("fused", "cublas"):
        check_against_reference(64, 768, 2304, feedforward, True, True, dtype, path)


def op_args(feedforward, has_bias, save_preact, M=33, K=200, N=96):
    x, w, b, s = make_case(M, K, N, feedforward, False, has_bias, torch.bfloat16, device="cuda")
    x.requires_grad_()
    s.requires_grad_()
    return (x, w, b, s, feedforward, False, save_preact)


@pytest.mark.parametrize("path", ["fused", "cublas", "aten"])
@pytest.mark.parametrize("feedforward,save_preact", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_opcheck(path, feedforward, save_preact, has_bias):
    with ia3_kernels.dense_path(path):
        torch.library.opcheck(torch.ops.ia3_kernels.dense_linear,
                              op_args(feedforward, has_bias, save_preact))


def tiny_model_bf16(family: str, fused: bool):
    torch.manual_seed(0)
    base, config = {"llama": llama, "gpt2": gpt2, "t5": t5}[family]()
    model = randomize_ia3(get_peft_model(base.to("cuda", torch.bfloat16), config))
    return ia3.fuse(model) if fused else model


@pytest.mark.parametrize("path", ["cublas", "aten"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_torch_compile_cublas_path(feedforward, path):
    """The cuBLAS strategies (x*l or W*l passes, in-place passes; or IA3's elementwise work in
    aten ops, what compiled large GEMMs run) also compile without a break."""
    x, w, b, s = make_case(64, 256, 640, feedforward, False, True, torch.bfloat16, device="cuda")

    def layer(x, s):
        return ia3_kernels.ia3_linear(x, w, b, s, feedforward)

    with ia3_kernels.dense_path(path):
        eager = output_and_grads(layer, x, s)
        torch._dynamo.reset()
        compiled = output_and_grads(torch.compile(layer, fullgraph=True), x, s)
    for e, c in zip(eager, compiled):  # bf16: compare by norm, a few elements differ by an ulp
        assert (c.float() - e.float()).norm() <= 1e-2 * e.float().norm()


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_compiled_large_gemm_leaves_ia3s_elementwise_work_to_inductor(feedforward):
    """Compiled with the default rules, a GEMM past COMPILED_ATEN_MIN_FLOP runs as cuBLAS with
    no kernel of ours in Inductor's code (forward and backward), a decode-sized one keeps the
    fused Triton GEMM; both match the eager layer."""
    from torch._inductor.utils import run_and_get_code

    for M, ours_in_code in ((2048, False), (16, True)):
        x, w, b, s = make_case(M, 768, 768, feedforward, False, True, torch.bfloat16,
                               device="cuda")

        def layer(x, s):
            return ia3_kernels.ia3_linear(x, w, b, s, feedforward)

        eager = output_and_grads(layer, x, s)
        torch._dynamo.reset()
        compiled_layer = torch.compile(layer, fullgraph=True)
        compiled, codes = run_and_get_code(lambda: output_and_grads(compiled_layer, x, s))
        code = "\n".join(codes)
        # Inductor inlines the custom op's body (no opaque call to it), and past the bound
        # that body holds cuBLAS GEMMs and torch ops only.
        assert "ia3_kernels.dense_linear.default(" not in code, M
        assert ("_ia3_matmul_kernel" in code) == ours_in_code, (M, code[:2000])
        for e, c in zip(eager, compiled):
            assert (c.float() - e.float()).norm() <= 1e-2 * e.float().norm(), M
    torch._dynamo.reset()


def test_torch_compile_fullgraph_no_graph_break():
    model = tiny_model_bf16("llama", fused=True)
    eager_losses, eager_grads = train(copy.deepcopy(model), "llama", steps=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    losses, grads = train(compiled, "llama", steps=2)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=2e-2, atol=2e-2)
    for name, g in grads[0].items():
        ref = eager_grads[0][name.replace("_orig_mod.", "")]
        assert (g.float() - ref.float()).norm() <= 0.05 * ref.float().norm() + 1e-6, name


@pytest.mark.parametrize("M,K,N", [(1, 4096, 1024), (8, 14336, 4096), (4096, 1024, 4096)])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_bitwise_deterministic(M, K, N, feedforward):
    x, w, b, s = make_case(M, K, N, feedforward, False, True, torch.bfloat16, device="cuda")
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    results = []
    for _ in range(3):
        xg, sg = x.clone().requires_grad_(), s.clone().requires_grad_()
        y = ia3_kernels.ia3_linear(xg, w, b, sg, feedforward)
        y.backward(dy)
        results.append((y, xg.grad, sg.grad))
    for run in results[1:]:
        for a, c in zip(results[0], run):
            assert torch.equal(a, c)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_cuda_graph_capture(feedforward):
    x, w, b, s = make_case(4, 4096, 1024, feedforward, False, True, torch.bfloat16, device="cuda")
    expected = ia3_kernels.ia3_linear(x, w, b, s, feedforward)
    graph, out = capture_cuda_graph(lambda: ia3_kernels.ia3_linear(x, w, b, s, feedforward))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, ia3_kernels.ia3_linear(x, w, b, s, feedforward), rtol=0, atol=0)
    assert not torch.equal(out, expected)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_captured_forward_takes_the_cublas_route(monkeypatch, feedforward):
    """A forward captured in a CUDA graph at M = 128 and 2**30 flop (GRAPHED_FWD_CUBLAS_MIN_FLOP)
    runs the cuBLAS route (counted, so the test fails if capture does not reach it), while the
    same call in eager runs the fused kernel; the replayed output matches the eager one within
    bf16 rounding of two different reduction orders."""
    from conftest import count_calls

    x, w, b, s = make_case(128, 2048, 2048, feedforward, False, True, torch.bfloat16,
                           device="cuda")
    route = "_feedforward_forward_cublas" if feedforward else "_cublas_linear"
    calls = count_calls(monkeypatch, dense, route)
    eager = ia3_kernels.ia3_linear(x, w, b, s, feedforward)
    assert not calls  # 2**30 flop, K = 2048: the fused kernel in eager
    graph, out = capture_cuda_graph(lambda: ia3_kernels.ia3_linear(x, w, b, s, feedforward))
    assert calls  # the capture took the route (the side-stream warm-up ran eager)
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=1.6e-2, atol=1.6e-2)


def test_capture_on_a_thread_that_never_ran_cublas(monkeypatch):
    """cuBLAS makes a thread's handle on its first GEMM, and cublasCreate inside a capture fails
    (CUBLAS_STATUS_NOT_INITIALIZED) and invalidates it: on the H100 on 2026-12-06 the test above
    did so in a fresh pytest worker, whose eager call had stayed on Triton, and the worker's
    next tests failed with it. A capture on a new thread with no eager call keeps the Triton
    routes and replays the eager result."""
    import threading

    from conftest import count_calls

    x, w, b, s = make_case(128, 2048, 2048, False, False, True, torch.bfloat16, device="cuda")
    eager = ia3_kernels.ia3_linear(x, w, b, s, False)  # main thread: compiles the kernels
    routes = count_calls(monkeypatch, dense, "_cublas_linear")
    result = {}

    def capture():
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = ia3_kernels.ia3_linear(x, w, b, s, False)
            graph.replay()
            torch.cuda.synchronize()
            result["out"] = out
        except Exception as error:  # re-raised on the test's thread
            result["error"] = error

    thread = threading.Thread(target=capture)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    assert not routes  # no cuBLAS handle on that thread: the fused kernel was captured
    torch.testing.assert_close(result["out"], eager, rtol=0, atol=0)


def test_deterministic_mode_without_cublas_workspace_config(monkeypatch):
    """torch.use_deterministic_algorithms(True) without CUBLAS_WORKSPACE_CONFIG refuses every
    cuBLAS GEMM. The warm-up GEMM that makes a thread's cuBLAS handles (dense._cublas_ready)
    must not turn that into an error for the fused routes, which need no cuBLAS: a new thread
    (whose first call runs the warm-up) computes the eager result."""
    import threading

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    x, w, b, s = make_case(1, 4096, 1024, False, False, True, torch.bfloat16, device="cuda")
    expected = ia3_kernels.ia3_linear(x, w, b, s, False)
    result = {}

    def call():
        try:
            result["out"] = ia3_kernels.ia3_linear(x, w, b, s, False)
        except Exception as error:  # re-raised on the test's thread
            result["error"] = error

    was_enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    finally:
        torch.use_deterministic_algorithms(was_enabled)
    if "error" in result:
        raise result["error"]
    torch.testing.assert_close(result["out"], expected, rtol=0, atol=0)


def test_graphs_on_one_stream_replayed_out_of_order(monkeypatch):
    """Split-K tile counters under capture come from a buffer zeroed before the capture, not
    one allocated inside it (zeroed only when that graph replays): graph B, captured after A on
    the same stream, replays first over memory that another graph of their shared pool left
    dirty, as a server's graphs for several batch sizes can."""
    from conftest import count_calls

    monkeypatch.setattr(dense, "_counter_buffers", {})  # as in a fresh process
    monkeypatch.setattr(dense, "_capture_counters", {})
    x1, w, b, s = make_case(1, 4096, 1024, False, False, True, torch.bfloat16, device="cuda")
    x2 = torch.randn_like(x1)
    expected = ia3_kernels.ia3_linear(x2, w, b, s, False)  # eager: compiles, zeroes the buffers
    counters = count_calls(monkeypatch, dense, "_split_k_counters")
    pool = torch.cuda.graph_pool_handle()
    dirty, first, second = (torch.cuda.CUDAGraph() for _ in range(3))
    with torch.cuda.graph(dirty, pool=pool):
        garbage = torch.full((1 << 16,), 7, device="cuda", dtype=torch.int32)
        del garbage  # its 256 KiB go back to the pool, where the next captures allocate
    with torch.cuda.graph(first, pool=pool):
        ia3_kernels.ia3_linear(x1, w, b, s, False)
    with torch.cuda.graph(second, pool=pool):
        out = ia3_kernels.ia3_linear(x2, w, b, s, False)
    assert counters  # the captures split K
    dirty.replay()
    second.replay()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_fused_layer_training_step_graph_capture(feedforward):
    """A fused layer's forward+backward (dx and dl) captured in a CUDA graph after eager calls,
    the way the layer suite times it: on the H100 on 2026-12-05 the suite's first attention
    group (Llama q/o_proj, M = 1 and 16) failed to capture (cudaErrorStreamCaptureInvalidated;
    suite-dense-stop26-partial-h100.md) while later groups captured. Replays repeat each
    other bit for bit (every reduction of ours has a fixed order) and match the eager
    gradients to bf16 rounding (cuBLAS may pick another algorithm under capture)."""
    from torch import nn

    torch.manual_seed(0)
    base = nn.Linear(4096, 4096).to("cuda", torch.bfloat16).requires_grad_(False)
    config = IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    model = ia3.fuse(get_peft_model(nn.ModuleDict({"proj": base}), config))
    layer = model.base_model.model["proj"]
    assert isinstance(layer, ia3.Linear)
    for vector in layer.ia3_l.values():
        nn.init.uniform_(vector, 0.5, 1.5)
    params = [p for p in layer.parameters() if p.requires_grad]
    for M in (1, 16):
        x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)

        def step():
            return torch.autograd.grad(layer(x), [x] + params, dy)

        eager = [g.clone() for g in step()]
        for _ in range(5):  # as do_bench's eager timing before the suite's capture
            step()
        graph, out = capture_cuda_graph(step)
        graph.replay()
        first = [g.clone() for g in out]
        graph.replay()
        torch.cuda.synchronize()
        for again, got, want in zip(out, first, eager):
            assert torch.equal(again, got)
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_tiny_model_bf16_trains_like_peft(family):
    stock, fused = tiny_model_bf16(family, fused=False), tiny_model_bf16(family, fused=True)
    losses_s, _ = train(stock, family, steps=4)
    losses_f, _ = train(fused, family, steps=4)
    torch.testing.assert_close(torch.tensor(losses_f), torch.tensor(losses_s), rtol=1e-2, atol=1e-2)


def test_autocast_with_fp32_weights_matches_peft():
    torch.manual_seed(0)
    base, config = llama()
    stock = randomize_ia3(get_peft_model(base.to("cuda"), config))
    fused = ia3.fuse(copy.deepcopy(stock))
    inputs = batch("llama", 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ls, lf = stock(**inputs).loss, fused(**inputs).loss
    assert abs(ls.item() - lf.item()) < 1e-2 * abs(ls.item())
    k_proj = fused.base_model.model.model.layers[0].self_attn.k_proj
    h = torch.randn(2, 7, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert k_proj(h).dtype == torch.bfloat16


def test_dispatch_keeps_scratch_within_the_memory_budget():
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    # Feedforward forward: cuBLAS from M = 128 past 2**34 flop, on W*l (N <= M) or x*l
    # (N > M): a scratch no larger than x whatever N.
    assert dense._use_cublas("ff_fwd", 8192, 4096, 4096, bf16, cuda)
    assert dense._use_cublas("ff_fwd", 8192, 14336, 4096, bf16, cuda)  # x*l
    assert dense._use_cublas("ff_fwd", 2048, 14336, 4096, bf16, cuda)  # x*l
    assert dense._use_cublas("ff_fwd", 256, 14336, 4096, bf16, cuda)  # x*l, 2**34.8 flop
    assert not dense._use_cublas("ff_fwd", 128, 4096, 4096, bf16, cuda)  # 2**32 flop: fused
    assert not dense._use_cublas("ff_fwd", 64, 14336, 4096, bf16, cuda)  # M < 128 (and 2**32.8)
    assert not dense._use_cublas("ff_fwd", 16, 1024, 4096, bf16, cuda)
    # GEMMs under 2**34 flop stay on the single fused kernel (eager launches cost more than
    # cuBLAS saves): T5-base 768->768 at 4096 tokens, not Llama-3.2-1B's down_proj at 8192.
    for phase in ("ff_fwd", "ff_bwd", "attn_fwd", "attn_bwd"):
        assert not dense._use_cublas(phase, 4096, 768, 768, bf16, cuda)
    assert dense._use_cublas("ff_bwd", 8192, 2048, 8192, bf16, cuda)
    assert dense._use_cublas("attn_fwd", 8192, 512, 2048, bf16, cuda)
    # Attention backward: one fused launch at M <= 64 and N <= 1024 (dl summed beside the dx
    # kernel's tiles); at M <= 16 and wider N, cuBLAS on a dy*l scratch of <= 256 KiB or
    # no larger than the fused kernel's split-K workspace (4096->14336 at M = 16: 448 KiB
    # against 512); at M = 17..64 and wider N, cuBLAS (the fused kernel does not split);
    # at M >= 4096 and >= 2**39 flop, cuBLAS over row chunks of dy*l (an eighth of M x N).
    assert not dense._use_cublas("attn_bwd", 16, 1024, 4096, bf16, cuda)
    assert dense._use_cublas("attn_bwd", 16, 4096, 4096, bf16, cuda)
    assert dense._use_cublas("attn_bwd", 64, 4096, 4096, bf16, cuda)  # 512 KiB of scratch
    assert dense._use_cublas("attn_bwd", 16, 14336, 4096, bf16, cuda)
    assert dense._use_cublas("attn_bwd", 32, 14336, 4096, bf16, cuda)
    assert not dense._use_cublas("attn_bwd", 128, 4096, 14336, bf16, cuda)
    assert not dense._use_cublas("attn_bwd", 1024, 4096, 4096, bf16, cuda)
    assert dense._use_cublas("attn_bwd", 8192, 4096, 14336, bf16, cuda)
    # ... and only where the GEMM hides the chunk loop's launches (T5's 768x768 does not).
    assert not dense._use_cublas("attn_bwd", 8192, 768, 768, bf16, cuda)


def test_attention_training_peak_memory_within_one_output():
    """Extra peak of an attention layer's training step over the bare layer's: u (one M x N)
    plus one row chunk of dy*l (an eighth of one), never a second full M x N."""
    from benchmarks.layers import Shape, build_layers, peak_mib, step_fn

    shape, M = Shape("Llama-3-8B", "down_proj", 14336, 4096), 8192  # takes the chunked path
    bare, _, ours = build_layers(shape, "attn", torch.device("cuda"), torch.bfloat16)
    x = torch.randn(M, shape.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, shape.n, device="cuda", dtype=torch.bfloat16)
    extra = peak_mib(step_fn(ours, x, "fwd+bwd", dy)) - peak_mib(step_fn(bare, x, "fwd+bwd", dy))
    one_output = M * shape.n * 2 / 2**20
    # + 2 MiB: dl's fp32 partial rows and allocator rounding.
    assert extra <= one_output * (1 + 1 / dense.ATTN_BWD_CHUNKS) + 2, (extra, one_output)
