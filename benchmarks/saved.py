"""python -m benchmarks.saved [MODEL] [--compile]: what a training step keeps for its backward —
the tensors autograd saves during the forward of the floor, PEFT and ours (and each compiled),
for one of benchmarks.e2e's models (default "Llama-3-8B dims x4 layers, NF4"), grouped by
shape and dtype, then the groups where ours keeps more than PEFT.

Why: peak training memory is mostly what the forward saves. The stop-35 end-to-end run read
ours compiled +320 MiB over PEFT compiled with NF4 bases (+960 against +640 over the compiled
floor, benchmarks/results/e2e-stop35-h100.md), unexplained; the step times alone cannot say
which tensor it is. A tensor saved by several nodes counts once (by its storage)."""
from __future__ import annotations

import sys
from collections import Counter

import torch

from . import e2e


def saved_tensors(step_model, batch) -> Counter:
    """(shape, dtype) -> count of the distinct storages saved during one forward of `step`."""
    step, model = step_model
    seen, groups = set(), Counter()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            groups[(tuple(t.shape), str(t.dtype).replace("torch.", ""))] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, batch)
    return groups


def group_mib(key: tuple, count: int) -> float:
    shape, dtype = key
    return torch.Size(shape).numel() * getattr(torch, dtype).itemsize * count / 2**20


def mib(groups: Counter) -> float:
    return sum(group_mib(k, n) for k, n in groups.items())


def table(groups: Counter, top: int = 12) -> list[str]:
    rows = sorted(groups.items(), key=lambda kv: -group_mib(*kv))
    return [f"    {group_mib(k, n):9.1f} MiB  {n:4d} x {k[1]:9s} {list(k[0])}" for k, n in rows[:top]]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    compile_ = "--compile" in argv
    names = [a for a in argv if not a.startswith("--")]
    name = names[0] if names else "Llama-3-8B dims x4 layers, NF4"
    spec = e2e.spec_named(name, e2e.FULL + e2e.QUICK + e2e.QUICK_GPU_QUANT)
    if spec is None:
        return 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, _, variants = e2e.build_variants(spec, device, torch.bfloat16 if
                                            device.type == "cuda" else torch.float32)
    if compile_:
        for label in ("floor", "PEFT", "ours"):
            step, model = variants[label]
            variants[f"{label} compiled"] = (step, torch.compile(model))
    print(f"{name} on {device}: tensors saved for the backward by one forward"
          + ("" if device.type == "cuda" else " (CPU: the reference path, not the kernels)"))
    results = {}
    for label, step_model in variants.items():
        saved_tensors(step_model, batch)  # warm-up (compiles); the second forward is counted
        results[label] = saved_tensors(step_model, batch)
        print(f"--- {label}: {mib(results[label]):.1f} MiB in {sum(results[label].values())} "
              f"tensors")
        print("\n".join(table(results[label])))
    for ours, peft in (("ours", "PEFT"), ("ours compiled", "PEFT compiled")):
        if ours in results and peft in results:
            extra = results[ours] - results[peft]
            print(f"--- kept by {ours}, not by {peft}: {mib(extra):.1f} MiB "
                  f"({mib(results[peft]) - mib(results[ours]):+.1f} the other way round)")
            print("\n".join(table(extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
