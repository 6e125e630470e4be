"""LLM.int8 bases (bitsandbytes Linear8bitLt): the op against the float64 reference on the
dequantized weight and against PEFT's arithmetic in the same dtype, on both strategies, forward
and every gradient; bad input; the layer against PEFT's; patching; fallbacks; a tiny 8-bit
Llama trained like stock PEFT. On CPU the kernels run under Triton's interpreter."""
import copy

import pytest
import torch
from peft import IA3Config, get_peft_model
from torch import nn

import ia3
import ia3_kernels
from conftest import DEVICE, assert_within_peft_bar, count_calls
from helpers import (check_bias_cast_like_bnb, ia3_grads, quantize_rows, randomize_ia3,
                     to_int8)
from ia3_kernels import int8

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.skipif(not ia3.HAS_BNB_8BIT, reason="PEFT found no bitsandbytes")

SHAPES = [(1, 33, 17), (37, 100, 70), (5, 300, 40), (70, 48, 130)]


def make_case(M, K, N, feedforward, has_bias, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    cb, scb = quantize_rows(torch.randn(N, K, generator=g) / K**0.5)
    b = torch.randn(N, generator=g).to(device, dtype) if has_bias else None
    scale = (torch.rand(K if feedforward else N, generator=g) + 0.5).to(device)
    return x, cb.to(device), scb.to(device), b, scale


def run(fn, x, cb, scb, b, scale, feedforward, dy=None):
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(x, cb, scb, b, scale, feedforward)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    inputs = [x, scale] + ([b] if b is not None else [])
    grads = (torch.autograd.grad(y, inputs, dy.to(y.dtype)) if y.numel()
             else [torch.zeros_like(t) for t in inputs])
    return y, grads, dy


def check_against_reference(x, cb, scb, b, scale, feedforward, dtype, path):
    with ia3_kernels.dense_path(path):
        y, grads, dy = run(ia3_kernels.ia3_linear_int8, x, cb, scb, b, scale, feedforward)
    y_peft, grads_peft, _ = run(int8.torch_ia3_linear_int8, x, cb, scb, b, scale, feedforward, dy)
    f64 = [t.double() if t is not None else None for t in (x, b, scale)]
    y_ref, grads_ref, _ = run(int8.torch_ia3_linear_int8, f64[0], cb, scb.double(), f64[1], f64[2],
                              feedforward, dy.double())
    y_abs, grads_abs, _ = run(int8.torch_ia3_linear_int8, f64[0].abs(), cb.abs(), scb.double(),
                              None if b is None else f64[1].abs(), f64[2].abs(), feedforward,
                              dy.double().abs())
    assert y.dtype == x.dtype and y.shape == y_peft.shape
    assert_within_peft_bar(y, y_peft, y_ref, dtype, "y", y_abs)
    for name, g, gp, gr, ga in zip(["dx", "dscale", "dbias"], grads, grads_peft, grads_ref,
                                   grads_abs):
        assert g.dtype == gp.dtype and g.shape == gp.shape, name
        assert_within_peft_bar(g, gp, gr, dtype, name, ga)


@pytest.mark.parametrize("path", ["fused", "cublas", "aten"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_op_against_reference(triton_backend, M, K, N, feedforward, dtype, path):
    x, cb, scb, b, scale = make_case(M, K, N, feedforward, True, dtype)
    check_against_reference(x, cb, scb, b, scale, feedforward, dtype, path)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_no_bias_empty_3d_and_strided_inputs(triton_backend, feedforward):
    x, cb, scb, _, scale = make_case(24, 40, 30, feedforward, False, torch.float32)
    for path in ("fused", "cublas"):
        check_against_reference(x, cb, scb, None, scale, feedforward, torch.float32, path)
        # A transposed view (strides (1, M)) and a column slice: the kernels take any strides.
        check_against_reference(x.t().contiguous().t(), cb, scb, None, scale, feedforward,
                                torch.float32, path)
        wide = torch.randn(24, 80, dtype=torch.float32, device=DEVICE)
        check_against_reference(wide[:, ::2], cb, scb, None, scale, feedforward, torch.float32,
                                path)
    x3 = torch.randn(2, 3, 40, device=DEVICE, requires_grad=True)
    y3 = ia3_kernels.ia3_linear_int8(x3, cb, scb, None, scale, feedforward)
    y2 = int8.torch_ia3_linear_int8(x3.reshape(6, 40), cb, scb, None, scale, feedforward)
    assert y3.shape == (2, 3, 30)
    torch.testing.assert_close(y3.reshape(6, 30), y2, rtol=1e-5, atol=1e-5)
    y3.sum().backward()
    assert x3.grad.shape == x3.shape
    empty = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    y0 = ia3_kernels.ia3_linear_int8(empty, cb, scb, None, scale.requires_grad_(), feedforward)
    assert y0.shape == (0, 30)
    y0.sum().backward()
    assert empty.grad.shape == (0, 40) and torch.all(scale.grad == 0)


@pytest.fixture
def int8_calls(monkeypatch):
    """The int8 kernels' forward entry point: proves a test ran them."""
    return count_calls(monkeypatch, int8, "int8_forward_impl")


@pytest.mark.parametrize("bad,match", [
    (dict(cb=lambda cb: cb.float()), "2-D int8"),
    (dict(scb=lambda s: s[:-1]), "one float scale per output row"),
    (dict(x=lambda x: x[:, :-1]), "in_features=40"),
    (dict(scale=lambda s: s[:-1]), "needs 40 scaling values"),
    (dict(b=lambda b: b[:-1]), "bias must have out_features=30"),
    (dict(scale=lambda s: s.to(torch.int32)), "scale must be a floating-point"),
    (dict(scb=lambda s: s.to("meta")), r"all tensors must be on one device.*'SCB'"),
])
def test_bad_input_raises_before_launch(triton_backend, monkeypatch, bad, match):
    monkeypatch.setattr(int8, "int8_forward_impl", lambda *a, **k: pytest.fail("launched"))
    x, cb, scb, b, scale = make_case(3, 40, 30, True, True, torch.float32)
    args = dict(x=x, cb=cb, scb=scb, b=b, scale=scale)
    for name, fn in bad.items():
        args[name] = fn(args[name])
    with pytest.raises((ValueError, TypeError), match=match):
        ia3_kernels.ia3_linear_int8(args["x"], args["cb"], args["scb"], args["b"], args["scale"],
                                    True)


# ---- layers ------------------------------------------------------------------------------------


def assert_close_to_bnb(ours, theirs, what=""):
    """On CPU bnb's int8 path is a dequantize-matmul like ours: equal up to fp32 rounding. On a
    GPU bnb runs LLM.int8, which also quantizes the activations (~1% relative error)."""
    if DEVICE == "cpu":
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=what)
    else:
        rel = ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()
        assert rel < 3e-2, f"{what}: relative difference {rel:.3e} from bnb's LLM.int8"


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 40)
        self.k = nn.Linear(24, 40, bias=False)
        self.ff = nn.Linear(40, 24)

    def forward(self, x):
        return self.ff(torch.tanh(self.q(x)) * self.k(x))


def int8_models(threshold=6.0, has_fp16_weights=False, seed=0):
    torch.manual_seed(seed)
    base = to_int8(TinyNet(), threshold=threshold, has_fp16_weights=has_fp16_weights)
    config = IA3Config(target_modules=["q", "k", "ff"], feedforward_modules=["ff"])
    stock = randomize_ia3(get_peft_model(base, config), seed)
    return stock, ia3.fuse(copy.deepcopy(stock))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_layer_matches_peft(triton_backend, int8_calls, threshold):
    stock, fused = int8_models(threshold)
    assert sum(type(m) is ia3.Linear8bitLt for m in fused.modules()) == 3
    x = torch.randn(2, 5, 24, device=DEVICE)
    y_s, y_f = stock(x), fused(x)
    assert y_f.dtype == x.dtype
    assert_close_to_bnb(y_f, y_s, "y")
    y_s.square().sum().backward()
    y_f.square().sum().backward()
    gs, gf = ia3_grads(stock), ia3_grads(fused)
    assert gs.keys() == gf.keys() and len(gs) == 3
    for name in gs:
        assert_close_to_bnb(gf[name], gs[name], name)
    assert stock.state_dict().keys() == fused.state_dict().keys()
    assert len(int8_calls) == 3


def test_layer_reads_int8_state_before_and_after_bnb_forward(triton_backend):
    """bnb keeps SCB on the weight until its own first forward moves it into layer.state."""
    stock, fused = int8_models()
    layer = fused.base_model.model.q
    base = layer.get_base_layer()
    x = torch.randn(3, 24, device=DEVICE)
    before = layer(x)
    assert base.weight.SCB is not None
    base(x)  # bnb's forward: SCB moves to state
    assert base.weight.SCB is None and base.state.SCB is not None
    torch.testing.assert_close(layer(x), before)


def test_disable_and_several_adapters(triton_backend):
    stock, fused = int8_models()
    for model in (stock, fused):
        model.add_adapter("other", IA3Config(target_modules=["q", "k", "ff"],
                                             feedforward_modules=["ff"]))
        randomize_ia3(model, seed=3)
        model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 24, device=DEVICE)
    assert_close_to_bnb(fused(x), stock(x), "two adapters")
    with stock.disable_adapter(), fused.disable_adapter():
        torch.testing.assert_close(fused(x), stock(x))  # both are bnb's own forward


def test_patch_peft_builds_int8_layers():
    torch.manual_seed(0)
    config = IA3Config(target_modules=["q", "ff"], feedforward_modules=["ff"])
    with ia3.patched_peft():
        model = get_peft_model(to_int8(TinyNet()), config)
    assert type(model.base_model.model.q) is ia3.Linear8bitLt
    model = get_peft_model(to_int8(TinyNet()), config)
    assert type(model.base_model.model.q) is not ia3.Linear8bitLt


def test_fp16_weights_fall_back_with_one_warning(triton_backend):
    stock, fused = int8_models(has_fp16_weights=True)
    x = torch.randn(3, 24, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="has_fp16_weights=True"):
        y = fused(x)
    # PEFT's math around bnb's own forward (which quantizes the 16-bit weight on each call).
    torch.testing.assert_close(y, stock(x), rtol=1e-4, atol=1e-5)
    ia3_kernels.set_strict(True)
    with pytest.raises(ia3_kernels.IA3FallbackError, match="has_fp16_weights"):
        fused(x)


def test_tiny_int8_llama_trains_like_peft(triton_backend, int8_calls):
    from test_models import llama, train

    torch.manual_seed(0)
    base, config = llama()
    stock = randomize_ia3(get_peft_model(to_int8(base).to(DEVICE), config))
    fused = ia3.fuse(copy.deepcopy(stock))
    kinds = {m.is_feedforward for m in fused.modules() if type(m) is ia3.Linear8bitLt}
    assert kinds == {True, False}  # down_proj, and k_proj/v_proj
    losses_s, grads_s = train(stock, "llama")
    losses_f, grads_f = train(fused, "llama")
    assert_close_to_bnb(torch.tensor(losses_f), torch.tensor(losses_s), "losses")
    for gs, gf in zip(grads_s, grads_f):
        assert gs.keys() == gf.keys() and gs
        for name in gs:
            if DEVICE == "cpu":
                torch.testing.assert_close(gf[name], gs[name], rtol=1e-3, atol=1e-5, msg=name)
            else:
                assert_close_to_bnb(gf[name], gs[name], name)
    assert len(int8_calls) == 3 * 2 * 3  # steps x decoder layers x (k, v, down)


def test_quantizer_of_these_tests_is_bnbs():
    """make_case's quantize_rows is bnb's own row-wise int8 quantization (int8_vectorwise_quant)."""
    w = torch.randn(30, 40) / 7
    cb, scb = quantize_rows(w)
    cb_bnb, scb_bnb, _ = bnb.functional.int8_vectorwise_quant(w.half())
    torch.testing.assert_close(scb, scb_bnb.float(), rtol=1e-3, atol=0)
    assert (cb.int() - cb_bnb.int()).abs().max() <= 1  # fp16 input rounding may move a code by 1


def test_attention_scale_grad_when_u_was_not_saved(triton_backend):
    """A direct caller of the op that does not save u still gets dl (u is recomputed)."""
    x, cb, scb, b, scale = make_case(9, 40, 30, False, True, torch.float32)
    scale.requires_grad_()
    y = int8._Int8LinearFunction.apply(x, cb, scb, b, scale, False, False, None)
    (g,) = torch.autograd.grad(y, scale, torch.ones_like(y))
    s = scale.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(int8.torch_ia3_linear_int8(x, cb, scb, b, s, False), s,
                                   torch.ones_like(y))
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_tma_route_against_reference(triton_backend, monkeypatch, feedforward):
    """As test_fourbit's: the dequantized scratch through tma_gemm (forced), once a step."""
    from conftest import count_calls
    from ia3_kernels import tma_gemm
    if not tma_gemm.available(torch.device(DEVICE)):
        pytest.skip("needs TMA (Hopper) or the interpreter, and triton >= 3.4")
    calls = count_calls(monkeypatch, tma_gemm, "launch_tma_gemm")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    x, cb, scb, b, scale = make_case(70, 96, 48, feedforward, True, dtype)
    check_against_reference(x, cb, scb, b, scale, feedforward, dtype, "tma")
    assert len(calls) == 1
    assert (calls[0][1].get("aux") is not None) == feedforward


def test_bias_cast_in_place_as_bnb_forward_does(triton_backend):
    """bnb's Linear8bitLt.forward casts an fp32 bias to x's dtype in place (once); ours does the
    same instead of casting a copy on every call, and still computes what PEFT's wrapper does
    (which feeds bnb float32 inputs, so its bias stays float32)."""
    stock, fused = int8_models()
    x = torch.randn(3, 24, device=DEVICE, dtype=torch.float16)
    check_bias_cast_like_bnb(fused.base_model.model.q, stock.base_model.model.q, x)


def test_trainable_bias_keeps_its_dtype(triton_backend):
    """A bias that trains is never cast in place (its optimizer state keeps its dtype): the op
    casts a copy, and the bias gets a float32 gradient."""
    stock, fused = int8_models()
    layer = fused.base_model.model.q
    bias = layer.get_base_layer().bias
    bias.requires_grad_(True)
    x = torch.randn(3, 24, device=DEVICE, dtype=torch.float16)
    layer(x).float().square().sum().backward()
    assert bias.dtype == torch.float32 and bias.grad is not None
    assert bias.grad.dtype == torch.float32

