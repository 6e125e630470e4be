"""Temporary experiment: tile shapes and code-table lookups of small_m's NF4 kernel (H100)."""
import itertools, sys
import torch
from ia3_kernels import small_m
from .tune_quant_small_m import build, weights_of, time_rotated


def candidates(m):
    out = []
    if m == 1:
        out += [(bn, bk, w, 2, True, mode) for bn, bk, w, mode in
                itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (0, 1))]
    modes = (0, 1, 2) if m == 1 else (0, 1) if m == 16 else (1,)
    bks = (128, 256, 512) if m <= 16 else (128, 256)
    out += [(bn, bk, w, 2, False, mode) for bn, bk, w, mode in
            itertools.product((32, 64, 128), bks, (4, 8), modes)]
    return out


def main():
    plan = [((14336, 4096), (1, 16, 64)), ((4096, 4096), (1, 16)), ((4096, 14336), (1, 16, 64))]
    for (k, n), ms in plan:
        copies = max(3, int(150e6 // (0.52 * k * n)) + 1)
        layers = build("nf4", k, n, copies)
        ws = weights_of("nf4", layers)
        scale = torch.rand(k, device="cuda") + 0.5
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bare = time_rotated([lambda q=q: q(x) for q in layers])
            def call(w, c):
                bn, bk, warps, stages, gemv, mode = c
                return small_m.launch_small_m(x, w.packed, w.absmax, n, x.dtype, four_bit=True,
                                              traceable=False, quant4=w, code_cast=w.code,
                                              scale_a=scale, tiles=(bn, bk, warps, stages, 0, gemv),
                                              lut_mode=mode)[0]
            ref = call(ws[0], (64, 64, 4, 2, False, 0)).float()
            res = []
            for c in candidates(m):
                try:
                    err = ((call(ws[0], c).float() - ref).abs().max() / ref.abs().max()).item()
                    us = time_rotated([lambda w=w: call(w, c) for w in ws])
                    res.append((us, c, err))
                except Exception as exc:
                    print(f"  {c} failed: {type(exc).__name__} {str(exc)[:100]}", flush=True)
            res.sort()
            for mode in sorted({c[5] for _, c, _ in res}):
                for gemv in (True, False):
                    sel = [r for r in res if r[1][5] == mode and r[1][4] == gemv]
                    if sel:
                        print(f"nf4 {k}->{n} M={m} bare {bare:.1f} mode {mode} gemv {gemv}: " +
                              "  ".join(f"{c[:3]}:{us:.1f}(err {e:.0e})" for us, c, e in sel[:4]),
                              flush=True)


if __name__ == "__main__":
    sys.exit(main())
