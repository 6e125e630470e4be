"""Bad input to every fused layer kind (dense, Conv2d, LLM.int8, NF4) gets an error that names
the layer, what it expected and what came, before any kernel launches; inputs the kernels do not
cover (float64 compute) take the reference path with one warning, or fail in strict mode."""
import pytest
import torch
from peft import IA3Config, get_peft_model
from torch import nn

import ia3
import ia3_kernels
from conftest import DEVICE
from helpers import peft_and_fused, to_4bit, to_int8
from test_conv import conv_models


def bnb_layer(kind):
    pytest.importorskip("bitsandbytes")
    base = nn.Sequential(nn.Linear(40, 24))
    base = to_int8(base) if kind == "int8" else to_4bit(base, compute_dtype=torch.float32)
    model = get_peft_model(base, IA3Config(target_modules=["0"], feedforward_modules=["0"]))
    return ia3.fuse(model).base_model.model[0]


# kind -> (layer builder, a good input shape, the layer's name in messages, wrong-size input)
KINDS = {
    "dense": (lambda: peft_and_fused()[1].base_model.model.ff, (3, 40),
              r"ia3.Linear\(Linear 40->24, feedforward", (3, 41),
              "x's last dimension must be in_features=40"),
    "conv2d": (lambda: conv_models()[1].base_model.model.stem, (2, 3, 8, 8),
               r"ia3.Conv2d\(3->8, kernel \(3, 3\), groups 1, attention", (2, 4, 8, 8),
               r"x must be \(N, 3, 2 spatial dims\)"),
    "int8": (lambda: bnb_layer("int8"), (3, 40), r"ia3.Linear8bitLt\(40->24, feedforward",
             (3, 41), "x's last dimension must be in_features=40"),
    "nf4": (lambda: bnb_layer("nf4"), (3, 40), r"ia3.Linear4bit\(40->24, feedforward", (3, 41),
            "x's last dimension must be in_features=40"),
}


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test."""
    from ia3_kernels import conv, dense, small_m

    def refuse(*args, **kwargs):
        raise AssertionError("a kernel was launched")
    monkeypatch.setitem(dense._KERNELS, False, (type("K", (), {"__getitem__": refuse})(),) * 2)
    # A launch plan replays the kernel without looking it up in _KERNELS (CUDA only).
    monkeypatch.setattr(dense, "_PLANS_ENABLED", False)
    monkeypatch.setitem(small_m._KERNELS, False, type("K", (), {"__getitem__": refuse})())
    monkeypatch.setitem(small_m._GEMV_KERNELS, False, type("K", (), {"__getitem__": refuse})())
    monkeypatch.setattr(conv, "_WEIGHT_KERNEL", type("K", (), {"__getitem__": refuse})())


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bad_input_names_the_layer_before_any_launch(triton_backend, no_launch, kind, strict):
    build, shape, name, wrong_shape, wrong_message = KINDS[kind]
    layer = build()
    ia3_kernels.set_strict(strict)
    with pytest.raises(ValueError, match=f"{name}.*{wrong_message}"):
        layer(torch.randn(wrong_shape, device=DEVICE))
    with pytest.raises(ValueError, match=f"{name}.*all tensors must be on one device, got "
                                         r"\{'x': device\(type='meta'\)"):
        layer(torch.randn(shape, device="meta"))
    with pytest.raises(TypeError, match=f"{name}.*x must be a floating-point tensor, got "
                                        "torch.int64"):
        layer(torch.randint(0, 3, shape, device=DEVICE))


@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_float64_input_on_a_float32_layer_is_a_dtype_error(triton_backend, no_launch, kind):
    """As nn.Linear / nn.Conv2d refuse it, but naming the layer (before: the reference's bare
    'mat1 and mat2 must have the same dtype')."""
    build, shape, name, _, _ = KINDS[kind]
    with pytest.raises(TypeError, match=f"{name}.*x is torch.float64 but weight is "
                                        "torch.float32; nn.(Linear|Conv) needs them equal"):
        build()(torch.randn(shape, dtype=torch.float64, device=DEVICE))


def test_int8_layer_in_float64_falls_back_once_or_fails_in_strict_mode(triton_backend):
    """bnb's int8 layer computes in x's dtype; the kernels cover 16/32-bit floats only."""
    layer = bnb_layer("int8")
    x = torch.randn(3, 40, dtype=torch.float64, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="int8 layer computing in torch.float64"):
        y = layer(x)
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
    ia3_kernels.set_strict(True)
    with pytest.raises(ia3_kernels.IA3FallbackError, match="int8 layer computing in torch.float64"):
        layer(x)


def test_nf4_layer_computes_float64_input_in_its_compute_dtype(triton_backend):
    """bnb's Linear4bit casts x to its compute dtype (float32 here) and returns x's dtype: the
    kernels run (no fallback, so strict mode is fine) and the result is float64."""
    layer = bnb_layer("nf4")
    ia3_kernels.set_strict(True)
    y = layer(torch.randn(3, 40, dtype=torch.float64, device=DEVICE))
    assert y.dtype == torch.float64 and torch.isfinite(y).all()


@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_description_is_formatted_only_for_an_error(triton_backend, kind):
    """The checks name the layer lazily: formatting its description (shape, active adapters) on
    every call cost ~3-9 us of host time a forward (dense._Caller)."""
    build, shape, name, wrong_shape, wrong_message = KINDS[kind]
    layer = build()
    calls = []
    real = layer._describe

    def describe():
        calls.append(1)
        return real()
    layer._describe = describe
    layer(torch.randn(shape, device=DEVICE))
    assert calls == []
    with pytest.raises(ValueError, match=f"{name}.*{wrong_message}"):
        layer(torch.randn(wrong_shape, device=DEVICE))
    assert calls  # the same hook is what names the layer in the error
