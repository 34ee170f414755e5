"""layermerge: make CNNs faster by making them shallower (LayerMerge, ICML 2024).

The library, layer by layer (DESIGN §9)::

    loaded = load_model("torchvision:resnet34")            # or timm:, layermerge:, file.py:fn
    traced = trace(loaded.model, loaded.input_shape)       # -> traced.chain
    space = build_space(traced.chain, conv_weights(traced))  # blocks and options
    plan = space.random_plan(0)                            # or a solver's plan
    train_net = apply(traced, plan)                        # trainable, exact
    deploy = merge(train_net)                              # one conv per block, verified

Names are imported lazily so that torch-free layers (tables, solve) load quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "Chain": "chain",
    "ConvSpec": "chain",
    "Node": "chain",
    "Skip": "chain",
    "ModelLoadError": "models",
    "load_model": "models",
    "Plan": "plan",
    "PlanBlock": "plan",
    "PlanError": "plan",
    "SearchSpace": "space",
    "build_space": "space",
    "TracedModel": "trace",
    "TraceError": "trace",
    "conv_weights": "trace",
    "trace": "trace",
    "MergeVerificationError": "transform",
    "apply": "transform",
    "compare": "transform",
    "count_layers": "transform",
    "merge": "transform",
    "verify": "transform",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layermerge' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .chain import Chain, ConvSpec, Node, Skip
    from .models import ModelLoadError, load_model
    from .plan import Plan, PlanBlock, PlanError
    from .space import SearchSpace, build_space
    from .trace import TracedModel, TraceError, conv_weights, trace
    from .transform import MergeVerificationError, apply, compare, count_layers, merge, verify
