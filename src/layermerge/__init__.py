"""layermerge: make CNNs faster by making them shallower (LayerMerge, ICML 2024).

The library, layer by layer::

    loaded = load_model("torchvision:resnet34")            # or timm:, layermerge:, file.py:fn
    traced = trace(loaded.model, loaded.input_shape)       # -> traced.chain (via its family)
    space = build_space(traced.chain, conv_weights(traced))  # blocks and options
    plan = space.random_plan(0)                            # or a solver's plan
    train_net = apply(traced, plan)                        # trainable, exact
    deploy = merge(train_net)                              # one conv per block, verified

    latency = build_latency_table(traced, "T.csv", make_backend(backend="onnxruntime"))
    build_importance_tables(traced, space, task, splits, "I.csv")  # task: layermerge.tasks
    plan = solve_tables(latency, read_table("I.csv"), budget_frac=0.6).plan  # the exact DP
    deploy = load_compressed(traced, plan, "finetuned.pt")  # = deploy_network
    result = benchmark(traced, plan, make_backend())       # original vs merged, interleaved

    compress(model, train=ds, val=ds_val, budgets=[0.7])   # all of it on your own objects
    net = load_shipped("runs/compress/layermerge-0.70", model=model)

Model families (fx-traceable CNNs, diffusers UNets, or your own) plug in through
:mod:`layermerge.families`.
"""

from ._version import __version__
from .chain import Chain, ConvSpec, Node, Skip
from .families import Family, MergeVerificationError, family_of, register_family
from .importance import build_importance_tables
from .latency import benchmark, build_latency_table, make_backend
from .models import ModelLoadError, load_model
from .pipeline.api import compress, load_shipped
from .plan import Plan, PlanBlock, PlanError
from .solve import solve_tables
from .space import SearchSpace, build_space
from .trace import TracedModel, TraceError, conv_weights, trace
from .transform import apply, compare, count_layers, deploy_network, merge, verify

#: the deploy network from a traced model, a plan and fine-tuned weights
load_compressed = deploy_network

__all__ = [
    "Chain",
    "ConvSpec",
    "Family",
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
    "benchmark",
    "build_importance_tables",
    "build_latency_table",
    "build_space",
    "compare",
    "compress",
    "conv_weights",
    "count_layers",
    "deploy_network",
    "family_of",
    "load_compressed",
    "load_model",
    "load_shipped",
    "make_backend",
    "merge",
    "register_family",
    "solve_tables",
    "trace",
    "verify",
    "__version__",
]
