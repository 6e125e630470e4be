"""Adapter names that a model lacks are errors, not silent no-ops.

Stock PEFT (0.21) raises for an unknown name in `PeftModel.set_adapter`, `delete_adapter` and
`add_weighted_adapter`, but three calls accept any string and do nothing with it:
`IA3Model.set_adapter("typo")` activates no adapter at all (every IA3 layer then runs unscaled,
and training updates nothing), `merge_adapter(["typo"])` and
`merge_and_unload(adapter_names=["typo"])` merge nothing. On a model with our fused layers these
raise a ValueError naming the unknown and the known adapters; models built of PEFT's own layers
keep PEFT's behaviour."""
from __future__ import annotations

from typing import Iterable, Optional, Union

from peft.tuners.ia3.layer import IA3Layer


def check_known(model, names: Optional[Union[str, Iterable[str]]], what: str) -> None:
    """Raise when a name in `names` is not one of the IA3Model's adapters (and the model holds
    at least one fused layer)."""
    if names is None:
        return
    names = [names] if isinstance(names, str) else list(names)
    known = list(getattr(model, "peft_config", {}))
    unknown = [n for n in names if n not in known]
    if unknown and _has_fused_layers(model):
        raise ValueError(f"{what}: adapter(s) {unknown} not found; this model's IA3 adapters are "
                         f"{known} (PEFT would silently use none of the unknown names)")


def _has_fused_layers(model) -> bool:
    from .patch import FUSED_CLASSES

    fused = tuple(FUSED_CLASSES.values())
    return any(isinstance(m, fused) for m in model.modules() if isinstance(m, IA3Layer))


def set_adapter(self, adapter_name, *args, **kwargs):
    check_known(self, adapter_name, "IA3Model.set_adapter")
    return _PEFT["set_adapter"](self, adapter_name, *args, **kwargs)


def merge_adapter(self, adapter_names=None, *args, **kwargs):
    check_known(self, adapter_names, "merge_adapter")
    return _PEFT["merge_adapter"](self, adapter_names, *args, **kwargs)


_PEFT: dict = {}
_OURS = {"set_adapter": set_adapter, "merge_adapter": merge_adapter}


def install() -> None:
    """Wrap IA3Model.set_adapter and merge_adapter (merge_and_unload is checked in
    mixed.unload_and_optionally_merge, which wraps PEFT's unload). Idempotent."""
    from peft.tuners.ia3.model import IA3Model

    for name, ours in _OURS.items():
        if getattr(IA3Model, name) is not ours:
            _PEFT[name] = getattr(IA3Model, name)
            setattr(IA3Model, name, ours)
