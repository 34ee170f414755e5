"""Model families: everything about a kind of model that the core does not know.

The registry (:func:`family_for_model`, :func:`family_of`) picks the family of a
model; :class:`Family` is the interface a family implements. Two are built in:
diffusers ``UNet2DModel`` (asked first) and fx-traceable CNNs (the fallback).
A new family subclasses :class:`Family` and calls :func:`register_family`.
"""

from .base import (
    Family,
    MergeVerificationError,
    TracedModel,
    TraceError,
    copy_marks,
    mark,
    param_of,
)
from .cnn import CNN, CnnFamily
from .diffusers_unet import UNET, UNet2DFamily
from .registry import (
    UnknownFamilyError,
    families,
    family_for_model,
    family_of,
    get_family,
    register_family,
    unregister_family,
)

register_family(CNN)
register_family(UNET)  # first: the CNN family claims every model

__all__ = [
    "CNN",
    "CnnFamily",
    "Family",
    "MergeVerificationError",
    "TraceError",
    "TracedModel",
    "UNET",
    "UNet2DFamily",
    "UnknownFamilyError",
    "copy_marks",
    "families",
    "family_for_model",
    "family_of",
    "get_family",
    "mark",
    "param_of",
    "register_family",
    "unregister_family",
]
