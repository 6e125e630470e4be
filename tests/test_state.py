"""What users do around the layers: special values in the vectors, gradient checkpointing,
copies and pickles, dtype moves, inference mode."""
import copy
import io
import pickle

import pytest
import torch

import ia3
import ia3_kernels
from conftest import DEVICE
from helpers import peft_and_fused, quantize_4bit, quantize_rows
from ia3_kernels import fourbit, int8
from test_dense_op import PATHS, make_case
from test_models import llama, train
from helpers import randomize_ia3


def special_value_ops(kind, x, w, feedforward):
    """(ours, reference) for one layer kind on the same weight (quantized from w for int8/NF4)."""
    if kind == "dense":
        return (lambda xx, s: ia3_kernels.ia3_linear(xx, w, None, s, feedforward),
                lambda xx, s: ia3_kernels.torch_ia3_linear(xx, w, None, s, feedforward))
    if kind == "int8":
        cb, scb = (t.to(DEVICE) for t in quantize_rows(w.cpu()))
        return (lambda xx, s: ia3_kernels.ia3_linear_int8(xx, cb, scb, None, s, feedforward),
                lambda xx, s: int8.torch_ia3_linear_int8(xx, cb, scb, None, s, feedforward))
    pytest.importorskip("bitsandbytes")
    w4 = fourbit.FourBitWeight.from_bnb(*quantize_4bit(*w.shape, "nf4", True, 32))
    return (lambda xx, s: ia3_kernels.ia3_linear_4bit(xx, w4, None, s, feedforward),
            lambda xx, s: fourbit.torch_ia3_linear_4bit(xx, w4, None, s, feedforward))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("kind", ["dense", "int8", "nf4"])
def test_special_values_in_the_vector_match_the_reference(triton_backend, kind, feedforward, path):
    """Zeros, negatives, inf and NaN in l: NaN exactly where the reference has NaN, same values
    elsewhere (forward and every gradient), for M = 7 (tiled / small-M kernels) and M = 1."""
    for M in (7, 1):
        x, w, b, scale = make_case(M, 64, 24, feedforward, False, True, torch.float32)
        scale[0], scale[1], scale[2], scale[3] = 0.0, -1.5, float("inf"), float("nan")
        dy = torch.randn(M, 24, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        results = []
        for fn, dense_path in zip(special_value_ops(kind, x, w, feedforward), (path, "auto")):
            xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
            with ia3_kernels.dense_path(dense_path):
                y = fn(xg, sg)
            y.backward(dy)
            results.append((y, xg.grad, sg.grad))
        for ours, ref, name in zip(results[0], results[1], ("y", "dx", "dl")):
            assert torch.equal(torch.isnan(ours), torch.isnan(ref)), (M, name)
            finite = torch.isfinite(ref)
            assert torch.equal(ours[~finite & ~torch.isnan(ref)], ref[~finite & ~torch.isnan(ref)])
            torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-5, atol=1e-5,
                                       msg=f"{name} M={M}")


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_special_values_in_a_conv_vector(triton_backend, feedforward):
    """Conv folds l into the weight (conv(x, W*l), and dx = dy conv^T (W*l)). Zeros, negatives
    and NaN give the reference's y and dx; inf is the one exception: W*inf holds +inf and -inf,
    whose sum is NaN across that channel (attention: y's channel; feedforward: dx's channel)
    where the reference has +-inf. dl is the reference's in every channel: channels whose l is
    0, inf or NaN get it from a direct computation, not from sum(...) / l."""
    from test_conv import make_case as conv_case

    x, w, b, scale, kw = conv_case("3x3", feedforward, True, torch.float32, False)
    flat = scale.view(-1)
    flat[0], flat[1], flat[2], flat[3] = 0.0, -1.5, float("inf"), float("nan")
    results = []
    for fn in (ia3_kernels.ia3_conv, ia3_kernels.torch_ia3_conv):
        xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
        y = fn(xg, w, b, sg, feedforward, **kw)
        y.backward(torch.ones_like(y))
        results.append((y, xg.grad, sg.grad))
    (y, dx, dl), (y_ref, dx_ref, dl_ref) = results
    assert torch.isfinite(dl_ref).all()
    torch.testing.assert_close(dl, dl_ref, rtol=1e-5, atol=1e-5, msg="dl")
    if feedforward:
        assert torch.equal(torch.isnan(y), torch.isnan(y_ref)), "y"
        torch.testing.assert_close(y[torch.isfinite(y_ref)], y_ref[torch.isfinite(y_ref)],
                                   rtol=1e-5, atol=1e-5)
        finite_channels = [c for c in range(dx.shape[1]) if c != 2]
        ours, ref = dx[:, finite_channels], dx_ref[:, finite_channels]
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), "dx"
        torch.testing.assert_close(ours[torch.isfinite(ref)], ref[torch.isfinite(ref)],
                                   rtol=1e-5, atol=1e-5)
        assert not torch.isfinite(dx[:, 2]).any() and not torch.isfinite(dx_ref[:, 2]).any()
    else:
        finite_channels = [c for c in range(y.shape[1]) if c not in (2, 3)]
        torch.testing.assert_close(y[:, finite_channels], y_ref[:, finite_channels],
                                   rtol=1e-5, atol=1e-5)
        assert torch.isnan(y[:, 3]).all() and torch.isnan(y_ref[:, 3]).all()
        assert torch.isinf(y_ref[:, 2]).any() and not torch.isfinite(y[:, 2]).any()
        assert torch.equal(torch.isnan(dx), torch.isnan(dx_ref)), "dx"  # the NaN channel's row


def tiny_llama_pair():
    torch.manual_seed(0)
    base, config = llama()
    from peft import get_peft_model
    stock = randomize_ia3(get_peft_model(base.to(DEVICE), config))
    return stock, ia3.fuse(copy.deepcopy(stock))


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(triton_backend, kernel_calls, reentrant):
    stock, fused = tiny_llama_pair()
    for model in (stock, fused):
        model.base_model.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.base_model.model.enable_input_require_grads()
    losses_s, grads_s = train(stock, "llama", steps=2)
    losses_f, grads_f = train(fused, "llama", steps=2)
    assert len(kernel_calls) > 0
    torch.testing.assert_close(torch.tensor(losses_f), torch.tensor(losses_s), rtol=1e-5, atol=1e-6)
    for name in grads_s[-1]:
        torch.testing.assert_close(grads_f[-1][name], grads_s[-1][name], rtol=1e-4, atol=1e-6)


def test_deepcopy_pickle_and_state_dict_round_trip(triton_backend):
    _, fused = peft_and_fused()
    x = torch.randn(3, 24, device=DEVICE)
    expected = fused(x)
    clone = copy.deepcopy(fused)
    assert any(type(m) is ia3.Linear for m in clone.modules())
    torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    assert any(type(m) is ia3.Linear for m in unpickled.modules())
    torch.testing.assert_close(unpickled(x), expected, rtol=0, atol=0)
    assert pickle.loads(pickle.dumps(fused.state_dict())).keys() == fused.state_dict().keys()


@pytest.mark.parametrize("how", ["to", "method"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_model_dtype_moves(triton_backend, dtype, how):
    """model.to(dtype) / model.half() / model.double() keep fused layers working; float64 runs
    the reference (warned once)."""
    peft_model, fused = peft_and_fused()
    if how == "to":
        peft_model, fused = peft_model.to(dtype), fused.to(dtype)
    else:
        method = "half" if dtype == torch.float16 else "double"
        peft_model, fused = getattr(peft_model, method)(), getattr(fused, method)()
    x = torch.randn(3, 24, device=DEVICE, dtype=dtype)
    if dtype == torch.float64:
        with pytest.warns(RuntimeWarning, match="float64"):
            y = fused(x)
    else:
        y = fused(x)
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 1e-12
    torch.testing.assert_close(y, peft_model(x), rtol=tol, atol=tol)


def test_no_grad_and_inference_mode(triton_backend, kernel_calls):
    peft_model, fused = peft_and_fused()
    x = torch.randn(3, 24, device=DEVICE)
    with torch.no_grad():
        y_nograd = fused(x)
    with torch.inference_mode():
        y_inf = fused(x)
    assert not y_nograd.requires_grad and not y_inf.requires_grad
    torch.testing.assert_close(y_inf, y_nograd, rtol=0, atol=0)
    torch.testing.assert_close(y_nograd, peft_model(x).detach(), rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 8


def test_frozen_adapters_get_no_gradient(triton_backend):
    _, fused = peft_and_fused()
    for name, p in fused.named_parameters():
        if "ia3_l" in name:
            p.requires_grad_(False)
    x = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    fused(x).square().sum().backward()
    assert x.grad is not None
    assert all(p.grad is None for n, p in fused.named_parameters() if "ia3_l" in n)
