"""Small models for layer tests (nn.Linear with and without bias, GPT-2's Conv1D) and the
bitsandbytes weight quantizers the op tests share."""
import copy

import torch
from peft import IA3Config, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import ia3
from conftest import DEVICE


class TinyNet(nn.Module):
    """q/k: attention-style IA3 (output scaled); ff: feedforward (input scaled); proj: Conv1D."""

    def __init__(self, d_in=24, d_hidden=40, d_out=16):
        super().__init__()
        self.q = nn.Linear(d_in, d_hidden)
        self.k = nn.Linear(d_in, d_hidden, bias=False)
        self.ff = nn.Linear(d_hidden, d_in)
        self.proj = Conv1D(d_out, d_in)  # Conv1D(nf=out_features, nx=in_features)

    def forward(self, x):
        h = torch.tanh(self.q(x)) * self.k(x)
        return self.proj(torch.relu(self.ff(h)))


def ia3_config(**kwargs):
    kwargs.setdefault("target_modules", ["q", "k", "ff", "proj"])
    kwargs.setdefault("feedforward_modules", ["ff", "proj"])
    return IA3Config(**kwargs)


def randomize_ia3(model, seed=0):
    """IA3 vectors start at ones; random values make every comparison meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def peft_and_fused(seed=0, dtype=torch.float32, device=DEVICE, **config):
    """A stock PEFT model and a fused deep copy of it (same weights)."""
    torch.manual_seed(seed)
    base = TinyNet().to(device, dtype)
    peft_model = randomize_ia3(get_peft_model(base, ia3_config(**config)), seed)
    fused_model = ia3.fuse(copy.deepcopy(peft_model))
    return peft_model, fused_model


def ia3_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "ia3_l" in n and p.grad is not None}


def output_and_grads(fn, *inputs):
    """(y, d loss/d input for each input) of y = fn(*inputs) with loss = sum(y^2) in fp32, on
    fresh leaves: the eager-vs-compiled comparisons of the GPU tests."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y.float().square().sum(), leaves))


def add_random_adapter(models, name, seed, config=None):
    """Add adapter `name` (random vectors) to each model and make it the active one."""
    for model in models:
        model.add_adapter(name, config or ia3_config())
        randomize_ia3(model, seed=seed)
        model.set_adapter(name)


def quantize_rows(w: torch.Tensor):
    """LLM.int8's weight quantization (bnb int8_vectorwise_quant): CB = round(127 w / absmax)."""
    scb = w.abs().amax(dim=1).clamp_min(1e-8)
    cb = torch.round(w * (127.0 / scb[:, None])).clamp(-127, 127).to(torch.int8)
    return cb, scb.float()


def quantize_4bit(N, K, quant_type="nf4", nested=True, blocksize=64, device=DEVICE, seed=0):
    """bnb's own 4-bit quantization of a random (N, K) weight: (packed, quant_state)."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    return bnb.functional.quantize_4bit(w.to(device), blocksize=blocksize,
                                        compress_statistics=nested, quant_type=quant_type)


def to_int8(model, device=DEVICE, **kwargs):
    """bitsandbytes Linear8bitLt for every nn.Linear but lm_head (see benchmarks.models.to_int8)."""
    from benchmarks.models import to_int8 as convert
    return convert(model, device, **kwargs)


def to_4bit(model, device=DEVICE, **kwargs):
    """bitsandbytes Linear4bit for every nn.Linear but lm_head (see benchmarks.models.to_4bit)."""
    from benchmarks.models import to_4bit as convert
    return convert(model, device, **kwargs)


def check_quantized_llama_trains(model, fused_class, autocast):
    """Fuse a tiny Llama with quantized bases and IA3; its 6 adapted layers become `fused_class`
    and train with losses matching our reference path (the same dequantized weights in PyTorch),
    in bf16 with or without autocast. PEFT's own wrappers return float32 k/v beside a bf16 q and
    crash this step without autocast (../shared/anchors/peft-e2e-h100.md)."""
    import ia3

    fused = ia3.fuse(model)
    assert sum(type(m) is fused_class for m in fused.modules()) == 6
    reference = copy.deepcopy(fused)
    ours = train_llama_on_cuda(fused, "auto", autocast)
    ref = train_llama_on_cuda(reference, "torch", autocast)
    assert all(torch.isfinite(torch.tensor(ours)))
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=2e-2, atol=2e-2)


def train_llama_on_cuda(model, backend, autocast, steps=3):
    """A few AdamW steps of a tiny Llama on CUDA with ia3_kernels' `backend`, under bf16
    autocast or not; every IA3 gradient must be finite and non-zero. Returns the losses."""
    import ia3_kernels
    from test_models import batch

    ia3_kernels.set_backend(backend)
    try:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**{k: v.cuda() for k, v in batch("llama", step).items()}).loss
            loss.backward()
            grads = ia3_grads(model)
            assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0
                                 for g in grads.values())
            losses.append(loss.item())
            opt.step()
        return losses
    finally:
        ia3_kernels.set_backend("auto")


def check_bias_cast_like_bnb(ours, theirs, x):
    """An ia3 bnb layer `ours` whose base keeps an fp32 bias, beside PEFT's `theirs` on a copy of
    the same base: after one call on x the base's bias has x's dtype, as after bnb's own forward
    (which casts it in place once), ours computes what PEFT does, and a later call casts nothing."""
    bare = copy.deepcopy(ours.get_base_layer())
    assert bare.bias.dtype == torch.float32
    y_f, y_s = ours(x), theirs(x)
    bare(x)  # bnb's own forward
    bias = ours.get_base_layer().bias
    assert bias.dtype == bare.bias.dtype == x.dtype
    torch.testing.assert_close(bias, bare.bias)
    assert y_f.dtype == x.dtype
    torch.testing.assert_close(y_f.float(), y_s.float(), rtol=2e-3, atol=2e-3)
    ours(x)
    assert ours.get_base_layer().bias is bias
