"""python -m benchmarks.tune_channel_pass: time the convolution backward's channel pass (conv.py's
_channel_pass over dense.py's scale-reduce kernel) at the activation shapes of benchmarks.conv,
for each tile (BLOCK_R x BLOCK_C), CTAs per SM and warp count, and print its bandwidth.

    sum:        a per-channel sum of a product of two activations (reads both): every conv
                layer's dl (feedforward sum(x * dx), attention sum(dy * y))
    scale+sum:  a = a * l in place and sum(a * b) per channel (reads two, writes one): a
                mixed-adapter batch's feedforward backward

Bandwidth counts those bytes once each; the H100's copy bandwidth is ~3.0 TB/s
(report.environment's copy_tb_per_s). CUDA-graph replays, L2 flushed by do_bench.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ia3_kernels import conv

from . import layers
from .conv import SHAPES

NCHW_TILES = [(128, 16), (256, 16), (64, 32), (128, 32), (256, 8), (512, 8)]
CHANNELS_LAST_TILES = [(32, 128), (64, 128), (16, 256), (32, 64), (64, 64), (8, 256)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_channel_pass",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="", help="comma-separated substrings of 'model layer'")
    p.add_argument("--ctas", default="4,8,16")
    p.add_argument("--warps", default="4,8")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    layers.require_cuda("tune_channel_pass")
    keys = [k.strip().lower() for k in args.layers.split(",") if k.strip()]
    ctas = [int(v) for v in args.ctas.split(",")]
    warps = [int(v) for v in args.warps.split(",")]
    for shape in SHAPES:
        if keys and not any(k in f"{shape.model} {shape.layer}".lower() for k in keys):
            continue
        for layout_name in ("nchw", "channels_last"):
            fmt = (torch.contiguous_format if layout_name == "nchw" else
                   torch.channels_last if shape.nd == 2 else torch.channels_last_3d)
            cases = [("sum", shape.c_in), ("scale+sum", shape.c_in)]
            if shape.c_out != shape.c_in:
                cases.append(("sum", shape.c_out))  # an attention layer's dy and y
            for mode, channels in cases:
                size = (shape.batch, channels, *shape.spatial)
                a = torch.randn(size, device="cuda", dtype=torch.bfloat16).contiguous(
                    memory_format=fmt)
                b = torch.randn_like(a)
                scale = torch.rand(channels, device="cuda", dtype=torch.bfloat16) + 0.5
                moved = a.numel() * a.element_size() * (3 if mode == "scale+sum" else 2)

                def run(tiles, a=a, b=b, scale=scale, mode=mode):
                    if mode == "scale+sum":
                        return conv._channel_pass(a, scale=scale, out=a, aux=b, tiles=tiles)
                    return conv._channel_pass(a, aux=b, tiles=tiles)

                results = []
                default_us = layers.time_graph(lambda: run(None))
                tiles_list = NCHW_TILES if layout_name == "nchw" else CHANNELS_LAST_TILES
                for block in tiles_list:
                    for c in ctas:
                        for w in warps:
                            us = layers.time_graph(lambda: run((*block, c, w)))
                            results.append((us, block, c, w))
                results.sort()
                best = results[0]
                print(f"{shape.model} {shape.layer} {layout_name} {mode} C={channels}: "
                      f"{moved / 2**20:.0f} MiB;"
                      f" default {default_us:.1f} us ({moved / default_us / 1e6:.2f} TB/s);"
                      f" best {best[0]:.1f} us ({moved / best[0] / 1e6:.2f} TB/s) tile {best[1]}"
                      f" ctas/SM {best[2]} warps {best[3]}; next: "
                      + ", ".join(f"{us:.1f} {blk} {c} {w}" for us, blk, c, w in results[1:4]),
                      flush=True)
                del a, b
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
