"""The dense op against the float64 reference and against PEFT's own arithmetic in the same dtype,
on both strategies (fused Triton GEMM, cuBLAS + Triton pass), forward and every gradient."""
import pytest
import torch

import ia3_kernels
from conftest import DEVICE, KERNEL_DTYPES, assert_within_peft_bar

# (M, K, N): K and N off every block size, M = 1, a split-K case (few output tiles, long K).
SHAPES = [(1, 33, 17), (37, 100, 70), (5, 300, 40), (70, 48, 130)]
# "aten": the route compiled GEMMs take (cuBLAS with IA3's elementwise work in torch ops).
PATHS = ["fused", "cublas", "aten"]


def make_case(M, K, N, feedforward, fan_in_fan_out, has_bias, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    if fan_in_fan_out:
        w = w.t().contiguous()  # stored (in, out) like GPT-2's Conv1D
    b = torch.randn(N, generator=g).to(device, dtype) if has_bias else None
    scale = (torch.rand(K if feedforward else N, generator=g) + 0.5).to(device)  # fp32, as PEFT
    return x, w, b, scale


def run(fn, x, w, b, scale, feedforward, fan_in_fan_out, dy=None):
    """Forward, then gradients of x, scale and (if any) bias for a fixed upstream gradient."""
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(x, w, b, scale, feedforward, fan_in_fan_out)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    inputs = [x, scale] + ([b] if b is not None else [])
    grads = torch.autograd.grad(y, inputs, dy.to(y.dtype)) if y.numel() else [torch.zeros_like(t) for t in inputs]
    return y, grads, dy


def check_against_reference(M, K, N, feedforward, fan_in_fan_out, has_bias, dtype, path):
    x, w, b, scale = make_case(M, K, N, feedforward, fan_in_fan_out, has_bias, dtype)
    with ia3_kernels.dense_path(path):
        y, grads, dy = run(ia3_kernels.ia3_linear, x, w, b, scale, feedforward, fan_in_fan_out)
    y_peft, grads_peft, _ = run(ia3_kernels.torch_ia3_linear, x, w, b, scale, feedforward,
                                fan_in_fan_out, dy)
    f64 = [t.double() if t is not None else None for t in (x, w, b, scale)]
    y_ref, grads_ref, _ = run(ia3_kernels.torch_ia3_linear, *f64, feedforward, fan_in_fan_out,
                              dy.double())
    absolute = [t.abs() if t is not None else None for t in f64]
    y_abs, grads_abs, _ = run(ia3_kernels.torch_ia3_linear, *absolute, feedforward, fan_in_fan_out,
                              dy.double().abs())
    assert y.dtype == x.dtype and y.shape == y_peft.shape
    assert_within_peft_bar(y, y_peft, y_ref, dtype, "y", y_abs)
    for name, g, gp, gr, ga in zip(["dx", "dscale", "dbias"], grads, grads_peft, grads_ref, grads_abs):
        assert g.dtype == gp.dtype, name
        assert_within_peft_bar(g, gp, gr, dtype, name, ga)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_matches_reference(triton_backend, M, K, N, dtype, feedforward, path):
    check_against_reference(M, K, N, feedforward, False, True, dtype, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("fan_in_fan_out,has_bias", [(True, True), (True, False), (False, False)])
def test_layouts_and_bias(triton_backend, fan_in_fan_out, has_bias, feedforward, path):
    check_against_reference(9, 65, 48, feedforward, fan_in_fan_out, has_bias, torch.float16, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_empty_batch(triton_backend, feedforward, path):
    x, w, b, scale = make_case(0, 24, 40, feedforward, False, True, torch.float32)
    with ia3_kernels.dense_path(path):
        y, grads, _ = run(ia3_kernels.ia3_linear, x, w, b, scale, feedforward, False)
        x3 = x.reshape(0, 3, 24)[:, :0]  # (0, 0, 24): leading dims of size 0 keep their shape
        assert ia3_kernels.ia3_linear(x3, w, b, scale, feedforward).shape == (0, 0, 40)
    assert y.shape == (0, 40)
    xg = x.detach().clone().requires_grad_()
    sg = scale.detach().clone().requires_grad_()
    with ia3_kernels.dense_path(path):
        ia3_kernels.ia3_linear(xg, w, b, sg, feedforward).sum().backward()
    assert xg.grad.shape == (0, 24)
    assert torch.equal(sg.grad, torch.zeros_like(sg))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_3d_and_non_contiguous_inputs(triton_backend, feedforward, path):
    dtype = torch.float32
    K, N = 40, 24
    _, w, b, scale = make_case(1, K, N, feedforward, False, True, dtype)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 2 * K, 3, generator=g).to(DEVICE, dtype)
    views = {
        "3d": base[:, :K, 0].reshape(2, 3, K),  # strided, viewable as 2-D
        "transposed": torch.randn(K, 7, generator=g).to(DEVICE, dtype).t(),  # column-major
        "permuted_3d": base.permute(2, 0, 1)[..., ::2],  # not viewable as 2-D: copied by reshape
        "broadcast": torch.randn(1, K, generator=g).to(DEVICE, dtype).expand(5, K),  # stride 0
    }
    for name, x in views.items():
        with ia3_kernels.dense_path(path):
            y = ia3_kernels.ia3_linear(x, w, b, scale, feedforward)
        ref = ia3_kernels.torch_ia3_linear(x.double(), w.double(), b.double(), scale.double(),
                                           feedforward)
        assert y.shape == x.shape[:-1] + (N,), name
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5, msg=name)
        xg = x.detach().clone().requires_grad_()
        with ia3_kernels.dense_path(path):
            ia3_kernels.ia3_linear(xg, w, b, scale, feedforward).square().sum().backward()
        xr = x.detach().double().requires_grad_()
        ia3_kernels.torch_ia3_linear(xr, w.double(), b.double(), scale.double(),
                                     feedforward).square().sum().backward()
        torch.testing.assert_close(xg.grad.double(), xr.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_weight_gradient_when_base_trains(triton_backend, feedforward, fan_in_fan_out, path):
    """A base weight that requires grad gets its gradient (never silently dropped)."""
    x, w, b, scale = make_case(11, 36, 20, feedforward, fan_in_fan_out, True, torch.float32)
    wg = w.clone().requires_grad_()
    with ia3_kernels.dense_path(path):
        ia3_kernels.ia3_linear(x, wg, b, scale, feedforward, fan_in_fan_out).square().sum().backward()
    wr = w.double().requires_grad_()
    ia3_kernels.torch_ia3_linear(x.double(), wr, b.double(), scale.double(), feedforward,
                                 fan_in_fan_out).square().sum().backward()
    torch.testing.assert_close(wg.grad.double(), wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_dscale_without_dx(triton_backend, path):
    """Adapters before the first trainable layer get x without grad: only dl is computed."""
    for feedforward in (True, False):
        x, w, b, scale = make_case(13, 50, 30, feedforward, False, False, torch.float32)
        s = scale.clone().requires_grad_()
        with ia3_kernels.dense_path(path):
            ia3_kernels.ia3_linear(x, w, None, s, feedforward).square().sum().backward()
        sr = scale.double().requires_grad_()
        ia3_kernels.torch_ia3_linear(x.double(), w.double(), None, sr, feedforward).square().sum().backward()
        torch.testing.assert_close(s.grad.double(), sr.grad, rtol=1e-5, atol=1e-6)


def test_result_is_deterministic(triton_backend):
    """Split-K and the dl partial sums have a fixed reduction order: bitwise equal reruns."""
    x, w, b, scale = make_case(5, 300, 40, True, False, True, torch.float32)
    outs = []
    for _ in range(2):
        y, grads, _ = run(ia3_kernels.ia3_linear, x, w, b, scale, True, False)
        outs.append([y] + list(grads))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_scaling_vector_dtype_follows_peft(triton_backend, dtype):
    """A low-precision scaling vector gets its gradient in its own dtype, like PEFT's."""
    x, w, b, scale = make_case(4, 32, 16, True, False, True, torch.float32)
    s = scale.to(dtype).requires_grad_()
    ia3_kernels.ia3_linear(x, w, b, s, True).sum().backward()
    assert s.grad.dtype == dtype


def test_chunked_cublas_attention_backward(triton_backend, monkeypatch):
    """The cuBLAS attention backward forms dy*l in row chunks: several chunks, odd last one."""
    from ia3_kernels import dense

    monkeypatch.setattr(dense, "ATTN_BWD_MIN_CHUNK_ROWS", 16)
    for has_bias in (True, False):
        check_against_reference(70, 48, 130, False, False, has_bias, torch.float32, "cublas")
        check_against_reference(70, 48, 130, False, True, has_bias, torch.float16, "cublas")


def test_cublas_attention_backward_scratch_never_exceeds_m_rows(triton_backend, monkeypatch):
    """Past the small-scratch size the dy*l scratch is chunked at >= ATTN_BWD_MIN_CHUNK_ROWS
    rows, but an M below that (the cuBLAS path forced) gets M rows, not a 512-row buffer."""
    from ia3_kernels import dense

    monkeypatch.setattr(dense, "SMALL_SCRATCH_BYTES", 64)
    scratch_rows = []
    real = dense._launch_scale_reduce

    def spy(src, **kwargs):
        if kwargs.get("out") is not None:
            scratch_rows.append(kwargs["out"].untyped_storage().nbytes()
                                // (kwargs["out"].shape[1] * kwargs["out"].element_size()))
        return real(src, **kwargs)

    monkeypatch.setattr(dense, "_launch_scale_reduce", spy)
    check_against_reference(5, 24, 40, False, False, True, torch.float32, "cublas")
    assert scratch_rows and max(scratch_rows) == 5


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "graph-capture"])
def test_forward_cublas_routes_start_lower_under_cuda_graph_capture(monkeypatch, capturing):
    """Forwards captured into a CUDA graph take the cuBLAS routes (one pass + one GEMM) from
    2**30 flop at M >= 128, where GPU time alone favours them; eager forwards keep the fused
    kernel below 2**34 (host time: one launch instead of two) unless the feedforward's K-loop
    is >= 8192 long. The backward's rules do not change under capture. No GPU needed: the
    capture query is stood in for."""
    from ia3_kernels import dense

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(dense, "_cublas_ready", lambda device: True)  # a thread that ran cuBLAS
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    for phase in ("ff_fwd", "attn_fwd"):
        # 4096->4096 at M = 128: 2**32 flop
        assert dense._use_cublas(phase, 128, 4096, 4096, bf16, cuda) == capturing
        # 4096->1024 at M = 128: exactly 2**30
        assert dense._use_cublas(phase, 128, 1024, 4096, bf16, cuda) == capturing
        # T5-base 768->768 at M = 512: 2**29.2 flop stays fused either way
        assert not dense._use_cublas(phase, 512, 768, 768, bf16, cuda)
        # M < 128 stays fused either way
        assert not dense._use_cublas(phase, 64, 14336, 4096, bf16, cuda)
        assert not dense._use_cublas(phase, 64, 4096, 14336, bf16, cuda)
        # past 2**34 cuBLAS either way
        assert dense._use_cublas(phase, 512, 14336, 4096, bf16, cuda)
    # a K-loop of >= 8192 in-features: the feedforward forward's cuBLAS route in eager too
    # (14336->4096 at M = 128, 2**33.8 flop); the attention forward scales in its epilogue
    assert dense._use_cublas("ff_fwd", 128, 4096, 14336, bf16, cuda)
    assert dense._use_cublas("attn_fwd", 128, 4096, 14336, bf16, cuda) == capturing
    assert not dense._use_cublas("ff_bwd", 128, 4096, 4096, bf16, cuda)
    assert not dense._use_cublas("attn_bwd", 128, 4096, 4096, bf16, cuda)


def test_quantized_weights_split_k_further_at_small_m():
    """Quantized weights (elem_size 1; 4-bit from M = 2, int8 from M = 17) split to ~4 CTAs an
    SM with up to 8 MiB of workspace; dense weights, M = 1 and int8 up to M = 16 keep ~2 CTAs
    an SM and 512 KiB (H100: 132 SMs)."""
    from ia3_kernels import dense

    def split(M, N, K, bm, bn, bk, elem_size, four_bit=False):
        return dense.split_k_for(M, N, K, bm, bn, bk, elem_size, 132, four_bit=four_bit)

    # The NF4 dx GEMM at M = 16 on 4096->4096: 64 tiles of 64 columns over K = 4096 (BLOCK 128).
    assert split(16, 4096, 4096, 16, 64, 128, 1, four_bit=True) == 9  # cdiv(4 * 132, 64)
    assert split(16, 4096, 4096, 16, 64, 128, 2) == 2  # dense: 512 KiB / 256 KiB a split
    assert split(16, 4096, 4096, 16, 64, 128, 1) == 2  # int8 to M = 16: its forward lost
    assert split(17, 4096, 4096, 32, 64, 128, 1) == 9  # int8 from M = 17
    # M = 1 keeps the dense rule (the GEMV-shaped backward lost with more splits)
    assert split(1, 4096, 4096, 1, 64, 128, 1, four_bit=True) == 5  # cdiv(2 * 132, 64)
    # 14336 columns at M = 16: 224 tiles, under 4 an SM: 3 splits (the dense rule: none,
    # its 512 KiB cap is under one split's 896 KiB)
    assert split(16, 14336, 4096, 16, 64, 128, 1, four_bit=True) == 3
    assert split(16, 14336, 4096, 16, 64, 128, 2) == 1
    # the 8 MiB cap: 64 x 14336 x 4 B = 3.5 MiB a split
    assert split(64, 14336, 4096, 64, 64, 64, 1) == 2
    # past M = 64 never
    assert split(65, 4096, 4096, 64, 64, 64, 1, four_bit=True) == 1


def test_small_m_attention_backward_takes_cublas_only_where_its_scratch_costs_no_more(monkeypatch):
    """At M <= 16 and N > 1024 the cuBLAS route's dy*l scratch (M x N) is taken while it is
    under 256 KiB or no larger than the fused kernel's split-K workspace; from M = 17 to 64 and
    N > 1024 it is taken up to ATTN_BWD_WIDE_SCRATCH_BYTES (the fused dx GEMM does not split
    K there and lost on the H100); at N <= 1024 never: the rule as the H100 (132 SMs) sees it,
    no GPU needed."""
    from ia3_kernels import dense

    monkeypatch.setattr(dense, "_sm_count", lambda device: 132)
    monkeypatch.setattr(dense, "_cublas_ready", lambda device: True)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    # 4096->14336: the fused dx GEMM (16 x 4096 out, over 14336) splits K in two at M = 16.
    assert dense._attn_bwd_fused_workspace(16, 14336, 4096, bf16, cuda) == 2 * 16 * 4096 * 4
    assert dense._use_cublas("attn_bwd", 16, 14336, 4096, bf16, cuda)  # 448 KiB <= 512 KiB
    assert dense._use_cublas("attn_bwd", 8, 14336, 4096, bf16, cuda)  # under 256 KiB
    # M = 32 and 64: no split in the fused kernel, cuBLAS on a <= 1.75 MiB scratch.
    assert dense._attn_bwd_fused_workspace(32, 14336, 4096, bf16, cuda) == 0
    assert dense._use_cublas("attn_bwd", 32, 14336, 4096, bf16, cuda)
    assert dense._use_cublas("attn_bwd", 64, 4096, 4096, bf16, cuda)
    assert not dense._use_cublas("attn_bwd", 64, 1024, 4096, bf16, cuda)
    assert not dense._use_cublas("attn_bwd", 65, 4096, 4096, bf16, cuda)
    for M in range(1, 65):  # never a scratch above the bounds
        for N, K in ((14336, 4096), (4096, 4096), (4096, 14336), (2304, 768), (1024, 4096)):
            if dense._use_cublas("attn_bwd", M, N, K, bf16, cuda):
                assert N > 1024
                bound = (dense.ATTN_BWD_WIDE_SCRATCH_BYTES if M >= dense.ATTN_BWD_WIDE_CUBLAS_MIN_M
                         else max(dense.SMALL_SCRATCH_BYTES,
                                  dense._attn_bwd_fused_workspace(M, N, K, bf16, cuda)))
                assert M * N * 2 <= bound
            else:
                assert N <= 1024 or M <= 16


@pytest.mark.parametrize("path", PATHS)
def test_attention_dscale_without_saved_preact(triton_backend, path):
    """The attention op called with save_preact=False still gives l its gradient (recomputes u)."""
    from ia3_kernels import dense

    x, w, b, scale = make_case(9, 40, 24, False, False, True, torch.float32)
    s = scale.clone().requires_grad_()
    with ia3_kernels.dense_path(path):
        y = dense._DenseLinearFunction.apply(x, w, b, s, False, False, False, None)
    y.square().sum().backward()
    sr = scale.double().requires_grad_()
    ia3_kernels.torch_ia3_linear(x.double(), w.double(), b.double(), sr, False).square().sum().backward()
    torch.testing.assert_close(s.grad.double(), sr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("save_preact", [True, False])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_custom_op_autograd_matches_eager_function(triton_backend, feedforward, save_preact):
    """The registered op's autograd (what torch.compile uses) gives the same gradients as the
    eager autograd.Function, including the attention op called without saving u."""
    from ia3_kernels import dense

    x, w, b, scale = make_case(9, 40, 24, feedforward, False, True, torch.float32)
    dy = torch.randn(9, 24, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    save = save_preact and not feedforward
    results = []
    for call in (lambda *a: torch.ops.ia3_kernels.dense_linear(*a)[0],
                 dense._DenseLinearFunction.apply):
        xg, sg, bg = (t.clone().requires_grad_() for t in (x, scale, b))
        y = call(xg, w, bg, sg, feedforward, False, save, None)
        results.append([y] + list(torch.autograd.grad(y, [xg, sg, bg], dy)))
    for op_result, eager_result in zip(*results):
        torch.testing.assert_close(op_result, eager_result, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("max_m", [0, 76, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_dl_by_separate_pass_past_the_row_bar(triton_backend, monkeypatch, dtype, max_m):
    """Past ATTN_BWD_DL_IN_KERNEL_MAX_M rows the attention dl is reduced by a pass of its own
    instead of inside the dx kernel's launch: with the bar below the case's M = 77 the pass
    over dy and u is taken, and at the bar it is not (the pass is counted, so the test fails if
    the route is not the one the bar says)."""
    from conftest import count_calls
    from ia3_kernels import dense

    monkeypatch.setattr(dense, "ATTN_BWD_DL_IN_KERNEL_MAX_M", max_m)
    passes = count_calls(monkeypatch, dense, "_launch_scale_reduce")
    check_against_reference(77, 96, 130, False, False, True, dtype, "fused")
    took_pass = any(kwargs.get("aux") is not None for _, kwargs in passes)
    assert took_pass == (max_m < 77)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("fan_in_fan_out,has_bias", [(False, True), (True, False)])
@pytest.mark.parametrize("M,K,N", [(70, 40, 48), (37, 64, 136)])
def test_tma_path(triton_backend, monkeypatch, M, K, N, fan_in_fan_out, has_bias, feedforward):
    """The persistent TMA GEMM as the op runs it (forced): forward and both backward GEMMs (dl's
    partials from its epilogue, feedforward; by the pass, attention), against the reference;
    the launches are counted so the test fails if the dispatch stops reaching the kernel."""
    from conftest import count_calls
    from ia3_kernels import tma_gemm
    if not tma_gemm.available(torch.device(DEVICE)):
        pytest.skip("needs TMA (Hopper) or the interpreter, and triton >= 3.4")
    calls = count_calls(monkeypatch, tma_gemm, "launch_tma_gemm")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    check_against_reference(M, K, N, feedforward, fan_in_fan_out, has_bias, dtype, "tma")
    assert len(calls) == 2  # the forward and the dx GEMM
    if feedforward:
        assert calls[1][1]["aux"] is not None  # dl from the dx GEMM's epilogue
    # Operands TMA cannot address (a row of 65 halves is not 16-byte aligned) take the fused
    # kernel under the same forcing, with the same results.
    calls.clear()
    check_against_reference(M, K + 1, N, feedforward, fan_in_fan_out, has_bias, dtype, "tma")
    assert not calls


@pytest.mark.parametrize("M,N", [(70, 40), (37, 48)], ids=["W*l (N <= M)", "x*l (N > M)"])
def test_cublas_feedforward_forward_folds_l_into_the_smaller_operand(triton_backend, monkeypatch,
                                                                     M, N):
    """The cuBLAS feedforward forward scales W (N x K) when N <= M and x (M x K) when N > M:
    one pass whose scratch is never larger than x; both against the reference."""
    from conftest import count_calls
    from ia3_kernels import dense
    scaled_w = count_calls(monkeypatch, dense, "_scaled_weight")
    passes = count_calls(monkeypatch, dense, "_launch_scale_reduce")
    check_against_reference(M, 40, N, True, False, True, torch.float16, "cublas")
    forward_passes = [c for c in passes.copy() if c[1].get("scale_axis") == 1
                      and c[1].get("out") is not None and c[1].get("aux") is None]
    if N <= M:
        assert len(scaled_w) == 1  # W diag(l), one chunk
    else:
        assert not scaled_w and forward_passes[0][0][0].shape == (M, 40)  # x*l


@pytest.mark.parametrize("mode,rows", [("ff", 40), ("attn", 40), ("attn", 150)])
def test_dl_partials_finished_in_kernel_across_row_blocks_and_splits(mode, rows):
    """dl's per-row-block sums are finished by the launch that makes them (the last CTA of a
    column block adds the rows in a fixed order), also where split-K CTAs share a tile; the
    counters it uses are left at zero. The attention's dl comes from programs of their own
    beside the GEMM's tiles, which only the split-0 programs may write: up to M = 64 with the
    GEMM's BLOCK_M x BLOCK_K, past it 128 x 32 (rows = 150: two steps, columns not a multiple
    of 32)."""
    from ia3_kernels import dense
    torch.manual_seed(0)
    interpret = torch.device(DEVICE).type != "cuda"
    # Several row blocks and split-K at once: small output grids split K (interpreter: 16-row
    # blocks, 4 "SMs"; GPU: int8-sized tiles are not needed, 16-row blocks come at M <= 16 only,
    # so the GPU takes the row blocks without the split).
    M, N, K = (rows, 300, 24) if interpret else (300, 96, 200)
    dt = torch.float32 if interpret else torch.bfloat16
    dy = torch.randn(M, N, device=DEVICE, dtype=dt)
    w = torch.randn(N, K, device=DEVICE, dtype=dt) / 8
    if mode == "ff":  # dx = (dy W) * l, dl = sum_rows (dy W) * x
        x = torch.randn(M, K, device=DEVICE, dtype=dt)
        s = torch.rand(1, K, device=DEVICE, dtype=dt) + 0.5
        dx, _, dl, _ = dense._launch_matmul(dy, dense._weight_as_nk(w, False), w, (M, K), dt,
                                            scale_c=s, aux=x, reduce_aux=True, sum_dtype=dt,
                                            traceable=False, finish_like=s)
        g = dy.double() @ w.double()
        want_dx, want_dl = g * s.double(), (g * x.double()).sum(0, keepdim=True)
    else:  # dx = (dy*l) W, dl = sum_rows dy*u by the launch's own row-sum programs
        u = torch.randn(M, N, device=DEVICE, dtype=dt)
        s = torch.rand(N, 1, device=DEVICE, dtype=dt) + 0.5
        dx, _, _, dl = dense._launch_matmul(dy, dense._weight_as_nk(w, False), w, (M, K), dt,
                                            scale_a=s, a_aux=u, sum_dtype=dt, traceable=False,
                                            finish_like=s)
        want_dx = (dy.double() * s.double().reshape(1, -1)) @ w.double()
        want_dl = (dy.double() * u.double()).sum(0).reshape(N, 1)
    config = dense._matmul_config(M, K, N, dy.element_size(),
                                  dense._sm_count(torch.device(DEVICE)), interpret)
    bm, split_k = config[0], config[3]
    assert -(-M // bm) > 1
    if interpret and rows <= 64:  # (at 150 rows the interpreter's table does not split K)
        assert split_k > 1
    assert dl.shape == s.shape and dl.dtype == s.dtype
    tol = 1e-4 if dt == torch.float32 else 3e-2
    torch.testing.assert_close(dx.double(), want_dx, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(dl.double(), want_dl, rtol=tol, atol=tol * 4 * M ** 0.5)
    for buf in dense._counter_buffers.values():
        assert int(buf.count_nonzero()) == 0


def test_mid_m_tiles_fill_half_the_gpu_or_more():
    """From M = 65 to 512 the table's 16-bit rows give the fused kernel at least 64 CTAs (the
    H100 has 132 SMs) on the benchmark's shapes, where the rows before stop 30 gave 12 (T5
    768->768 at M = 128) to 64, except GEMMs whose A tile is scaled in the K-loop, which keep
    128-column tiles (and >= 32 CTAs); no split-K (its workspace would outgrow x). The rule as the
    H100 sees it, no GPU needed; the timings are in dense._matmul_config's comment."""
    from ia3_kernels import dense

    shapes = ((1024, 4096), (4096, 4096), (14336, 4096), (4096, 14336), (768, 768), (768, 3072),
              (3072, 768), (2304, 768))
    for M in (65, 128, 200, 256, 384, 512):
        for N, K in shapes:
            for stores_preact, scales_a in ((False, False), (True, False), (False, True)):
                bm, bn, bk, split_k, warps, stages = dense._matmul_config(
                    M, N, K, 2, 132, False, stores_preact, scales_a=scales_a)
                assert split_k == 1
                # A scaled A tile (feedforward x, attention dy) keeps 128 columns a tile (but
                # where N <= 1024 up to M = 256): fewer CTAs (>= 32) can be the price there.
                floor = 32 if scales_a else 64
                assert -(-M // bm) * -(-N // bn) >= floor, (M, N, K, bm, bn, scales_a)
                if scales_a and not (N <= 1024 and M <= 256):
                    assert bn >= 128, (M, N, K, bn)
    # Narrow GEMMs (N <= 1024) up to M = 256 take 32x32x256 tiles: 4096->1024 at M = 128 read
    # 16.2 us against 33.2 for the 64x128 row (bare 13.2).
    assert dense._matmul_config(128, 1024, 4096, 2, 132, False)[:3] == (32, 32, 256)
    # 4096->4096 at M = 128: 64x64x128 for the attention forward (27.1 us against 36.5), but
    # 64x128x64 for the feedforward forward, whose x tile is scaled in the K-loop (37.8 us
    # against 52.7 with 64x64x128).
    assert dense._matmul_config(128, 4096, 4096, 2, 132, False, True)[:3] == (64, 64, 128)
    assert dense._matmul_config(128, 4096, 4096, 2, 132, False, scales_a=True)[:3] == (64, 128,
                                                                                      64)
    # fp32 and int8 weights keep their rows.
    assert dense._matmul_config(128, 1024, 4096, 4, 132, False)[:2] == (64, 128)
    assert dense._matmul_config(128, 1024, 4096, 1, 132, False)[:2] == (64, 128)


def test_aten_route_only_for_compiled_16bit_gemms_past_its_bounds():
    """dense._use_aten: the route of compiled GEMMs from 2**30 flop and M = 128 on CUDA in
    16-bit; eager calls, decode sizes, fp32, CPU tensors and mixed-adapter batches keep theirs."""
    from ia3_kernels import dense

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    big = (2048, 768, 768)  # M, N, K: T5-base's k/v at 2048 tokens, 2.4e9 flop
    assert dense._use_aten(*big, torch.bfloat16, cuda, True, None)
    assert dense._use_aten(*big, torch.float16, cuda, True, None)
    assert not dense._use_aten(*big, torch.bfloat16, cuda, False, None)  # eager
    assert not dense._use_aten(64, 14336, 4096, torch.bfloat16, cuda, True, None)  # M < 128
    assert not dense._use_aten(256, 1024, 1024, torch.bfloat16, cuda, True, None)  # < 2**30
    assert not dense._use_aten(*big, torch.float32, cuda, True, None)
    assert not dense._use_aten(*big, torch.bfloat16, cpu, True, None)
    assert not dense._use_aten(*big, torch.bfloat16, cuda, True, torch.zeros(2, dtype=torch.long))
    with ia3_kernels.dense_path("fused"):
        assert not dense._use_aten(*big, torch.bfloat16, cuda, True, None)
    with ia3_kernels.dense_path("aten"):
        assert dense._use_aten(3, 5, 7, torch.float32, cpu, False, None)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_aten_route_compiles_with_inductor(triton_backend, feedforward):
    """The aten route inside the custom op's traced body compiles with Inductor (fullgraph; here
    its CPU backend) and gives the reference's output and gradients."""
    import torch._dynamo

    x, w, b, scale = make_case(64, 48, 40, feedforward, False, True, torch.float32)
    x, scale = x.requires_grad_(), scale.requires_grad_()

    def layer(x, s):
        return ia3_kernels.ia3_linear(x, w, b, s, feedforward)

    torch._dynamo.reset()
    with ia3_kernels.dense_path("aten"):
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(x, scale)
        grads = torch.autograd.grad(y.square().sum(), [x, scale])
    torch._dynamo.reset()
    xr, sr = x.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
    yr = ia3_kernels.torch_ia3_linear(xr, w.double(), b.double(), sr, feedforward)
    grads_ref = torch.autograd.grad(yr.square().sum(), [xr, sr])
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), gr, rtol=1e-5, atol=1e-4)
