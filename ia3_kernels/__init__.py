"""Triton kernels for (IA)^3: fused dense and LLM.int8 linear (feedforward and attention), forward and
backward, each with its pure-PyTorch reference. Depends on torch and triton only."""
from .config import (IA3FallbackError, get_backend, is_strict, reset_warnings, set_backend,
                     set_strict)
from .dense import dense_path, ia3_linear, torch_ia3_linear
from .int8 import dequantize_int8, ia3_linear_int8, torch_ia3_linear_int8

__all__ = [
    "IA3FallbackError", "dense_path", "dequantize_int8", "get_backend", "ia3_linear",
    "ia3_linear_int8", "is_strict", "reset_warnings", "set_backend", "set_strict",
    "torch_ia3_linear", "torch_ia3_linear_int8",
]
