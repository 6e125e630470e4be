"""The layer suite: every fused layer type against the bare base layer, PEFT's IA3 wrapper, PEFT's
wrapper under torch.compile, and ours eager and compiled — forward and forward+backward (x
requires grad, the IA3 vector trains, the base is frozen), extra peak memory, achieved TFLOP/s
and GB/s and the share of this GPU's roofline. Families:

    dense   nn.Linear on Llama-3-8B and T5-base shapes
    conv1d  GPT-2's Conv1D (weight stored (in, out), fan_in_fan_out)
    int8    bitsandbytes Linear8bitLt (LLM.int8, threshold 6.0, as transformers loads it)
    nf4/fp4 bitsandbytes Linear4bit (double quantization, blocksize 64, compute dtype = x's)
    conv2d  Stable-Diffusion UNet and ResNet-50 convolutions, NCHW and channels_last
    conv3d  a 3x3x3 video block

"M" is the number of rows the layer multiplies: tokens for linear layers, output positions
(batch x spatial) for convolutions. The layers of one (family, shape, mode) are built once and
reused across M, so torch.compile'd variants compile once per layer class, mode and phase
(M dynamic, parameter shapes static), not once per case.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from . import conv, layers

FAMILIES = ("dense", "conv1d", "int8", "nf4", "fp4", "conv2d", "conv3d")
QUANT = ("int8", "nf4", "fp4")
VARIANTS = ("bare", "peft", "peft_compiled", "ours", "ours_compiled")
M_VALUES = [1, 16, 128, 512, 2048, 8192]
QUICK_M_VALUES = [1, 16, 2048]

GPT2_SHAPES = [layers.Shape("GPT-2", "c_attn (Conv1D)", 768, 2304, conv1d=True),
               layers.Shape("GPT-2", "c_fc (Conv1D)", 768, 3072, conv1d=True),
               layers.Shape("GPT-2", "mlp c_proj (Conv1D)", 3072, 768, conv1d=True)]
LINEAR_SHAPES = [s for s in layers.SHAPES if not s.conv1d]
CONV_LAYOUTS = ("nchw", "channels_last")

# CPU-only machines: a few small shapes on the reference path, no compile, no bitsandbytes.
CPU_SHAPES = {
    "dense": [layers.Shape("T5-base", "q/k/v/o", 768, 768)],
    "conv1d": [layers.Shape("GPT-2", "c_attn (Conv1D)", 768, 2304, conv1d=True)],
    "conv2d": [conv.ConvShape("tiny", "3x3 32->32 @16x16", 32, 32, (3, 3), 2, (16, 16), 1)],
}
CPU_M_VALUES = [1, 128]


@dataclass(frozen=True)
class Group:
    """The layers of one family, shape, mode (and conv layout): built once, timed at every M."""
    family: str
    shape: object  # layers.Shape or conv.ConvShape
    mode: str  # "ff" (input scaled) or "attn" (output scaled)
    layout: str = ""  # convolutions: "nchw" or "channels_last"

    @property
    def label(self) -> str:
        extra = f" {self.layout}" if self.layout else ""
        return f"{self.family} {self.shape.model} {self.shape.layer}{extra} {self.mode}"


@dataclass
class SuiteRow(layers.TimedRatios):
    family: str
    model: str
    layer: str
    k: int  # in_features / in channels
    n: int  # out_features / out channels
    m: int  # rows multiplied: tokens, or output positions of a convolution
    mode: str
    layout: str
    dtype: str
    phase: str  # "fwd" or "fwd+bwd"
    timing: str  # "eager" or "graph" (CUDA-graph replays)
    bare_us: float
    peft_us: float
    ours_us: float
    peft_compiled_us: Optional[float] = None
    ours_compiled_us: Optional[float] = None
    peak_mib: dict = field(default_factory=dict)  # variant -> MiB over what was allocated before
    flop: float = 0.0
    bytes: float = 0.0  # the least a fused implementation moves (weights as stored, activations once)
    ours_tflops: Optional[float] = None
    ours_gbps: Optional[float] = None
    roofline_pct: Optional[float] = None  # time at this GPU's roofline / ours
    bound: str = ""  # "memory" or "compute": which ceiling the roofline is
    errors: dict = field(default_factory=dict)  # variant -> why it has no timing


# ---- cases --------------------------------------------------------------------------------------

def groups(families, modes, cuda: bool, quick: bool, layer_keys=(), layouts=CONV_LAYOUTS) -> list[Group]:
    out = []
    for family in families:
        if not cuda:
            shapes = CPU_SHAPES.get(family, [])
        elif family == "dense" or family in QUANT:
            shapes = LINEAR_SHAPES
        elif family == "conv1d":
            shapes = GPT2_SHAPES
        else:
            shapes = [s for s in conv.SHAPES if s.nd == (2 if family == "conv2d" else 3)]
        if quick:
            keep = {"dense": ("k/v_proj", "down_proj"), "int8": ("down_proj",), "nf4": ("down_proj",),
                    "fp4": ("down_proj",), "conv1d": ("c_attn (Conv1D)",)}.get(family)
            shapes = [s for s in shapes if keep is None or s.layer in keep][:2] or shapes[:1]
        if layer_keys:
            shapes = [s for s in shapes
                      if any(k in f"{family} {s.model} {s.layer}".lower() for k in layer_keys)]
        kept = tuple(layouts) if family in ("conv2d", "conv3d") else ("",)
        if family in ("conv2d", "conv3d") and (quick or not cuda):
            kept = ("channels_last",) if cuda else ("nchw",)
        out += [Group(family, s, mode, lay) for s in shapes for lay in kept for mode in modes]
    return out


def build(group: Group, device, dtype):
    """(bare, PEFT, ours) layers of a group, over the same frozen weights and IA3 vector."""
    if group.family in ("dense", "conv1d"):
        return layers.build_layers(group.shape, group.mode, device, dtype)
    if group.family in QUANT:
        from . import quant
        bnb_layer, _, peft_layer, ours = quant.build_layers(group.shape, group.mode, group.family,
                                                            dtype=dtype)
        return bnb_layer, peft_layer, ours
    return conv.build_layers(group.shape, group.mode, _memory_format(group), device=device,
                             dtype=dtype)


def _memory_format(group: Group):
    if group.layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last if group.shape.nd == 2 else torch.channels_last_3d


def m_values_of(group: Group, m_values) -> list[int]:
    if group.family in ("conv2d", "conv3d"):
        return [group.shape.batch * math.prod(group.shape.spatial)]  # stride 1, same padding
    return list(m_values)


def inputs(group: Group, m: int, bare, device, dtype):
    """(x, dy) of one case, seeded."""
    g = torch.Generator(device=device).manual_seed(1)
    if group.family not in ("conv2d", "conv3d"):
        return layers.case_inputs(group.shape, m, device, dtype)
    s = group.shape
    x = torch.randn(s.batch, s.c_in, *s.spatial, device=device, dtype=dtype, generator=g)
    x = x.contiguous(memory_format=_memory_format(group))
    with torch.no_grad():
        dy = torch.randn_like(bare(x))
    return x, dy


def weight_bytes(group: Group, elem: int) -> int:
    s = group.shape
    if group.family in QUANT:
        from . import quant
        return quant.weight_bytes(s, group.family)
    if group.family in ("conv2d", "conv3d"):
        return s.c_out * s.c_in * math.prod(s.kernel) * elem
    return s.k * s.n * elem


def work(group: Group, m: int, phase: str, elem: int) -> tuple[float, float]:
    """(flop, bytes) of one case. Forward: one GEMM (2·M·N·K), weights as stored + x + y.
    Forward+backward (frozen base): the dx GEMM again, weights read again, dy read, dx written."""
    k, n = _k_n(group)
    taps = math.prod(group.shape.kernel) if group.family in ("conv2d", "conv3d") else 1
    flop = 2.0 * m * n * k * taps
    w = weight_bytes(group, elem)
    fwd_bytes = w + m * (k + n) * elem
    if phase == "fwd":
        return flop, fwd_bytes
    return 2 * flop, 2 * fwd_bytes


def _k_n(group: Group) -> tuple[int, int]:
    s = group.shape
    return (s.c_in, s.c_out) if group.family in ("conv2d", "conv3d") else (s.k, s.n)


# ---- timing -------------------------------------------------------------------------------------

def _call(layer, x):
    return layer(x)


_compiled_call: Optional[Callable] = None


def compiled_call() -> Callable:
    """One torch.compile'd `layer(x)` for every layer: the layer is an argument, so another
    instance of the same class and shape reuses the compiled code. Dynamic M (activations), static
    parameter shapes (torch's default), as a model compiled for training sees them: K and N stay
    constants, so Triton kernels keep their 16-divisibility hints (with every size symbolic, our
    kernels lost them and ran up to 2x slower). A recompile limit that is reached raises rather
    than fall back to eager silently."""
    global _compiled_call
    if _compiled_call is None:
        cfg = torch._dynamo.config
        for name, value in (("cache_size_limit", 512), ("accumulated_cache_size_limit", 4096),
                            ("fail_on_recompile_limit_hit", True)):
            if hasattr(cfg, name):
                setattr(cfg, name, value)
        _compiled_call = torch.compile(_call, dynamic=True)
    return _compiled_call


def step(layer, x, phase: str, dy, compiled: bool) -> Callable[[], object]:
    call = compiled_call() if compiled else _call
    if phase == "fwd":
        def fwd():
            with torch.no_grad():
                return call(layer, x)
        return fwd
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd_bwd():
        return torch.autograd.grad(call(layer, x), [x] + params, dy)
    return fwd_bwd


def _attempt(fn, errors: dict, variant: str) -> Optional[float]:
    try:
        return fn()
    except Exception as exc:  # bnb's int8 layer under CUDA-graph capture, a compile failure
        errors[variant] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return None


def bench_group(group: Group, m_values, device, dtype, *, graphs: bool, compiled: bool,
                ceilings: dict, rep_ms: float, tick=lambda label: None) -> list[SuiteRow]:
    bare, peft_layer, ours = build(group, device, dtype)
    cuda = device.type == "cuda"
    elem = torch.empty((), dtype=dtype).element_size()
    k, n = _k_n(group)
    rows = []
    for m in m_values_of(group, m_values):
        tick(f"{group.label} M={m}")
        x, dy = inputs(group, m, bare, device, dtype)
        for phase in ("fwd", "fwd+bwd"):
            xin = x.clone().requires_grad_(phase == "fwd+bwd")
            fns = {"bare": step(bare, xin, phase, dy, False),
                   "peft": step(peft_layer, xin, phase, dy, False),
                   "ours": step(ours, xin, phase, dy, False)}
            if compiled and cuda:
                fns["peft_compiled"] = step(peft_layer, xin, phase, dy, True)
                fns["ours_compiled"] = step(ours, xin, phase, dy, True)
            small = group.family in ("conv2d", "conv3d") or m <= layers.GRAPH_MAX_M
            timings = ["eager"] + (["graph"] if cuda and graphs and small else [])
            for timing in timings:
                errors: dict = {}
                if timing == "graph" and group.family == "int8":
                    # bnb's LLM.int8 matmul synchronises with the host; a failed capture also
                    # leaves the CUDA context unusable for later captures.
                    for v in ("bare", "peft", "peft_compiled"):
                        errors[v] = "bitsandbytes' Linear8bitLt cannot be captured in a CUDA graph"
                if not cuda:
                    us = {v: layers.time_cpu(fn, min_seconds=0.05) for v, fn in fns.items()}
                else:
                    timer = layers.time_eager if timing == "eager" else layers.time_graph
                    us = {v: None if v in errors else
                          _attempt(lambda fn=fn: timer(fn, warmup_ms=rep_ms / 4, rep_ms=rep_ms), errors, v)
                          for v, fn in fns.items()}
                flop, moved = work(group, m, phase, elem)
                nan = float("nan")
                row = SuiteRow(group.family, group.shape.model, group.shape.layer, k, n, m,
                               group.mode, group.layout, str(dtype).replace("torch.", ""), phase,
                               timing, us["bare"] or nan, us["peft"] or nan, us["ours"] or nan,
                               us.get("peft_compiled"), us.get("ours_compiled"), flop=flop,
                               bytes=moved, errors=errors)
                if row.ours_us == row.ours_us:
                    seconds = row.ours_us * 1e-6
                    row.ours_tflops = flop / seconds / 1e12
                    row.ours_gbps = moved / seconds / 1e9
                    if ceilings:
                        memory_us = moved / (ceilings["copy_tb_per_s"] * 1e12) * 1e6
                        compute_us = flop / (ceilings["bf16_matmul_tflops"] * 1e12) * 1e6
                        row.bound = "memory" if memory_us >= compute_us else "compute"
                        row.roofline_pct = 100 * max(memory_us, compute_us) / row.ours_us
                if cuda and phase == "fwd+bwd" and timing == "eager":
                    for v, fn in fns.items():  # (after the eager timings: compiled code is warm)
                        if v not in errors:
                            row.peak_mib[v] = _attempt(lambda fn=fn: round(layers.peak_mib(fn), 2),
                                                       errors, v)
                rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
    return rows


def row_dict(row: SuiteRow) -> dict:
    d = asdict(row)
    d["ours_over_bare"] = row.ours_over_bare
    d["peft_over_bare"] = row.peft_over_bare
    return d
