"""patch_peft / fuse / unfuse, and adapter files interchangeable with stock PEFT."""
import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.ia3 import layer as peft_layer
from peft.tuners.ia3 import model as peft_model_mod

import ia3
from conftest import DEVICE
from helpers import TinyNet, ia3_config, randomize_ia3


def layer_types(model):
    return {type(m) for m in model.modules() if isinstance(m, peft_layer.Linear)}


def test_patch_and_unpatch():
    try:
        ia3.patch_peft()
        ia3.patch_peft()  # idempotent
        assert layer_types(get_peft_model(TinyNet(), ia3_config())) == {ia3.Linear}
    finally:
        ia3.unpatch_peft()
    ia3.unpatch_peft()
    assert peft_model_mod.Linear is peft_layer.Linear
    assert layer_types(get_peft_model(TinyNet(), ia3_config())) == {peft_layer.Linear}


def test_patched_context_restores_and_nests():
    with ia3.patched_peft():
        with ia3.patched_peft():
            assert peft_model_mod.Linear is ia3.Linear
        assert peft_model_mod.Linear is ia3.Linear
        model = get_peft_model(TinyNet(), ia3_config())
    assert peft_model_mod.Linear is peft_layer.Linear
    assert layer_types(model) == {ia3.Linear}


def test_fuse_in_place_twice_and_unfuse():
    model = get_peft_model(TinyNet(), ia3_config())
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert ia3.fuse(model) is model
    ia3.fuse(model)
    assert layer_types(model) == {ia3.Linear}
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # no copies
    assert list(model.state_dict()) == keys
    assert ia3.unfuse(model) is model
    assert layer_types(model) == {peft_layer.Linear}


@pytest.mark.parametrize("direction", ["fused_to_stock", "stock_to_fused"])
def test_save_load_interchangeable(tmp_path, triton_backend, direction):
    torch.manual_seed(0)
    base = TinyNet().to(DEVICE)
    source = randomize_ia3(get_peft_model(copy.deepcopy(base), ia3_config()))
    if direction == "fused_to_stock":
        ia3.fuse(source)
    source.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    if direction == "fused_to_stock":
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert layer_types(loaded) == {peft_layer.Linear}
    else:
        with ia3.patched_peft():
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert layer_types(loaded) == {ia3.Linear}
    assert list(loaded.state_dict()) == list(source.state_dict())
    x = torch.randn(4, 24, device=DEVICE)
    torch.testing.assert_close(loaded(x), source(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["fused_to_stock", "stock_to_fused"])
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_save_load_interchangeable(tmp_path, triton_backend, quant, direction):
    """The same with bitsandbytes bases: the adapter file (safetensors) of a fused model loads
    into stock PEFT's bnb wrappers and the reverse: same keys, the vectors bit for bit, and a
    fused model loaded from a stock file gives the source's outputs exactly."""
    pytest.importorskip("bitsandbytes")
    from helpers import to_4bit, to_int8

    def base():
        torch.manual_seed(0)  # the same random weights, quantized the same way, every call
        # The converters quantize the Linear layers on DEVICE; the rest of TinyNet follows.
        return (to_int8(TinyNet()) if quant == "int8" else to_4bit(TinyNet())).to(DEVICE)

    config = ia3_config(target_modules=["q", "k", "ff"], feedforward_modules=["ff"])
    source = randomize_ia3(get_peft_model(base(), config))
    if direction == "fused_to_stock":
        ia3.fuse(source)
    source.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    fused_types = {ia3.Linear8bitLt if quant == "int8" else ia3.Linear4bit}
    if direction == "fused_to_stock":
        loaded = PeftModel.from_pretrained(base(), tmp_path)
        assert not {type(m) for m in loaded.modules()} & fused_types
    else:
        with ia3.patched_peft():
            loaded = PeftModel.from_pretrained(base(), tmp_path)
        assert {type(m) for m in loaded.modules()} & fused_types
    assert list(loaded.state_dict()) == list(source.state_dict())
    loaded_vectors = {k: v for k, v in loaded.state_dict().items() if "ia3_l" in k}
    for name, v in source.state_dict().items():
        if "ia3_l" in name:
            assert torch.equal(loaded_vectors[name], v), name  # carried bit for bit
    x = torch.randn(4, 24, device=DEVICE)
    if direction == "stock_to_fused":  # the fused model equals the source fused in place
        torch.testing.assert_close(loaded(x), ia3.fuse(source)(x), rtol=0, atol=0)
    elif quant == "int8" or DEVICE == "cuda":  # stock PEFT runs the loaded adapter
        # (bnb 0.50.2's CPU 4-bit matmul asserts "N must be divisible by block_n" on this
        # freshly loaded 24-wide layer: a bnb CPU limitation, so NF4 runs it on the GPU only.)
        assert torch.isfinite(loaded(x).float()).all()
