"""Which family handles a model: a registry consulted in order (first claim wins)."""

from __future__ import annotations

from torch import nn

from .base import Family, TracedModel

_FAMILIES: list[Family] = []


class UnknownFamilyError(LookupError):
    """No registered family handles the model, or a network names an unknown family."""


def register_family(family: Family, *, first: bool = True) -> Family:
    """Register ``family`` (an instance). ``first`` puts it before the families
    registered so far, so that a specific family wins over a generic one; a family
    of the same name is replaced."""
    for i, f in enumerate(_FAMILIES):
        if f.name == family.name:
            del _FAMILIES[i]
            break
    _FAMILIES.insert(0 if first else len(_FAMILIES), family)
    return family


def unregister_family(name: str) -> None:
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != name]


def families() -> list[Family]:
    """The registered families, in the order they are asked."""
    return list(_FAMILIES)


def get_family(name: str) -> Family:
    for f in _FAMILIES:
        if f.name == name:
            return f
    raise UnknownFamilyError(
        f"no model family named {name!r} is registered (known: {[f.name for f in _FAMILIES]})"
    )


def family_for_model(model: nn.Module) -> Family:
    """The first registered family that claims ``model``."""
    for f in _FAMILIES:
        if f.claims(model):
            return f
    raise UnknownFamilyError(
        f"no model family handles {type(model).__name__} (known: {[f.name for f in _FAMILIES]})"
    )


def family_of(obj: TracedModel | nn.Module) -> Family:
    """The family of a traced model, of a network a family built (``layermerge_family``),
    or else of a plain model (:func:`family_for_model`)."""
    if isinstance(obj, TracedModel):
        return obj.family
    name = getattr(obj, "layermerge_family", None)
    if name is not None:
        return get_family(name)
    return family_for_model(obj)
