"""ia3.Linear against PEFT's Linear: outputs, gradients and every piece of layer state."""
import pytest
import torch

import ia3
from conftest import DEVICE
from helpers import add_random_adapter, ia3_config, ia3_grads, peft_and_fused, randomize_ia3
from peft.tuners.ia3 import layer as peft_layer

TOL = dict(rtol=1e-5, atol=1e-5)


def inputs(seed=1, shape=(3, 5, 24)):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return x.requires_grad_()


def fwd_bwd(model, x):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().mean().backward()
    return y.detach(), x.grad, ia3_grads(model)


def assert_same_training_signal(peft_model, fused_model, x):
    y_p, dx_p, g_p = fwd_bwd(peft_model, x)
    y_f, dx_f, g_f = fwd_bwd(fused_model, x)
    torch.testing.assert_close(y_f, y_p, **TOL)
    torch.testing.assert_close(dx_f, dx_p, **TOL)
    assert g_f.keys() == g_p.keys() and g_p
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name], **TOL, msg=name)


def test_fused_layers_are_peft_subclasses():
    _, fused = peft_and_fused()
    layers = [m for m in fused.modules() if isinstance(m, peft_layer.Linear)]
    assert len(layers) == 4 and all(type(m) is ia3.Linear for m in layers)
    assert {m.fan_in_fan_out for m in layers} == {True, False}  # Conv1D and nn.Linear


def test_matches_peft(triton_backend, kernel_calls):
    peft_model, fused = peft_and_fused()
    assert_same_training_signal(peft_model, fused, inputs())
    assert len(kernel_calls) == 4  # every fused layer ran the kernels


def test_several_active_adapters(triton_backend):
    peft_model, fused = peft_and_fused()
    for model in (peft_model, fused):
        model.add_adapter("second", ia3_config(target_modules=["q", "ff"], feedforward_modules=["ff"]))
        randomize_ia3(model, seed=7)
        # The layers k and proj lack "second": PEFT skips it there, and so must we.
        model.base_model.set_adapter(["default", "second"])
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.requires_grad_(True)
    assert_same_training_signal(peft_model, fused, inputs())
    g = ia3_grads(fused)
    assert any(".second" in n for n in g) and any(".default" in n for n in g)


def test_set_adapter_switches_vectors(triton_backend):
    peft_model, fused = peft_and_fused()
    add_random_adapter((peft_model, fused), "other", seed=3)
    x = inputs()
    torch.testing.assert_close(fused(x), peft_model(x), **TOL)
    fused.set_adapter("default")
    peft_model.set_adapter("default")
    torch.testing.assert_close(fused(x), peft_model(x), **TOL)


def test_disable_adapters(triton_backend):
    peft_model, fused = peft_and_fused()
    x = inputs()
    with fused.disable_adapter(), peft_model.disable_adapter():
        y_f, y_p = fused(x), peft_model(x)
        torch.testing.assert_close(y_f, fused.get_base_model()(x), rtol=0, atol=0)
    torch.testing.assert_close(y_f, y_p, **TOL)
    assert not torch.allclose(fused(x), y_f)  # adapters back on


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge(triton_backend, safe_merge):
    peft_model, fused = peft_and_fused()
    x = inputs()
    y_adapted = fused(x).detach()
    for model in (peft_model, fused):
        for layer in model.modules():
            if isinstance(layer, peft_layer.Linear):
                layer.merge(safe_merge=safe_merge)
    assert all(m.merged for m in fused.modules() if isinstance(m, ia3.Linear))
    torch.testing.assert_close(fused(x), peft_model(x), **TOL)
    torch.testing.assert_close(fused(x), y_adapted, rtol=1e-4, atol=1e-5)
    with pytest.warns(UserWarning, match="inaccurate"):
        fused.unmerge_adapter()
    peft_model.unmerge_adapter()
    assert not any(m.merged for m in fused.modules() if isinstance(m, ia3.Linear))
    torch.testing.assert_close(fused(x), peft_model(x), **TOL)


def test_add_weighted_adapter(triton_backend):
    peft_model, fused = peft_and_fused()
    for model in (peft_model, fused):
        model.add_adapter("b", ia3_config())
        randomize_ia3(model, seed=5)
        model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "mix")
        model.set_adapter("mix")
    assert any(type(m) is ia3.Linear and "mix" in m.ia3_l for m in fused.modules())
    assert_same_training_signal(peft_model, fused, inputs())


def test_delete_adapter(triton_backend):
    peft_model, fused = peft_and_fused()
    add_random_adapter((peft_model, fused), "b", seed=5)
    for model in (peft_model, fused):
        model.delete_adapter("default")
    assert not any("default" in n for n, _ in fused.named_parameters())
    assert_same_training_signal(peft_model, fused, inputs())


@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_unload(triton_backend, how):
    peft_model, fused = peft_and_fused()
    x = inputs()
    base_p = getattr(peft_model, how)()
    base_f = getattr(fused, how)()
    assert not any(isinstance(m, peft_layer.Linear) for m in base_f.modules())
    torch.testing.assert_close(base_f(x), base_p(x), **TOL)


def test_base_layer_with_hook_falls_back_to_peft_once(triton_backend):
    peft_model, fused = peft_and_fused()
    layer = fused.base_model.model.q
    calls = []
    layer.base_layer.register_forward_hook(lambda *a: calls.append(1))
    x = inputs()
    with pytest.warns(RuntimeWarning, match="forward hooks"):
        y = fused(x)
    assert calls, "the base layer's hook must still run"
    torch.testing.assert_close(y, peft_model(x), **TOL)
    ia3.set_strict(True)
    with pytest.raises(ia3.IA3FallbackError, match="forward hooks"):
        fused(x)


@pytest.mark.parametrize("how", ["argument", "switch"])
def test_merge_keep_original_unmerges_bit_for_bit(triton_backend, how):
    _, fused = peft_and_fused()
    layers = [m for m in fused.modules() if isinstance(m, ia3.Linear)]
    before = [(m.get_base_layer().weight.clone(), None if m.get_base_layer().bias is None
               else m.get_base_layer().bias.clone()) for m in layers]
    keys = list(fused.state_dict())
    x = inputs()
    y_adapted = fused(x).detach()
    try:
        if how == "switch":
            ia3.set_keep_original_on_merge(True)
        for m in layers:
            m.merge(keep_original=True if how == "argument" else None)
    finally:
        ia3.set_keep_original_on_merge(False)
    assert all(m.merged for m in layers)
    assert list(fused.state_dict()) == keys  # the kept copies are not state
    torch.testing.assert_close(fused(x), y_adapted, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(m.get_base_layer().weight, w) for m, (w, _) in zip(layers, before))
    for m in layers:
        m.unmerge()
    for m, (w, b) in zip(layers, before):
        assert not m.merged
        assert torch.equal(m.get_base_layer().weight, w)
        assert b is None or torch.equal(m.get_base_layer().bias, b)
        assert "ia3_original_weight" not in m._buffers
    torch.testing.assert_close(fused(x), y_adapted, rtol=0, atol=0)


def test_merge_without_keep_original_is_peft_approximate_unmerge(triton_backend):
    _, fused = peft_and_fused()
    layer = next(m for m in fused.modules() if isinstance(m, ia3.Linear))
    weight = layer.get_base_layer().weight.clone()
    layer.merge()
    assert "ia3_original_weight" not in layer._buffers
    with pytest.warns(UserWarning, match="inaccurate"):
        layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, weight, rtol=1e-5, atol=1e-6)


def test_bad_input_error_names_the_layer(triton_backend, kernel_calls):
    _, fused = peft_and_fused()
    layer = fused.base_model.model.ff
    with pytest.raises(ValueError, match=r"ia3.Linear\(Linear 40->24, feedforward, active adapters "
                                         r"\['default'\]\): x's last dimension must be in_features=40"):
        layer(torch.randn(3, 39, device=DEVICE))
    with pytest.raises(ValueError, match=r"ia3.Linear\(Linear 40->24.*all tensors must be on one "
                                         r"device, got \{'x': device\(type='meta'\)"):
        layer(torch.randn(3, 40, device="meta"))
    assert len(kernel_calls) == 0


@pytest.mark.parametrize("call", [
    lambda m: m.base_model.set_adapter("nope"),
    lambda m: m.base_model.set_adapter(["default", "nope"]),
    lambda m: m.merge_adapter(["nope"]),
    lambda m: m.merge_and_unload(adapter_names=["nope"]),
], ids=["set_adapter", "set_adapter-list", "merge_adapter", "merge_and_unload"])
def test_unknown_adapter_names_are_errors_on_fused_models(triton_backend, call):
    """Stock PEFT accepts these names and silently uses none of them (the model then runs, or
    is merged, with no IA3 at all); with our layers they raise, naming the known adapters."""
    peft_model, fused = peft_and_fused()
    call(peft_model)  # PEFT's own layers: no error, PEFT's behaviour is kept
    with pytest.raises(ValueError, match=r"adapter\(s\) \['nope'\] not found; this model's IA3 "
                                         r"adapters are \['default'\]"):
        call(fused)
    # Nothing changed: the fused model still runs its adapter.
    assert fused.active_adapters == ["default"] and not any(
        getattr(m, "merged_adapters", None) for m in fused.modules())
