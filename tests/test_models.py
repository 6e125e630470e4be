"""Tiny randomly initialised transformers models (no downloads) trained a few steps with fused
IA3 and with stock PEFT from the same start: same losses, same gradients, same vectors.
Dropout is off so that both runs see the same function."""
import copy

import pytest
import torch
from peft import IA3Config, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, \
    T5ForConditionalGeneration

import ia3
from conftest import DEVICE
from helpers import ia3_grads, randomize_ia3

VOCAB = 96


def llama():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg), IA3Config(task_type="CAUSAL_LM")  # k_proj, v_proj, down_proj


def gpt2():
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg), IA3Config(task_type="CAUSAL_LM")  # Conv1D c_attn, mlp.c_proj


def t5():
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=72, num_layers=2, num_heads=4,
                   dropout_rate=0.0, decoder_start_token_id=0)
    # The T-Few setting: k, v and the feedforward output. No task_type: PEFT 0.21's
    # PeftModelForSeq2SeqLM reaches for a generation helper that newer transformers removed.
    return T5ForConditionalGeneration(cfg), IA3Config(target_modules=["k", "v", "wo"],
                                                       feedforward_modules=["wo"])


def batch(family, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 7), generator=g).to(DEVICE)
    if family == "t5":
        labels = torch.randint(1, VOCAB, (2, 5), generator=g).to(DEVICE)
        return dict(input_ids=ids, labels=labels)
    return dict(input_ids=ids, labels=ids)


def train(model, family, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, grads = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**batch(family, step)).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(ia3_grads(model))
        opt.step()
    return losses, grads


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_tiny_model_trains_like_peft(triton_backend, kernel_calls, family):
    torch.manual_seed(0)
    base, config = {"llama": llama, "gpt2": gpt2, "t5": t5}[family]()
    stock = randomize_ia3(get_peft_model(base.to(DEVICE), config))
    fused = ia3.fuse(copy.deepcopy(stock))
    assert any(type(m) is ia3.Linear and m.is_feedforward for m in fused.modules())
    assert any(type(m) is ia3.Linear and not m.is_feedforward for m in fused.modules())
    losses_s, grads_s = train(stock, family)
    losses_f, grads_f = train(fused, family)
    assert len(kernel_calls) > 0
    torch.testing.assert_close(torch.tensor(losses_f), torch.tensor(losses_s), rtol=1e-5, atol=1e-6)
    for gs, gf in zip(grads_s, grads_f):
        assert gs.keys() == gf.keys() and gs
        for name in gs:
            torch.testing.assert_close(gf[name], gs[name], rtol=1e-4, atol=1e-6, msg=name)
    for (name, p_s), (_, p_f) in zip(stock.named_parameters(), fused.named_parameters()):
        if "ia3_l" in name:
            torch.testing.assert_close(p_f, p_s, rtol=1e-5, atol=1e-6, msg=name)
