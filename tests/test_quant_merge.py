"""Merging IA3 into bitsandbytes bases (ia3.quant_merge): attention vectors fold exactly into
the statistics (int8 SCB, 4-bit absmax, double quantization unpacked) and unmerge restores
them bit for bit; feedforward vectors re-quantize with a warning that states the measured
error, unmerge is exact when the original was kept; the merged layer computes what the
unmerged fused layer computes; merge_and_unload works on quantized models (PEFT refuses).
On CPU the kernels run under Triton's interpreter."""
import copy

import pytest
import torch
from peft import IA3Config, get_peft_model

import ia3
import ia3_kernels
from conftest import DEVICE
from helpers import randomize_ia3, to_4bit, to_int8
from ia3_kernels.fourbit import FourBitWeight, dequantize_4bit
from ia3_kernels.int8 import dequantize_int8
from test_models import llama

bnb = pytest.importorskip("bitsandbytes")


class Net(torch.nn.Module):
    def __init__(self, k=128, n=64):
        super().__init__()
        self.attn = torch.nn.Linear(k, n)
        self.ff = torch.nn.Linear(k, n)

    def forward(self, x):
        return self.attn(x) + self.ff(x)


def _model(fmt, **quant):
    torch.manual_seed(0)
    net = Net()
    net = to_int8(net) if fmt == "int8" else to_4bit(net, **quant)
    config = IA3Config(target_modules=["attn", "ff"], feedforward_modules=["ff"])
    return randomize_ia3(ia3.fuse(get_peft_model(net, config)))


def _dequantized(layer):
    base = layer.get_base_layer()
    if isinstance(layer, ia3.Linear8bitLt):
        from ia3.bnb import int8_weight
        cb, scb = int8_weight(base)
        return dequantize_int8(cb, scb, torch.float32)
    return dequantize_4bit(FourBitWeight.from_bnb(base.weight.data, base.weight.quant_state),
                           torch.float32)


def _snapshot(layer):
    base = layer.get_base_layer()
    if isinstance(layer, ia3.Linear8bitLt):
        from ia3.bnb import int8_weight
        cb, scb = int8_weight(base)
        return [cb.clone(), scb.clone(), base.bias.data.clone()]
    state = base.weight.quant_state
    parts = [base.weight.data.clone(), state.absmax.clone(), base.bias.data.clone()]
    if state.nested:
        parts.append(state.state2.absmax.clone())
    return parts


FORMATS = [("int8", {}), ("nf4", dict(compress_statistics=True)),
           ("nf4", dict(compress_statistics=False)), ("fp4", dict(quant_type="fp4"))]


@pytest.mark.parametrize("fmt,quant", FORMATS, ids=["int8", "nf4-nested", "nf4", "fp4"])
def test_attention_merge_is_exact_and_unmerges_bit_for_bit(triton_backend, fmt, quant):
    model = _model(fmt, **quant)
    layer = model.base_model.model.attn
    before = _snapshot(layer)
    weight = _dequantized(layer)
    l = layer.ia3_l["default"].detach().reshape(-1).float()
    x = torch.randn(5, 128, device=DEVICE)
    with torch.no_grad():
        unmerged = layer(x)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an exact fold warns of nothing
            layer.merge()
        assert layer.merged
        torch.testing.assert_close(_dequantized(layer), weight * l[:, None], rtol=1e-6, atol=0)
        # The merged base through the fused op with unit scaling: what the unmerged layer gave.
        base = layer.get_base_layer()
        ones = torch.ones_like(l)
        if fmt == "int8":
            from ia3.bnb import int8_weight
            merged = ia3_kernels.ia3_linear_int8(x, *int8_weight(base), base.bias, ones, False)
        else:
            merged = ia3_kernels.ia3_linear_4bit(
                x, FourBitWeight.from_bnb(base.weight.data, base.weight.quant_state), base.bias,
                ones, False)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    assert not layer.merged
    for a, b in zip(before, _snapshot(layer)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "not-kept"])
@pytest.mark.parametrize("fmt,quant", FORMATS, ids=["int8", "nf4-nested", "nf4", "fp4"])
def test_feedforward_merge_requantizes_with_a_measured_warning(triton_backend, fmt, quant, keep):
    model = _model(fmt, **quant)
    layer = model.base_model.model.ff
    before = _snapshot(layer)
    exact = _dequantized(layer) * layer.ia3_l["default"].detach().reshape(1, -1).float()
    with pytest.warns(UserWarning, match=r"re-quantizes the weight .* relative error of the merged "
                                         r"weight against the exact product: (\S+)") as record:
        layer.merge(keep_original=keep)
    stated = float(str(record[0].message).rsplit(": ", 1)[1])
    measured = ((_dequantized(layer) - exact).norm() / exact.norm()).item()
    assert stated == pytest.approx(measured, rel=1e-2)
    assert measured < (0.01 if fmt == "int8" else 0.15)
    if keep:
        layer.unmerge()
        for a, b in zip(before, _snapshot(layer)):
            assert torch.equal(a, b)
    else:
        with pytest.warns(UserWarning, match="unmerge re-quantizes"):
            layer.unmerge()
        assert not layer.merged


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_merge_and_unload_quantized_llama(triton_backend, fmt):
    """PEFT raises "Cannot merge ia3 layers when the model is loaded in 8-bit/4-bit mode"; with
    fused layers the merged model's logits stay those of the adapted model (attention layers
    exactly, the feedforward one within its re-quantization error)."""
    if fmt == "nf4" and DEVICE == "cpu":
        pytest.skip("after unload bnb's own CPU 4-bit kernel runs k_proj, and it needs "
                    "out_features % 32 == 0 (16 here); runs on the GPU")
    torch.manual_seed(0)
    base, config = llama()
    skip = ("lm_head", "q_proj", "o_proj", "gate_proj", "up_proj")  # see test_mixed_layers
    base = to_int8(base.to(DEVICE), skip=skip) if fmt == "int8" else to_4bit(base.to(DEVICE),
                                                                             skip=skip)
    model = randomize_ia3(ia3.fuse(get_peft_model(base, config))).eval()
    ids = torch.randint(1, 96, (2, 6), device=DEVICE)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with pytest.warns(UserWarning, match="re-quantizes"):
            merged_model = model.merge_and_unload()
        assert not any(isinstance(m, ia3.FUSED_CLASSES[k]) for m in merged_model.modules()
                       for k in ia3.FUSED_CLASSES)
        merged = merged_model(input_ids=ids).logits
    assert ((merged - adapted).norm() / adapted.norm()).item() < 0.05


def test_merged_layer_forward_uses_the_merged_base(triton_backend):
    """After merge() the fused bnb layer calls the base (PEFT's bnb wrappers would scale again);
    disabling adapters unmerges first, as PEFT's dense layers do."""
    model = _model("nf4")
    layer = model.base_model.model.attn
    x = torch.randn(3, 128, device=DEVICE)
    with torch.no_grad():
        adapted = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), adapted, rtol=2e-2, atol=2e-2)
        with model.disable_adapter():
            plain = layer(x)
        assert not layer.merged
        torch.testing.assert_close(plain, layer.get_base_layer()(x))


def test_merging_twice_raises(triton_backend):
    model = _model("int8")
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    layer = model.base_model.model.attn
    layer.merge(adapter_names=["default"])
    with pytest.raises(ValueError, match="in one call"):
        layer.merge(adapter_names=["other"])
