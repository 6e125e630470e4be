"""python -m benchmarks.sass_loop '{"LUT": 1, "BLOCK_N": 64}' ...: compile small_m's M = 1 GEMV
kernel for sm_90 on this machine (no GPU needed: Triton's bundled ptxas) and print its hottest
loop's SASS instruction mix per weight element. Each argument is a JSON object of the kernel's
constexprs (and num_warps) over the defaults below (NF4, double quantization, feedforward).

Why: at M = 1 the GEMV is bound by instructions issued per weight as much as by HBM (an H100
issues ~0.93e12 warp-instructions a second over 132 SMs, so 14336x4096 weights at 3.6
instructions each take ~7 us against 10 us of weight bytes), and counting them here caught the
x loads (10.2 -> 5.2 instructions a weight) and the 4-D layouts (shuffles, spills) before any
device time was spent. Written against Triton 3.9's ASTSource (attrs and constexprs keyed by
argument-index tuples); a development tool, not run by CI."""
from __future__ import annotations

import collections
import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ia3_kernels import small_m

POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i32", "c_ptr": "*bf16", "scale_a_ptr": "*fp32",
            "scale_c_ptr": "*fp32", "bias_ptr": "*bf16", "preact_ptr": "*bf16",
            "workspace_ptr": "*fp32", "counter_ptr": "*i32", "w_scale_ptr": "*u8",
            "code_ptr": "*fp32", "code2_ptr": "*fp32", "absmax2_ptr": "*fp32",
            "offset_ptr": "*fp32", "scale_index_ptr": "*i64"}
DEFAULTS = dict(W_4BIT=True, W_SCALE_MUL=1 / 127, Q_BLOCKSIZE=64, Q_NESTED=True,
                Q_BLOCKSIZE2=256, SCALE_A=True, HAS_BIAS=False, STORE_PREACT=False,
                SCALE_C=False, SCALE_GATHER=False, SPLIT_K=2, LUT=1, PREFETCH=0, EVEN_K=True,
                BLOCK_N=64, BLOCK_K=256)


def compile_gemv(overrides: dict):
    kernel = small_m._quant_gemv_kernel
    names = list(kernel.arg_names)
    consts = dict(DEFAULTS)
    num_warps = overrides.pop("num_warps", 4)
    consts.update(overrides)
    types = dict(POINTERS)
    if not consts["W_4BIT"]:
        types["w_scale_ptr"] = "*fp32"
    signature = {n: types.get(n, "constexpr" if n in consts else "i32") for n in names}
    # Triton's own specialisation of a real launch: 16-byte-aligned pointers, N, K and the
    # row stride divisible by 16.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n].startswith("*") or n in ("N", "K", "stride_w_words")}
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=1))
    return compiled, consts, num_warps


def hottest_loop(sass: str):
    """The longest span between a label and a backward branch to it."""
    labels, instrs = {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.?L\w+):", line)
        if m:
            labels[m.group(1)] = len(instrs)
        elif "\t" in line and not line.startswith("Function"):
            instrs.append(line.split("\t", 1)[1].strip())
    best = []
    for i, ins in enumerate(instrs):
        m = re.search(r"BRA\s+(?:`\()?(\.?L\w+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            body = instrs[labels[m.group(1)]:i + 1]
            best = body if len(body) > len(best) else best
    return best


def main(argv=None) -> int:
    for arg in (argv if argv is not None else sys.argv[1:]) or ["{}"]:
        compiled, consts, warps = compile_gemv(json.loads(arg))
        body = hottest_loop(compiled.asm["sass"])
        weights = consts["BLOCK_N"] * consts["BLOCK_K"] / (32 * warps)
        mix = collections.Counter(re.split(r"[ .;]", b.lstrip("@!P0123456789 "))[0] for b in body)
        sass = compiled.asm["sass"]
        # Registers a thread ~ the highest register named (+2 reserved); 64K a SM bound the
        # resident warps, which hide the FMA/PRMT chains' latency (2 a scheduler is too few).
        regs = max(int(r) for r in re.findall(r"\bR(\d+)\b", sass)) + 3
        warps_per_sm = min(64, 65536 // (regs * 32 * warps) * warps)
        print(f"{arg}: {len(body)} instructions a loop step, {weights:.0f} weights a thread -> "
              f"{len(body) / weights:.2f} a weight; shared memory {compiled.metadata.shared} B; "
              f"~{regs} registers a thread (<= {warps_per_sm} warps an SM); local memory "
              f"loads/stores {sass.count('LDL')}/{sass.count('STL')}")
        print("   " + ", ".join(f"{k} {v}" for k, v in mix.most_common(16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
