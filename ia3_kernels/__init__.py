"""Triton kernels for (IA)^3: fused dense, convolution, LLM.int8 and bitsandbytes 4-bit linear (feedforward
and attention), forward and backward, each with its pure-PyTorch reference. Depends on torch
and triton only."""
from .config import (IA3FallbackError, get_backend, is_strict, reset_warnings, set_backend,
                     set_strict)
from .conv import ia3_conv, scale_conv_weight, torch_ia3_conv
from .dense import dense_path, ia3_linear, torch_ia3_linear
from .fourbit import FourBitWeight, dequantize_4bit, ia3_linear_4bit, torch_ia3_linear_4bit
from .int8 import dequantize_int8, ia3_linear_int8, torch_ia3_linear_int8

__all__ = [
    "FourBitWeight", "IA3FallbackError", "dense_path", "dequantize_4bit", "dequantize_int8",
    "get_backend", "ia3_conv", "ia3_linear", "ia3_linear_4bit", "ia3_linear_int8", "is_strict",
    "reset_warnings", "scale_conv_weight", "set_backend", "set_strict", "torch_ia3_conv",
    "torch_ia3_linear", "torch_ia3_linear_4bit",
    "torch_ia3_linear_int8",
]
