"""Triton kernels for (IA)^3: fused dense linear (feedforward and attention), forward and
backward, each with its pure-PyTorch reference. Depends on torch and triton only."""
from .config import (IA3FallbackError, get_backend, is_strict, reset_warnings, set_backend,
                     set_strict)
from .dense import dense_path, ia3_linear, torch_ia3_linear

__all__ = [
    "IA3FallbackError", "dense_path", "get_backend", "ia3_linear", "is_strict", "reset_warnings",
    "set_backend", "set_strict", "torch_ia3_linear",
]
