"""Run under Nsight Compute on a GPU machine: the quantized small-M kernels, each launched once
after warm-up between cudaProfilerStart/Stop, so that ncu profiles only them:

    ncu --clock-control none --profile-from-start off --set full -o quant \
        python -m benchmarks.ncu_quant
    ncu --import quant.ncu-rep --page details
    ncu --import quant.ncu-rep --page source --csv --print-source sass -k regex:_quant_gemv

Kernels, in order: the NF4 M = 1 GEMV on 14336->4096, bare bnb's NF4 M = 1 on the same weight,
the NF4 GEMV on 4096->4096, the NF4 M = 16 forward and backward on 4096->4096 (small_m.py's
kernel, then dense.py's dequantize-matmul for dx and dl), the int8 GEMV on 14336->4096. On the
H100 (Firecracker) ncu reads the hardware counters; leave its clock control off (the device's
METHOD.md). What it found there on 2026-12-06: ncu-quant-small-m-stop32-h100.log."""
from __future__ import annotations

import sys

import torch

from benchmarks.layers import require_cuda


def main() -> int:
    require_cuda("ncu_quant")
    import ia3_kernels
    from benchmarks.tune_quant_small_m import build, weights_of
    from ia3_kernels import small_m

    torch.manual_seed(0)
    cases = []
    for fmt, k, n in [("nf4", 14336, 4096), ("nf4", 4096, 4096), ("int8", 14336, 4096)]:
        layer = build(fmt, k, n, 1)[0]
        w = weights_of(fmt, [layer])[0]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        scale = torch.rand(k, device="cuda") + 0.5
        cases.append((f"gemv {fmt} {k}->{n}", lambda w=w, x=x, s=scale, n=n: small_m.launch_gemv(
            x, N=n, out_dtype=x.dtype, traceable=False, scale_a=s, **w.small_m_args())))
        if fmt == "nf4" and k == 14336:
            cases.append(("bnb nf4 M=1 14336->4096", lambda q=layer, x=x: q(x)))
        if fmt == "nf4" and k == 4096:
            x16 = torch.randn(16, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            l16 = (torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5).requires_grad_()
            dy = torch.randn(16, n, device="cuda", dtype=torch.bfloat16)

            def fwd_bwd(x16=x16, w=w, l16=l16, dy=dy):
                y = ia3_kernels.ia3_linear_4bit(x16, w, None, l16, True)
                torch.autograd.grad(y, (x16, l16), dy)
            cases.append(("nf4 M=16 4096->4096 fwd+bwd", fwd_bwd))
    for _, fn in cases:
        for _ in range(3):  # compile and warm outside the profiled range
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in cases:
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(name for name, _ in cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
