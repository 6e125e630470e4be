"""The eager launch shortcut (ia3_kernels.launch.FastKernel): keys that tell apart every
specialisation Triton compiles, and on the GPU the same results as Triton's own launch."""
import pytest
import torch

from ia3_kernels import dense, launch


def _params(kernel):
    """The kernel's parameters (under TRITON_INTERPRET=1 triton.jit gives an interpreter
    wrapper without them: rebuild the JITFunction from the Python function)."""
    if not hasattr(kernel, "params"):
        from triton.runtime.jit import JITFunction
        kernel = JITFunction(kernel.fn)
    return kernel.params


def _binder_for(kernel, args, kwargs):
    params = _params(kernel)
    example = dict(zip([p.name for p in params], args))
    example.update(kwargs)
    return launch._make_binder(params, example)


def _scale_args(src, scale, out):
    R, C = src.shape
    args = (src, scale, out, None, None, None, None, None, None, None, None, R, C, R, 1,
            src.stride(0), src.stride(1), out.stride(0), out.stride(1), 0, 0, 0, 0, 0)
    kwargs = dict(SCALE_AXIS=1, SCALE_GATHER=False, STORE_OUT=True, REDUCE_AUX=False, ROW_SCALE=False,
                  ROW_SCALE_MUL=1.0, SRC_4BIT=False, Q_BLOCKSIZE=64, Q_NESTED=False,
                  Q_BLOCKSIZE2=256, Q_ALIGNED=False, BLOCK_R=16, BLOCK_C=32, num_warps=4)
    return args, kwargs


def test_cdiv():
    assert [launch.cdiv(a, 16) for a in (0, 1, 15, 16, 17, 33)] == [0, 1, 1, 1, 2, 3]


def test_key_separates_what_triton_specialises():
    src = torch.randn(33, 40)
    args, kwargs = _scale_args(src, torch.rand(40), torch.empty(33, 40))
    bind = _binder_for(dense._ia3_scale_reduce_kernel, args, kwargs)
    key, full, warps, stages, options = bind(*args, **kwargs)
    assert full[:len(args)] == args and warps == 4 and stages == 3 and options == {}
    assert len(full) == len(_params(dense._ia3_scale_reduce_kernel))

    def key_of(*a, **k):
        return bind(*a, **{**kwargs, **k})[0]

    # A view 4 bytes into the buffer is not 16-byte aligned: another specialisation.
    shifted = torch.randn(33 * 40 + 1)[1:].view(33, 40)
    assert key_of(shifted, *args[1:]) != key
    assert key_of(src.half(), *args[1:]) != key  # dtype
    assert key_of(*args[:11], 1, *args[12:]) != key  # an int (R) that becomes 1
    assert key_of(*args[:11], 32, *args[12:]) != key  # divisible by 16
    assert key_of(*args, num_warps=8)[-2:] != key[-2:]  # launch options
    assert key_of(*args, BLOCK_C=64) != key  # constexpr values
    assert key_of(*args) == key  # and the same call keys the same
    with pytest.raises(AttributeError):  # no dtype: the caller takes Triton's path
        bind(1.5, *args[1:], **kwargs)


def _count_triton_launches(monkeypatch, fast):
    """Route the wrapper's fallback through a counter; returns the count's dict."""
    calls = {"triton": 0}
    real = fast.fn

    class Counting:
        def __getitem__(self, g):
            calls["triton"] += 1
            return real[g]

    monkeypatch.setattr(fast, "fn", Counting())
    return calls


@pytest.mark.gpu
def test_fast_launch_matches_triton_and_skips_it_when_cached(monkeypatch):
    fast = launch.FastKernel(dense._ia3_scale_reduce_kernel)
    scale = torch.rand(40, device="cuda")
    base = torch.randn(33 * 40 + 1, device="cuda")
    for src in (base[:-1].view(33, 40), base[1:].view(33, 40)):  # aligned, then not
        out = torch.empty_like(src)
        args, kwargs = _scale_args(src, scale, out)
        grid = (3, 2)
        fast[grid](*args, **kwargs)  # first call: through Triton, kept
        torch.testing.assert_close(out, src * scale, rtol=0, atol=0)
        out.fill_(float("nan"))
        real = fast.fn
        calls = _count_triton_launches(monkeypatch, fast)
        fast[grid](*args, **kwargs)  # cached: the C launcher directly
        monkeypatch.setattr(fast, "fn", real)
        assert calls["triton"] == 0
        torch.testing.assert_close(out, src * scale, rtol=0, atol=0)
    assert len(fast._compiled) == 2  # one entry per alignment


@pytest.mark.gpu
def test_launch_hooks_send_calls_through_triton(monkeypatch):
    fast = launch.FastKernel(dense._ia3_scale_reduce_kernel)
    src = torch.randn(8, 32, device="cuda")
    out = torch.empty_like(src)
    args, kwargs = _scale_args(src, torch.rand(32, device="cuda"), out)
    fast[(1, 1)](*args, **kwargs)
    monkeypatch.setattr(launch, "_launch_hooks_active", lambda: True)
    calls = _count_triton_launches(monkeypatch, fast)
    fast[(1, 1)](*args, **kwargs)
    assert calls["triton"] == 1


def test_key_of_tma_descriptors():
    """Host-side TMA descriptors key by dtype, block shape and base alignment (Triton types
    them tensordesc<dtype[block]>), not by their data: a new descriptor over another tensor of
    the same kind launches the cached kernel."""
    from ia3_kernels import tma_gemm
    if tma_gemm.TensorDescriptor is None:
        pytest.skip("triton < 3.4: no host-side descriptors")
    TD = tma_gemm.TensorDescriptor

    def descs(a, b, c):
        return (TD.from_tensor(a, [16, 16]), TD.from_tensor(b, [32, 16]),
                TD.from_tensor(c, [16, 16]), TD.from_tensor(c, [16, 16]),
                TD.from_tensor(c, [16, 16]))

    a, b, c = (torch.randn(64, 32, dtype=torch.float16) for _ in range(3))
    args = (*descs(a, b, c), None, None, None, None, None, 1, 64, 64, 32)
    kwargs = dict(B_KN=False, SCALE_A=False, HAS_BIAS=False, STORE_PREACT=False,
                  REDUCE_AUX=False, SCALE_C=False, SCALE_GATHER=False, GATHER_SPAN=0, STORE_C=True,
                  SUBTILE=False, BLOCK_M=16,
                  BLOCK_N=32, BLOCK_K=16, GROUP_M=8, NUM_SMS=4)
    bind = _binder_for(tma_gemm._ia3_tma_gemm_kernel, args, kwargs)
    key = bind(*args, **kwargs)[0]
    other = (*descs(*(torch.randn(128, 32, dtype=torch.float16) for _ in range(3))), *args[5:])
    assert bind(*other, **kwargs)[0] == key  # other tensors, shapes: the same kernel
    bf16 = (*descs(*(t.to(torch.bfloat16) for t in (a, b, c))), *args[5:])
    assert bind(*bf16, **kwargs)[0] != key  # dtype
    wider = (args[0], TD.from_tensor(b, [64, 16]), *args[2:])
    assert bind(*wider, **kwargs)[0] != key  # block shape
    shifted = torch.randn(64 * 32 + 8, dtype=torch.float16)[8:].view(64, 32)  # 16 bytes in
    assert bind(TD.from_tensor(shifted, [16, 16]), *args[1:], **kwargs)[0] == key
    with pytest.raises(AttributeError):  # a tensor where a descriptor was: Triton's path
        bind(a, *args[1:], **kwargs)


def test_launcher_that_refuses_its_arguments_sends_the_kernel_back_to_triton(monkeypatch):
    """The first direct launch of a key that raises TypeError (a launcher taking its
    arguments otherwise, say descriptors on another Triton) relaunches through Triton and
    turns the shortcut off for that kernel; one that succeeds is not retried."""
    from types import SimpleNamespace

    class FakeCompiled:
        function = packed_metadata = None

        def __init__(self, refuse):
            self.refuse, self.runs = refuse, 0

        def run(self, *args):
            self.runs += 1
            if self.refuse:
                raise TypeError("launcher expected another argument kind")

    class FakeJit:
        params = [SimpleNamespace(name="x", is_constexpr=False),
                  SimpleNamespace(name="n", is_constexpr=False)]

        def __init__(self, compiled):
            self.compiled, self.triton_calls = compiled, 0

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                self.triton_calls += 1
                return self.compiled
            return call

    monkeypatch.setattr(launch, "_driver", lambda: (lambda: 0, lambda device: 0))
    monkeypatch.setattr(launch, "_ENABLED", True)
    t = torch.zeros(4)
    for refuse in (True, False):
        jit = FakeJit(FakeCompiled(refuse))
        fast = launch.FastKernel(jit)
        fast._usable = True
        fast[(1,)](t, 7)  # first call: through "Triton", kept
        fast[(1,)](t, 7)  # first direct launch
        fast[(1,)](t, 7)
        if refuse:
            assert not fast._usable and jit.compiled.runs == 1 and jit.triton_calls == 3
        else:
            assert fast._usable and jit.compiled.runs == 2 and jit.triton_calls == 1


class _FakeCompiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _FakeJit:
    """A triton.jit stand-in: parameters x, y (tensors), n (int), BLOCK (constexpr)."""

    def __init__(self):
        from types import SimpleNamespace
        self.params = [SimpleNamespace(name=n, is_constexpr=n == "BLOCK")
                       for n in ("x", "y", "n", "BLOCK")]
        self.compiled, self.triton_calls = _FakeCompiled(), 0

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            self.triton_calls += 1
            return self.compiled
        return call


def _fake_fast(monkeypatch):
    monkeypatch.setattr(launch, "_driver", lambda: (lambda: 0, lambda device: 11))
    monkeypatch.setattr(launch, "_ENABLED", True)
    jit = _FakeJit()
    fast = launch.FastKernel(jit)
    fast._usable = True
    return jit, fast


def test_plan_relaunches_with_new_slot_values_and_the_rest_fixed(monkeypatch):
    jit, fast = _fake_fast(monkeypatch)
    x, y = torch.zeros(4), torch.ones(4)
    # First call: through "Triton" (compiles); second: its first direct launch; a plan only
    # once that worked.
    assert fast.plan((3, 2), (x, y, 7), dict(BLOCK=16), ("x", "y")) is None
    plan = fast.plan((3, 2), (x, y, 7), dict(BLOCK=16), ("x", "y"))
    assert plan is not None and jit.triton_calls == 1 and len(jit.compiled.launches) == 1
    x2, y2 = torch.zeros(4), torch.ones(4)
    assert plan(x2, y2) is True
    launched = jit.compiled.launches[-1]
    assert launched[:9] == (3, 2, 1, 11, "function", "metadata", None, None, None)
    assert launched[9] is x2 and launched[10] is y2 and launched[11:] == (7, 16)
    assert jit.triton_calls == 1
    monkeypatch.setattr(launch, "_launch_hooks_active", lambda: True)
    assert plan(x2, y2) is False and len(jit.compiled.launches) == 2  # a profiler: no launch


def test_plan_refuses_a_tensor_outside_its_slots(monkeypatch):
    jit, fast = _fake_fast(monkeypatch)
    x, y = torch.zeros(4), torch.ones(4)
    for _ in range(3):  # y would be replayed stale: never a plan
        assert fast.plan((1,), (x, y, 7), dict(BLOCK=16), ("x",)) is None
    assert len(jit.compiled.launches) == 2  # the calls themselves did launch


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["ff_bwd", "attn_fwd", "attn_bwd", "attn_bwd_small", "split_k"])
def test_launch_plans_give_the_launches_they_replace(monkeypatch, case):
    """dense._launch_matmul replays a plan per call signature: bitwise what the full launch
    gives, for new tensors of the same signature, and a new signature gets its own plan."""
    torch.manual_seed(0)
    dt = torch.bfloat16
    # attn_bwd_small: dl by programs of their own beside the GEMM's tiles (M <= 64)
    M, N, K = {"split_k": (3, 4096, 4096), "attn_bwd_small": (16, 200, 96)}.get(case,
                                                                              (300, 200, 96))
    case = "attn_bwd" if case == "attn_bwd_small" else case
    w = torch.randn(N, K, device="cuda", dtype=dt) / 8

    def call(a, aux, scale):
        if case == "ff_bwd":  # dx = (dy W) * l, dl = sum_rows (dy W) * x, finished in-kernel
            return dense._launch_matmul(a, dense._weight_as_nk(w, False), w, (M, K), dt,
                                        scale_c=scale, aux=aux, reduce_aux=True,
                                        sum_dtype=scale.dtype, traceable=False,
                                        finish_like=scale)
        if case == "attn_bwd":  # dx = (dy*l) W, dl = sum_rows dy*u in the K-loop
            return dense._launch_matmul(a, dense._weight_as_nk(w, False), w, (M, K), dt,
                                        scale_a=scale, a_aux=aux, sum_dtype=scale.dtype,
                                        traceable=False, finish_like=scale)
        return dense._launch_matmul(aux, dense._weight_as_kn(w, False), w, (aux.shape[0], N),
                                    dt, scale_c=scale, store_preact=True, traceable=False)

    def inputs(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        dy = torch.randn(M, N, device="cuda", dtype=dt, generator=g)
        aux = torch.randn(M, N if case == "attn_bwd" else K, device="cuda", dtype=dt, generator=g)
        scale = torch.rand(1, N if case in ("attn_bwd", "attn_fwd", "split_k") else K,
                           device="cuda", dtype=dt, generator=g) + 0.5
        return dy, aux, scale

    monkeypatch.setattr(dense._MATMUL_PLANS, "plans", {})
    for seed in range(4):
        args = inputs(seed)
        monkeypatch.setattr(dense, "_PLANS_ENABLED", False)
        expected = call(*args)
        monkeypatch.setattr(dense, "_PLANS_ENABLED", True)
        got = call(*args)
        for e, g in zip(expected, got):
            assert (e is None) == (g is None)
            if e is not None:
                assert torch.equal(e, g), (case, seed)
    assert len(dense._MATMUL_PLANS.plans) == 1


def test_pointer_key_holds_dtypes_and_refuses_unaligned_pointers():
    a, b = torch.zeros(16, dtype=torch.float16), torch.zeros(4, dtype=torch.int32)
    assert launch.pointer_key((a, None, b)) == (torch.float16, None, torch.int32)
    assert launch.pointer_key((a[1:], b)) is None  # 2 bytes in: Triton specialises on it


def test_plan_cache_replays_without_building_the_arguments(monkeypatch):
    """PlanCache (the conv launchers): the call that yields a plan launches through FastKernel
    (first through "Triton", then its first direct launch), later calls of the key replay the
    plan with their own tensors and never build the arguments; key None and kernels that are
    not FastKernel (the interpreter) launch plainly, keeping nothing."""
    jit, fast = _fake_fast(monkeypatch)
    cache = launch.PlanCache(fast, ("x", "y"))
    built = []

    def call(key, x, y):
        def arguments():
            built.append(key)
            return (x, y, 7), dict(BLOCK=16)
        cache.launch(key, (3,), (x, y), arguments)

    x, y = torch.zeros(4), torch.ones(4)
    call("k", x, y)
    call("k", x, y)
    assert list(cache.plans) == ["k"] and jit.triton_calls == 1 and len(built) == 2
    x2, y2 = torch.zeros(4), torch.ones(4)
    call("k", x2, y2)
    assert len(built) == 2  # replayed: no arguments built
    launched = jit.compiled.launches[-1]
    assert launched[9] is x2 and launched[10] is y2 and launched[11:] == (7, 16)
    call(None, x, y)
    assert len(built) == 3 and list(cache.plans) == ["k"]
    plain = launch.PlanCache(jit, ("x", "y"))  # a triton.jit function itself: no plans
    plain.launch("k", (3,), (x, y), lambda: ((x, y, 7), dict(BLOCK=16)))
    assert plain.plans == {} and jit.triton_calls == 2
    monkeypatch.setattr(launch, "_launch_hooks_active", lambda: True)  # a profiler is on
    launches = len(jit.compiled.launches)
    call("k", x2, y2)  # the plan declines; the call goes through Triton's own path
    assert len(built) == 4 and jit.triton_calls == 3 and len(jit.compiled.launches) == launches


def test_plan_keeps_no_reference_to_the_first_calls_tensors():
    """A plan's template holds None in its slots, not the tensors of the call that made it:
    held, they kept that call's output and its autograd graph alive, and a later backward's
    CUDA-graph capture broke on the stale AccumulateGrad node's stream (H100, 2026-12-05)."""
    import gc
    import weakref

    launched = []

    class Kernel:
        function, packed_metadata = object(), object()

        @staticmethod
        def run(*args):
            launched.append(args[9:])

    first = torch.ones(3)
    alive = weakref.ref(first)
    plan = launch._make_plan(Kernel(), (1, 1, 1), 0, (first, 7, torch.zeros(2)), [0, 2],
                             lambda device: 0)
    del first
    gc.collect()
    assert alive() is None
    second, third = torch.full((3,), 2.0), torch.ones(2)
    assert plan(second, third)
    assert launched[-1][0] is second and launched[-1][1] == 7 and launched[-1][2] is third
