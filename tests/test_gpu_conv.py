"""GPU tests of the IA3 convolutions: bf16 (and fp16/fp32) against the float64 reference and
PEFT's bar at model-like channel counts, NCHW and channels_last; zero entries of l; CUDA-graph
capture; torch.compile; a bf16 ResNet trained like PEFT's."""
import copy

import pytest
import torch

import ia3
import ia3_kernels
from conftest import capture_cuda_graph
from helpers import output_and_grads
from test_conv import CASES, check, make_case

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_on_gpu(case, dtype, feedforward, channels_last):
    x, w, b, scale, kwargs = make_case(case, feedforward, case != "1x1-valid", dtype, channels_last)
    check(x, w, b, scale, feedforward, kwargs, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("shape", [(2, 320, 16, 16, 320, 3), (4, 64, 28, 28, 256, 1),
                                   (4, 256, 14, 14, 64, 1)], ids=["unet3x3", "rn1x1up", "rn1x1down"])
def test_model_sized_bf16(shape, feedforward, channels_last):
    n, c_in, h, w_, c_out, k = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, h, w_, generator=g).cuda().bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5).cuda().bfloat16()
    b = torch.randn(c_out, generator=g).cuda().bfloat16()
    scale = (torch.rand(c_in if feedforward else c_out, generator=g) + 0.5).cuda()
    scale = scale.view(1, -1, 1, 1)
    y, _ = check(x, w, b, scale, feedforward, dict(padding=k // 2), torch.bfloat16)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_zero_entries_of_l_in_bf16_channels_last():
    """Zero entries of an attention l get dl = sum(dy*u) from the direct-convolution kernel on
    the GPU (bf16, channels_last), within the bar."""
    x, w, b, scale, kwargs = make_case("3x3", False, True, torch.bfloat16, True)
    scale = scale.clone()
    scale.view(-1)[[1, 4, 7]] = 0.0
    _, grads = check(x, w, b, scale, False, kwargs, torch.bfloat16)
    assert (grads[1].view(-1)[[1, 4, 7]].abs() > 0).all()


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_cuda_graph_capture_of_forward_and_backward(feedforward):
    """Captured fwd+bwd replays give the eager gradients (the same launches: channels whose l
    is 0 are found on the device, not the host), also after zeros are written into l between
    replays. Not bitwise: cuDNN may pick another algorithm for dx under capture (seen on the
    H100)."""
    x, w, b, scale, kwargs = make_case("stride2-dil2-grouped-reflect", feedforward, True,
                                       torch.bfloat16, True)
    x = x.detach().requires_grad_()
    scale = scale.detach().requires_grad_()
    # A loss whose dy is non-zero everywhere (y**2 would give dy = 0 in a channel where l == 0,
    # and there the attention dl = sum(dy * u) would be 0 whatever the op computes).
    probe = None

    def step():
        nonlocal probe
        y = ia3_kernels.ia3_conv(x, w, b, scale, feedforward, **kwargs)
        if probe is None:
            probe = torch.randn(y.shape, device=y.device, generator=torch.Generator(
                y.device).manual_seed(2))
        return torch.autograd.grad((y.float() * probe).sum(), [x, scale])

    eager = step()
    graph, captured = capture_cuda_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager, captured):
        torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=1e-2)
    with torch.no_grad():
        scale.view(-1)[[0, 3]] = 0.0
    eager_zeros = step()
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager_zeros, captured):
        torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=1e-2)
    assert (captured[1].view(-1)[[0, 3]].abs() > 0).all()  # dl where l == 0: exact, not 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_launch_plans_give_what_the_launches_they_replace_give(monkeypatch, feedforward,
                                                               channels_last):
    """The weight fold and dl launches replay launch plans from their third call of a
    signature on (the first goes through Triton, the second is FastKernel's first direct
    launch): every call of the same fwd+bwd, with fresh tensors of that signature, gives the
    first call's results bit for bit (cuDNN in deterministic mode), and a second
    signature gets plans of its own. Two weight folds: the forward's passes the bias, the
    backward's does not."""
    from ia3_kernels import conv

    # cuDNN's data gradient is bitwise repeatable only in deterministic mode (test_determinism).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(conv._WEIGHT_PLANS, "plans", {})
    monkeypatch.setattr(conv._DL_PLANS, "plans", {})
    # Zero padding: a reflect pad's backward (F.pad) adds with atomics on CUDA, so its dx is
    # not bitwise repeatable whatever the launches (seen on the H100, 2026-12-05).
    x0, w, b, scale0, kwargs = make_case("3x3", feedforward, True, torch.bfloat16, channels_last)

    def step(x_like, scale_like):
        x = x_like.detach().clone().requires_grad_()  # fresh tensors, same signature
        scale = scale_like.detach().clone().requires_grad_()
        y = ia3_kernels.ia3_conv(x, w, b, scale, feedforward, **kwargs)
        return (y,) + torch.autograd.grad(y.float().square().sum(), [x, scale])

    first = step(x0, scale0)
    for _ in range(3):
        for want, got in zip(first, step(x0, scale0)):
            assert torch.equal(want, got)
    assert len(conv._WEIGHT_PLANS.plans) == 2 and len(conv._DL_PLANS.plans) == 1
    step(x0[:1], scale0)  # another batch size: another dl signature, the same weight folds
    step(x0[:1], scale0)
    assert len(conv._WEIGHT_PLANS.plans) == 2 and len(conv._DL_PLANS.plans) == 2


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_torch_compile_fullgraph(feedforward):
    import torch._dynamo

    torch._dynamo.reset()
    x, w, b, scale, kwargs = make_case("3x3", feedforward, True, torch.bfloat16, True)
    layer = torch.compile(lambda x, s: ia3_kernels.ia3_conv(x, w, b, s, feedforward, **kwargs),
                          fullgraph=True)

    eager = output_and_grads(
        lambda xx, ss: ia3_kernels.ia3_conv(xx, w, b, ss, feedforward, **kwargs), x, scale)
    compiled = output_and_grads(layer, x, scale)
    for e, c in zip(eager, compiled):
        assert (c.float() - e.float()).norm() <= 2e-2 * e.float().norm()


def test_resnet_bf16_training_follows_peft():
    from peft import IA3Config, get_peft_model
    from transformers import ResNetConfig, ResNetModel

    from helpers import randomize_ia3

    cfg = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[64, 128], depths=[2, 2],
                       layer_type="bottleneck")
    torch.manual_seed(0)
    base = ResNetModel(cfg).cuda().bfloat16().to(memory_format=torch.channels_last)
    # Regexes (PEFT checks list-valued feedforward_modules as a subset of target_modules).
    ia3_cfg = IA3Config(target_modules=r".*convolution",
                        feedforward_modules=r".*layer\.0\.convolution")
    peft_model = randomize_ia3(get_peft_model(copy.deepcopy(base), ia3_cfg))
    fused = ia3.fuse(copy.deepcopy(peft_model))
    kinds = {m.is_feedforward for m in fused.modules() if isinstance(m, ia3.Conv2d)}
    assert kinds == {True, False}
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda().bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    losses = {}
    for name, model in (("peft", peft_model), ("ours", fused)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(4):
            loss = model(pixel_values=x).last_hidden_state.float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["peft"], rel=3e-2)
    assert losses["peft"][-1] < losses["peft"][0]
