"""Mixed-adapter batches at the op level (dense, LLM.int8, bitsandbytes 4-bit): every example
scales with its own row of a table of IA3 vectors. Forward and every gradient against the
float64 reference within PEFT's error bar, on both strategies; each adapter's gradient holds
only its own examples' contribution (adapters no example uses get exactly zero); a mixed batch
equals each example run alone with its adapter's vector; the backward is bitwise reproducible;
bad input raises before any launch. On CPU the kernels run under Triton's interpreter."""
import pytest
import torch

import ia3_kernels
from conftest import DEVICE, KERNEL_DTYPES, assert_within_peft_bar
from helpers import quantize_rows
from ia3_kernels import fourbit, int8

bnb = pytest.importorskip("bitsandbytes")

# (B, T, K, N): odd K and N, one-token examples (decode), one example, several.
SHAPES = [(3, 5, 40, 24), (4, 1, 33, 70), (1, 7, 48, 20), (5, 3, 100, 17)]
ADAPTERS = 4
INDEX = [2, 0, 2, 3, 2]  # adapter 1 unused: its gradient must be exactly zero


def _case(B, T, K, N, feedforward, dtype, seed=0, has_bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if has_bias else None
    table = (torch.rand(ADAPTERS, K if feedforward else N, generator=g) + 0.5).to(DEVICE)
    index = torch.tensor(INDEX[:B], device=DEVICE)
    return x, w, b, table, index


def _family(name, w, dtype):
    """(op(x, b, table, ff, index), reference(x, b, table, ff, index)) for one weight format."""
    if name == "dense":
        wd = w.to(DEVICE, dtype)
        return (lambda x, b, s, ff, i: ia3_kernels.ia3_linear(x, wd, b, s, ff, adapter_index=i),
                lambda x, b, s, ff, i: ia3_kernels.torch_ia3_linear(
                    x, wd.to(x.dtype), None if b is None else b.to(x.dtype), s, ff,
                    adapter_index=i))
    if name == "int8":
        cb, scb = (t.to(DEVICE) for t in quantize_rows(w))
        return (lambda x, b, s, ff, i: ia3_kernels.ia3_linear_int8(x, cb, scb, b, s, ff,
                                                                   adapter_index=i),
                lambda x, b, s, ff, i: int8.torch_ia3_linear_int8(
                    x, cb, scb.double() if x.dtype == torch.float64 else scb, b, s, ff, i))
    packed, state = bnb.functional.quantize_4bit(w.to(DEVICE), blocksize=64,
                                                 compress_statistics=True, quant_type="nf4")
    w4 = fourbit.FourBitWeight.from_bnb(packed, state)
    return (lambda x, b, s, ff, i: ia3_kernels.ia3_linear_4bit(x, w4, b, s, ff, adapter_index=i),
            lambda x, b, s, ff, i: fourbit.torch_ia3_linear_4bit(x, w4, b, s, ff,
                                                                 adapter_index=i))


def _run(fn, x, b, table, feedforward, index, dy=None):
    x = x.detach().clone().requires_grad_()
    table = table.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(x, b, table, feedforward, index)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device, y.dtype)
    inputs = [x, table] + ([b] if b is not None else [])
    return y, torch.autograd.grad(y, inputs, dy.to(y.dtype)), dy


FAMILIES = ["dense", "int8", "nf4"]


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_against_reference(triton_backend, family, shape, dtype, feedforward, path):
    x, w, b, table, index = _case(*shape, feedforward, dtype)
    op, reference = _family(family, w, dtype)
    with ia3_kernels.dense_path(path):
        y, grads, dy = _run(op, x, b, table, feedforward, index)
    y_peft, grads_peft, _ = _run(reference, x, b, table, feedforward, index, dy)
    y_ref, grads_ref, _ = _run(reference, x.double(), b.double(), table.double(), feedforward,
                               index, dy.double())
    assert y.dtype == y_peft.dtype and y.shape == y_peft.shape
    assert_within_peft_bar(y, y_peft, y_ref, dtype, "y")
    for name, g, gp, gr in zip(["dx", "dtable", "dbias"], grads, grads_peft, grads_ref):
        assert g.shape == gp.shape and g.dtype == gp.dtype, name
        assert_within_peft_bar(g, gp, gr, dtype, name)
    unused = sorted(set(range(ADAPTERS)) - set(index.tolist()))
    assert torch.all(grads[1][unused] == 0), "an adapter no example uses got a gradient"


@pytest.mark.skipif(not ia3_kernels.tma_gemm.available(torch.device(DEVICE)),
                    reason="needs TMA (Hopper) or the interpreter, and triton >= 3.4")
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_attention_forward_on_the_tma_gemm(triton_backend, monkeypatch, family):
    """Large-M attention forwards of a mixed batch gather each row's l in the TMA GEMM's
    epilogue (dense weights and the quantized layers' dequantized scratch), as single-adapter
    ones take l there: the kernel is reached, with u stored (training) and without (serving),
    and the output and gradients stay within the bar."""
    from conftest import count_calls

    calls = count_calls(monkeypatch, ia3_kernels.tma_gemm, "launch_tma_gemm")
    x, w, b, table, index = _case(4, 6, 48, 32, False, torch.float16)  # TMA-aligned rows
    op, reference = _family(family, w, torch.float16)
    with ia3_kernels.dense_path("tma"):
        y, grads, dy = _run(op, x, b, table, False, index)
        with torch.no_grad():
            y_serving = op(x, b, table, False, index)
    gathered = [kw for _, kw in calls if kw.get("scale_index") is not None]
    assert [kw["store_preact"] for kw in gathered] == [True, False], "TMA GEMM not reached"
    y_peft, grads_peft, _ = _run(reference, x, b, table, False, index, dy)
    y_ref, grads_ref, _ = _run(reference, x.double(), b.double(), table.double(), False,
                               index, dy.double())
    assert_within_peft_bar(y, y_peft, y_ref, torch.float16, "y")
    assert_within_peft_bar(y_serving, y_peft, y_ref, torch.float16, "y without grad")
    for name, g, gp, gr in zip(["dx", "dtable", "dbias"], grads, grads_peft, grads_ref):
        assert_within_peft_bar(g, gp, gr, torch.float16, name)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_each_example_alone(triton_backend, family, feedforward):
    """Row b of a mixed batch is example b run alone with table row index[b], and table row a's
    gradient is the sum of the single-adapter gradients of the examples using a."""
    x, w, b, table, index = _case(3, 4, 64, 48, feedforward, torch.float32)
    op, _ = _family(family, w, torch.float32)
    y, (dx, dtable, db), dy = _run(op, x, b, table, feedforward, index)
    expected_dtable = torch.zeros_like(table)
    for e in range(x.shape[0]):
        vector = table[index[e]]
        y1, (dx1, dl1, _), _ = _run(lambda x_, b_, s_, ff, i: op(x_, b_, s_[None], ff, i),
                                    x[e:e + 1], b, vector, feedforward,
                                    torch.zeros(1, dtype=torch.long, device=DEVICE), dy[e:e + 1])
        torch.testing.assert_close(y[e:e + 1], y1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx[e:e + 1], dx1, rtol=1e-5, atol=1e-5)
        expected_dtable[index[e]] += dl1
    torch.testing.assert_close(dtable, expected_dtable, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "cublas"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_mixed_backward_is_bitwise_reproducible(triton_backend, feedforward, path):
    x, w, b, table, index = _case(5, 3, 100, 17, feedforward, torch.float32)
    op, _ = _family("dense", w, torch.float32)
    with ia3_kernels.dense_path(path):
        runs = [_run(op, x, b, table, feedforward, index) for _ in range(2)]
    for first, second in zip(runs[0][1], runs[1][1]):
        assert torch.equal(first, second)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_mixed_batch_strided_input_and_no_bias(triton_backend, feedforward):
    x, w, _, table, index = _case(3, 6, 40, 24, feedforward, torch.float32, has_bias=False)
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, K) with T outermost
    assert not x_strided.is_contiguous()
    op, reference = _family("dense", w, torch.float32)
    for path in ("fused", "cublas"):
        with ia3_kernels.dense_path(path):
            y, grads, dy = _run(op, x_strided, None, table, feedforward, index)
        y_ref, grads_ref, _ = _run(reference, x, None, table, feedforward, index, dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        for g, gr in zip(grads, grads_ref):
            torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_mixed_batch_with_no_rows(triton_backend, family, feedforward):
    """Examples with no tokens, and no examples at all (the fuzz test found the reference's
    gather failing to reshape an empty batch)."""
    x, w, b, table, index = _case(3, 5, 40, 24, feedforward, torch.float32)
    for ours in _family(family, w, torch.float32):
        for xs, idx in ((x[:, :0], index), (x[:0], index[:0])):
            y, (dx, dtable, db), _ = _run(ours, xs, b, table, feedforward, idx)
            assert y.shape == (*xs.shape[:2], 24) and dx.shape == xs.shape
            assert torch.all(dtable == 0) and torch.all(db == 0)


@pytest.mark.parametrize("bad,match", [
    (dict(table=torch.ones(4, 41)), r"table of shape \(adapters, 40\)"),
    (dict(table=torch.ones(40)), r"table of shape \(adapters, 40\)"),
    (dict(index=torch.tensor([0, 1])), "adapter_index has 2 entries but x of shape"),
    (dict(index=torch.tensor([0, 1, 4])), r"values must lie in \[0, 4\)"),
    (dict(index=torch.tensor([0, -1, 2])), r"values must lie in \[0, 4\)"),
    (dict(index=torch.tensor([0.0, 1.0, 2.0])), "1-D int32/int64 tensor"),
    (dict(index=torch.tensor([[0, 1, 2]])), "1-D int32/int64 tensor"),
])
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_mixed_input_raises_before_launch(triton_backend, monkeypatch, family, bad, match):
    from ia3_kernels import dense

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(dense, "_launch_matmul", no_launch)
    monkeypatch.setattr(dense, "_launch_scale_reduce", no_launch)
    x, w, b, table, index = _case(3, 5, 40, 24, True, torch.float32)
    table = bad.get("table", table).to(DEVICE)
    index = bad.get("index", index)
    if index.device.type != DEVICE and not torch.is_floating_point(index):
        index = index.to(DEVICE)
        if DEVICE == "cuda" and "values must lie" in match:
            pytest.skip("index ranges are checked on the host only (a device check would sync)")
    op, _ = _family(family, w, torch.float32)
    with pytest.raises(ValueError, match=match):
        op(x, b, table, True, index)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_mixed_batch_conv_against_reference(triton_backend, dtype, feedforward, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, 7, generator=g).to(DEVICE, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (torch.randn(8, 3, 3, 3, generator=g) / 5).to(DEVICE, dtype)
    b = torch.randn(8, generator=g).to(DEVICE, dtype)
    table = (torch.rand(ADAPTERS, 6 if feedforward else 8, generator=g) + 0.5).to(DEVICE)
    index = torch.tensor(INDEX[:3], device=DEVICE)

    def run(fn, x, w, b, table, dy=None):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, table)]
        y = fn(*leaves, feedforward, padding=1, groups=2, adapter_index=index)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y) \
            if dy is None else dy
        return y, torch.autograd.grad(y, leaves, dy.to(y.dtype)), dy

    y, grads, dy = run(ia3_kernels.ia3_conv, x, w, b, table)
    y_peft, grads_peft, _ = run(ia3_kernels.torch_ia3_conv, x, w, b, table, dy)
    y_ref, grads_ref, _ = run(ia3_kernels.torch_ia3_conv, x.double(), w.double(), b.double(),
                              table.double(), dy.double())
    assert_within_peft_bar(y, y_peft, y_ref, dtype, "y")
    for name, g_, gp, gr in zip(["dx", "dweight", "dbias", "dtable"], grads, grads_peft,
                                grads_ref):
        assert g_.shape == gp.shape and g_.dtype == gp.dtype, name
        assert_within_peft_bar(g_, gp, gr, dtype, name)
    assert torch.all(grads[3][[1]] == 0)
