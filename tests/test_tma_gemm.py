"""tma_gemm.py, the persistent TMA GEMM: every prologue/epilogue flag against float64 with the
"2x PEFT's error" bar, both weight layouts, M/N/K that are not multiples of a block, one and
several tiles per CTA, the split epilogue; the TMA eligibility rules."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, HAS_CUDA, assert_within_peft_bar
from ia3_kernels import tma_gemm

pytestmark = pytest.mark.skipif(not tma_gemm.available(torch.device(DEVICE)),
                                reason="needs TMA (Hopper) or the interpreter, and triton >= 3.4")

DTYPES = [torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
# (M, K, N, tiles): tiles = (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SUBTILE)
CASES = [
    (70, 40, 48, (16, 32, 16, 4, 1, True)),  # 5 x 2 tiles over 4 CTAs, K and M ragged
    (33, 72, 24, (16, 16, 32, 4, 1, False)),  # BLOCK_K does not divide K
    (1, 64, 40, (16, 32, 32, 4, 1, True)),  # M = 1, N ragged
]
if HAS_CUDA:
    CASES += [(300, 264, 520, (128, 256, 64, 8, 3, True)), (129, 1000, 136, (128, 128, 64, 4, 4, False))]


def inputs(M, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=g).to(DEVICE, dtype)
    l_in = (torch.rand(K, generator=g) + 0.5).to(DEVICE)
    l_out = (torch.rand(N, generator=g) + 0.5).to(DEVICE)
    dy = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    return x, w, b, l_in, l_out, dy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["w_nk", "w_kn"])
@pytest.mark.parametrize("M,K,N,tiles", CASES)
def test_forward_modes(M, K, N, tiles, fan_in_fan_out, dtype):
    """Feedforward (x*l) W^T + b; attention (x W^T + b)*l with u stored; plain x W^T."""
    x, w, b, l_in, l_out, _ = inputs(M, K, N, dtype)
    stored = w.t().contiguous() if fan_in_fan_out else w
    x64, w64, b64 = x.double(), w.double(), b.double()

    y, u, _ = tma_gemm.launch_tma_gemm(x, stored, fan_in_fan_out, N, scale_a=l_in, bias=b,
                                       tiles=tiles)
    assert u is None
    peft = F.linear((x * l_in).to(dtype), w, b)
    assert_within_peft_bar(y, peft, (x64 * l_in.double()) @ w64.t() + b64, dtype, "ff")

    y, u, _ = tma_gemm.launch_tma_gemm(x, stored, fan_in_fan_out, N, bias=b, scale_c=l_out,
                                       store_preact=True, tiles=tiles)
    u_peft = F.linear(x, w, b)
    assert_within_peft_bar(u, u_peft, x64 @ w64.t() + b64, dtype, "u")
    assert_within_peft_bar(y, (u_peft * l_out).to(dtype), (x64 @ w64.t() + b64) * l_out.double(),
                           dtype, "attn y")

    y, _, _ = tma_gemm.launch_tma_gemm(x, stored, fan_in_fan_out, N, tiles=tiles)
    assert_within_peft_bar(y, F.linear(x, w), x64 @ w64.t(), dtype, "plain")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,tiles", CASES)
def test_backward_gemms(M, K, N, tiles, dtype):
    """Feedforward dx = (dy W)*l with dl's partial sums of (dy W)*x (no C store too);
    attention dx = (dy*l) W."""
    x, w, b, l_in, l_out, dy = inputs(M, K, N, dtype, seed=1)
    dy64, w64, x64 = dy.double(), w.double(), x.double()
    g64 = dy64 @ w64
    dx, _, partial = tma_gemm.launch_tma_gemm(dy, w, True, K, scale_c=l_in, aux=x, tiles=tiles)
    g_peft = dy @ w
    assert_within_peft_bar(dx, (g_peft * l_in).to(dtype), g64 * l_in.double(), dtype, "ff dx")
    assert partial.shape == (-(-M // tiles[0]), K) and partial.dtype == torch.float32
    dl_peft = (g_peft * x).float().sum(0)
    assert_within_peft_bar(partial.sum(0), dl_peft, (g64 * x64).sum(0), torch.float32, "ff dl")
    none, _, partial_only = tma_gemm.launch_tma_gemm(dy, w, True, K, aux=x, store_c=False,
                                                     tiles=tiles)
    assert none is None and torch.equal(partial_only, partial)

    dx, _, _ = tma_gemm.launch_tma_gemm(dy, w, True, K, scale_a=l_out, tiles=tiles)
    peft = (dy * l_out).to(dtype) @ w
    assert_within_peft_bar(dx, peft, (dy64 * l_out.double()) @ w64, dtype, "attn dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N,tiles", CASES)
def test_gathered_output_scaling(M, K, N, tiles, dtype):
    """A mixed-adapter batch's attention forward: row m scaled by its example's row of an
    (adapters, N) table, u stored; examples of one row (decode: the per-row gather) and of
    several, aligned with the tiles or straddling them (the per-example gather, spans 1 to
    5; gather_span says which)."""
    x, w, b, _, _, _ = inputs(M, K, N, dtype, seed=2)
    g = torch.Generator().manual_seed(5)
    table = (torch.rand(3, N, generator=g) + 0.5).to(DEVICE)
    x64, w64, b64 = x.double(), w.double(), b.double()
    u64 = x64 @ w64.t() + b64
    u_peft = F.linear(x, w, b)
    for examples in {M, 1} | {d for d in (2, 5, 7, 10, 14) if M % d == 0}:
        index = torch.randint(0, 3, (examples,), generator=g).to(DEVICE)
        rows = table[index].repeat_interleave(M // examples, dim=0)  # (M, N)
        y, u, _ = tma_gemm.launch_tma_gemm(x, w, False, N, bias=b, scale_c=table,
                                           store_preact=True, tiles=tiles, scale_index=index)
        assert_within_peft_bar(u, u_peft, u64, dtype, "u")
        assert_within_peft_bar(y, (u_peft * rows).to(dtype), u64 * rows.double(), dtype,
                               f"mixed y, {examples} examples")


def test_deterministic_and_writes_into_out():
    x, w, b, l_in, _, _ = inputs(70, 40, 48, torch.float16)
    tiles = (16, 32, 16, 4, 1, True)
    first = tma_gemm.launch_tma_gemm(x, w, False, 48, scale_a=l_in, bias=b, tiles=tiles)[0]
    out = torch.full_like(first, float("nan"))
    again = tma_gemm.launch_tma_gemm(x, w, False, 48, scale_a=l_in, bias=b, tiles=tiles, out=out)[0]
    assert again is out and torch.equal(out, first)


def test_eligibility():
    """16-bit operands whose rows TMA can address (unit inner stride, 16-byte base and rows) and
    an output whose rows are whole 16-byte units."""
    x = torch.randn(8, 64, device=DEVICE, dtype=torch.float16)
    w = torch.randn(32, 64, device=DEVICE, dtype=torch.float16)
    assert tma_gemm.eligible(x, w, 32)
    assert not tma_gemm.eligible(x, w, 36)  # 72-byte output rows
    assert not tma_gemm.eligible(x.float(), w.float(), 32)  # fp32: cuBLAS's
    assert not tma_gemm.eligible(x, w.to(torch.bfloat16), 32)
    assert not tma_gemm.eligible(x[:, 1:], w[:, 1:], 32)  # base 2 bytes past an aligned one
    assert not tma_gemm.eligible(torch.randn(8, 60, device=DEVICE, dtype=torch.float16), w, 32)
    assert not tma_gemm.eligible(x.t(), w, 32)  # inner stride 8
    assert tma_gemm.eligible(x[:, :32], w, 32)  # a column slice with 128-byte rows is fine
    assert not tma_gemm.eligible(x, w, 32, torch.empty(8, 36, device=DEVICE, dtype=torch.float16))


def test_empty_rows():
    x = torch.empty(0, 64, device=DEVICE, dtype=torch.float16)
    w = torch.randn(32, 64, device=DEVICE, dtype=torch.float16)
    y, u, partial = tma_gemm.launch_tma_gemm(x, w, False, 32, store_preact=True,
                                             aux=torch.empty(0, 32, device=DEVICE,
                                                             dtype=torch.float16))
    assert y.shape == u.shape == (0, 32) and partial.shape == (0, 32)


@pytest.mark.parametrize("examples,table_dtype,store_preact,stages", [
    (64, torch.float16, False, 3), (64, torch.float16, True, 2), (64, torch.float32, False, 2),
    (64, torch.float32, True, 2), (2, torch.float32, True, 4), (None, None, True, 4)],
    ids=["row-16bit", "row-16bit-u", "row-fp32", "row-fp32-u", "example-fp32-u", "plain"])
def test_pipeline_stages_leave_room_for_the_gathered_table(monkeypatch, examples, table_dtype,
                                                           store_preact, stages):
    """The per-row gather (64 examples of 1 row) stages the table tile in shared memory on top
    of the pipeline: an H100 (232,448 bytes) ran out at 3 stages with u stored
    (gpu-tests-stop34b/c-h100.log) or with an fp32 table (gpu-tests-stop35-h100.log), so
    launch_tma_gemm caps the stages there. The per-example gather (2 examples of 32 rows: a
    vector each, up to 4 a tile) and a plain epilogue keep the 4 asked for. Checked at the launch (the numbers
    are the GPU's, not the interpreter's)."""
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(
                (kwargs["num_stages"], kwargs["GATHER_SPAN"]))

    monkeypatch.setattr(tma_gemm, "_KERNEL", Recorder())
    x, w, b, _, l_out, _ = inputs(64, 64, 64, torch.float16)
    kwargs = {}
    if table_dtype is not None:
        kwargs = dict(scale_c=torch.stack([l_out, l_out]).to(table_dtype),
                      scale_index=torch.arange(examples, device=DEVICE) % 2)
    tma_gemm.launch_tma_gemm(x, w, False, 64, bias=b, store_preact=store_preact,
                             tiles=(128, 256, 64, 8, 4, True), **kwargs)
    assert launched == [(stages, 4 if examples == 2 else 0)]  # 128-row tiles, 32-row examples


@pytest.mark.parametrize("block_m", [16, 128])
def test_gather_span_bounds_the_examples_of_every_tile(block_m):
    """gather_span is never below the examples some tile holds (the per-example epilogue would
    leave rows unscaled), is exact where tiles and examples align, and sends tiles of more than
    GATHER_MAX_SPAN examples to the per-row gather."""
    for T in range(1, 3 * block_m + 2):
        span = tma_gemm.gather_span(T, block_m)
        for examples in (1, 3, 8):
            M = T * examples
            held = max(len({r // T for r in range(start, min(start + block_m, M))})
                       for start in range(0, M, block_m))
            assert span == 0 or held <= span, (T, examples, span, held)
        if T % block_m == 0:
            assert span == 1
        elif block_m % T == 0:
            assert span == (block_m // T if block_m // T <= tma_gemm.GATHER_MAX_SPAN else 0)
    assert tma_gemm.gather_span(1, block_m) == 0  # decode: a row each
