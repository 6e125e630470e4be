"""python -m benchmarks.overhead: host (CPU) time per eager layer call — bare, PEFT, ours — on a
layer small enough that the GPU never holds the CPU back, a breakdown of our stack, and
cProfiles of ours (forward, and forward+backward with autograd's device threads off so that the
profiler sees the backward). Eager timings of small layers measure exactly this.
`--conv`: the same for the convolution layers; `--paths`: ours with each dense strategy forced;
`--eager`: where large eager forward+backward calls spend their time (host, device, syncs);
`--threads`: what autograd's device thread costs them; `--quant`: the bitsandbytes layers (int8,
NF4) and which launch path our quantized kernels took."""
from __future__ import annotations

import cProfile
import contextlib
import pstats
import sys
import time

import torch

from .conv import ConvShape, build_layers as build_conv_layers
from .layers import Shape, build_layers, require_cuda

# A conv small enough that every call is host-bound, and a benchmark-sized one.
TINY_CONV = ConvShape("tiny", "3x3 64->64 @8x8", 64, 64, (3, 3), 2, (8, 8), 1)
UNET_CONV = ConvShape("SD UNet", "3x3 320->320 @64x64", 320, 320, (3, 3), 8, (64, 64), 1)


_last_sync_wait_us = [0.0]


def host_us(fn, calls=2000) -> float:
    """Host us per call. The wait for the device after the loop is kept in _last_sync_wait_us:
    about one call's device time when the host is the bottleneck; far more when the device is
    (the launch queue then backs up, and the host time measured is the device's)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    _last_sync_wait_us[0] = (time.perf_counter() - start - elapsed) * 1e6
    return elapsed / calls * 1e6


def breakdown() -> None:
    """Host us of each layer of our eager stack, bottom up, for a feedforward forward."""
    import torch.nn.functional as F

    from ia3_kernels import dense
    from ia3_kernels.launch import FastKernel

    shape = Shape("T5-base", "q/k/v/o", 768, 768)
    bare, _, ours = build_layers(shape, "ff", torch.device("cuda"), torch.bfloat16)
    x = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
    w, b = bare.weight, bare.bias
    s = ours.ia3_l["default"].detach()
    # The fused path's own launch, caught as it happens (the kernel's signature is not copied
    # here: a copy went stale once and crashed this benchmark), then replayed both ways.
    caught = []
    real_launch = FastKernel._launch

    def spy(self, grid, args, kwargs):
        caught.append((self.fn, grid, args, kwargs))
        return real_launch(self, grid, args, kwargs)

    FastKernel._launch = spy
    try:
        with dense.dense_path("fused"):
            dense.dense_forward_impl(x, w, b, s, True, False, False)
    finally:
        FastKernel._launch = real_launch
    jit_fn, grid, args, kwargs = caught[0]
    fast = FastKernel(jit_fn)

    def launch(kernel):
        kernel[grid](*args, **kwargs)

    steps = {
        "torch.empty": lambda: torch.empty(16, 768, device="cuda", dtype=torch.bfloat16),
        "F.linear (bare op)": lambda: F.linear(x, w, b),
        "Triton kernel[grid](...)": lambda: launch(jit_fn),
        "FastKernel launch": lambda: launch(fast),
        "dense_forward_impl": lambda: dense.dense_forward_impl(x, w, b, s, True, False, False),
        "ia3_linear": lambda: dense.ia3_linear(x, w, b, s, True),
        "ia3.Linear layer": lambda: ours(x),
        "nn.Linear layer": lambda: bare(x),
    }
    with torch.no_grad():
        for name, fn in steps.items():
            print(f"breakdown host us/call: {name:<26} {host_us(fn):7.1f}")


def backward_breakdown() -> None:
    """Host us of our backward impl called directly (no autograd engine), per mode."""
    from ia3_kernels import dense

    shape = Shape("T5-base", "q/k/v/o", 768, 768)
    for mode in ("ff", "attn"):
        bare, _, ours = build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)
        s = ours.ia3_l["default"].detach()
        x = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
        ff = mode == "ff"
        _, u = dense.dense_forward_impl(x, bare.weight, bare.bias, s, ff, False, not ff)
        fn = lambda: dense.dense_backward_impl(dy, x, bare.weight, bare.bias, s, u, ff, False,  # noqa: E731
                                               True, True, False, False, torch.bfloat16)
        print(f"backward impl host us/call ({mode}, l {s.dtype}): {host_us(fn):7.1f}")


@contextlib.contextmanager
def autograd_threads(enabled: bool):
    torch.autograd.set_multithreading_enabled(enabled)
    try:
        yield
    finally:
        torch.autograd.set_multithreading_enabled(True)


def host_table(prefix: str, layers: dict, x, dy, with_threads: bool = True) -> None:
    """Host us per forward and forward+backward for each layer (name -> module), and a cProfile
    of 300 forward+backward calls of layers["ours"]; autograd's device threads off for the
    profile (else the backward runs on a thread the profiler does not see)."""
    xg = x.clone().requires_grad_()
    for name, layer in layers.items():
        with torch.no_grad():
            fwd = host_us(lambda: layer(x))
        params = [xg] + [p for p in layer.parameters() if p.requires_grad]
        line = f"{prefix} {name:<5} host us/call: forward {fwd:7.1f}   forward+backward "
        if with_threads:
            line += f"{host_us(lambda: torch.autograd.grad(layer(xg), params, dy), calls=500):7.1f}   "
        with autograd_threads(False):
            fb1 = host_us(lambda: torch.autograd.grad(layer(xg), params, dy), calls=500)
        print(line + f"(autograd device threads off: {fb1:7.1f}; device wait after loop "
                     f"{_last_sync_wait_us[0]:.0f} us)")
    ours = layers["ours"]
    params = [xg] + [p for p in ours.parameters() if p.requires_grad]
    prof = cProfile.Profile()
    with autograd_threads(False):
        prof.runcall(lambda: [torch.autograd.grad(ours(xg), params, dy) for _ in range(300)])
    print(f"--- cProfile, ours, {prefix.strip()}, forward+backward x 300 (autograd threads off)")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def conv_breakdown() -> None:
    """Host us of each piece of our eager conv stack (tiny 3x3 conv, bf16), with the device
    wait after each timing loop (large = the device, not the host, bounds that line)."""
    from ia3_kernels import conv

    x = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    s = torch.rand(64, device="cuda", dtype=torch.bfloat16) + 0.5
    geometry = ((1, 1), (1, 1), (1, 1), 1)
    w_fixed, _ = conv.scale_conv_weight(w, s, True, 1)
    y_attn, _ = conv.conv_forward_impl(x, w, b, s, False, geometry)
    steps = {
        "torch.empty_like(W)": lambda: torch.empty_like(w),
        "torch.convolution(x, W)": lambda: torch.convolution(x, w, b, *geometry[:3], False, [0, 0], 1),
        "torch.convolution(x, W' fixed)": lambda: torch.convolution(x, w_fixed, b, *geometry[:3],
                                                                   False, [0, 0], 1),
        "scale_conv_weight ff": lambda: conv.scale_conv_weight(w, s, True, 1),
        "scale_conv_weight attn+bias": lambda: conv.scale_conv_weight(w, s, False, 1, b),
        "conv_forward_impl ff": lambda: conv.conv_forward_impl(x, w, b, s, True, geometry),
        "ia3_conv ff (no grad)": lambda: conv.ia3_conv(x, w, b, s, True, 1, 1),
        "convolution_backward(W) dx only": lambda: conv._CONV_BACKWARD(
            dy, x, w, None, *geometry[:3], False, [0, 0], 1, [True, False, False]),
        "_channel_pass (x, dx)": lambda: conv._channel_pass(dy, aux=x),
        "_dscale ff (one launch)": lambda: conv._dscale(dy, x, dy, x, w, b, s, True, geometry),
        "conv_backward_impl ff (dx, dl)": lambda: conv.conv_backward_impl(
            dy, x, w, b, s, None, True, geometry, True, True, False, False),
        "conv_backward_impl attn (dx, dl)": lambda: conv.conv_backward_impl(
            dy, x, w, b, s, y_attn, False, geometry, True, True, False, False),
    }
    with torch.no_grad():
        for name, fn in steps.items():
            us = host_us(fn)
            print(f"conv breakdown host us/call: {name:<34} {us:7.1f}   "
                  f"(device wait after loop {_last_sync_wait_us[0]:8.1f} us)")


def conv_ablation(rounds: int = 5, big: bool = False) -> None:
    """In-context host cost of each piece of our conv fwd+bwd (tiny 3x3 conv): the same loop
    with pieces swapped for no-ops, cumulatively (each line drops one more piece; differences
    between lines are what the pieces cost inside the whole call, caches and all)."""
    from ia3_kernels import conv

    shape = UNET_CONV if big else TINY_CONV
    x = torch.randn(shape.batch, shape.c_in, *shape.spatial, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    real_fold, real_backward = conv.scale_conv_weight, conv.conv_backward_impl
    in_backward = [False]
    skip = {"dl": False, "backward fold": False, "forward fold": False, "checks": False}

    def dscale(scaled_grad, other, dy, x, weight, bias, scale, *rest):
        return torch.empty_like(scale) if skip["dl"] else real["_dscale"](
            scaled_grad, other, dy, x, weight, bias, scale, *rest)

    def fold(weight, scale, feedforward, groups, bias=None):
        if skip["backward fold" if in_backward[0] else "forward fold"]:
            return weight, (bias if bias is not None and not feedforward else None)
        return real_fold(weight, scale, feedforward, groups, bias)

    def backward_impl(*args):
        in_backward[0] = True
        try:
            return real_backward(*args)
        finally:
            in_backward[0] = False

    def check_inputs(x, weight, *args):
        return (None, weight.dim() - 2) if skip["checks"] else real["_check_inputs"](
            x, weight, *args)

    real = {"_dscale": conv._dscale, "_check_inputs": conv._check_inputs}
    patches = {"_dscale": dscale, "scale_conv_weight": fold, "conv_backward_impl": backward_impl,
               "_check_inputs": check_inputs}
    saved = {name: getattr(conv, name) for name in patches}
    for name, fn in patches.items():
        setattr(conv, name, fn)
    try:
        for mode in ("ff", "attn"):
            bare, peft_layer, ours = build_conv_layers(shape, mode, torch.contiguous_format)
            steps = ((ours, "ours as is", None), (ours, "- dl launch", "dl"),
                     (ours, "- backward weight fold", "backward fold"),
                     (ours, "- forward weight fold", "forward fold"),
                     (ours, "- input checks", "checks"), (bare, "bare nn.Conv2d", None),
                     (peft_layer, "PEFT's IA3 Conv2d", None))
            best: dict = {}
            for _ in range(rounds):  # the host's timings drift: the best of a few rounds
                for layer, label, drop in steps:
                    if drop is not None:
                        skip[drop] = True
                    params = [xg] + [p for p in layer.parameters() if p.requires_grad]
                    with autograd_threads(False):
                        us = host_us(lambda: torch.autograd.grad(layer(xg), params, dy),
                                     calls=100 if big else 500)
                    best[label] = min(best.get(label, us), us)
                skip.update(dict.fromkeys(skip, False))
            for _, label, _ in steps:
                print(f"conv ablation {shape.layer} {mode:<4} fwd+bwd host us/call: {label:<26} "
                      f"{best[label]:7.1f} (best of {rounds})")
    finally:
        for name, fn in saved.items():
            setattr(conv, name, fn)


def conv_overhead() -> None:
    """The same for the convolution layers (python -m benchmarks.overhead --conv): a 3x3 conv
    small enough (batch 2, 64 channels, 8x8) that every call is host-bound."""

    shape = TINY_CONV
    for mode in ("ff", "attn"):
        bare, peft_layer, ours = build_conv_layers(shape, mode, torch.contiguous_format)
        x = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16)
        host_table(f"conv {mode:<4}", {"bare": bare, "peft": peft_layer, "ours": ours}, x, dy,
                   with_threads=False)


def waits_for_device_ms(fn, sleep_ms: float = 50.0) -> float:
    """Host ms of one fn() call issued while the device is busy for ~sleep_ms: near 0 when fn
    only queues work, ~sleep_ms when something in it waits for the device (a sync)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(sleep_ms * 1e-3 * 1.8e9))  # cycles at ~1.8 GHz
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e3


def device_mallocs_per_call(fn, calls: int = 50) -> float:
    """cudaMalloc calls per fn() in steady state (each one synchronizes the device)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats().get("num_device_alloc", 0)
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.memory_stats().get("num_device_alloc", 0) - before) / calls


def conv_big() -> None:
    """A benchmark-sized conv (UNet 3x3 320->320 @64x64, batch 8, NCHW): host us per
    forward+backward, whether a call waits for the device, cudaMallocs per call, and a short
    cProfile of ours (eager timings of big convs were far above max(host, device))."""

    shape = UNET_CONV
    x = torch.randn(8, 320, 64, 64, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    for mode in ("ff", "attn"):
        layers = dict(zip(("bare", "peft", "ours"),
                          build_conv_layers(shape, mode, torch.contiguous_format)))
        for name, layer in layers.items():
            params = [xg] + [p for p in layer.parameters() if p.requires_grad]
            step = lambda: torch.autograd.grad(layer(xg), params, dy)  # noqa: E731
            host = host_us(step, calls=100)
            wait = _last_sync_wait_us[0] / 100
            print(f"big conv {mode:<4} {name:<5} fwd+bwd host us/call {host:8.1f} (device wait "
                  f"after loop {wait:7.1f} us/call), one call behind a 50 ms device sleep "
                  f"{waits_for_device_ms(step):6.2f} ms, cudaMalloc/call "
                  f"{device_mallocs_per_call(step):.2f}")
        ours = layers["ours"]
        params = [xg] + [p for p in ours.parameters() if p.requires_grad]
        prof = cProfile.Profile()
        with autograd_threads(False):
            prof.runcall(lambda: [torch.autograd.grad(ours(xg), params, dy) for _ in range(100)])
        print(f"--- cProfile, ours, big conv {mode}, forward+backward x 100 (autograd threads off)")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(12)


def queued_device_us(fn, calls: int = 20, sleep_ms: float = 100.0) -> float:
    """Device us per fn() with no host gaps: the calls are queued behind a sleep kernel long
    enough to hide their host time, and timed between events around them alone. Prints a
    warning when the host took longer to queue them than the sleep (the figure then includes
    host gaps) or when fn synchronizes (the sleep cannot cover it)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(sleep_ms * 1e-3 * 1.8e9))  # cycles at ~1.8 GHz
    t0 = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    queued_ms = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    if queued_ms > 0.8 * sleep_ms:
        print(f"    (queueing took {queued_ms:.0f} ms against a {sleep_ms:.0f} ms sleep: host gaps "
              "or a sync are in this figure)")
    return start.elapsed_time(end) / calls * 1e3


# Eager suite rows far above max(host, device) at M = 2048/8192 (suite-dense-large-h100.md):
# a sync, a cudaMalloc, or the autograd thread hand-off? One line per layer says which.
EAGER_CASES = [
    (Shape("Llama-3-8B", "k/v_proj", 4096, 1024), "ff", 8192),
    (Shape("Llama-3-8B", "q/o_proj", 4096, 4096), "attn", 8192),
    (Shape("Llama-3-8B", "q/o_proj", 4096, 4096), "ff", 2048),
    (Shape("T5-base", "wo", 3072, 768), "attn", 2048),
    (Shape("T5-base", "q/k/v/o", 768, 768), "ff", 2048),
    (Shape("T5-base", "q/k/v/o", 768, 768), "ff", 16),
]


def eager_diag() -> None:
    """For each EAGER_CASES layer, bare / PEFT / ours forward+backward (x and the IA3 vector
    require grad, as in the suite): host us per call (autograd threads on, and off), device us
    per call with no host gaps, the suite's eager reading (do_bench, L2 flushed), cudaMallocs
    per call, and the host ms of a call issued behind 50 ms of device work (~50: it syncs)."""
    from ia3_kernels import dense_path

    from .layers import step_fn, time_eager
    for shape, mode, M in EAGER_CASES:
        layers = dict(zip(("bare", "peft", "ours"),
                          build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)))
        x = torch.randn(M, shape.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, shape.n, device="cuda", dtype=torch.bfloat16)
        runs = [(name, layer, "auto") for name, layer in layers.items()]
        if M >= 2048:  # ours with the TMA GEMM forced (the backward's 2**38 flop limit)
            runs.append(("ours/tma", layers["ours"], "tma"))
        for name, layer, path in runs:
            fb = step_fn(layer, x, "fwd_bwd", dy)
            with dense_path(path):
                host = host_us(fb, calls=200)
                with autograd_threads(False):
                    host_off = host_us(fb, calls=200)
                device = queued_device_us(fb)
                print(f"eager {shape.model} {shape.layer} {mode} M={M} {name:<8} fwd+bwd: host "
                      f"{host:7.1f} us (threads off {host_off:7.1f}), device {device:7.1f} us, "
                      f"do_bench {time_eager(fb):7.1f} us, cudaMalloc/call "
                      f"{device_mallocs_per_call(fb):.2f}, behind 50 ms of work "
                      f"{waits_for_device_ms(fb):5.1f} ms", flush=True)
        del layers, x, dy
        torch.cuda.empty_cache()


class _PythonIdentity(torch.autograd.Function):
    """y = x with a Python backward that returns dy: what a Python backward node costs."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        return dy


def threads_diag() -> None:
    """Eager forward+backward host time grew with M only with autograd's device threads on
    (overhead --eager, H100: ours k/v_proj ff M = 8192 1091 us on, 418 off; T5 768 M = 16 448
    / 466). Which part: a Python backward node on the device thread at all (an identity
    Function), the GIL's switch interval (5 ms by default: a thread that wants the GIL waits
    for the holder's next release or the interval), cuBLAS on that thread, or our kernels?"""
    from ia3_kernels import dense_path

    default_interval = sys.getswitchinterval()
    for shape, mode, M in [(Shape("Llama-3-8B", "k/v_proj", 4096, 1024), "ff", 8192),
                           (Shape("Llama-3-8B", "q/o_proj", 4096, 4096), "attn", 8192),
                           (Shape("T5-base", "q/k/v/o", 768, 768), "ff", 2048)]:
        bare, _, ours = build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)
        x = torch.randn(M, shape.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, shape.n, device="cuda", dtype=torch.bfloat16)
        bare_py = lambda t: _PythonIdentity.apply(bare(t))  # noqa: E731
        runs = [("bare", bare, "auto"), ("bare + Python identity node", bare_py, "auto"),
                ("ours", ours, "auto"), ("ours fused", ours, "fused"),
                ("ours cublas", ours, "cublas"), ("ours tma", ours, "tma")]
        for name, layer, path in runs:
            params = [x] + ([p for p in layer.parameters() if p.requires_grad]
                            if isinstance(layer, torch.nn.Module) else [])
            fb = lambda: torch.autograd.grad(layer(x), params, dy)  # noqa: E731
            cells = []
            with dense_path(path):
                for threads, interval in ((True, default_interval), (False, default_interval),
                                          (True, 1e-5)):
                    sys.setswitchinterval(interval)
                    try:
                        with autograd_threads(threads):
                            cells.append(host_us(fb, calls=200))
                    finally:
                        sys.setswitchinterval(default_interval)
                device = queued_device_us(fb)
            print(f"threads {shape.model} {shape.layer} {mode} M={M} {name:<28} fwd+bwd host us: "
                  f"threads on {cells[0]:7.1f}, off {cells[1]:7.1f}, on with a 10 us GIL switch "
                  f"interval {cells[2]:7.1f}; device {device:7.1f}", flush=True)
        del bare, ours, x, dy
        torch.cuda.empty_cache()


def paths_host() -> None:
    """Host us per eager call of ours with each dense strategy forced, on T5's 768->768 at
    M = 16 (GPU time negligible): what each strategy's launches cost the CPU. The TMA kernel
    launches through Triton's own path with host-side descriptors; the others through
    launch.FastKernel and aten."""
    import ia3_kernels
    shape = Shape("T5-base", "q/k/v/o", 768, 768)
    for mode in ("ff", "attn"):
        bare, _, ours = build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)
        x = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
        xg = x.clone().requires_grad_()
        for name, layer, path in [("bare", bare, "auto"), ("ours", ours, "fused"),
                                  ("ours", ours, "cublas"), ("ours", ours, "tma")]:
            params = [xg] + [p for p in layer.parameters() if p.requires_grad]
            with ia3_kernels.dense_path(path):
                with torch.no_grad():
                    fwd = host_us(lambda: layer(x), calls=500)
                fb = host_us(lambda: torch.autograd.grad(layer(xg), params, dy), calls=300)
                with autograd_threads(False):
                    fb1 = host_us(lambda: torch.autograd.grad(layer(xg), params, dy), calls=300)
            print(f"{mode:<4} {name} {path:<6} host us/call: forward {fwd:7.1f}   "
                  f"forward+backward {fb:7.1f} (autograd device threads off: {fb1:7.1f})",
                  flush=True)
        # Where the TMA path's backward spends its host time (threads off: the profiler sees it).
        params = [xg] + [p for p in ours.parameters() if p.requires_grad]
        prof = cProfile.Profile()
        with ia3_kernels.dense_path("tma"), autograd_threads(False):
            prof.runcall(lambda: [torch.autograd.grad(ours(xg), params, dy) for _ in range(200)])
        print(f"--- cProfile, ours, {mode}, TMA forced, forward+backward x 200 (threads off)")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(15)


SPIN_CASES = {
    "t5ff16": (Shape("T5-base", "q/k/v/o", 768, 768), "ff", 16),
    "t5ff2048": (Shape("T5-base", "q/k/v/o", 768, 768), "ff", 2048),
    "t5attn2048": (Shape("T5-base", "wo", 3072, 768), "attn", 2048),
    "kvff8192": (Shape("Llama-3-8B", "k/v_proj", 4096, 1024), "ff", 8192),
}


def spin() -> None:
    """`--spin CASE VARIANT SECONDS [body|all] [off]`: one eager forward+backward (autograd's
    device threads on, as in training, unless `off`) in a loop for SECONDS. Prints host us per
    call and, for ours, how much of it the backward's own body took on the thread that ran it;
    `body` / `all` add a cProfile of that body or of the whole loop (see below). A sampling
    profiler outside the process also works on this loop (py-spy record --threads; with
    --native it fell seconds behind at 1 kHz on the H100 host and never wrote its file)."""
    from ia3_kernels import dense

    args = sys.argv[sys.argv.index("--spin") + 1:]
    case, variant, seconds = args[0], args[1], float(args[2])
    shape, mode, M = SPIN_CASES[case]
    layers = dict(zip(("bare", "peft", "ours"),
                      build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)))
    layer = layers[variant]
    x = torch.randn(M, shape.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, shape.n, device="cuda", dtype=torch.bfloat16)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    body = [0.0, 0]
    real_backward = dense._DenseLinearFunction.backward
    # `--spin CASE VARIANT SECONDS body|all [off]`: cProfile the backward's body on whichever
    # thread runs it, or the whole loop. One profiler at a time: since Python 3.12 cProfile
    # rides on sys.monitoring, which is process-wide (it sees every thread's calls) and takes
    # one profiler.
    profile = args[3] if len(args) > 3 and args[3] in ("body", "all") else ""
    body_prof, caller_prof = cProfile.Profile(), cProfile.Profile()

    def timed_backward(ctx, g):
        if profile == "body":
            body_prof.enable()
        start = time.perf_counter()
        try:
            return real_backward(ctx, g)
        finally:
            body[0] += time.perf_counter() - start
            body[1] += 1
            if profile == "body":
                body_prof.disable()

    dense._DenseLinearFunction.backward = staticmethod(timed_backward)
    torch.autograd.set_multithreading_enabled("off" not in args[3:])
    try:
        for _ in range(50):
            torch.autograd.grad(layer(x), params, dy)
        torch.cuda.synchronize()
        body[:] = [0.0, 0]
        if profile == "body":
            body_prof = cProfile.Profile()
        elif profile == "all":
            caller_prof.enable()
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(20):
                torch.autograd.grad(layer(x), params, dy)
            calls += 20
        elapsed = time.perf_counter() - start
        if profile == "all":
            caller_prof.disable()
        torch.cuda.synchronize()
    finally:
        dense._DenseLinearFunction.backward = staticmethod(real_backward)
    threads = torch.autograd.is_multithreading_enabled()
    torch.autograd.set_multithreading_enabled(True)
    per_body = body[0] / body[1] * 1e6 if body[1] else 0.0
    print(f"spin {case} {variant}: {calls} fwd+bwd calls, host {elapsed / calls * 1e6:.1f} us a "
          f"call; our backward body {per_body:.1f} us a call on the device thread "
          f"({body[1]} calls; autograd device threads "
          f"{'on' if threads else 'off'})", flush=True)
    if profile and (profile == "all" or body[1]):
        label = "the backward's body" if profile == "body" else "the whole loop"
        print(f"--- spin {case} {variant}: cProfile of {label}, {calls} calls")
        pstats.Stats(body_prof if profile == "body" else caller_prof,
                     stream=sys.stdout).sort_stats("tottime").print_stats(22)


@contextlib.contextmanager
def _host_variant(finish: bool, plans: bool):
    """Ours with dl's in-kernel finish and/or _launch_matmul's launch plans turned off, as
    before they existed (torch sum + cast + view of the partials; the full launch each call)."""
    from ia3_kernels import dense, quantized

    real = dense._launch_matmul

    def without_finish(*args, finish_like=None, **kwargs):
        return real(*args, **kwargs)

    saved = dense._PLANS_ENABLED
    dense._PLANS_ENABLED = plans
    if not finish:
        dense._launch_matmul = quantized._launch_matmul = without_finish
    try:
        yield
    finally:
        dense._PLANS_ENABLED = saved
        dense._launch_matmul = quantized._launch_matmul = real


def ab_host(rounds: int = 5) -> None:
    """`--ab`: host us per eager forward+backward (autograd's device threads on, as in
    training) of bare, PEFT and ours with and without dl's in-kernel finish and the launch
    plans, interleaved in rounds in one process (the host's speed drifts between machines and
    minutes: best of `rounds`), and the device us of ours (no host gaps)."""
    variants = [("bare", "bare", None), ("peft", "peft", None),
                ("ours before (no finish, no plans)", "ours", (False, False)),
                ("ours + in-kernel finish", "ours", (True, False)),
                ("ours + finish + plans", "ours", (True, True))]
    for case in ("t5ff16", "t5ff2048", "t5attn2048", "kvff8192"):
        shape, mode, M = SPIN_CASES[case]
        layers = dict(zip(("bare", "peft", "ours"),
                          build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)))
        x = torch.randn(M, shape.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(M, shape.n, device="cuda", dtype=torch.bfloat16)
        best: dict = {}
        for _ in range(rounds):
            for label, name, flags in variants:
                layer = layers[name]
                params = [x] + [p for p in layer.parameters() if p.requires_grad]
                step = lambda: torch.autograd.grad(layer(x), params, dy)  # noqa: E731
                ctx = _host_variant(*flags) if flags else contextlib.nullcontext()
                with ctx:
                    us = host_us(step, calls=300)
                best[label] = min(best.get(label, us), us)
        with _host_variant(True, True):
            params = [x] + [p for p in layers["ours"].parameters() if p.requires_grad]
            device = queued_device_us(lambda: torch.autograd.grad(layers["ours"](x), params, dy))
        for label, _, _ in variants:
            print(f"ab {case} ({shape.model} {shape.layer} {mode} M={M}) {label:<34} fwd+bwd host "
                  f"{best[label]:7.1f} us (best of {rounds})", flush=True)
        print(f"ab {case} ours device {device:7.1f} us a fwd+bwd (no host gaps)", flush=True)
        del layers, x, dy
        torch.cuda.empty_cache()


def quant_overhead() -> None:
    """`--quant`: host us per eager call of bare bnb, bare bf16, PEFT and ours on int8 and NF4
    bases (T5-base 768->768, feedforward, M = 1 and 16: GPU times of 8-14 us), whether our
    small-M kernels launched through FastKernel's direct path or fell back to Triton's own
    run() (~25-45 us a call), and a cProfile of our no-grad forward. Why: in the 2026-12-06
    layer benchmark our NF4 eager forward at M <= 16 read ~30 us above its CUDA-graph time,
    where int8's same-path forward read within a few us of its own (nf4-h100-stop33.md); as
    do_bench's L2 flush hides ~80 us of host time a call, NF4's host time is at least ~25 us
    more than int8's. With the kernels stubbed out on the development CPU NF4's Python cost ~30
    us more (77-87 against 50-53 us a no-grad call): its per-call weight checks and layout,
    which ia3.Linear4bit now keeps per layer (ia3/bnb.py). This shows what remains."""
    from ia3_kernels import small_m

    from . import quant

    shape = Shape("T5-base", "q/k/v/o", 768, 768)
    kernels = {"gemv": small_m._GEMV_KERNELS[False], "small_m": small_m._KERNELS[False]}
    for fmt in ("int8", "nf4"):
        bnb_layer, bf16, peft_layer, ours = quant.build_layers(shape, "ff", fmt)
        for m in (1, 16):
            x = torch.randn(m, shape.k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(m, shape.n, device="cuda", dtype=torch.bfloat16)
            host_table(f"{fmt} M={m:<2}", {"bnb": bnb_layer, "bf16": bf16, "peft": peft_layer,
                                          "ours": ours}, x, dy, with_threads=False)
            for name, kernel in kernels.items():
                state = ("not a FastKernel" if not hasattr(kernel, "_usable") else
                         f"direct path usable {kernel._usable}, keys {len(kernel._compiled)}, "
                         f"launched directly {len(kernel._launched)}")
                print(f"{fmt} M={m} {name} kernel: {state}")
        with torch.no_grad():
            x = torch.randn(1, shape.k, device="cuda", dtype=torch.bfloat16)
            prof = cProfile.Profile()
            prof.runcall(lambda: [ours(x) for _ in range(1000)])
        print(f"--- cProfile, ours, {fmt} M=1 no-grad forward x 1000")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(20)


def _conv_default() -> None:
    conv_breakdown()
    conv_overhead()


# Flag -> what it runs instead of the default (the first flag of this order present wins).
MODES = {
    "--ab": ab_host,
    "--spin": spin,
    "--paths": paths_host,
    "--threads": threads_diag,
    "--eager": eager_diag,
    "--conv-big": conv_big,
    "--conv-ablation": lambda: conv_ablation(big="big" in sys.argv[1:]),
    "--conv": _conv_default,
    "--quant": quant_overhead,
}


def main() -> int:
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        print(__doc__.strip())
        print("flags (the first present wins; none: the dense breakdown and host tables): "
              + ", ".join(MODES))
        return 0
    require_cuda("overhead")
    for flag, run in MODES.items():
        if flag in sys.argv[1:]:
            run()
            return 0
    breakdown()
    backward_breakdown()
    shape = Shape("T5-base", "q/k/v/o", 768, 768)
    for mode in ("ff", "attn"):
        bare, peft_layer, ours = build_layers(shape, mode, torch.device("cuda"), torch.bfloat16)
        x = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(16, 768, device="cuda", dtype=torch.bfloat16)
        host_table(f"{mode:<4}", {"bare": bare, "peft": peft_layer, "ours": ours}, x, dy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
