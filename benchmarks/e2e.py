"""python -m benchmarks.e2e: whole training steps of decoder and seq2seq models built from configs
(random weights, no downloads) — the no-adapter floor, stock PEFT IA3 and fused IA3, eager and
(with --compile) torch.compile'd, with and without gradient checkpointing. Reports step time,
tokens/s and peak memory, and the ratio of each to the floor.

The floor is the same model's forward+backward with every weight frozen and the input embeddings
requiring grad, so the backward runs through every layer: the time IA3 would cost if it were free.
AdamW steps the IA3 vectors (the floor has nothing to step).

--quick: tiny configs, a few steps, on whatever device is present (on a CPU the reference path):
checks the pipeline in well under two minutes; CPU numbers are not the point.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import IA3Config, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, \
    T5ForConditionalGeneration

import ia3

from . import report

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: object  # () -> model
    ia3: object  # () -> IA3Config
    batch: int
    seq: int
    seq2seq: bool = False


def llama_1b():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
        tie_word_embeddings=True))


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
                                        num_key_value_heads=2, max_position_embeddings=128))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def tiny_t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128,
                                               num_layers=2, num_heads=4, dropout_rate=0.0,
                                               decoder_start_token_id=0))


def causal_ia3():
    return IA3Config(task_type="CAUSAL_LM")  # PEFT's defaults per architecture


def t_few_ia3():
    # The T-Few setting: k, v and the feedforward output (no task_type: PEFT 0.21's seq2seq
    # wrapper reaches for a generation helper that newer transformers removed).
    return IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])


FULL = [
    ModelSpec("Llama-3.2-1B dims", llama_1b, causal_ia3, 8, 1024),
    ModelSpec("T5-base", t5_base, t_few_ia3, 8, 512, seq2seq=True),
    ModelSpec("GPT-2 small (Conv1D)", gpt2_small, causal_ia3, 8, 1024),
]
QUICK = [
    ModelSpec("tiny Llama", tiny_llama, causal_ia3, 2, 32),
    ModelSpec("tiny T5", tiny_t5, t_few_ia3, 2, 32, seq2seq=True),
    ModelSpec("tiny GPT-2 (Conv1D)", tiny_gpt2, causal_ia3, 2, 32),
]


def make_batch(spec: ModelSpec, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (spec.batch, spec.seq), generator=g).to(device)
    if spec.seq2seq:
        labels = torch.randint(1, vocab, (spec.batch, spec.seq // 2), generator=g).to(device)
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids}


def floor_step(model, batch):
    """Forward+backward with frozen weights; the input embeddings require grad."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=batch["labels"]).loss
    loss.backward()


def make_ia3_step(model, lr=1e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(m, batch):
        loss = m(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(step, model, batch, device, warmup: int, steps: int) -> tuple[float, float]:
    """(mean ms per step after warm-up, peak MiB over what was allocated before)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step(model, batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(steps):
        step(model, batch)
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / steps * 1e3
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else float("nan")
    return ms, peak


def run_spec(spec: ModelSpec, device, dtype, checkpointing: bool, compile_: bool, warmup, steps):
    torch.manual_seed(0)
    base = spec.build().to(device, dtype)
    vocab = base.config.vocab_size
    batch = make_batch(spec, vocab, device)
    tokens = batch["input_ids"].numel() + (batch["labels"].numel() if spec.seq2seq else 0)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    variants = {}
    floor_model = base.requires_grad_(False)
    variants["floor"] = (floor_step, floor_model)
    stock = get_peft_model(copy.deepcopy(base), spec.ia3())
    variants["PEFT"] = (make_ia3_step(stock), stock)
    fused = ia3.fuse(get_peft_model(copy.deepcopy(base), spec.ia3()))
    variants["ours"] = (make_ia3_step(fused), fused)
    if compile_:
        for name in ("PEFT", "ours"):
            step, model = variants[name]
            variants[f"{name} compiled"] = (make_ia3_step(model), torch.compile(model))
    rows = []
    for name, (step, model) in variants.items():
        ms, peak = measure(step, model, batch, device, warmup, steps)
        rows.append({"model": spec.name, "variant": name, "grad_ckpt": checkpointing,
                     "tokens": tokens, "ms": ms, "tokens_per_s": tokens / ms * 1e3, "peak_mib": peak})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    floor = rows[0]
    for r in rows:
        r["over_floor"] = r["ms"] / floor["ms"]
        r["mem_over_floor_mib"] = r["peak_mib"] - floor["peak_mib"]
    return rows


def markdown(env, rows, note) -> str:
    lines = ["# End-to-end training steps: floor vs PEFT vs ia3-kernels", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + ["", note, ""]
    lines += ["| model | grad ckpt | variant | tokens/step | ms/step | tokens/s | x floor | peak MiB | MiB over floor |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['grad_ckpt']} | {r['variant']} | {r['tokens']} | {r['ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['over_floor']:.3f} | {r['peak_mib']:.0f} | "
                     f"{r['mem_over_floor_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configs, a few steps")
    p.add_argument("--models", default="", help="comma-separated substrings of model names")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd PEFT and ours")
    p.add_argument("--no-ckpt", action="store_true", help="skip the gradient-checkpointing runs")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default 8; quick 2)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--stem", default="")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    specs = QUICK if args.quick or not cuda else FULL
    if args.models:
        keys = [k.strip().lower() for k in args.models.split(",")]
        specs = [s for s in specs if any(k in s.name.lower() for k in keys)]
    steps = args.steps or (2 if args.quick or not cuda else 8)
    warmup = 1 if args.quick or not cuda else 3
    note = ("Mean of %d steps after %d warm-up steps; %s." % (
        steps, warmup, "bf16 on the GPU" if cuda else
        "CPU-only machine: tiny configs on the reference path to check the pipeline — CPU "
        "numbers are not the point of this package"))
    print(note)
    rows = []
    for spec in specs:
        for ckpt in ([False] if args.no_ckpt else [False, True]):
            print(f"{spec.name}, gradient checkpointing {ckpt} ...", flush=True)
            rows += run_spec(spec, device, dtype, ckpt, args.compile, warmup, steps)
    print(markdown({}, rows, ""))
    env = report.environment() if cuda else {"device": "cpu", "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("e2e-" + ("gpu" if cuda else "cpu"))
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "note": note, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(env, rows, note))
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
