"""Building blocks of the layer benchmarks: real models' linear shapes, the bare / PEFT / ours
layers over one frozen base, forward and forward+backward step functions (x requires grad, the
IA3 vector trains, the base is frozen), timers, peak memory and a progress bar. Ratios are taken
within one run on one machine.

GPU timings: `triton.testing.do_bench` medians with the L2 cache flushed between calls. Eager
timings include the CPU's launch overhead, which dominates small layers; at M <= 16 the same
work is also captured in a CUDA graph and its replays timed, which leaves the kernels' time.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from peft import IA3Config
from peft.tuners.ia3.layer import Linear as PeftLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

import ia3
import ia3_kernels


@dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    k: int  # in_features
    n: int  # out_features
    conv1d: bool = False  # GPT-2's Conv1D: weight stored (in, out), fan_in_fan_out=True


SHAPES = [
    Shape("Llama-3-8B", "q/o_proj", 4096, 4096),
    Shape("Llama-3-8B", "k/v_proj", 4096, 1024),
    Shape("Llama-3-8B", "gate/up_proj", 4096, 14336),
    Shape("Llama-3-8B", "down_proj", 14336, 4096),
    Shape("T5-base", "q/k/v/o", 768, 768),
    Shape("T5-base", "wo", 3072, 768),
    Shape("GPT-2", "c_attn (Conv1D)", 768, 2304, conv1d=True),
]
GRAPH_MAX_M = 16


def pick_shapes(shapes: list, csv: str) -> list:
    """The shapes whose 'model layer' contains one of the comma-separated keys, in the keys'
    order (each shape once); all of them for an empty csv. The tuning tools' --layers."""
    if not csv:
        return list(shapes)
    picked = [s for key in csv.split(",") for s in shapes if key in f"{s.model} {s.layer}"]
    return [s for i, s in enumerate(picked) if s not in picked[:i]]


class TimedRatios:
    """ours / bare and PEFT / bare of a result row with bare_us, peft_us and ours_us."""

    @property
    def ours_over_bare(self) -> float:
        return self.ours_us / self.bare_us

    @property
    def peft_over_bare(self) -> float:
        return self.peft_us / self.bare_us


# --adapter-dtype of the tuning tools: build_layers' adapter_dtype by name.
ADAPTER_DTYPES = {"model": None, "fp32": torch.float32}


def add_adapter_dtype_option(parser) -> None:
    parser.add_argument("--adapter-dtype", choices=tuple(ADAPTER_DTYPES), default="model",
                        help="the IA3 vectors' dtype: the model's (bf16; PEFT's layer as built) "
                             "or fp32 (get_peft_model's default, autocast_adapter_dtype=True)")


def build_layers(shape: Shape, mode: str, device, dtype, seed=0, adapter_dtype=None):
    """(bare, PEFT layer, fused layer), the two IA3 layers wrapping the same frozen base.
    The IA3 vectors come in the base's dtype, as PEFT's layer makes them; adapter_dtype
    (torch.float32) keeps them in fp32 instead, as `get_peft_model` does by default
    (autocast_adapter_dtype=True upcasts 16-bit adapter weights), which changes both IA3
    layers' arithmetic (PEFT: x*l in fp32; ours: the scaling in fp32, rounded once)."""
    torch.manual_seed(seed)
    if shape.conv1d:
        bare = Conv1D(shape.n, shape.k)
    else:
        bare = nn.Linear(shape.k, shape.n)
    bare = bare.to(device, dtype).requires_grad_(False)
    feedforward = mode == "ff"
    config = IA3Config(target_modules=["x"], feedforward_modules=["x"] if feedforward else [],
                       fan_in_fan_out=shape.conv1d)
    layers = []
    vector = None
    for _ in range(2):
        layer = PeftLinear(bare, "default", config=config, is_feedforward=feedforward,
                           is_target_conv_1d_layer=shape.conv1d)
        if adapter_dtype is not None:
            layer.ia3_l["default"].data = layer.ia3_l["default"].data.to(adapter_dtype)
        param = layer.ia3_l["default"]
        with torch.no_grad():
            if vector is None:
                vector = torch.rand(param.shape, generator=torch.Generator().manual_seed(seed)) + 0.5
            param.copy_(vector)  # U(0.5, 1.5), the same for both
        layers.append(layer)
    peft_layer, ours = layers
    ia3.fuse(ours)
    return bare, peft_layer, ours


def step_fn(layer: nn.Module, x: torch.Tensor, phase: str, dy: torch.Tensor) -> Callable[[], object]:
    if phase == "fwd":
        def fwd():
            with torch.no_grad():
                return layer(x)
        return fwd
    inputs = [x] + [p for p in layer.parameters() if p.requires_grad]

    def fwd_bwd():
        return torch.autograd.grad(layer(x), inputs, dy)
    return fwd_bwd


def peak_mib(fn, repeats: int = 3) -> float:
    """Device memory at the peak of one call, over what was allocated before it (outputs kept):
    the largest of a few calls, since memory freed during a call (an earlier call's result
    dropped late) can hide part of a single call's peak (seen: a bare conv's backward read
    24.5 MiB in one run and 122.5 in the next, H100). One unmeasured call first: allocations
    made once per process (cuBLAS workspaces, split-K counters, kernel scratch) belong to no
    step's peak, yet whichever variant ran first would carry them. (Suspected, not verified on
    a GPU: why the GPU test of the attention step's peak read 74.03 MiB over bare against its
    74.0 bound at stop 30, where it passed at stop 29 in another test order.)"""
    import gc
    fn()  # its output is dropped at once
    torch.cuda.synchronize()
    peaks = []
    for _ in range(repeats):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        del out
    return max(peaks) / 2**20


def kernel_table(fn, iters: int = 20) -> list[tuple[str, float, float]]:
    """(kernel name, device us per call of fn, launches per call) from torch.profiler over
    iters calls after a warm-up, longest first: where a fused op's time goes."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals: dict = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us, count = totals.get(event.name, (0.0, 0))
            totals[event.name] = (us + event.device_time, count + 1)
    rows = [(name, us / iters, count / iters) for name, (us, count) in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def require_cuda(tool: str) -> None:
    """Exit with a one-line reason (not a traceback from the first .cuda()) where a GPU-only
    tool runs on a machine without CUDA."""
    if not torch.cuda.is_available():
        raise SystemExit(f"benchmarks.{tool} times GPU kernels: it needs a CUDA GPU")


@contextlib.contextmanager
def forced_tiles(choose):
    """Within the block, dense._matmul_config asks choose(M, N, K, elem_size, a_elem_size) for
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K]), or None to keep the table's
    row; without a sixth value split-K follows dense.split_k_for. Launch plans are emptied on
    entry and restored on exit: a plan keeps the tiles its signature first had, so without this
    every candidate of a sweep after the first would time the first one's tiles."""
    from unittest.mock import patch

    from ia3_kernels import dense
    real = dense._matmul_config

    def config(M, N, K, elem_size, n_sm, interpret, stores_preact=False, a_elem_size=None,
               scales_a=False):
        tiles = choose(M, N, K, elem_size, a_elem_size or elem_size)
        if tiles is None:
            return real(M, N, K, elem_size, n_sm, interpret, stores_preact, a_elem_size,
                        scales_a)
        bm, bn, bk, warps, stages = tiles[:5]
        split = tiles[5] if len(tiles) > 5 else dense.split_k_for(M, N, K, bm, bn, bk, elem_size,
                                                                  n_sm, interpret)
        return bm, bn, bk, split, warps, stages
    with patch.object(dense, "_matmul_config", config), \
            patch.object(dense._MATMUL_PLANS, "plans", {}):
        yield


def time_eager(fn, warmup_ms=10, rep_ms=60) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def capture_graph(fn, warmup: int = 3):
    """(graph, fn's output inside it): fn captured in a CUDA graph after `warmup` calls on a side
    stream (kernels compile and allocators warm outside the capture). Python's garbage
    is collected first and the collector paused during the capture: torch.cuda.graph stopped
    collecting before captures (torch >= 2.9, unless torch.compiler.config.force_cudagraph_gc),
    so a collection that happens to start mid-capture could run finalizers of dead CUDA objects
    from earlier cases there, and in the default "global" capture mode any CUDA call that
    synchronises, from any thread, invalidates the capture. (A suspect, not a proven cause, of
    the suite's failed captures on 2026-12-05, suite-dense-stop26-partial-h100.md.)"""
    import gc
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    gc.collect()
    torch.cuda.synchronize()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    finally:
        if was_enabled:
            gc.enable()
    return graph, out


def time_graph(fn, warmup_ms=10, rep_ms=60) -> float:
    """Capture fn in a CUDA graph (capture_graph), time its replays. A capture that fails is
    reported on stderr with its whole message and tried once more after a device sync (the
    suite records a second failure as the case's error)."""
    import sys

    from triton.testing import do_bench
    try:
        graph, _ = capture_graph(fn)
    except Exception as exc:  # noqa: BLE001 - reported, then one retry
        print(f"time_graph: capture failed ({type(exc).__name__}: {exc}); retrying once",
              file=sys.stderr, flush=True)
        torch.cuda.synchronize()
        graph, _ = capture_graph(fn)
    return do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


def time_cpu(fn, min_seconds=0.2) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n * 1e6


def case_inputs(shape: Shape, m: int, device, dtype):
    """The input x (m x in) and upstream gradient dy (m x out) of one case, seeded."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(m, shape.k, device=device, dtype=dtype, generator=g)
    dy = torch.randn(m, shape.n, device=device, dtype=dtype, generator=g)
    return x, dy


def compare_paths(shape: Shape, m: int, mode: str, device, dtype) -> list[dict]:
    """Time our op with each strategy forced: where does cuBLAS + pass beat the fused GEMM?
    CUDA graphs at every M, so that only GPU time decides."""
    bare, _, ours = build_layers(shape, mode, device, dtype)
    x, dy = case_inputs(shape, m, device, dtype)
    out = []
    for phase in ("fwd", "fwd+bwd"):
        xin = x.clone().requires_grad_(phase == "fwd+bwd")
        fn = step_fn(ours, xin, phase, dy)
        entry = dict(model=shape.model, layer=shape.layer, k=shape.k, n=shape.n, m=m, mode=mode,
                     phase=phase, bare_us=time_graph(step_fn(bare, xin, phase, dy)))
        for path in ("fused", "cublas"):
            with ia3_kernels.dense_path(path):
                entry[f"{path}_us"] = time_graph(fn)
        out.append(entry)
    return out


@contextlib.contextmanager
def progress(total: int, enabled: bool = True):
    state = {"done": 0, "start": time.time()}

    def tick(label: str):
        state["done"] += 1
        if enabled:
            elapsed = time.time() - state["start"]
            bar = "#" * int(30 * state["done"] / total)
            print(f"\r[{bar:<30}] {state['done']}/{total} {elapsed:5.0f}s {label:<48}", end="",
                  flush=True)
    yield tick
    if enabled:
        print()
