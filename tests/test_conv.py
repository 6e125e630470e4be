"""IA3 convolutions: the op against the float64 reference and PEFT's own arithmetic (every conv
setting: stride, padding incl. 'same' and the non-zero modes, dilation, groups and depthwise,
bias, NCHW and channels_last, Conv2d and Conv3d), forward and every gradient; zeros in l; bad
input; the fused layers against PEFT's (adapters, merge, disable, save/load, training)."""
import copy

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from torch import nn

import ia3
import ia3_kernels
from conftest import DEVICE, assert_within_peft_bar, count_calls
from helpers import ia3_grads, randomize_ia3

# (weight shape (C_out, C_in, *k), conv kwargs). C_in/C_out and spatial sizes off any block.
CONV2D_CASES = {
    "3x3": ((12, 10, 3, 3), dict(padding=1)),
    "stride2-dil2-grouped-reflect": ((12, 10, 3, 3), dict(stride=2, padding=2, dilation=2, groups=2,
                                                         padding_mode="reflect")),
    "depthwise-same": ((10, 10, 3, 3), dict(padding="same", groups=10)),
    "asym-same-2x3": ((6, 10, 2, 3), dict(padding="same")),
    "circular-rect": ((12, 10, 3, 1), dict(stride=(1, 2), padding=(1, 0), padding_mode="circular")),
    "1x1-valid": ((24, 10, 1, 1), dict(padding="valid")),
}
CONV3D_CASES = {
    "3x3x3": ((6, 4, 3, 3, 3), dict(padding=1)),
    "1x3x3-s122-g2-replicate": ((6, 4, 1, 3, 3), dict(stride=(1, 2, 2), padding=(0, 1, 1), groups=2,
                                                      padding_mode="replicate")),
}
SPATIAL = {4: (9, 7), 5: (3, 6, 5)}


def make_case(case, feedforward, has_bias, dtype, channels_last, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    wshape, conv_kwargs = CASES[case]
    c_out, c_in_pg = wshape[:2]
    conv_kwargs = dict(conv_kwargs)
    groups = conv_kwargs.get("groups", 1)
    c_in = c_in_pg * groups
    x = torch.randn(batch, c_in, *SPATIAL[len(wshape)], generator=g)
    fan_in = c_in_pg * int(torch.tensor(wshape[2:]).prod())
    w = torch.randn(wshape, generator=g) / fan_in**0.5
    b = torch.randn(c_out, generator=g) if has_bias else None
    n = c_in if feedforward else c_out
    scale = (torch.rand(n, generator=g) + 0.5).view(1, n, *([1] * (len(wshape) - 2)))
    x, w = x.to(DEVICE, dtype), w.to(DEVICE, dtype)
    if channels_last:
        fmt = torch.channels_last if len(wshape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    b = b.to(DEVICE, dtype) if b is not None else None
    return x, w, b, scale.to(DEVICE), conv_kwargs


CASES = {**CONV2D_CASES, **CONV3D_CASES}


def run(fn, x, w, b, scale, feedforward, kwargs, dy=None, weight_grad=False):
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    w = w.detach().clone().requires_grad_(weight_grad)
    y = fn(x, w, b, scale, feedforward, **kwargs)
    if dy is None:  # in y's memory format, as autograd hands it over
        from ia3_kernels.conv import _memory_format

        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
        dy = dy.contiguous(memory_format=_memory_format(y))
    inputs = [x, scale] + ([b] if b is not None else []) + ([w] if weight_grad else [])
    grads = torch.autograd.grad(y, inputs, dy.to(y.dtype))
    return y, grads, dy


def check(x, w, b, scale, feedforward, kwargs, dtype, weight_grad=False, fn=None):
    y, grads, dy = run(fn or ia3_kernels.ia3_conv, x, w, b, scale, feedforward, kwargs,
                       weight_grad=weight_grad)
    y_peft, grads_peft, _ = run(ia3_kernels.torch_ia3_conv, x, w, b, scale, feedforward, kwargs,
                                dy, weight_grad)
    f64 = [t.double() if t is not None else None for t in (x, w, b, scale)]
    y_ref, grads_ref, _ = run(ia3_kernels.torch_ia3_conv, *f64, feedforward, kwargs, dy.double(),
                              weight_grad)
    absolute = [t.abs() if t is not None else None for t in f64]
    y_abs, grads_abs, _ = run(ia3_kernels.torch_ia3_conv, *absolute, feedforward, kwargs,
                              dy.double().abs(), weight_grad)
    assert y.dtype == x.dtype and y.shape == y_peft.shape
    assert_within_peft_bar(y, y_peft, y_ref, dtype, "y", y_abs)
    names = ["dx", "dscale"] + (["dbias"] if b is not None else []) + (["dweight"] if weight_grad else [])
    for name, g, gp, gr, ga in zip(names, grads, grads_peft, grads_ref, grads_abs):
        assert g.shape == gp.shape and g.dtype == gp.dtype, name
        assert_within_peft_bar(g, gp, gr, dtype, name, ga)
    return y, grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(CONV2D_CASES) + list(CONV3D_CASES))
def test_matches_reference(triton_backend, case, dtype, feedforward, channels_last):
    has_bias = case != "1x1-valid"
    x, w, b, scale, kwargs = make_case(case, feedforward, has_bias, dtype, channels_last)
    check(x, w, b, scale, feedforward, kwargs, dtype)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_weight_and_bias_gradients(triton_backend, feedforward):
    """A trainable base (weight and bias) gets PEFT's gradients through the folded weight."""
    x, w, b, scale, kwargs = make_case("3x3", feedforward, True, torch.float32, False)
    check(x, w, b, scale, feedforward, kwargs, torch.float32, weight_grad=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_zero_entries_of_l_get_exact_gradients(triton_backend, feedforward, case):
    """Attention dl comes from sum(dy*y)/l; where l == 0, y keeps no trace of u and a direct
    convolution of those channels (found on the device) gives dl = sum(dy*u), not 0 or NaN:
    every conv geometry, channels_last for the 3x3 case."""
    x, w, b, scale, kwargs = make_case(case, feedforward, True, torch.float32, case == "3x3")
    scale = scale.clone()
    zeros = [0, scale.numel() - 1, scale.numel() // 2]  # first, last and a middle channel
    scale.view(-1)[zeros] = 0.0
    _, grads = check(x, w, b, scale, feedforward, kwargs, torch.float32)
    dscale = grads[1].view(-1)
    assert torch.isfinite(dscale).all()
    assert (dscale[zeros].abs() > 1e-3).all()  # a real gradient where l == 0


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_dl_kernel_divides_by_l_or_sums_exact_terms_of_zero_and_nonfinite_channels(triton_backend,
                                                                                feedforward):
    """The dl kernel returns sum(src * aux) / l where l is finite and non-zero, and the exact dl
    where l is 0, inf or NaN (feedforward sum(x * (dy conv^T W)), attention
    sum(dy * conv(x, W, b))), against PyTorch: 150 channels (several channel blocks), stride 2,
    padding, two groups, the pixels split over several programs; NaN planted in src and aux at
    the special channels (what l = inf or NaN leaves there) must not leak into their dl."""
    from ia3_kernels import conv

    g = torch.Generator().manual_seed(3)
    c_in = 150 if feedforward else 6
    c_out = 6 if feedforward else 150
    x = torch.randn(2, c_in, 24, 12, generator=g).requires_grad_()
    w = torch.randn(c_out, c_in // 2, 3, 3, generator=g) / 30
    b = torch.randn(c_out, generator=g)
    scale = torch.rand(150, generator=g) + 0.5
    geometry = ((2, 1), (1, 1), (1, 1), 2)
    u = torch.nn.functional.conv2d(x, w, b, stride=(2, 1), padding=1, groups=2)
    dy = torch.randn(u.shape, generator=g)
    if feedforward:
        (grad_x,) = torch.autograd.grad(u, x, dy)
        exact = (x * grad_x).sum((0, 2, 3))
        src, aux = torch.randn(x.shape, generator=g), x.detach().clone()
    else:
        exact = (dy * u).sum((0, 2, 3))
        src, aux = dy.clone(), torch.randn(u.shape, generator=g)
    x, exact = x.detach().to(DEVICE), exact.detach().to(DEVICE)
    dy, w, b, scale = dy.to(DEVICE), w.to(DEVICE), b.to(DEVICE), scale.to(DEVICE)
    src, aux = src.to(DEVICE), aux.to(DEVICE)
    grid = conv._dl_layout(src, aux, dy, x, w, feedforward, True, geometry)[2]
    assert grid[0] > 1 and grid[1] > 1  # pixels over several programs, several channel blocks
    quotient = (src * aux).sum((0, 2, 3)) / scale
    got = conv._dscale(src, aux, dy, x, w, b, scale, feedforward, geometry)
    torch.testing.assert_close(got, quotient, rtol=1e-5, atol=1e-4)
    scale[[0, 74]] = 0.0
    scale[127], scale[128], scale[149] = float("inf"), float("nan"), -float("inf")
    special = (scale == 0) | ~torch.isfinite(scale)
    src[:, special], aux[:, special] = float("nan"), float("nan")
    got = conv._dscale(src, aux, dy, x, w, b, scale, feedforward, geometry)
    torch.testing.assert_close(got[special], exact[special], rtol=1e-5, atol=1e-5)
    quotient = (src * aux).sum((0, 2, 3)) / scale
    torch.testing.assert_close(got[~special], quotient[~special], rtol=1e-5, atol=1e-4)


# (weight shape, groups): 3x3 with 150 input channels a group (two channel blocks of the fold's
# 128-wide tiles), 9x9 (81 taps: two tap blocks of 64), a grouped 3-D kernel, a 1-D kernel,
# 1x1 and an empty weight.
FOLD_CASES = [((6, 150, 3, 3), 1), ((4, 6, 9, 9), 2), ((6, 4, 3, 3, 3), 3), ((5, 7, 3), 1),
              ((8, 12, 1, 1), 4), ((0, 3, 3, 3), 1)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("wshape,groups", FOLD_CASES, ids=[str(c[0]) for c in FOLD_CASES])
def test_weight_fold_is_the_product_rounded_once(triton_backend, wshape, groups, dtype,
                                                 feedforward, layout):
    """scale_conv_weight against (W * l in fp32).to(dtype), bit for bit: every output channel's
    tile, both storage orders, group-aware input channels, bias for attention; the result keeps
    the weight's memory format."""
    from ia3_kernels import conv

    g = torch.Generator().manual_seed(0)
    w = torch.randn(wshape, generator=g).to(DEVICE, dtype)
    if layout == "channels_last":
        if w.dim() == 3:
            pytest.skip("no channels_last format for 1-D kernels")
        w = w.contiguous(memory_format=torch.channels_last if w.dim() == 4
                         else torch.channels_last_3d)
    c_out, in_pg = wshape[:2]
    n = in_pg * groups if feedforward else c_out
    scale = (torch.rand(n, generator=g) * 3 - 1).to(DEVICE)
    bias = torch.randn(c_out, generator=g).to(DEVICE, dtype)
    got, got_bias = conv.scale_conv_weight(w, scale, feedforward, groups, bias)
    if feedforward:
        assert got_bias is None
    else:
        assert torch.equal(got_bias, (bias.float() * scale).to(dtype))
    assert got.stride() == w.stride()
    # The PyTorch twin (torch.compile's fold): the product in l's dtype (fp32), rounded once.
    assert torch.equal(got, conv._fold_weight_torch(w, scale, feedforward, groups))


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_odd_inputs(triton_backend, feedforward):
    """Unbatched input, an empty batch and a non-contiguous slice of a larger tensor."""
    x, w, b, scale, kwargs = make_case("3x3", feedforward, True, torch.float32, False,
                                       batch=3)
    check(x[1], w, b, scale, feedforward, kwargs, torch.float32)  # (C, H, W)
    check(x[:0], w, b, scale, feedforward, kwargs, torch.float32)
    wide = torch.randn(3, 20, 9, 14, device=DEVICE)
    check(wide[:, ::2, :, ::2], w, b, scale, feedforward, kwargs, torch.float32)
    check(wide[:, 3:13, :, :7], w, b, scale, feedforward, kwargs, torch.float32)  # H, W unflattenable


def test_backend_torch_runs_the_reference_and_kernels_differ_from_it(triton_backend, monkeypatch):
    """The kernel path is taken (its weight kernel runs) on the triton backend, not on torch."""
    from ia3_kernels import conv

    calls = count_calls(monkeypatch, conv, "scale_conv_weight")
    x, w, b, scale, kwargs = make_case("3x3", True, True, torch.float32, False)
    ia3_kernels.ia3_conv(x, w, b, scale, True, **kwargs)
    assert len(calls) == 1
    ia3_kernels.set_backend("torch")
    ia3_kernels.ia3_conv(x, w, b, scale, True, **kwargs)
    assert len(calls) == 1


def test_bad_input_is_refused_before_any_launch(triton_backend):
    x, w, b, scale, kwargs = make_case("3x3", True, True, torch.float32, False)
    with pytest.raises(ValueError, match="needs 10 scaling values"):
        ia3_kernels.ia3_conv(x, w, b, torch.ones(12, device=DEVICE), True, **kwargs)
    with pytest.raises(ValueError, match="needs 12 scaling values"):
        ia3_kernels.ia3_conv(x, w, b, torch.ones(10, device=DEVICE), False, **kwargs)
    with pytest.raises(ValueError, match="x must be"):
        ia3_kernels.ia3_conv(x[:, :5], w, b, scale, True, **kwargs)
    with pytest.raises(ValueError, match="bias must have"):
        ia3_kernels.ia3_conv(x, w, b[:3], scale, True, **kwargs)
    with pytest.raises(ValueError, match="groups=5 must divide"):
        ia3_kernels.ia3_conv(x, w, b, scale, True, groups=5)
    with pytest.raises(TypeError, match="x is torch.float16 but weight is torch.float32; nn.Conv"):
        ia3_kernels.ia3_conv(x.half(), w, b, scale, True, **kwargs)
    with pytest.raises(TypeError, match="floating-point"):
        ia3_kernels.ia3_conv(x, w, b, scale.int(), True, **kwargs)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class TinyConvNet(nn.Module):
    """stem (attention: output scaled), depthwise and grouped convs (feedforward, input scaled),
    and a Conv3d over a stack of the feature maps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grp = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4, padding_mode="reflect")
        self.vid = nn.Conv3d(1, 4, (2, 3, 3), padding=(0, 1, 1), bias=False)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.grp(self.dw(h)))  # (N, 12, 4, 4)
        return self.vid(h.unsqueeze(1)).flatten(1)


def conv_config(**kwargs):
    kwargs.setdefault("target_modules", ["stem", "dw", "grp", "vid"])
    kwargs.setdefault("feedforward_modules", ["dw", "grp"])
    return IA3Config(**kwargs)


def conv_models(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    base = TinyConvNet().to(DEVICE, dtype)
    peft_model = randomize_ia3(get_peft_model(base, conv_config()), seed)
    return peft_model, ia3.fuse(copy.deepcopy(peft_model))


def conv_input(dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 8, 8, generator=g).to(DEVICE, dtype)


def test_fuse_builds_conv_subclasses_and_patch_peft_too():
    peft_model, fused = conv_models()
    assert isinstance(fused.base_model.model.stem, ia3.Conv2d)
    assert isinstance(fused.base_model.model.vid, ia3.Conv3d)
    assert isinstance(fused.base_model.model.vid, type(peft_model.base_model.model.vid))
    with ia3.patched_peft():
        built = get_peft_model(TinyConvNet(), conv_config())
    assert isinstance(built.base_model.model.grp, ia3.Conv2d)
    assert set(built.state_dict()) == set(peft_model.state_dict())


def test_layers_match_peft_forward_and_gradients(triton_backend, monkeypatch):
    from ia3_kernels import conv

    calls = count_calls(monkeypatch, conv, "conv_forward_impl")
    peft_model, fused = conv_models()
    x = conv_input()
    y_peft, y = peft_model(x), fused(x)
    assert len(calls) == 4  # every conv went through the fused op
    torch.testing.assert_close(y, y_peft, rtol=1e-4, atol=1e-5)
    y_peft.square().sum().backward()
    y.square().sum().backward()
    grads, grads_peft = ia3_grads(fused), ia3_grads(peft_model)
    assert grads.keys() == grads_peft.keys() and len(grads) == 4
    for name in grads:
        torch.testing.assert_close(grads[name], grads_peft[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_adapters_disable_and_merge(triton_backend):
    peft_model, fused = conv_models()
    for model in (peft_model, fused):
        model.add_adapter("second", conv_config())
        randomize_ia3(model, seed=7)
        model.base_model.set_adapter(["default", "second"])
    x = conv_input()
    torch.testing.assert_close(fused(x), peft_model(x), rtol=1e-4, atol=1e-5)
    with fused.disable_adapter(), peft_model.disable_adapter():
        torch.testing.assert_close(fused(x), peft_model(x))
    before = fused(x)
    for layer in (fused.base_model.model.stem, fused.base_model.model.grp):
        layer.merge(keep_original=True)
    torch.testing.assert_close(fused(x), before, rtol=1e-4, atol=1e-5)  # merged path
    for layer in (fused.base_model.model.stem, fused.base_model.model.grp):
        layer.unmerge()
    torch.testing.assert_close(fused(x), before)  # kept originals: exact


def test_save_loads_into_stock_peft(triton_backend, tmp_path):
    _, fused = conv_models()
    fused.save_pretrained(tmp_path)
    torch.manual_seed(0)
    stock = PeftModel.from_pretrained(TinyConvNet().to(DEVICE), tmp_path)
    x = conv_input()
    torch.testing.assert_close(stock(x), fused(x), rtol=1e-4, atol=1e-5)


def test_resnet_training_matches_peft(triton_backend):
    """A tiny randomly initialised transformers ResNet (bottleneck blocks: 1x1 and 3x3 convs,
    strided) trained a few AdamW steps with IA3 on every conv: losses and vectors follow PEFT."""
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="bottleneck", downsample_in_first_stage=False)
    torch.manual_seed(0)
    base = ResNetModel(cfg).to(DEVICE)
    ia3_cfg = IA3Config(target_modules=["convolution"], feedforward_modules=[])
    peft_model = randomize_ia3(get_peft_model(copy.deepcopy(base), ia3_cfg))
    fused = ia3.fuse(copy.deepcopy(peft_model))
    assert sum(isinstance(m, ia3.Conv2d) for m in fused.modules()) >= 8
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses, first_grads = {}, {}
    for name, model in (("peft", peft_model), ("ours", fused)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for step in range(3):
            out = model(pixel_values=x).last_hidden_state
            loss = out.square().mean()
            opt.zero_grad()
            loss.backward()
            if step == 0:
                first_grads[name] = ia3_grads(model)
            opt.step()
            losses[name].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["peft"], rel=1e-4)
    assert losses["peft"][-1] != losses["peft"][0]  # training moved
    # Gradients, not the vectors after AdamW: Adam's normalisation turns a 1e-9 difference in a
    # near-zero gradient into a whole lr-sized step.
    assert first_grads["ours"].keys() == first_grads["peft"].keys()
    for n, g in first_grads["peft"].items():
        torch.testing.assert_close(first_grads["ours"][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_torch_compile_fullgraph_folds_the_weight_in_torch(triton_backend, feedforward):
    """Under torch.compile the op traces as PyTorch ops (no graph break, no warning) with the
    same weight folding; gradients match the reference."""
    import torch._dynamo

    torch._dynamo.reset()
    x, w, b, scale, kwargs = make_case("stride2-dil2-grouped-reflect", feedforward, True,
                                       torch.float32, False)
    fn = torch.compile(ia3_kernels.ia3_conv, fullgraph=True, backend="eager")
    check(x, w, b, scale, feedforward, kwargs, torch.float32, fn=lambda *a, **k: fn(*a, **k))
    check(x, w, b, scale, feedforward, kwargs, torch.float32, weight_grad=True,
          fn=lambda *a, **k: fn(*a, **k))


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_compiled_backward_computes_no_weight_gradient_for_a_frozen_weight(triton_backend,
                                                                         feedforward):
    """IA3 freezes the base weight: the compiled op's backward must not convolve for a weight
    gradient to get dl (differentiating through the folded weight did: a whole convolution
    more than PEFT's backward). Every convolution_backward call is recorded."""
    import torch._dynamo
    from torch.utils._python_dispatch import TorchDispatchMode

    masks = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    torch._dynamo.reset()
    x, w, b, scale, kwargs = make_case("3x3", feedforward, True, torch.float32, False)
    fn = torch.compile(ia3_kernels.ia3_conv, fullgraph=True, backend="eager")
    x, scale = x.requires_grad_(), scale.requires_grad_()
    y = fn(x, w, b, scale, feedforward, **kwargs)
    with Record():
        torch.autograd.grad(y, [x, scale], torch.ones_like(y))
    assert masks and all(not mask[1] for mask in masks), masks
