"""layermerge: make CNNs faster by making them shallower (LayerMerge, ICML 2024).

The library, layer by layer (DESIGN §9)::

    loaded = load_model("torchvision:resnet34")            # or timm:, layermerge:, file.py:fn
    traced = trace(loaded.model, loaded.input_shape)       # -> traced.chain
    space = build_space(traced.chain, conv_weights(traced))  # blocks and options
    plan = space.random_plan(0)                            # or a solver's plan
    train_net = apply(traced, plan)                        # trainable, exact
    deploy = merge(train_net)                              # one conv per block, verified
"""

__version__ = "0.1.0"

from .chain import Chain, ConvSpec, Node, Skip
from .models import ModelLoadError, load_model
from .plan import Plan, PlanBlock, PlanError
from .space import SearchSpace, build_space
from .trace import TracedModel, TraceError, conv_weights, trace
from .transform import MergeVerificationError, apply, compare, count_layers, merge, verify

__all__ = [
    "Chain",
    "ConvSpec",
    "MergeVerificationError",
    "ModelLoadError",
    "Node",
    "Plan",
    "PlanBlock",
    "PlanError",
    "SearchSpace",
    "Skip",
    "TraceError",
    "TracedModel",
    "apply",
    "build_space",
    "compare",
    "conv_weights",
    "count_layers",
    "load_model",
    "merge",
    "trace",
    "verify",
    "__version__",
]
