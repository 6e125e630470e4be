"""ia3: fused (IA)^3 layers for Hugging Face PEFT.

    import ia3
    ia3.patch_peft()                 # get_peft_model / from_pretrained now build fused layers
    model = ia3.fuse(peft_model)     # or swap the layers of an existing PEFT model in place
"""
from ia3_kernels import (IA3FallbackError, get_backend, ia3_conv, ia3_linear, is_strict,
                         set_backend, set_strict, torch_ia3_conv, torch_ia3_linear)

from .bnb import HAS_BNB_4BIT, HAS_BNB_8BIT
from .layer import Conv2d, Conv3d, Linear, active_scaling, set_keep_original_on_merge
from .mixed import BASE_ADAPTER, AdapterBatch
from .patch import FUSED_CLASSES, fuse, patch_peft, patched_peft, unfuse, unpatch_peft
from .training import IA3GradNormCallback, check_feedforward_modules, ia3_grad_norms

if HAS_BNB_8BIT:
    from .bnb import Linear8bitLt  # noqa: F401
if HAS_BNB_4BIT:
    from .bnb import Linear4bit  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "AdapterBatch", "BASE_ADAPTER", "Conv2d", "Conv3d", "FUSED_CLASSES", "HAS_BNB_4BIT", "HAS_BNB_8BIT", "IA3FallbackError",
    "IA3GradNormCallback", "Linear", "active_scaling",
    "check_feedforward_modules", "fuse", "get_backend", "ia3_conv", "ia3_grad_norms", "ia3_linear",
    "is_strict", "patch_peft", "patched_peft", "set_backend", "set_keep_original_on_merge",
    "set_strict", "torch_ia3_conv", "torch_ia3_linear", "unfuse", "unpatch_peft",
]
