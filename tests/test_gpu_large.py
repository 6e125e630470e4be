"""Operands with more than 2**31 elements on the GPU: every offset a kernel forms from them must be
64-bit, or rows past 2**31 / row_stride read or write someone else's memory. Each layer kind, each
mode, the big operand being x, y (and dx, dy) or the weight; forward and every gradient against
an fp32 reference within the numerics bar (2x the error of PEFT's bf16 arithmetic + bf16's
rounding floor), and the last rows, whose offsets pass 2**31, checked on their own. The fp32
reference runs a chunk of rows (images) at a time, so no fp32 copy of a big operand is held.

Needs about 45 GiB of free GPU memory; skipped otherwise (and without a GPU)."""
import gc

import pytest
import torch

import ia3_kernels
from conftest import HAS_CUDA, assert_within_peft_bar
from ia3_kernels import fourbit, int8

PAST_2_31 = 2**31 + 2**22  # elements in the big operand
NEEDED_GIB = 45

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA or torch.cuda.mem_get_info()[0] < NEEDED_GIB * 2**30,
                       reason=f"needs a GPU with {NEEDED_GIB} GiB free"),
]


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def linear_kind(kind, N, K):
    """(ours, PEFT's bf16 arithmetic, the fp32 dequantized weight) for a random (N, K) weight."""
    w = torch.randn(N, K, device="cuda") / K**0.5
    if kind == "dense":
        wb = w.bfloat16()
        del w
        return (lambda x, b, s, ff: ia3_kernels.ia3_linear(x, wb, b, s, ff),
                lambda x, b, s, ff: ia3_kernels.torch_ia3_linear(x, wb, b, s, ff),
                lambda: wb.float())
    if kind == "int8":
        scb = w.abs().amax(dim=1).clamp_min(1e-8)
        cb = torch.round(w * (127.0 / scb[:, None])).clamp(-127, 127).to(torch.int8)
        del w
        return (lambda x, b, s, ff: ia3_kernels.ia3_linear_int8(x, cb, scb, b, s, ff),
                lambda x, b, s, ff: int8.torch_ia3_linear_int8(x, cb, scb, b, s, ff),
                lambda: int8.dequantize_int8(cb, scb, torch.float32))
    packed, state = quantize_nf4(w)
    del w
    w4 = fourbit.FourBitWeight.from_bnb(packed, state)
    return (lambda x, b, s, ff: ia3_kernels.ia3_linear_4bit(x, w4, b, s, ff),
            lambda x, b, s, ff: fourbit.torch_ia3_linear_4bit(x, w4, b, s, ff),
            lambda: fourbit.dequantize_4bit(w4, torch.float32))


def quantize_nf4(w, rows_per_call=8192):
    """bnb's NF4 quantization (blocksize 64, double quantization when the weight fits one call).
    bnb's quantize_4bit passes the element count to its C kernel as a 32-bit int, so a weight
    past 2**31 elements is quantized a row chunk at a time (the flat block layout is the same:
    chunks hold whole blocks), without double quantization, which would need the whole absmax."""
    bnb = pytest.importorskip("bitsandbytes")
    F = bnb.functional
    if w.numel() < 2**31:
        return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert (rows_per_call * w.shape[1]) % 64 == 0 and rows_per_call * w.shape[1] < 2**31
    parts = [F.quantize_4bit(w[i:i + rows_per_call], blocksize=64, compress_statistics=False,
                             quant_type="nf4") for i in range(0, w.shape[0], rows_per_call)]
    state = F.QuantState(absmax=torch.cat([st.absmax for _, st in parts]), shape=w.shape,
                         code=parts[0][1].code, blocksize=64, quant_type="nf4", dtype=w.dtype)
    return torch.cat([p for p, _ in parts]), state


def forward_backward(op, x, b, s, feedforward, dy):
    x, b, s = (t.detach().requires_grad_() for t in (x, b, s))
    y = op(x, b, s, feedforward)
    grads = torch.autograd.grad(y, (x, s, b), dy.to(y.dtype))
    return [y.detach(), *grads]


def check_in_chunks(ours, peft, ref_op, x, b, s, feedforward, dy, chunk=2**14):
    """The numerics bar (2x PEFT's error against the fp32 reference + bf16's floor) for y, dx,
    dl and dbias, with the fp32 reference run on `chunk` examples at a time (rows are
    independent; dl and dbias are float64 sums of the chunks'), so that no fp32 copy of a 2**31
    element operand is ever held. The last 64 rows (offsets past 2**31) must pass on their own."""
    sums = {name: torch.zeros(3, dtype=torch.float64, device="cuda") for name in ("y", "dx")}
    reduced = [0, 0]

    def add(name, a, p, r, into):
        r = r.double()
        into += torch.stack([(a.double() - r).square().sum(), (p.double() - r).square().sum(),
                             r.square().sum()])

    def reference(rows):
        return forward_backward(ref_op, x[rows].float(), b.float(), s, feedforward,
                                dy[rows].float())

    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        y_r, dx_r, dl_r, db_r = reference(rows)
        add("y", ours[0][rows], peft[0][rows], y_r, sums["y"])
        add("dx", ours[1][rows], peft[1][rows], dx_r, sums["dx"])
        reduced = [reduced[0] + dl_r.double(), reduced[1] + db_r.double()]
    tail = slice(x.shape[0] - 64, None)
    last = {"y": torch.zeros_like(sums["y"]), "dx": torch.zeros_like(sums["dx"])}
    y_r, dx_r, _, _ = reference(tail)
    add("y", ours[0][tail], peft[0][tail], y_r, last["y"])
    add("dx", ours[1][tail], peft[1][tail], dx_r, last["dx"])
    floor = 2.0**-8  # bf16's unit roundoff, times |reference| (conftest.ERR_FLOOR)
    for what, table in (("", sums), (", last 64 examples", last)):
        for name, (e_ours, e_peft, norm) in table.items():
            e_ours, e_peft, norm = e_ours.sqrt().item(), e_peft.sqrt().item(), norm.sqrt().item()
            assert e_ours <= 2 * e_peft + floor * norm, (name + what, e_ours, e_peft, norm)
    for name, a, p, r in zip(["dl", "dbias"], ours[2:], peft[2:], reduced):
        assert torch.isfinite(a).all(), name
        assert_within_peft_bar(a, p, r, torch.bfloat16, name)


# (N, K, M): x and dx past 2**31 elements; y and dy past it; the weight past it (M small: the
# small-M kernels, and M = 300: the tiled or dequantize paths).
SHAPES = {"x": lambda: (64, 4096, PAST_2_31 // 4096 + 1),
          "y": lambda: (4096, 64, PAST_2_31 // 4096 + 1),
          "w-small-m": lambda: (32768, 65600, 3),
          "w": lambda: (32768, 65600, 300)}


@pytest.mark.parametrize("big", list(SHAPES))
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("kind", ["dense", "int8", "nf4"])
def test_linear_operand_past_2_31_elements(kind, feedforward, big):
    N, K, M = SHAPES[big]()
    ours_op, peft_op, weight_fp32 = linear_kind(kind, N, K)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", generator=g, dtype=torch.bfloat16)
    s = torch.rand(K if feedforward else N, device="cuda", generator=g) + 0.5
    dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
    ia3_kernels.set_strict(True)  # the kernels, not the reference path, must take these sizes
    try:
        ours = forward_backward(ours_op, x, b, s, feedforward, dy)
    finally:
        ia3_kernels.set_strict(False)
    peft = forward_backward(peft_op, x, b, s, feedforward, dy)
    w32 = weight_fp32()
    check_in_chunks(ours, peft, lambda xx, bb, ss, ff: ia3_kernels.torch_ia3_linear(xx, w32, bb, ss, ff),
                    x, b, s, feedforward, dy)


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_conv_activation_past_2_31_elements(feedforward):
    """Conv2d 3x3 64->64 on 520 images of 256x256: 2.18e9 elements in x, y, dx and dy (cuDNN's
    convolution, and our channel passes of the backward that read them all)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (520, 64, 256, 256)
    assert torch.Size(shape).numel() > 2**31
    C = shape[1]
    x = torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(C, C, 3, 3, device="cuda", generator=g) / 24).bfloat16()
    b = torch.randn(C, device="cuda", generator=g, dtype=torch.bfloat16)
    s = (torch.rand(C, device="cuda", generator=g) + 0.5).view(1, C, 1, 1)
    dy = torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)
    ia3_kernels.set_strict(True)
    try:
        ours = forward_backward(
            lambda xx, bb, ss, ff: ia3_kernels.ia3_conv(xx, w, bb, ss, ff, padding=1),
            x, b, s, feedforward, dy)
    finally:
        ia3_kernels.set_strict(False)
    peft = forward_backward(
        lambda xx, bb, ss, ff: ia3_kernels.torch_ia3_conv(xx, w, bb, ss, ff, padding=1),
        x, b, s, feedforward, dy)
    check_in_chunks(
        ours, peft,
        lambda xx, bb, ss, ff: ia3_kernels.torch_ia3_conv(xx, w.float(), bb, ss, ff, padding=1),
        x, b, s, feedforward, dy, chunk=32)
