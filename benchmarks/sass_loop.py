"""python -m benchmarks.sass_loop '{"LUT": 1, "BLOCK_N": 64}' ...: compile small_m's M = 1 GEMV
kernel for sm_90 on this machine (no GPU needed: Triton's bundled ptxas) and print its hottest
loop's SASS instruction mix per weight element. Each argument is a JSON object of the kernel's
constexprs (and num_warps) over the defaults below (NF4, double quantization, feedforward).
`--dense '{"SCALE_A": true, "REDUCE_A_AUX": true}' ...`: the same for dense.py's matmul kernel
as a small-M backward launch specialises it (loop length, async copies, barriers, registers).
The device runs Triton 3.6: `pip download triton==3.6.0 --no-deps`, install it into a folder
and put that first on PYTHONPATH to compile with the device's version.

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
    compiled = _compile_sm90(kernel, signature, consts, ("N", "K", "stride_w_words"),
                             num_warps, 1)
    return compiled, consts, num_warps


def _compile_sm90(kernel, signature: dict, consts: dict, divisible: tuple, num_warps: int,
                  num_stages: int):
    """kernel compiled for sm_90 as Triton specialises a real launch: 16-byte-aligned pointers
    and the ints named in `divisible` divisible by 16; `consts` the constexpr values."""
    names = list(kernel.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if signature[n].startswith("*") or n in divisible}
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


# _ia3_matmul_kernel (dense.py) as a backward launch specialises it: unit strides are
# constexpr 1 in a real launch (dy, u, x and dx contiguous; W row-major as B[n, k]), which
# matters (without it the attention backward's probe showed spills that a launch does not have).
DENSE_POINTERS = {"counter_ptr": "*i32", "partial_ptr": "*fp32",
                  "workspace_ptr": "*fp32", "final_ptr": "*fp32", "scale_a_ptr": "*fp32",
                  "scale_c_ptr": "*fp32"}
DENSE_DEFAULTS = dict(SCALE_A=False, REDUCE_A_AUX=False, HAS_BIAS=False, REDUCE_AUX=False,
                      FINISH=False, STORE_PREACT=False, SCALE_C=False, SCALE_GATHER=False,
                      STORE_C=True, SPLIT_K=2, DOT_PRECISION="tf32", W_SCALE_AXIS=0,
                      W_SCALE_MUL=1 / 127, W_4BIT=0, Q_BLOCKSIZE=64, Q_NESTED=False,
                      Q_BLOCKSIZE2=256, Q_ALIGNED=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=256,
                      GROUP_M=8, AUX_BLOCK_M=16, AUX_BLOCK_K=256, stride_ak=1, stride_bn=1,
                      stride_cn=1, stride_a_auxk=1, stride_auxn=1, rows_per_index=1)


def compile_dense(overrides: dict):
    """dense._ia3_matmul_kernel for sm_90 with a backward launch's specialisation (above);
    overrides: constexprs, num_warps, num_stages (default 4, 4: the M <= 16 row of
    dense._matmul_config), and "types": pointer dtypes over DENSE_POINTERS (others bf16)."""
    from ia3_kernels import dense
    kernel = dense._ia3_matmul_kernel
    names = list(kernel.arg_names)
    overrides = dict(overrides)
    num_warps = overrides.pop("num_warps", 4)
    num_stages = overrides.pop("num_stages", 4)
    pointers = dict(DENSE_POINTERS, **overrides.pop("types", {}))  # e.g. a bf16 scale vector
    consts = dict(DENSE_DEFAULTS, **overrides)
    signature = {n: ("constexpr" if n in consts else
                     pointers.get(n, "*bf16") if n.endswith("_ptr") else "i32")
                 for n in names}
    return _compile_sm90(kernel, signature, consts, ("N", "K", "stride_am", "stride_bk",
                                                     "stride_cm", "stride_a_auxm",
                                                     "stride_auxm"), num_warps, num_stages)


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


def _mix(body) -> collections.Counter:
    """Opcode counts of SASS lines, a predicate (@P0, @!UPT, ...) skipped."""
    return collections.Counter(re.split(r"[ .;]", re.sub(r"^@!?U?P[0-9T]+\s+", "", b))[0]
                               for b in body)


def _registers(sass: str) -> int:
    """Registers a thread ~ the highest register named (+2 reserved)."""
    return max(int(r) for r in re.findall(r"\bR(\d+)\b", sass)) + 3


def dense_main(args) -> int:
    """`--dense '{...}' ...`: the dense kernel's K-loop per configuration: its SASS length,
    async copies (LDGSTS: loads the pipeliner staged), shared-memory loads and barriers,
    registers and spills."""
    for arg in args or ["{}"]:
        compiled = compile_dense(json.loads(arg))
        sass = compiled.asm["sass"]
        body = hottest_loop(sass)
        mix = _mix(body)
        print(f"{arg}: loop {len(body)} instructions; LDGSTS {mix['LDGSTS']}, LDG "
              f"{mix['LDG']}, LDS {mix['LDS']}, LDSM {mix['LDSM']}, HMMA {mix['HMMA']}, BAR "
              f"{mix['BAR']}; ~{_registers(sass)} registers a thread; shared memory "
              f"{compiled.metadata.shared} B; local memory loads/stores "
              f"{sass.count('LDL')}/{sass.count('STL')}")
    return 0


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] == ["--dense"]:
        return dense_main(argv[1:])
    for arg in argv or ["{}"]:
        compiled, consts, warps = compile_gemv(json.loads(arg))
        body = hottest_loop(compiled.asm["sass"])
        weights = consts["BLOCK_N"] * consts["BLOCK_K"] / (32 * warps)
        mix = _mix(body)
        sass = compiled.asm["sass"]
        # Registers a thread ~ the highest register named (+2 reserved); 64K a SM bound the
        # resident warps, which hide the FMA/PRMT chains' latency (2 a scheduler is too few).
        regs = _registers(sass)
        warps_per_sm = min(64, 65536 // (regs * 32 * warps) * warps)
        print(f"{arg}: {len(body)} instructions a loop step, {weights:.0f} weights a thread -> "
              f"{len(body) / weights:.2f} a weight; shared memory {compiled.metadata.shared} B; "
              f"~{regs} registers a thread (<= {warps_per_sm} warps an SM); local memory "
              f"loads/stores {sass.count('LDL')}/{sass.count('STL')}")
        print("   " + ", ".join(f"{k} {v}" for k, v in mix.most_common(16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
