"""bitsandbytes 4-bit bases (Linear4bit): our dequantization against bnb's for every format,
blocksize and double-quantization setting; the op against the float64 reference on the
dequantized weight and against PEFT's arithmetic in the same dtype, on both strategies, forward
and every gradient; bad input; the layer against PEFT's; patching; fallbacks; a tiny NF4 Llama
trained like stock PEFT. On CPU the kernels run under Triton's interpreter."""
import copy

import pytest
import torch
from peft import IA3Config, get_peft_model
from torch import nn

import ia3
import ia3_kernels
from conftest import DEVICE, assert_within_peft_bar, count_calls
from helpers import check_bias_cast_like_bnb, ia3_grads, quantize_4bit, randomize_ia3, to_4bit
from ia3_kernels import fourbit
from ia3_kernels.fourbit import FourBitWeight

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.skipif(not ia3.HAS_BNB_4BIT, reason="PEFT found no bitsandbytes")

FORMATS = [(qt, nested) for qt in ("nf4", "fp4") for nested in (False, True)]


def make_case(M, K, N, feedforward, has_bias, dtype, quant_type="nf4", nested=True, blocksize=64,
              seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    packed, state = quantize_4bit(N, K, quant_type, nested, blocksize, seed=seed)
    b = torch.randn(N, generator=g).to(DEVICE, dtype) if has_bias else None
    scale = (torch.rand(K if feedforward else N, generator=g) + 0.5).to(DEVICE)
    return x, FourBitWeight.from_bnb(packed, state), b, scale


def run(fn, x, w, b, scale, feedforward, dy=None):
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(x, w, b, scale, feedforward)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device, y.dtype)
    inputs = [x, scale] + ([b] if b is not None else [])
    grads = (torch.autograd.grad(y, inputs, dy.to(y.dtype)) if y.numel()
             else [torch.zeros_like(t) for t in inputs])
    return y, grads, dy


def check_against_reference(x, w, b, scale, feedforward, dtype, path):
    with ia3_kernels.dense_path(path):
        y, grads, dy = run(ia3_kernels.ia3_linear_4bit, x, w, b, scale, feedforward)
    y_peft, grads_peft, _ = run(fourbit.torch_ia3_linear_4bit, x, w, b, scale, feedforward, dy)
    f64 = [t.double() if t is not None else None for t in (x, b, scale)]
    y_ref, grads_ref, _ = run(fourbit.torch_ia3_linear_4bit, f64[0], w, f64[1], f64[2],
                              feedforward, dy.double())
    assert y.dtype == x.dtype and y.shape == y_peft.shape
    assert_within_peft_bar(y, y_peft, y_ref, dtype, "y", _magnitude(x, w, b, scale, feedforward))
    for name, g, gp, gr in zip(["dx", "dscale", "dbias"], grads, grads_peft, grads_ref):
        assert g.dtype == gp.dtype and g.shape == gp.shape, name
        assert_within_peft_bar(g, gp, gr, dtype, name)


def _magnitude(x, w, b, scale, feedforward):
    """The float64 reference on absolute values of every input: sum |terms| of each output."""
    weight = fourbit.dequantize_4bit(w, torch.float64).abs()
    bias = None if b is None else b.double().abs()
    return ia3_kernels.torch_ia3_linear(x.double().abs(), weight, bias, scale.double().abs(),
                                        feedforward)


# ---- storage -------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("blocksize", fourbit.BLOCKSIZES)
def test_dequantize_matches_bnb(quant_type, nested, blocksize):
    """Every format, blocksize and double-quantization setting. Blocks aligned to rows
    (in_features = blocksize): bit-identical to bnb's dequantize_4bit. Blocks straddling rows
    (in_features 200, 96, 105): bnb's CUDA kernels index blocks over the flattened matrix (as
    we do); its CPU kernel does not for some shapes (bnb 0.50.2: (16, 96) blocksize 64 comes
    back 1.2 off a unit-scale weight), so there every value must sit within half a code gap of
    the weight bnb quantized, which only the flat indexing gives."""
    for N, K in ((3, blocksize), (7, 200), (16, 96), (5, 105)):
        g = torch.Generator().manual_seed(N)
        w = torch.randn(N, K, generator=g)
        packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize,
                                                     compress_statistics=nested,
                                                     quant_type=quant_type)
        ours = fourbit.dequantize_4bit(FourBitWeight.from_bnb(packed, state), torch.float32)
        if K % blocksize == 0:
            torch.testing.assert_close(ours, bnb.functional.dequantize_4bit(packed, state).float(),
                                       rtol=0, atol=0)
        flat = w.reshape(-1)
        pad = -flat.numel() % blocksize
        block_absmax = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize).abs().amax(1)
        bound = block_absmax.repeat_interleave(blocksize)[:flat.numel()].reshape(N, K)
        slack = 1.02 if nested else 1.0 + 1e-6  # the uint8 absmax codes move it by < 1%
        half_gap = state.code.float().sort().values.diff().max() / 2  # NF4: -1 to -0.6962
        assert ((ours - w).abs() <= half_gap * slack * bound + 1e-6).all()


@pytest.mark.parametrize("quant_type,nested", FORMATS)
@pytest.mark.parametrize("blocksize", fourbit.BLOCKSIZES)
def test_kernels_every_format_and_blocksize(triton_backend, quant_type, nested, blocksize):
    """Forward and all gradients, feedforward and attention, M = 1 (GEMV) and 3 (tl.dot):
    in_features = min(blocksize, 256) (blocks aligned to rows for blocksize <= 256) and 200
    (blocks straddle rows, bytes too for odd in_features: 105)."""
    for K in sorted({min(blocksize, 256), 200, 105}):
        for M, feedforward in ((1, True), (3, False), (3, True), (1, False)):
            x, w, b, scale = make_case(M, K, 24, feedforward, True, torch.float32, quant_type,
                                       nested, blocksize)
            check_against_reference(x, w, b, scale, feedforward, torch.float32, "fused")


SHAPES = [(1, 64, 17), (37, 128, 70), (5, 320, 40), (70, 48, 130), (4, 200, 33)]


@pytest.mark.parametrize("path", ["fused", "cublas", "aten"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_op_against_reference(triton_backend, M, K, N, feedforward, dtype, path):
    x, w, b, scale = make_case(M, K, N, feedforward, True, dtype)
    check_against_reference(x, w, b, scale, feedforward, dtype, path)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_aten_route_leaves_the_elementwise_work_to_aten(triton_backend, monkeypatch, feedforward):
    """The route of compiled large GEMMs (forced here by dense_path("aten")) on a quantized
    base (quantized.py, shared by 4-bit and int8): the weight's dequantization is the only
    Triton pass; u*l, dx = g*l and dl's row sums are aten ops, which Inductor fuses, so that it
    can recompute x from the layer before instead of saving it (NF4 Llama-3-8B dims kept
    4 x 224 MiB more than PEFT compiled: saved-nf4-compiled-stop36-h100.log)."""
    from ia3_kernels import quantized
    passes = count_calls(monkeypatch, quantized, "_launch_scale_reduce")
    from_g = count_calls(monkeypatch, quantized, "_feedforward_grads_from_g")
    dequantized = count_calls(monkeypatch, FourBitWeight, "dequantize_into")
    x, w, b, scale = make_case(37, 128, 70, feedforward, True, torch.float32)
    check_against_reference(x, w, b, scale, feedforward, torch.float32, "aten")
    assert passes == [] and from_g == []
    assert len(dequantized) == 2  # the forward's scratch and the backward's


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_no_bias_empty_3d_and_strided_inputs(triton_backend, feedforward):
    x, w, _, scale = make_case(24, 64, 30, feedforward, False, torch.float32)
    for path in ("fused", "cublas", "aten"):
        check_against_reference(x, w, None, scale, feedforward, torch.float32, path)
        check_against_reference(x.t().contiguous().t(), w, None, scale, feedforward,
                                torch.float32, path)
        wide = torch.randn(24, 128, dtype=torch.float32, device=DEVICE)
        check_against_reference(wide[:, ::2], w, None, scale, feedforward, torch.float32, path)
    x3 = torch.randn(2, 3, 64, device=DEVICE, requires_grad=True)
    y3 = ia3_kernels.ia3_linear_4bit(x3, w, None, scale, feedforward)
    y2 = fourbit.torch_ia3_linear_4bit(x3.reshape(6, 64), w, None, scale, feedforward)
    assert y3.shape == (2, 3, 30)
    torch.testing.assert_close(y3.reshape(6, 30), y2, rtol=1e-5, atol=1e-5)
    y3.sum().backward()
    assert x3.grad.shape == x3.shape
    empty = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    y0 = ia3_kernels.ia3_linear_4bit(empty, w, None, scale.requires_grad_(), feedforward)
    assert y0.shape == (0, 30)
    y0.sum().backward()
    assert empty.grad.shape == (0, 64) and torch.all(scale.grad == 0)


def test_compute_dtype_and_output_dtype(triton_backend):
    """As bnb's Linear4bit: computes in compute_dtype, returns x's dtype."""
    x, w, b, scale = make_case(5, 64, 30, True, True, torch.float32)
    y = ia3_kernels.ia3_linear_4bit(x, w, b, scale, True, compute_dtype=torch.float16)
    y_ref = fourbit.torch_ia3_linear_4bit(x, w, b, scale, True, compute_dtype=torch.float16)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=2e-3, atol=2e-3)
    assert not torch.equal(y_ref, fourbit.torch_ia3_linear_4bit(x, w, b, scale, True))


def test_attention_scale_grad_when_u_was_not_saved(triton_backend):
    """A direct caller that does not save u still gets dl (u is recomputed)."""
    x, w, b, scale = make_case(9, 64, 30, False, True, torch.float32)
    scale.requires_grad_()
    y = fourbit._FourBitLinearFunction.apply(x, w, b, scale, False, False, None)
    (g,) = torch.autograd.grad(y, scale, torch.ones_like(y))
    s = scale.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(fourbit.torch_ia3_linear_4bit(x, w, b, s, False), s,
                                   torch.ones_like(y))
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.fixture
def fourbit_calls(monkeypatch):
    """The quantized impls' forward entry point as fourbit calls it: proves a test ran the
    kernels."""
    return count_calls(monkeypatch, fourbit, "quantized_forward_impl")


def _with(w, **changes):
    fields = {name: getattr(w, name) for name in ("packed", "absmax", "code", "blocksize",
                                                  "out_features", "in_features", "absmax2",
                                                  "code2", "offset", "blocksize2")}
    fields.update(changes)
    return FourBitWeight(**fields)


@pytest.mark.parametrize("bad,match", [
    (dict(w=lambda w: _with(w, packed=w.packed[:-1])), "must hold 960 bytes"),
    (dict(w=lambda w: _with(w, packed=w.packed.view(torch.int8))), "as uint8"),
    (dict(w=lambda w: _with(w, blocksize=48)), "blocksize must be one of"),
    (dict(w=lambda w: _with(w, absmax=w.absmax[:-1])), "one value per 64 weights"),
    (dict(w=lambda w: _with(w, code=w.code[:8])), "16 float values"),
    (dict(w=lambda w: _with(w, code2=w.code2[:10])), "double-quantized absmax"),
    (dict(x=lambda x: x[:, :-1]), "in_features=64"),
    (dict(scale=lambda s: s[:-1]), "needs 64 scaling values"),
    (dict(b=lambda b: b[:-1]), "bias must have out_features=30"),
    (dict(scale=lambda s: s.to(torch.int32)), "scale must be a floating-point"),
    (dict(w=lambda w: _with(w, absmax2=w.absmax2.to("meta"))),
     r"all tensors must be on one device.*'absmax2'"),
])
def test_bad_input_raises_before_launch(triton_backend, monkeypatch, bad, match):
    monkeypatch.setattr(fourbit, "quantized_forward_impl", lambda *a, **k: pytest.fail("launched"))
    x, w, b, scale = make_case(3, 64, 30, True, True, torch.float32)
    args = dict(x=x, w=w, b=b, scale=scale)
    for name, fn in bad.items():
        args[name] = fn(args[name])
    with pytest.raises((ValueError, TypeError), match=match):
        ia3_kernels.ia3_linear_4bit(args["x"], args["w"], args["b"], args["scale"], True)


# ---- layers ------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """in_features multiples of 64: bnb's CPU kernels (PEFT's path here) are right only there."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(64, 128)
        self.k = nn.Linear(64, 128, bias=False)
        self.ff = nn.Linear(128, 64)

    def forward(self, x):
        return self.ff(torch.tanh(self.q(x)) * self.k(x))


def fourbit_models(seed=0, **quant):
    torch.manual_seed(seed)
    base = to_4bit(TinyNet(), **quant)
    config = IA3Config(target_modules=["q", "k", "ff"], feedforward_modules=["ff"])
    stock = randomize_ia3(get_peft_model(base, config), seed)
    return stock, ia3.fuse(copy.deepcopy(stock))


def assert_close_to_peft(ours, theirs, what=""):
    """PEFT computes in float32 (its upcast) on the same dequantized weight; ours computes in
    the layer's compute dtype (float32 here): equal up to summation order."""
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-4, atol=1e-5, msg=what)


@pytest.mark.parametrize("quant_type,nested", FORMATS)
def test_layer_matches_peft(triton_backend, fourbit_calls, quant_type, nested):
    stock, fused = fourbit_models(quant_type=quant_type, compress_statistics=nested)
    assert sum(type(m) is ia3.Linear4bit for m in fused.modules()) == 3
    x = torch.randn(2, 5, 64, device=DEVICE)
    y_s, y_f = stock(x), fused(x)
    assert y_f.dtype == x.dtype
    assert_close_to_peft(y_f, y_s, "y")
    y_s.square().sum().backward()
    y_f.square().sum().backward()
    gs, gf = ia3_grads(stock), ia3_grads(fused)
    assert gs.keys() == gf.keys() and len(gs) == 3
    for name in gs:
        assert_close_to_peft(gf[name], gs[name], name)
    assert stock.state_dict().keys() == fused.state_dict().keys()
    assert len(fourbit_calls) == 3


def test_disable_and_several_adapters(triton_backend):
    stock, fused = fourbit_models()
    for model in (stock, fused):
        model.add_adapter("other", IA3Config(target_modules=["q", "k", "ff"],
                                             feedforward_modules=["ff"]))
        randomize_ia3(model, seed=3)
        model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 64, device=DEVICE)
    assert_close_to_peft(fused(x), stock(x), "two adapters")
    with stock.disable_adapter(), fused.disable_adapter():
        torch.testing.assert_close(fused(x), stock(x))  # both are bnb's own forward


def test_patch_peft_builds_4bit_layers():
    torch.manual_seed(0)
    config = IA3Config(target_modules=["q", "ff"], feedforward_modules=["ff"])
    with ia3.patched_peft():
        model = get_peft_model(to_4bit(TinyNet()), config)
    assert type(model.base_model.model.q) is ia3.Linear4bit
    model = get_peft_model(to_4bit(TinyNet()), config)
    assert type(model.base_model.model.q) is not ia3.Linear4bit


def test_save_and_load_adapter_interchangeable_with_peft(triton_backend, tmp_path):
    from peft import PeftModel

    stock, fused = fourbit_models()
    fused.save_pretrained(tmp_path / "fused")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(to_4bit(TinyNet()), tmp_path / "fused")
    for name, p in stock.named_parameters():
        if "ia3_l" in name:
            torch.testing.assert_close(dict(loaded.named_parameters())[name], p)


def test_unquantized_base_falls_back_with_one_warning(triton_backend):
    stock, fused = fourbit_models()
    layer = fused.base_model.model.q
    weight = layer.get_base_layer().weight
    saved = weight.quant_state
    weight.quant_state = None  # as before bnb quantizes on .to(device)
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="not quantized yet"):
        try:
            layer(x)  # bnb's own forward then runs (or refuses): not ours to judge
        except Exception:  # noqa: BLE001
            pass
    ia3_kernels.set_strict(True)
    weight.quant_state = None
    with pytest.raises(ia3_kernels.IA3FallbackError, match="not quantized yet"):
        layer(x)
    weight.quant_state = saved
    torch.testing.assert_close(layer(x), stock.base_model.model.q(x), rtol=1e-4, atol=1e-5)


def test_tiny_nf4_llama_trains_like_peft(triton_backend, fourbit_calls):
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_models import VOCAB, llama, train

    torch.manual_seed(0)
    _, config = llama()
    # Widths multiples of the blocksize: bnb's CPU kernels (stock PEFT's path) are right there.
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    stock = randomize_ia3(get_peft_model(to_4bit(base).to(DEVICE), config))
    fused = ia3.fuse(copy.deepcopy(stock))
    kinds = {m.is_feedforward for m in fused.modules() if type(m) is ia3.Linear4bit}
    assert kinds == {True, False}  # down_proj, and k_proj/v_proj
    losses_s, grads_s = train(stock, "llama")
    losses_f, grads_f = train(fused, "llama")
    torch.testing.assert_close(torch.tensor(losses_f), torch.tensor(losses_s), rtol=1e-4,
                               atol=1e-5)
    for gs, gf in zip(grads_s, grads_f):
        assert gs.keys() == gf.keys() and gs
        for name in gs:
            torch.testing.assert_close(gf[name], gs[name], rtol=1e-3, atol=1e-5, msg=name)
    assert len(fourbit_calls) == 3 * 2 * 3  # steps x decoder layers x (k, v, down)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_tma_route_against_reference(triton_backend, monkeypatch, feedforward):
    """The dequantized scratch multiplied by tma_gemm (forced: on the GPU it takes over at
    large M on Hopper): the attention forward (l and bias in its epilogue) and the feedforward
    backward (dx and dl's partials) each launch it once."""
    from conftest import count_calls
    from ia3_kernels import tma_gemm
    if not tma_gemm.available(torch.device(DEVICE)):
        pytest.skip("needs TMA (Hopper) or the interpreter, and triton >= 3.4")
    calls = count_calls(monkeypatch, tma_gemm, "launch_tma_gemm")
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    x, w, b, scale = make_case(70, 128, 48, feedforward, True, dtype)
    check_against_reference(x, w, b, scale, feedforward, dtype, "tma")
    assert len(calls) == 1
    assert (calls[0][1].get("aux") is not None) == feedforward  # ff: dx + dl; attn: forward


def test_bias_cast_in_place_as_bnb_forward_does(triton_backend):
    """bnb's Linear4bit.forward casts x to its compute_dtype and an fp32 bias to that dtype in
    place (once); ours does the same instead of casting a copy on every call."""
    torch.manual_seed(0)
    base = to_4bit(TinyNet(), compute_dtype=torch.float16)
    stock = randomize_ia3(get_peft_model(base, IA3Config(target_modules=["q", "ff"],
                                                         feedforward_modules=["ff"])), 0)
    fused = ia3.fuse(copy.deepcopy(stock))
    for name in ("q", "ff"):
        ours = getattr(fused.base_model.model, name)
        x = torch.randn(3, ours.in_features, device=DEVICE, dtype=torch.float16)
        check_bias_cast_like_bnb(ours, getattr(stock.base_model.model, name), x)


def test_prepared_weight_is_kept_per_layer_until_bnbs_tensors_change(triton_backend, monkeypatch):
    """ia3.Linear4bit checks and lays out its base's weight once (fourbit.prepare_weight) and
    reuses it while bnb's bytes and quant_state are the same; a re-quantized weight, a swapped
    quant_state or a copy of the layer gets its own, and every call matches PEFT."""
    import ia3.bnb as ia3_bnb

    prepared = count_calls(monkeypatch, ia3_bnb, "prepare_weight")
    stock, fused = fourbit_models()
    ours, theirs = fused.base_model.model.q, stock.base_model.model.q
    x = torch.randn(3, 64, device=DEVICE)
    for _ in range(3):
        assert_close_to_peft(ours(x), theirs(x), "kept")
    assert len(prepared) == 1
    # bnb re-quantizes: new bytes and a new quant_state (what .to(device) or a merge does).
    torch.manual_seed(5)
    fresh = to_4bit(nn.Sequential(nn.Linear(64, 128)))[0]
    ours.get_base_layer().weight = fresh.weight
    theirs.get_base_layer().weight = copy.deepcopy(fresh.weight)
    assert_close_to_peft(ours(x), theirs(x), "re-quantized")
    assert len(prepared) == 2
    copied = copy.deepcopy(ours)
    assert_close_to_peft(copied(x), theirs(x), "copy")
    assert len(prepared) == 3


def test_prepared_weight_is_not_kept_from_inference_mode(triton_backend, monkeypatch):
    """Views made under torch.inference_mode can be inference tensors (the M = 1 GEMV's int32
    word view is), which autograd refuses to save and in-place ops refuse to touch: a call
    there keeps nothing, and the training step after it prepares its own weights and trains."""
    import ia3.bnb as ia3_bnb

    prepared = count_calls(monkeypatch, ia3_bnb, "prepare_weight")
    stock, fused = fourbit_models()
    x = torch.randn(1, 64, device=DEVICE)
    with torch.inference_mode():
        fused(x)
    assert len(prepared) == 0
    fused(x).square().sum().backward()
    assert len(prepared) == 3  # q, k, ff
    assert all(g.abs().sum() > 0 for g in ia3_grads(fused).values())
