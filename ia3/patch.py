"""PEFT integration: build fused layers from get_peft_model/from_pretrained (patch_peft), or
swap the layers of an existing model in place (fuse). Swapping changes a module's class and
nothing else: no weight is copied and state-dict keys stay PEFT's."""
from __future__ import annotations

import contextlib
import threading

from peft.tuners.ia3 import bnb as peft_ia3_bnb
from peft.tuners.ia3 import layer as peft_ia3_layer
from peft.tuners.ia3 import model as peft_ia3_model
from torch import nn

from . import bnb, mixed
from .layer import Conv2d, Conv3d, Linear

# PEFT layer class -> fused twin. Layer types not listed here stay PEFT's.
FUSED_CLASSES: dict[type, type] = {peft_ia3_layer.Linear: Linear, peft_ia3_layer.Conv2d: Conv2d,
                                   peft_ia3_layer.Conv3d: Conv3d}
# Where PEFT's IA3 tuner looks each class up when it builds a layer: `model` imports the dense
# classes at import time; the bnb classes are imported from `peft.tuners.ia3.bnb` inside
# `_create_new_module`, on every call.
_LOOKUPS = [(peft_ia3_model, "Linear"), (peft_ia3_model, "Conv2d"), (peft_ia3_model, "Conv3d")]
if bnb.HAS_BNB_8BIT:
    FUSED_CLASSES[peft_ia3_bnb.Linear8bitLt] = bnb.Linear8bitLt
    _LOOKUPS.append((peft_ia3_bnb, "Linear8bitLt"))
if bnb.HAS_BNB_4BIT:
    FUSED_CLASSES[peft_ia3_bnb.Linear4bit] = bnb.Linear4bit
    _LOOKUPS.append((peft_ia3_bnb, "Linear4bit"))
_UNFUSED_CLASSES = {fused: peft for peft, fused in FUSED_CLASSES.items()}
_lock = threading.Lock()
_saved_originals: list[list[tuple[object, str, type]]] = []


def patch_peft() -> None:
    """Make PEFT's IA3 tuner build fused layers (get_peft_model, PeftModel.from_pretrained,
    load_adapter, add_weighted_adapter on new modules), and give PEFT's IA3Model the
    adapter_names hook for mixed-adapter batches (ia3.mixed). Idempotent."""
    mixed.install()
    with _lock:
        for module, name in _LOOKUPS:
            current = getattr(module, name, None)
            if current in FUSED_CLASSES:
                setattr(module, name, FUSED_CLASSES[current])


def unpatch_peft() -> None:
    """Undo patch_peft: PEFT builds its own layers again. Idempotent."""
    with _lock:
        for module, name in _LOOKUPS:
            current = getattr(module, name, None)
            if current in _UNFUSED_CLASSES:
                setattr(module, name, _UNFUSED_CLASSES[current])


@contextlib.contextmanager
def patched_peft():
    """`with patched_peft(): model = get_peft_model(...)` builds fused layers inside the block
    and restores whatever was there before on exit (nesting is fine)."""
    with _lock:
        _saved_originals.append([(m, n, getattr(m, n)) for m, n in _LOOKUPS])
    patch_peft()
    try:
        yield
    finally:
        with _lock:
            for module, name, cls in _saved_originals.pop():
                setattr(module, name, cls)


def _swap(model: nn.Module, mapping: dict[type, type]) -> nn.Module:
    for module in model.modules():
        target = mapping.get(type(module))
        if target is not None:
            module.__class__ = target
    return model


def fuse(model: nn.Module) -> nn.Module:
    """Swap every PEFT IA3 layer of `model` for its fused twin, in place; returns the model.
    Calling it twice is harmless. For a PeftModel, its IA3 configs are checked on the way
    (check_feedforward_modules: a feedforward pattern that matches nothing warns), and PEFT's
    IA3Model learns mixed-adapter batches (`adapter_names=`, ia3.mixed)."""
    from peft.tuners.ia3.config import IA3Config

    from .training import check_feedforward_modules

    for config in getattr(model, "peft_config", {}).values():
        if isinstance(config, IA3Config):
            check_feedforward_modules(config, model)
    mixed.install()
    return _swap(model, FUSED_CLASSES)


def unfuse(model: nn.Module) -> nn.Module:
    """Swap fused layers back to PEFT's classes, in place; returns the model."""
    return _swap(model, _UNFUSED_CLASSES)
