"""GPU tests of the IA3 convolutions: bf16 (and fp16/fp32) against the float64 reference and
PEFT's bar at model-like channel counts, NCHW and channels_last; the zero count read back from
pinned memory; CUDA-graph capture; torch.compile; a bf16 ResNet trained like PEFT's."""
import copy

import pytest
import torch

import ia3
import ia3_kernels
from conftest import capture_cuda_graph
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


@pytest.mark.parametrize("shape", [(4, 64, 28, 28, 256), (4, 256, 14, 14, 64), (8, 64, 56, 56, 64)],
                         ids=["rn1x1up", "rn1x1down", "rn1x1"])
def test_pointwise_gemm_backward_bf16_and_graph_capture(shape):
    """conv_path("gemm") at ResNet-50 1x1 widths in bf16, channels_last: within PEFT's bar, and
    a captured forward+backward replays to the eager result (the path is chosen at capture)."""
    n, c_in, h, w_, c_out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c_in, h, w_, generator=g).cuda().bfloat16()
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, 1, 1, generator=g) / c_in**0.5).cuda().bfloat16()
    scale = (torch.rand(1, c_in, 1, 1, generator=g) + 0.5).cuda()
    with ia3_kernels.conv_path("gemm"):
        check(x, w, None, scale, True, {}, torch.bfloat16)
        xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
        dy = torch.randn(n, c_out, h, w_, device="cuda", dtype=torch.bfloat16)
        dy = dy.contiguous(memory_format=torch.channels_last)

        def step():
            xg.grad = sg.grad = None
            ia3_kernels.ia3_conv(xg, w, None, sg, True).backward(dy)
            return xg.grad.clone(), sg.grad.clone()

        eager = step()
        graph, captured = capture_cuda_graph(step)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


def test_zero_count_comes_back_through_pinned_memory(monkeypatch):
    """The forward's weight kernel writes how many entries of l are zero into a pinned slot;
    the backward reads that slot (no device sync) and the zero channels get exact gradients."""
    from ia3_kernels import conv

    tickets = []
    real_take = conv._zero_counts.take

    def take(device):
        slot, ticket = real_take(device)
        tickets.append(ticket)
        return slot, ticket

    monkeypatch.setattr(conv._zero_counts, "take", take)
    x, w, b, scale, kwargs = make_case("3x3", False, True, torch.bfloat16, False)
    scale = scale.clone()
    scale.view(-1)[[1, 4, 7]] = 0.0
    _, grads = check(x, w, b, scale, False, kwargs, torch.bfloat16)
    assert len(tickets) == 1
    key, slot, _ = tickets[0]
    torch.cuda.synchronize()
    assert int(conv._zero_counts._buffers[key][1][slot]) == 3
    assert (grads[1].view(-1)[[1, 4, 7]].abs() > 0).all()


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_cuda_graph_capture_of_forward_and_backward(feedforward):
    """Captured fwd+bwd replays give the eager gradients (attention: the captured backward
    recomputes u, since the zero count cannot be read on the host during capture)."""
    x, w, b, scale, kwargs = make_case("stride2-dil2-grouped-reflect", feedforward, True,
                                       torch.bfloat16, True)
    x = x.detach().requires_grad_()
    scale = scale.detach().requires_grad_()

    def step():
        y = ia3_kernels.ia3_conv(x, w, b, scale, feedforward, **kwargs)
        return torch.autograd.grad(y.float().square().sum(), [x, scale])

    eager = step()
    graph, captured = capture_cuda_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager, captured):
        torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_torch_compile_fullgraph(feedforward):
    import torch._dynamo

    torch._dynamo.reset()
    x, w, b, scale, kwargs = make_case("3x3", feedforward, True, torch.bfloat16, True)
    layer = torch.compile(lambda x, s: ia3_kernels.ia3_conv(x, w, b, s, feedforward, **kwargs),
                          fullgraph=True)

    def fwd_bwd(fn):
        xx, ss = x.detach().requires_grad_(), scale.detach().requires_grad_()
        y = fn(xx, ss)
        return (y, *torch.autograd.grad(y.float().square().sum(), [xx, ss]))

    eager = fwd_bwd(lambda xx, ss: ia3_kernels.ia3_conv(xx, w, b, ss, feedforward, **kwargs))
    compiled = fwd_bwd(layer)
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
