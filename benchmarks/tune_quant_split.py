"""python -m benchmarks.tune_quant_split: split-K of the quantized dequantize-matmuls at small M.

dense.split_k_for gives 4-bit and int8 weights (elem_size 1) their own split rule:
QUANT_SPLIT_K_WORKSPACE_BYTES of fp32 workspace and ~QUANT_SPLIT_K_CTAS_PER_SM CTAs an SM,
where dense weights keep 512 KiB and 2 (the bare layer's peak memory). This times the fused ops
under both rules on the Llama-3-8B shapes: NF4 (double quantization) and int8, feedforward and
attention, forward and forward+backward (dx and dl) at M = 1, 16, 64, as CUDA-graph replays
over rotated weights (each replay walks >= 150 MB of them: L2-cold), beside the bare bnb NF4
layer's forward+backward (dx) under the same graphs (LLM.int8's layer cannot be captured).
At M <= 64 the 4-bit forward is small_m.py's (its own splits): there only the backward's dx
GEMM changes. The shipped rule keeps the dense one at M = 1 for both formats and for int8 up to
M = 16 (split_k_for: int8 forwards at M = 2..16 run dense.py's kernel and lost with more
splits), so those rows now time the same splits twice; the H100 log
(tune-quant-split-stop32-h100.log) was taken before that, with the quantized rule at every M."""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.layers import require_cuda
from ia3_kernels import dense
from benchmarks.tune_quant_small_m import SHAPES, build, time_rotated, weights_of


# (workspace cap, CTAs an SM) of each rule
RULES = {"quant": (dense.QUANT_SPLIT_K_WORKSPACE_BYTES, dense.QUANT_SPLIT_K_CTAS_PER_SM),
         "dense": (dense.SPLIT_K_WORKSPACE_BYTES, 2)}


def _set_rule(rule: str):
    """'quant': the shipped quantized rule; 'dense': the dense rule it replaced."""
    dense.QUANT_SPLIT_K_WORKSPACE_BYTES, dense.QUANT_SPLIT_K_CTAS_PER_SM = RULES[rule]
    dense._MATMUL_PLANS.plans.clear()  # plans keep the tiles of their first launch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="nf4,int8")
    parser.add_argument("--m", default="1,16,64")
    parser.add_argument("--rep-ms", type=int, default=25)
    args = parser.parse_args(argv)
    require_cuda("tune_quant_split")
    import ia3_kernels
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; us per call "
          f"(CUDA graphs, rotated weights); rules: dense = 512 KiB / 2 CTAs an SM, quant = "
          f"the shipped quantized rule", flush=True)
    for fmt in args.formats.split(","):
        for k, n in SHAPES:
            copies = max(3, int(150e6 // ((0.52 if fmt == "nf4" else 1.0) * k * n)) + 1)
            layers = build(fmt, k, n, copies)
            weights = weights_of(fmt, layers)
            for m in map(int, args.m.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
                cells = []
                if fmt == "nf4":
                    def bare_step(q):
                        return torch.autograd.grad(q(x), x, dy)
                    bare = time_rotated([lambda q=q: bare_step(q) for q in layers], args.rep_ms)
                    cells.append(f"bnb fwd+bwd {bare:.1f}")
                for ff in (True, False):
                    scale = (torch.rand(k if ff else n, device="cuda", dtype=torch.bfloat16)
                             + 0.5).requires_grad_()

                    def op(w, ff=ff, scale=scale):
                        if fmt == "nf4":
                            return ia3_kernels.ia3_linear_4bit(x, w, None, scale, ff)
                        return ia3_kernels.ia3_linear_int8(x, w.cb, w.scb, None, scale, ff)

                    def step(w, op=op, scale=scale):
                        return torch.autograd.grad(op(w), (x, scale), dy)

                    for rule in ("dense", "quant"):
                        _set_rule(rule)
                        with torch.no_grad():
                            fwd = time_rotated([lambda w=w: op(w) for w in weights], args.rep_ms)
                        both = time_rotated([lambda w=w: step(w) for w in weights], args.rep_ms)
                        cells.append(f"{'ff' if ff else 'attn'} {rule}: fwd {fwd:.1f} "
                                     f"fwd+bwd {both:.1f}")
                _set_rule("quant")
                print(f"{fmt} {k}->{n} M={m}: " + " | ".join(cells), flush=True)
            del layers, weights
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
