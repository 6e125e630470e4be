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

import contextlib
import copy
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import IA3Config, get_peft_model

import ia3

from . import layers, models, report

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: object  # () -> model
    ia3: object  # () -> IA3Config
    batch: int
    seq: int
    seq2seq: bool = False
    quant: str = ""  # "", "nf4" (NF4 + double quantization, bf16 compute) or "int8" (LLM.int8)
    autocast: bool = False  # bf16 autocast around every variant's step


def causal_ia3():
    return IA3Config(task_type="CAUSAL_LM")  # PEFT's defaults per architecture


def t_few_ia3():
    # The T-Few setting: k, v and the feedforward output (no task_type: PEFT 0.21's seq2seq
    # wrapper reaches for a generation helper that newer transformers removed).
    return IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"])


# QIA3 runs under bf16 autocast for every variant: PEFT's bitsandbytes wrappers return float32
# and crash a Llama step without it (../shared/anchors/peft-e2e-h100.md); ours runs either way.
FULL = [
    ModelSpec("Llama-3.2-1B dims", models.llama_1b, causal_ia3, 8, 1024),
    ModelSpec("Llama-3-8B dims x4 layers, NF4", models.llama_8b_4_layers, causal_ia3, 4, 2048,
              quant="nf4", autocast=True),
    ModelSpec("Llama-3-8B dims x4 layers, int8", models.llama_8b_4_layers, causal_ia3, 4, 2048,
              quant="int8", autocast=True),
    ModelSpec("T5-base", models.t5_base, t_few_ia3, 8, 512, seq2seq=True),
    ModelSpec("GPT-2 small (Conv1D)", models.gpt2_small, causal_ia3, 8, 1024),
]
QUICK = [
    ModelSpec("tiny Llama", models.tiny_llama, causal_ia3, 2, 32),
    ModelSpec("tiny T5", models.tiny_t5, t_few_ia3, 2, 32, seq2seq=True),
    ModelSpec("tiny GPT-2 (Conv1D)", models.tiny_gpt2, causal_ia3, 2, 32),
]
QUICK_GPU_QUANT = [
    ModelSpec("tiny Llama, NF4", models.tiny_llama, causal_ia3, 2, 32, quant="nf4", autocast=True),
    ModelSpec("tiny Llama, int8", models.tiny_llama, causal_ia3, 2, 32, quant="int8", autocast=True),
]


def spec_named(name: str, specs: list) -> ModelSpec | None:
    """The spec called `name` among `specs`, or None after printing the names there are (the
    single-model tools: host_profile, saved)."""
    for spec in specs:
        if spec.name == name:
            return spec
    print(f"no model named {name!r}; one of {[s.name for s in specs]}")
    return None


def make_batch(spec: ModelSpec, vocab: int, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (spec.batch, spec.seq), generator=g).to(device)
    if spec.seq2seq:
        labels = torch.randint(1, vocab, (spec.batch, spec.seq // 2), generator=g).to(device)
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids}


def floor_step(model, batch, autocast=False):
    """Forward+backward with frozen weights; the input embeddings require grad."""
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(inputs_embeds=embeds, labels=batch["labels"]).loss
    loss.backward()


def make_ia3_step(model, lr=1e-3, autocast=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(m, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = m(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure_block(step, model, batch, device, steps: int) -> tuple[float, float]:
    """(mean ms per step of `steps` steps, peak MiB over what was allocated before them)."""
    cuda = device.type == "cuda"
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


def measure_interleaved(variants: dict, batch, device, warmup: int, steps: int, rounds: int,
                        tick=lambda label: None) -> dict:
    """{name: (median over rounds of the round's mean ms a step, peak MiB over all rounds) or the
    exception it raised}. Each round times every variant for `steps` steps in turn: the H100
    hosts' step times drifted by up to 30% within a run (T5-base floor 52.8 and 70.8 ms on the
    same day), and variants timed in one block each took whatever drift fell on their block."""
    results: dict = {}
    for name, (step, model) in variants.items():
        tick(name)
        try:
            for _ in range(warmup):
                step(model, batch)
        except Exception as exc:  # a compile failure, say: recorded, the other variants go on
            results[name] = exc
    live = [name for name in variants if name not in results]
    times: dict = {name: [] for name in live}
    peaks: dict = {name: [] for name in live}
    for _ in range(rounds):
        for name in list(live):
            step, model = variants[name]
            try:
                ms, peak = measure_block(step, model, batch, device, steps)
            except Exception as exc:  # noqa: BLE001 - as above
                results[name] = exc
                live.remove(name)
                continue
            times[name].append(ms)
            peaks[name].append(peak)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for name in live:
        results[name] = (statistics.median(times[name]),
                         max(peaks[name]) if device.type == "cuda" else float("nan"))
    return results


def profile_steps(step, model, batch, steps: int = 2, top: int = 12) -> dict:
    """Where a step's time goes (--profile): torch.profiler over `steps` steps after the timed
    ones. gpu_busy_ms: the kernels' device time a step (one stream, so their sum is the time the
    GPU was busy); wall_ms: the step's time under the profiler, which inflates the host's part;
    the top kernels by device time and the top host ops by self CPU time, per step. A step whose
    gpu_busy_ms is well under its unprofiled ms is host-bound."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]
                 + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step(model, batch)
        sync()
    wall_ms = (time.perf_counter() - start) / steps * 1e3
    events = prof.key_averages()

    def device_us(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    # Kernels only: a CPU op (aten::mm) also carries the device time of the kernels it launched,
    # so summing every event with device time counted each kernel twice (T5-base: "GPU busy"
    # 75 ms a step against 52.8 ms unprofiled wall time, stop 29).
    def is_kernel(e):
        return str(getattr(e, "device_type", "")).rsplit(".", 1)[-1] != "CPU"
    kernels = sorted((e for e in events if is_kernel(e) and device_us(e) > 0), key=device_us,
                     reverse=True)
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": wall_ms,
        "gpu_busy_ms": sum(device_us(e) for e in kernels) / steps / 1e3,
        "top_kernels": [(e.key[:90], device_us(e) / steps / 1e3, e.count // steps)
                        for e in kernels[:top]],
        "top_host_ops": [(e.key[:90], e.self_cpu_time_total / steps / 1e3, e.count // steps)
                         for e in host[:top]],
    }


def print_profile(label: str, prof: dict) -> None:
    print(f"--- profile {label}: {prof['wall_ms']:.1f} ms a step under the profiler, "
          f"GPU busy {prof['gpu_busy_ms']:.1f} ms")
    for title, rows in (("kernels (device ms, calls a step)", prof["top_kernels"]),
                        ("host ops (self CPU ms, calls a step)", prof["top_host_ops"])):
        print(f"  {title}:")
        for name, ms, count in rows:
            print(f"    {ms:8.2f} {count:6d}  {name}")


VARIANTS = ("floor", "floor compiled", "PEFT", "PEFT compiled", "ours", "ours compiled")


def build_variants(spec: ModelSpec, device, dtype, checkpointing: bool = False):
    """(batch, autocast, {"floor" | "PEFT" | "ours": (step, model)}) of one model: the base,
    stock PEFT IA3 on a copy of it and fused IA3 on another (benchmarks.host_profile too)."""
    base = models.build_base(spec.build, spec.quant, device, dtype)
    batch = make_batch(spec, base.config.vocab_size, device)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = spec.autocast and device.type == "cuda"  # PEFT's bnb wrappers need it
    stock = get_peft_model(copy.deepcopy(base), spec.ia3())
    fused = ia3.fuse(get_peft_model(copy.deepcopy(base), spec.ia3()))
    return batch, autocast, {"floor": (lambda m, b: floor_step(m, b, autocast), base),
                             "PEFT": (make_ia3_step(stock, autocast=autocast), stock),
                             "ours": (make_ia3_step(fused, autocast=autocast), fused)}


def run_spec(spec: ModelSpec, device, dtype, checkpointing: bool, compile_: bool, warmup, steps,
             tick=lambda label: None, profile: bool = False, rounds: int = 1):
    """Rows of one model and checkpointing setting: floor, PEFT, ours (and both compiled)."""
    batch, autocast, variants = build_variants(spec, device, dtype, checkpointing)
    tokens = batch["input_ids"].numel() + (batch["labels"].numel() if spec.seq2seq else 0)
    base, stock, fused = (variants[name][1] for name in ("floor", "PEFT", "ours"))
    if compile_:
        # Compiled variants are judged against the compiled floor: torch.compile also fuses the
        # rest of the model (norms, rotary embeddings, activations), which no adapter kernel can.
        variants["floor compiled"] = (lambda m, b: floor_step(m, b, autocast), torch.compile(base))
        for name, model in (("PEFT", stock), ("ours", fused)):
            variants[f"{name} compiled"] = (make_ia3_step(model, autocast=autocast), torch.compile(model))
    ordered = {name: variants[name] for name in VARIANTS if name in variants}
    measured = measure_interleaved(
        ordered, batch, device, warmup, steps, rounds,
        tick=lambda name: tick(f"{spec.name} ckpt={checkpointing} {name}"))
    rows = []
    for name in ordered:
        row = {"model": spec.name, "variant": name, "grad_ckpt": checkpointing, "base": spec.quant or
               str(dtype).replace("torch.", ""), "autocast": autocast, "tokens": tokens}
        result = measured[name]
        if isinstance(result, Exception):
            row.update(ms=float("nan"), tokens_per_s=float("nan"), peak_mib=float("nan"),
                       error=f"{type(result).__name__}: "
                             f"{str(result).splitlines()[0][:200] if str(result) else ''}")
        else:
            ms, peak = result
            row.update(ms=ms, tokens_per_s=tokens / ms * 1e3, peak_mib=peak)
        rows.append(row)
    # Profiles only once every variant is timed: a profiler session can leave the process's
    # launches slower (CUPTI callbacks), and the variants timed after one would pay for it.
    for row in rows if profile else ():
        if "error" not in row:
            step, model = variants[row["variant"]]
            row["profile"] = profile_steps(step, model, batch)
            print_profile(f"{spec.name} ckpt={checkpointing} {row['variant']} ({row['ms']:.1f} ms "
                          "a step unprofiled)", row["profile"])
    floors = {r["variant"]: r for r in rows if r["variant"].startswith("floor")}
    for r in rows:
        floor = floors["floor compiled" if r["variant"].endswith("compiled") and "floor compiled"
                       in floors else "floor"]
        r["floor"] = floor["variant"]
        r["over_floor"] = r["ms"] / floor["ms"]
        r["mem_over_floor_mib"] = r["peak_mib"] - floor["peak_mib"]
    return rows


# Issue 7's targets (H100): every step with our layers <= 1.03x the floor in bf16 and <= 1.05x the
# bare-bnb floor with quantized bases, and faster than PEFT compiled; peak memory <= PEFT's.
STEP_OVER_FLOOR = {"": 1.03, "nf4": 1.05, "int8": 1.05}


def summarize(rows: list[dict]) -> list[dict]:
    """Per model and checkpointing setting: ours (eager, compiled) against the floor's limit,
    PEFT compiled, and PEFT's memory."""
    out = []
    groups = dict.fromkeys((r["model"], r["grad_ckpt"]) for r in rows)
    for model, ckpt in groups:
        by = {r["variant"]: r for r in rows if (r["model"], r["grad_ckpt"]) == (model, ckpt)}
        base = by["floor"]["base"]  # each row's "over_floor" is against its own floor (compiled or not)
        limit = STEP_OVER_FLOOR.get("" if base in ("bfloat16", "float16", "float32") else base)
        for ours in ("ours", "ours compiled"):
            if ours not in by:
                continue
            r = by[ours]
            entry = {"model": model, "grad_ckpt": ckpt, "variant": ours,
                     "over_floor": round(r["over_floor"], 3), "floor_limit": limit,
                     "meets_floor": r["over_floor"] <= limit}
            if "PEFT compiled" in by:
                entry["over_peft_compiled"] = round(r["ms"] / by["PEFT compiled"]["ms"], 3)
            peft = "PEFT compiled" if ours.endswith("compiled") and "PEFT compiled" in by else "PEFT"
            entry["peak_minus_peft_mib"] = round(r["peak_mib"] - by[peft]["peak_mib"], 1)
            out.append(entry)
    return out


def markdown(env, rows, note, summary=()) -> str:
    lines = ["# End-to-end training steps: floor vs PEFT vs ia3-kernels", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + ["", note, ""]
    lines += ["| model | base | autocast | grad ckpt | variant | tokens/step | ms/step | tokens/s | "
              "x floor | against | peak MiB | MiB over floor |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['base']} | {r['autocast']} | {r['grad_ckpt']} | "
                     f"{r['variant']} | {r['tokens']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['over_floor']:.3f} | {r.get('floor', 'floor')} | {r['peak_mib']:.0f} | "
                     f"{r['mem_over_floor_mib']:.0f} |")
    if summary:
        lines += ["", "## Targets: ours vs the floor, PEFT compiled and PEFT's memory", "",
                  "| model | grad ckpt | variant | x floor | limit | ours / PEFT compiled | "
                  "peak - PEFT's (compiled: PEFT compiled's) (MiB) |", "|---|---|---|---|---|---|---|"]
        for s in summary:
            pc = s.get("over_peft_compiled")
            lines.append(f"| {s['model']} | {s['grad_ckpt']} | {s['variant']} | {s['over_floor']} "
                         f"{'ok' if s['meets_floor'] else 'MISS'} | {s['floor_limit']} | "
                         f"{'-' if pc is None else pc} | {s['peak_minus_peft_mib']} |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "## Variants that did not run", ""]
        lines += [f"- {r['model']} (ckpt {r['grad_ckpt']}) {r['variant']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = report.argument_parser("python -m benchmarks.e2e", __doc__, "tiny configs, a few steps",
                               RESULTS, models=True)
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd PEFT and ours (runs without checkpointing)")
    p.add_argument("--compile-ckpt", action="store_true",
                   help="with --compile: compiled variants under gradient checkpointing too")
    p.add_argument("--no-ckpt", action="store_true", help="skip the gradient-checkpointing runs")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps a round (default 3 on a GPU, x 4 rounds; quick 2)")
    p.add_argument("--merge", action="store_true", help="keep other models' rows of <stem>.json")
    p.add_argument("--profile", action="store_true",
                   help="once a model's variants are timed, profile two steps of each "
                        "(torch.profiler): GPU busy time a step, top kernels and host ops; kept in "
                        "the JSON rows. Later models are timed after these profiles: quote "
                        "timings from a run without --profile")
    p.add_argument("--rounds", type=int, default=0,
                   help="interleaved timing rounds, every variant once a round (default 4 on a "
                        "GPU, 1 with --quick or on a CPU); a variant's time is the median round")
    p.add_argument("--no-autograd-threads", action="store_true",
                   help="every variant's backward on the calling thread "
                        "(torch.autograd.set_multithreading_enabled(False)), not autograd's "
                        "device thread: where eager steps are host-bound (T5-base, GPT-2)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cuda, device, dtype = report.run_device()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a cast warning on every int8 call
    specs = FULL
    if args.quick or not cuda:
        specs = QUICK + (QUICK_GPU_QUANT if cuda else [])
    specs = report.select_by_name(specs, args.models)
    steps = args.steps or (2 if args.quick or not cuda else 3)
    warmup = 1 if args.quick or not cuda else 3
    rounds = args.rounds or (1 if args.quick or not cuda else 4)
    note = ("Median over %d interleaved rounds (every variant in turn) of the mean of %d steps, "
            "after %d warm-up steps; %s." % (
        rounds, steps, warmup, "bf16 on the GPU (QIA3 runs: every variant under bf16 autocast, which "
        "PEFT's bitsandbytes wrappers need); compiled: torch.compile(model), default mode" if cuda
        else "CPU-only machine: tiny configs on the reference path to check the pipeline (no "
        "bitsandbytes runs) — CPU numbers are not the point of this package"))
    if args.no_autograd_threads:
        note += ("; autograd's device threads off for every variant (torch.autograd."
                 "set_multithreading_enabled(False): the backward runs on the calling thread)")
    print(note)
    ckpts = [False] if args.no_ckpt else [False, True]
    def compiled(ckpt):
        return args.compile and (args.compile_ckpt or not ckpt)
    total = len(specs) * sum(6 if compiled(c) else 3 for c in ckpts)
    env = report.environment() if cuda else {"device": "cpu", "torch": torch.__version__}
    if cuda and any(s.quant for s in specs):
        env["bitsandbytes"] = __import__("bitsandbytes").__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("e2e-" + ("gpu" if cuda else "cpu"))
    json_path = out / f"{stem}.json"
    kept = []
    if args.merge and json_path.exists():
        names = {s.name for s in specs}
        kept = [r for r in json.loads(json_path.read_text())["rows"] if r["model"] not in names]
    rows: list[dict] = []

    def write() -> list[dict]:
        summary = summarize(kept + rows) if cuda else []
        json_path.write_text(json.dumps({"environment": env, "note": note, "summary": summary,
                                         "rows": kept + rows}, indent=1))
        (out / f"{stem}.md").write_text(markdown(env, kept + rows, note, summary))
        return summary

    threads = (torch.autograd.set_multithreading_enabled(False) if args.no_autograd_threads
               else contextlib.nullcontext())
    with threads, layers.progress(total) as tick:
        for spec in specs:
            for ckpt in ckpts:
                rows += run_spec(spec, device, dtype, ckpt, compiled(ckpt), warmup, steps, tick,
                                 args.profile, rounds)
                write()  # after every run: a run cut off keeps what it measured
    summary = write()
    print(markdown({}, kept + rows, "", summary))
    print(f"wrote {json_path} and .md")
    if cuda:
        report.draw("plot_e2e", json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
