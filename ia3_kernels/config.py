"""Backend choice, strict mode and the one-time fallback warning, shared by every op family.

Backends: "auto" runs Triton on CUDA tensors and the pure-PyTorch reference on everything else;
"triton" runs Triton kernels whatever the device (CPU tensors need TRITON_INTERPRET=1, which is how
CI exercises the kernels); "torch" always runs the reference. Set with `set_backend` or the
IA3_BACKEND environment variable. Strict mode (`set_strict(True)`, IA3_STRICT=1) turns every
fallback to the reference into an `IA3FallbackError`.
"""
from __future__ import annotations

import contextlib
import os
import warnings

_BACKENDS = ("auto", "triton", "torch")


class IA3FallbackError(RuntimeError):
    """Raised in strict mode where a configuration would fall back to the reference path."""


def _env_backend() -> str:
    value = os.environ.get("IA3_BACKEND", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"IA3_BACKEND must be one of {_BACKENDS}, got {value!r}")
    return value


_state = {
    "backend": _env_backend(),
    "strict": os.environ.get("IA3_STRICT", "0").strip().lower() in ("1", "true", "yes", "on"),
    "interpret": os.environ.get("TRITON_INTERPRET", "0").strip() == "1",
}
_warned: set[str] = set()


def set_backend(backend: str) -> None:
    """Choose "auto" (Triton on CUDA, reference elsewhere), "triton" or "torch" (reference)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _state["backend"] = backend


def get_backend() -> str:
    return _state["backend"]


def set_strict(strict: bool) -> None:
    """In strict mode every fallback to the reference path raises instead of warning."""
    _state["strict"] = bool(strict)


def is_strict() -> bool:
    return _state["strict"]


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1 was set when the package was imported: kernels may run on CPU tensors."""
    return _state["interpret"]


def fallback(reason: str) -> None:
    """Announce (once per reason) that the reference path runs instead of the kernels."""
    message = f"ia3_kernels: falling back to the PyTorch reference path: {reason}"
    if _state["strict"]:
        raise IA3FallbackError(message + " (strict mode is on)")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which fallback reasons were announced (tests use it to see the warning again)."""
    _warned.clear()


@contextlib.contextmanager
def path_override(setting: dict, path: str, allowed: tuple):
    """Inside the block, setting["path"] = path (one of `allowed`); restored on exit. Backs the
    strategy switch dense_path (tests and benchmarks)."""
    if path not in allowed:
        raise ValueError(f"path must be one of {allowed}, got {path!r}")
    old = setting["path"]
    setting["path"] = path
    try:
        yield
    finally:
        setting["path"] = old
