"""Trace a model into LayerMerge's chain.

The chain is read off the model by its family (:mod:`layermerge.families`):
fx-traceable CNNs through their torch.fx graph, diffusers UNets through their
block classes. Anything the family cannot represent becomes a break with a
reason, or a :class:`TraceError` naming the module and op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .families import TracedModel, TraceError, family_for_model

__all__ = ["TraceError", "TracedModel", "conv_weights", "trace"]


def trace(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    include_stem: bool = False,
    include_head: bool = False,
    freeze: Sequence[str] = (),
) -> TracedModel:
    """Trace ``model`` (in eval mode) into a :class:`TracedModel`.

    ``input_shape`` is (C, H, W) of one example (default: what the model says, e.g.
    a diffusers UNet's ``sample_size``, else 3x224x224); shapes at every node come from
    running it through the model. The stem (first conv) and a final 1x1 head conv
    feeding global pooling stay outside the chain unless ``include_stem`` /
    ``include_head``; convs named in ``freeze`` are irreducible.
    """
    family = family_for_model(model)
    if input_shape is None:
        input_shape = family.default_input_shape(model) or (3, 224, 224)
    return family.trace(
        model,
        tuple(input_shape),
        include_stem=include_stem,
        include_head=include_head,
        freeze=tuple(freeze),
    )


def conv_weights(traced: TracedModel) -> dict[int, torch.Tensor]:
    """Chain index -> conv weight, for choosing kept convs by L1 norm."""
    return {c.index: traced.module(c.path).weight for c in traced.chain.convs}
