"""Models of the end-to-end and generation benchmarks, built from configs with random weights (no
downloads), and bitsandbytes quantization of their linear layers as transformers' load_in_8bit /
load_in_4bit does it (bnb quantizes the weights itself when they move to the GPU)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, \
    T5ForConditionalGeneration


def llama_1b():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
        tie_word_embeddings=True))


def llama_8b_4_layers():
    """Four decoder layers of Llama-3-8B's dimensions (the QIA3 runs of the e2e anchor)."""
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096))


def gpt2_small():
    return GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def t5_base():
    return T5ForConditionalGeneration(T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                                               num_heads=12, dropout_rate=0.0,
                                               decoder_start_token_id=0))


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=256))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def tiny_t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128,
                                               num_layers=2, num_heads=4, dropout_rate=0.0,
                                               decoder_start_token_id=0))


def build_base(build, quant: str, device, dtype):
    """The frozen base model `build()` on `device` in `dtype` (random weights, initialised on the
    device), its linear layers quantized by bitsandbytes when `quant` is "nf4" (NF4 + double
    quantization, compute dtype `dtype`) or "int8" (LLM.int8); lm_head kept, as transformers does."""
    torch.manual_seed(0)
    with torch.device(device):
        base = build().to(dtype)
    if quant == "nf4":
        base = to_4bit(base, device, quant_type="nf4", compute_dtype=dtype)
    elif quant == "int8":
        base = to_int8(base, device)
    elif quant:
        raise ValueError(f"quant must be '', 'nf4' or 'int8', got {quant!r}")
    return base.requires_grad_(False)


def to_int8(model, device, threshold=6.0, has_fp16_weights=False, skip=("lm_head",)):
    """Replace every nn.Linear of `model` (but `skip`) by a bitsandbytes Linear8bitLt holding the
    same weights, quantized by bnb itself when moved to `device` (as transformers' load_in_8bit
    does); marks the model `is_loaded_in_8bit` so that PEFT builds its 8-bit IA3 wrappers."""
    import bitsandbytes as bnb

    def make(child):
        return bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                   has_fp16_weights=has_fp16_weights, threshold=threshold)
    _replace_linears(model, make, device, skip)
    model.is_loaded_in_8bit = True
    return model


def to_4bit(model, device, quant_type="nf4", compress_statistics=True, blocksize=64,
            compute_dtype=torch.float32, skip=("lm_head",)):
    """The same with bitsandbytes Linear4bit (NF4/FP4, double quantization by default); marks the
    model `is_loaded_in_4bit`."""
    import bitsandbytes as bnb

    def make(child):
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=compress_statistics,
                              quant_type=quant_type)
        q.weight.blocksize = blocksize
        return q
    _replace_linears(model, make, device, skip)
    model.is_loaded_in_4bit = True
    return model


def _replace_linears(model, make, device, skip):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in skip:
                q = make(child)
                q.load_state_dict(child.state_dict())
                setattr(parent, name, q.to(device))
