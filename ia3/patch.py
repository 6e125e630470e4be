"""PEFT integration: build fused layers from get_peft_model/from_pretrained (patch_peft), or
swap the layers of an existing model in place (fuse). Swapping changes a module's class and
nothing else: no weight is copied and state-dict keys stay PEFT's."""
from __future__ import annotations

import contextlib
import threading

from peft.tuners.ia3 import layer as peft_ia3_layer
from peft.tuners.ia3 import model as peft_ia3_model
from torch import nn

from .layer import Linear

# PEFT layer class -> fused twin. Layer types not listed here stay PEFT's.
FUSED_CLASSES: dict[type, type] = {peft_ia3_layer.Linear: Linear}
_UNFUSED_CLASSES = {fused: peft for peft, fused in FUSED_CLASSES.items()}
_lock = threading.Lock()
_saved_originals: list[dict[str, type]] = []


def patch_peft() -> None:
    """Make PEFT's IA3 tuner build fused layers (get_peft_model, PeftModel.from_pretrained,
    load_adapter, add_weighted_adapter on new modules). Idempotent."""
    with _lock:
        for peft_cls, fused_cls in FUSED_CLASSES.items():
            name = peft_cls.__name__
            if getattr(peft_ia3_model, name, None) is peft_cls:
                setattr(peft_ia3_model, name, fused_cls)


def unpatch_peft() -> None:
    """Undo patch_peft: PEFT builds its own layers again. Idempotent."""
    with _lock:
        for peft_cls, fused_cls in FUSED_CLASSES.items():
            name = peft_cls.__name__
            if getattr(peft_ia3_model, name, None) is fused_cls:
                setattr(peft_ia3_model, name, peft_cls)


@contextlib.contextmanager
def patched_peft():
    """`with patched_peft(): model = get_peft_model(...)` builds fused layers inside the block
    and restores whatever was there before on exit (nesting is fine)."""
    with _lock:
        _saved_originals.append({c.__name__: getattr(peft_ia3_model, c.__name__)
                                 for c in FUSED_CLASSES})
    patch_peft()
    try:
        yield
    finally:
        with _lock:
            for name, cls in _saved_originals.pop().items():
                setattr(peft_ia3_model, name, cls)


def _swap(model: nn.Module, mapping: dict[type, type]) -> nn.Module:
    for module in model.modules():
        target = mapping.get(type(module))
        if target is not None:
            module.__class__ = target
    return model


def fuse(model: nn.Module) -> nn.Module:
    """Swap every PEFT IA3 layer of `model` for its fused twin, in place; returns the model.
    Calling it twice is harmless. For a PeftModel, its IA3 configs are checked on the way
    (check_feedforward_modules: a feedforward pattern that matches nothing warns)."""
    from peft.tuners.ia3.config import IA3Config

    from .training import check_feedforward_modules

    for config in getattr(model, "peft_config", {}).values():
        if isinstance(config, IA3Config):
            check_feedforward_modules(config, model)
    return _swap(model, FUSED_CLASSES)


def unfuse(model: nn.Module) -> nn.Module:
    """Swap fused layers back to PEFT's classes, in place; returns the model."""
    return _swap(model, _UNFUSED_CLASSES)
