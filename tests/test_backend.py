"""Backend choice, strict mode, fallback warnings and input errors."""
import os
import subprocess
import sys

import pytest
import torch

import ia3
import ia3_kernels
from conftest import DEVICE, HAS_CUDA


def case(K=16, N=8, dtype=torch.float32, feedforward=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, K, dtype=dtype, generator=g).to(DEVICE)
    w = torch.randn(N, K, dtype=dtype, generator=g).to(DEVICE)
    b = torch.randn(N, dtype=dtype, generator=g).to(DEVICE)
    return x, w, b, (torch.rand(K if feedforward else N, generator=g) + 0.5).to(DEVICE)


def test_set_backend_validates_and_is_shared_with_ia3():
    with pytest.raises(ValueError, match="backend must be one of"):
        ia3.set_backend("cuda")
    old = ia3.get_backend()
    try:
        ia3.set_backend("torch")
        assert ia3_kernels.get_backend() == "torch"
    finally:
        ia3.set_backend(old)


def test_torch_backend_never_runs_kernels(kernel_calls):
    old = ia3_kernels.get_backend()
    try:
        ia3_kernels.set_backend("torch")
        y = ia3_kernels.ia3_linear(*case(), feedforward=True)
    finally:
        ia3_kernels.set_backend(old)
    assert len(kernel_calls) == 0
    torch.testing.assert_close(y, ia3_kernels.torch_ia3_linear(*case(), feedforward=True))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU default")
def test_auto_runs_reference_on_cpu_without_warning(kernel_calls, recwarn):
    ia3_kernels.set_backend("auto")
    ia3_kernels.ia3_linear(*case(), feedforward=True)
    assert len(kernel_calls) == 0
    assert not [w for w in recwarn if "falling back" in str(w.message)]


def test_triton_backend_runs_kernels(triton_backend, kernel_calls):
    ia3_kernels.ia3_linear(*case(), feedforward=True)
    assert len(kernel_calls) == 1


def test_uncovered_dtype_warns_once_then_errors_in_strict_mode(triton_backend, kernel_calls):
    x, w, b, s = case(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="float64"):
        y = ia3_kernels.ia3_linear(x, w, b, s, True)
    torch.testing.assert_close(y, ia3_kernels.torch_ia3_linear(x, w, b, s, True))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ia3_kernels.ia3_linear(x, w, b, s, True)  # second time: silent
    assert len(kernel_calls) == 0
    ia3.set_strict(True)
    with pytest.raises(ia3.IA3FallbackError, match="float64"):
        ia3_kernels.ia3_linear(x, w, b, s, True)


def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IA3_BACKEND",
                                                                   "IA3_STRICT")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=300)


def test_environment_variables_choose_backend_and_strictness():
    out = run_python("import ia3_kernels as k; print(k.get_backend(), k.is_strict())",
                     IA3_BACKEND="torch", IA3_STRICT="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["torch", "True"]
    bad = run_python("import ia3_kernels", IA3_BACKEND="tpu")
    assert bad.returncode != 0 and "IA3_BACKEND must be one of" in bad.stderr


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_triton_backend_on_cpu_needs_the_interpreter():
    code = ("import torch, ia3_kernels as k\n"
            "x=torch.randn(2,4); w=torch.randn(3,4); s=torch.ones(4)\n"
            "print(k.ia3_linear(x,w,None,s,True).shape)")
    out = run_python(code, IA3_BACKEND="triton")
    assert out.returncode == 0 and "TRITON_INTERPRET=1" in out.stderr, out.stderr
    strict = run_python(code, IA3_BACKEND="triton", IA3_STRICT="1")
    assert strict.returncode != 0 and "IA3FallbackError" in strict.stderr


@pytest.mark.parametrize("bad,match", [
    (lambda x, w, b, s: (x[:, :-1], w, b, s), "last dimension must be in_features=16"),
    (lambda x, w, b, s: (x, w, b, s[:-1]), "needs 16 scaling values"),
    (lambda x, w, b, s: (x, w, b[:-1], s), "bias must have out_features=8"),
    (lambda x, w, b, s: (x, w[None], b, s), "weight must be 2-D"),
    (lambda x, w, b, s: (x.long(), w, b, s), "x must be a floating-point tensor"),
    (lambda x, w, b, s: (x.half(), w, b, s), "x is torch.float16 but weight is torch.float32"),
    (lambda x, w, b, s: (x, w, b.half(), s), "bias is torch.float16 but weight is torch.float32"),
    (lambda x, w, b, s: (x, w, b, s.to("meta")), "all tensors must be on one device"),
])
def test_bad_input_is_a_clear_error(triton_backend, kernel_calls, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ia3_kernels.ia3_linear(*bad(*case()), feedforward=True)
    assert len(kernel_calls) == 0


def test_attention_scale_size_error_names_the_mode(triton_backend):
    x, w, b, s = case(feedforward=True)
    with pytest.raises(ValueError, match="attention .* needs 8 scaling values"):
        ia3_kernels.ia3_linear(x, w, b, s, feedforward=False)
