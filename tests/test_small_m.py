"""small_m.py, the quantized forward at M <= 64: every tile shape the table can pick (several
quantization blocks a tile, BLOCK_K halved to divide K, GEMV at M = 1, split-K), both formats,
feedforward and attention (bias, stored u, gathered per-example vectors), against the float64
reference with the "2x PEFT's error" bar; the dispatch rules; determinism."""
import pytest
import torch

from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES, assert_within_peft_bar
from helpers import quantize_rows
from ia3_kernels import dense, fourbit, int8, small_m
from ia3_kernels.fourbit import FourBitWeight
from ia3_kernels.int8 import Int8Weight

bnb = pytest.importorskip("bitsandbytes")


def nf4_weight(N, K, blocksize=64, nested=True, quant_type="nf4", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    packed, state = bnb.functional.quantize_4bit(w.to(DEVICE), blocksize=blocksize,
                                                 compress_statistics=nested, quant_type=quant_type)
    return FourBitWeight.from_bnb(packed, state)


def int8_weight(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K**0.5
    cb, scb = quantize_rows(w)
    return Int8Weight(cb.to(DEVICE), scb.to(DEVICE))


def reference(x, wq, bias, scale, feedforward, dtype, adapter_index=None):
    """(PEFT's arithmetic in dtype, the float64 ground truth) for a quantized weight."""
    if isinstance(wq, FourBitWeight):
        fn = lambda xx, b, s: fourbit.torch_ia3_linear_4bit(xx, wq, b, s, feedforward,
                                                           adapter_index=adapter_index)
    else:
        fn = lambda xx, b, s: int8.torch_ia3_linear_int8(xx, wq.cb, wq.scb, b, s, feedforward,
                                                        adapter_index=adapter_index)
    peft = fn(x, bias, scale)
    ref = fn(x.double(), None if bias is None else bias.double(), scale.double())
    return peft, ref


def inputs(M, K, N, feedforward, dtype, seed):
    """x (M, K) and bias in dtype, l (fp32, in 0.5..1.5) along K (feedforward) or N."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    bias = torch.randn(N, generator=g).to(DEVICE, dtype)
    scale = (torch.rand(K if feedforward else N, generator=g) + 0.5).to(DEVICE)
    return x, bias, scale


def check_y_and_u(y, u, x, wq, bias, scale, feedforward, dtype, what):
    """y within the PEFT bar; for attention also u = x W^T + b (stored before the scaling)."""
    peft, ref = reference(x, wq, bias, scale, feedforward, dtype)
    assert_within_peft_bar(y, peft, ref, dtype, what)
    if not feedforward:
        u_peft, u_ref = reference(x, wq, bias, torch.ones_like(scale), False, dtype)
        assert_within_peft_bar(u, u_peft, u_ref, dtype, "u")


def launch(x, wq, bias, scale, feedforward, tiles=None, store_preact=False, scale_index=None):
    return small_m.launch_small_m(
        x, N=wq.out_features, out_dtype=x.dtype, traceable=False, bias=bias,
        scale_a=scale if feedforward else None, scale_c=None if feedforward else scale,
        store_preact=store_preact, scale_index=scale_index, tiles=tiles, **wq.small_m_args())


# (M, K, N, tiles): tiles = (BLOCK_N, BLOCK_K, warps, stages, SPLIT_K, GEMV at M = 1)
NF4_CASES = [
    (1, 512, 40, (16, 256, 4, 1, 1, True)),  # GEMV, 4 quantization blocks a tile
    (1, 192, 33, (16, 128, 4, 1, 2, True)),  # BLOCK_K halves to 64 (192 % 128), 2 splits
    (1, 256, 24, (16, 64, 4, 1, 1, False)),  # M = 1 on the dot path (M padded to 16)
    (5, 512, 48, (16, 256, 4, 1, 2, False)),  # 4 blocks a tile, split-K
    (16, 384, 17, (16, 128, 4, 1, 3, False)),  # 3 splits of 128 in-features
    (37, 128, 70, (32, 64, 4, 1, 1, False)),  # BLOCK_M 64
]


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("M,K,N,tiles", NF4_CASES)
@pytest.mark.parametrize("fmt", ["nf4", "fp4-plain"])
def test_4bit_tiles_against_reference(M, K, N, tiles, feedforward, fmt):
    dtype = torch.float32
    wq = nf4_weight(N, K, quant_type=fmt[:3], nested=fmt == "nf4")
    x, bias, scale = inputs(M, K, N, feedforward, dtype, seed=1)
    y, u = launch(x, wq, bias, scale, feedforward, tiles, store_preact=not feedforward)
    check_y_and_u(y, u, x, wq, bias, scale, feedforward, dtype, f"y {tiles}")


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_4bit_other_blocksizes_with_several_blocks_a_tile(blocksize):
    wq = nf4_weight(24, 512, blocksize=blocksize)
    x = torch.randn(3, 512, device=DEVICE)
    scale = torch.rand(512, device=DEVICE) + 0.5
    for tiles in ((16, 256, 4, 1, 1, False), (16, 512, 4, 1, 2, True)):
        y, _ = launch(x[:1] if tiles[5] else x, wq, None, scale, True, tiles)
        peft, ref = reference(x[:1] if tiles[5] else x, wq, None, scale, True, torch.float32)
        assert_within_peft_bar(y, peft, ref, torch.float32, f"bs {blocksize} {tiles}")


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("M,K,N,split", [(17, 300, 40, 1), (33, 256, 24, 2), (64, 130, 9, 1)])
def test_int8_against_reference(M, K, N, split, feedforward, dtype):
    wq = int8_weight(N, K)
    x, bias, scale = inputs(M, K, N, feedforward, dtype, seed=2)
    y, _ = launch(x, wq, bias, scale, feedforward, (16, 64, 4, 1, split, False))
    peft, ref = reference(x, wq, bias, scale, feedforward, dtype)
    assert_within_peft_bar(y, peft, ref, dtype, "y")


@pytest.mark.parametrize("wq_kind", ["nf4", "int8"])
def test_mixed_adapter_attention_gathers_each_examples_vector(wq_kind):
    """A mixed batch's attention epilogue: example e's rows take table row index[e]."""
    N, K, examples, rows = 24, 256, 4, 3
    wq = nf4_weight(N, K) if wq_kind == "nf4" else int8_weight(N, K)
    x = torch.randn(examples * rows, K, device=DEVICE)
    table = torch.rand(3, N, device=DEVICE) + 0.5
    index = torch.tensor([2, 0, 1, 2], device=DEVICE)
    y, _ = launch(x, wq, None, table, False, (16, 64, 4, 1, 2, False), scale_index=index)
    for e in range(examples):
        part = slice(e * rows, (e + 1) * rows)
        peft, ref = reference(x[part], wq, None, table[index[e]], False, torch.float32)
        assert_within_peft_bar(y[part], peft, ref, torch.float32, f"example {e}")


def test_split_k_is_deterministic():
    wq = nf4_weight(40, 1024)
    x = torch.randn(4, 1024, device=DEVICE)
    scale = torch.rand(1024, device=DEVICE) + 0.5
    tiles = (16, 64, 4, 1, 8, False)
    first = launch(x, wq, None, scale, True, tiles)[0]
    for _ in range(3):
        assert torch.equal(launch(x, wq, None, scale, True, tiles)[0], first)


def test_dispatch():
    """4-bit takes small_m at M <= 64 when blocks align with rows; int8 from M = 17; a forced
    cuBLAS path never takes it."""
    aligned, straddling = nf4_weight(8, 128), nf4_weight(8, 200)
    assert aligned.use_small_m(1) and aligned.use_small_m(64) and not aligned.use_small_m(65)
    assert not straddling.use_small_m(1)
    q8 = int8_weight(8, 64)
    # M = 1: the GEMV kernel where it is the default and CB rows are whole 32-bit words.
    assert q8.use_small_m(1) == small_m.use_gemv(q8.cb, False, 64)
    assert not int8_weight(8, 66).use_small_m(1)  # 66 bytes a row: dense.py's GEMV
    assert not q8.use_small_m(16) and q8.use_small_m(17) and q8.use_small_m(64)
    assert not q8.use_small_m(65)
    with dense.dense_path("cublas"):
        assert not aligned.use_small_m(1) and not q8.use_small_m(32)


def test_tiles_table_and_split_rule():
    """4-bit BLOCK_K halves to a divisor of K; the GEMV only at M = 1 and for 4-bit; M padded to
    16..64."""
    dev = torch.device(DEVICE)
    bm, bn, bk, split, _, _ = small_m.small_m_tiles(1, 64, 192, True, dev, (16, 128, 4, 1, 0, True))
    assert (bm, bk) == (1, 64)
    bm, *_ = small_m.small_m_tiles(2, 64, 192, True, dev, (16, 128, 4, 1, 0, True))
    assert bm == 16
    assert small_m.small_m_tiles(40, 64, 256, False, dev, (16, 128, 4, 1, 0, False))[0] == 64
    assert small_m.small_m_tiles(1, 64, 256, False, dev, (16, 128, 4, 1, 0, True))[0] == 16  # int8: no GEMV


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("M", [1, 2, 16, 33, 64])
@pytest.mark.parametrize("K,N", [(4096, 1024), (1024, 4096), (14336, 512)])
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_gpu_default_tiles_llama_shapes(K, N, M, dtype, feedforward):
    """The table's own tiles (and split-K rule) on the GPU, bf16 included, both formats."""
    x, bias, scale = inputs(M, K, N, feedforward, dtype, seed=3)
    for wq in (nf4_weight(N, K), int8_weight(N, K)):
        y, _ = launch(x, wq, bias, scale, feedforward)
        peft, ref = reference(x, wq, bias, scale, feedforward, dtype)
        assert_within_peft_bar(y, peft, ref, dtype, f"{type(wq).__name__} y")
        assert torch.equal(launch(x, wq, bias, scale, feedforward)[0], y)  # run to run


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
def test_gpu_one_feature_shapes_fit_shared_memory(dtype, feedforward):
    """in_features / out_features of 1 (and a 4-bit row of one block), every dtype and M
    regime: the shapes with which the GPU fuzz test found an fp32 tile over the H100's shared
    memory (in dense.py's int8 backward; see test_int8's fp32 backward test)."""
    for wq, K in ((int8_weight(1, 1), 1), (int8_weight(7, 1), 1), (int8_weight(1, 5), 5),
                  (nf4_weight(1, 64), 64), (nf4_weight(3, 64, blocksize=64), 64)):
        N = wq.out_features
        for M in (1, 16, 21, 64):
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE, dtype)
            scale = (torch.rand(K if feedforward else N) + 0.5).to(DEVICE)
            y, _ = launch(x, wq, None, scale, feedforward)
            peft, ref = reference(x, wq, None, scale, feedforward, dtype)
            assert_within_peft_bar(y, peft, ref, dtype, f"{type(wq).__name__} M={M} K={K} N={N}")


# --------------------------------------------------------------------------------------------
# The M = 1 GEMV kernel (launch_gemv): tiles = (BLOCK_N, BLOCK_K, SPLIT_K, warps, LUT, PREFETCH)
# --------------------------------------------------------------------------------------------


def gemv(x, wq, bias, scale, feedforward, tiles=None, store_preact=False, scale_index=None):
    return small_m.launch_gemv(
        x, N=wq.out_features, out_dtype=x.dtype, traceable=False, bias=bias,
        scale_a=scale if feedforward else None, scale_c=None if feedforward else scale,
        store_preact=store_preact, scale_index=scale_index, tiles=tiles, **wq.small_m_args())


# Lookups 0 and 1 (shared-memory gathers) run under the interpreter; 2 and 3 are inline PTX
# (GPU).
GEMV_LUTS = (0, 1, 2, 3) if HAS_CUDA and DEVICE == "cuda" else (0, 1)
GEMV_CASES = [
    # (K, N, tiles)
    (512, 40, (16, 256, 1, 4, None, 1)),  # 4 quantization blocks a tile, N not a multiple
    (512, 40, (16, 128, 2, 4, None, 0)),  # no prefetch, 2 splits
    (192, 33, (16, 128, 3, 4, None, 1)),  # BLOCK_K halves to 64; 3 splits
    (1024, 7, (8, 64, 16, 4, None, 1)),  # 16 splits, one row tile
    (512, 40, (16, 64, 2, 4, None, 3)),  # the K-loop pipelined 3 stages deep (tl.range)
]


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("K,N,tiles", GEMV_CASES)
@pytest.mark.parametrize("lut", GEMV_LUTS)
@pytest.mark.parametrize("fmt", ["nf4", "fp4-plain"])
def test_gemv_4bit_against_reference(fmt, lut, K, N, tiles, feedforward):
    """Decodes 0 and 1 (exact fp32 codes) in fp32; decodes 2 and 3 (fp16 codes, for bf16 only:
    their 2**-11 rounding is below bf16's 2**-8) in bf16 on the GPU."""
    dtype = torch.bfloat16 if lut in (2, 3) else torch.float32
    wq = nf4_weight(N, K, quant_type=fmt[:3], nested=fmt == "nf4")
    x, bias, scale = inputs(1, K, N, feedforward, dtype, seed=5)
    tiles = (*tiles[:4], lut, tiles[5])
    y, u = gemv(x, wq, bias, scale, feedforward, tiles, store_preact=not feedforward)
    check_y_and_u(y, u, x, wq, bias, scale, feedforward, dtype, f"y {tiles}")


@pytest.mark.parametrize("blocksize", [32, 128, 1024])
def test_gemv_4bit_other_blocksizes(blocksize):
    """Tiles narrower and wider than a quantization block (one absmax a sub-block)."""
    wq = nf4_weight(24, 2048, blocksize=blocksize)
    x = torch.randn(1, 2048, device=DEVICE)
    scale = torch.rand(2048, device=DEVICE) + 0.5
    peft, ref = reference(x, wq, None, scale, True, torch.float32)
    for tiles in ((16, 256, 1, 4, 1, 1), (16, 512, 2, 4, 0, 0)):
        y, _ = gemv(x, wq, None, scale, True, tiles)
        assert_within_peft_bar(y, peft, ref, torch.float32, f"bs {blocksize} {tiles}")


@pytest.mark.parametrize("feedforward", [True, False], ids=["ff", "attn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("lut", [0, 2] if HAS_CUDA and DEVICE == "cuda" else [0])
@pytest.mark.parametrize("K,N,tiles", [(512, 40, (16, 256, 1, 4, 0, 1)),
                                       (200, 24, (16, 64, 2, 4, 0, 1)),  # K % BLOCK_K != 0
                                       (300, 9, (8, 128, 1, 4, 0, 0)),  # masked, no prefetch
                                       (520, 24, (16, 64, 2, 4, 0, 3))])  # pipelined, masked
def test_gemv_int8_against_reference(K, N, tiles, lut, dtype, feedforward):
    """Decode 0 (integer ops) everywhere, 2 (inline PTX prmt) on the GPU."""
    tiles = (*tiles[:4], lut, tiles[5])
    wq = int8_weight(N, K)
    x, bias, scale = inputs(1, K, N, feedforward, dtype, seed=6)
    y, _ = gemv(x, wq, bias, scale, feedforward, tiles)
    peft, ref = reference(x, wq, bias, scale, feedforward, dtype)
    assert_within_peft_bar(y, peft, ref, dtype, "y")


@pytest.mark.parametrize("wq_kind", ["nf4", "int8"])
def test_gemv_strided_x_and_mixed_adapter_row(wq_kind):
    """x with a column stride of 2 (a slice of a wider tensor), fp16; and an attention table
    gathered at row scale_index[0]."""
    N, K = 24, 256
    wq = nf4_weight(N, K) if wq_kind == "nf4" else int8_weight(N, K)
    wide = torch.randn(1, 2 * K, device=DEVICE, dtype=torch.float16)
    x = wide[:, ::2]
    scale = torch.rand(K, device=DEVICE) + 0.5
    y, _ = gemv(x, wq, None, scale, True, (16, 64, 2, 4, 0, 1))
    peft, ref = reference(x, wq, None, scale, True, torch.float16)
    assert_within_peft_bar(y, peft, ref, torch.float16, "strided x")
    table = torch.rand(3, N, device=DEVICE) + 0.5
    index = torch.tensor([2], device=DEVICE)
    x = x.float().contiguous()
    y, _ = gemv(x, wq, None, table, False, (16, 64, 2, 4, 0, 1), scale_index=index)
    peft, ref = reference(x, wq, None, table[2], False, torch.float32)
    assert_within_peft_bar(y, peft, ref, torch.float32, "table row 2")


def test_gemv_split_k_is_deterministic_and_launch_small_m_takes_it(monkeypatch):
    wq = nf4_weight(40, 1024)
    x = torch.randn(1, 1024, device=DEVICE)
    scale = torch.rand(1024, device=DEVICE) + 0.5
    tiles = (16, 64, 8, 4, 0, 1)
    first = gemv(x, wq, None, scale, True, tiles)[0]
    for _ in range(3):
        assert torch.equal(gemv(x, wq, None, scale, True, tiles)[0], first)
    # launch_small_m at M = 1 with the table's tiles takes the GEMV kernel where use_gemv says
    # so (IA3_GEMV=1: the same result as its own call), else the tiled kernel (IA3_GEMV=0).
    own = gemv(x, wq, None, scale, True)[0]
    monkeypatch.setattr(small_m, "_GEMV_FORCED", True)
    assert small_m.use_gemv(wq.packed, True, 1024)
    assert torch.equal(launch(x, wq, None, scale, True)[0], own)
    monkeypatch.setattr(small_m, "_GEMV_FORCED", False)
    assert not small_m.use_gemv(wq.packed, True, 1024)
    assert not torch.equal(launch(x, wq, None, scale, True)[0], own)


def test_gemv_eligibility():
    """Rows must be whole 32-bit words at a 4-byte-aligned address; otherwise launch_small_m
    keeps the tiled kernel (still right)."""
    q8 = int8_weight(8, 64)
    assert small_m.gemv_eligible(q8.cb, False, 64)
    storage = torch.zeros(8 * 64 + 1, dtype=torch.int8, device=DEVICE)
    shifted = storage[1:].view(8, 64)  # 1 byte past an aligned allocation
    shifted.copy_(q8.cb)
    assert not small_m.gemv_eligible(shifted, False, 64)
    assert not small_m.gemv_eligible(int8_weight(8, 66).cb, False, 66)
    moved = Int8Weight(shifted, q8.scb)
    x = torch.randn(1, 64, device=DEVICE)
    scale = torch.rand(64, device=DEVICE) + 0.5
    y, _ = launch(x, moved, None, scale, True)
    peft, ref = reference(x, q8, None, scale, True, torch.float32)
    assert_within_peft_bar(y, peft, ref, torch.float32, "misaligned CB")
