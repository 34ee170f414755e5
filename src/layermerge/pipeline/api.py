"""One call from a model and datasets in a Python session to files to ship.

::

    import layermerge as lm

    result = lm.compress(model, train=train_set, val=val_set, test=test_set,
                         budgets=[0.7], run_dir="runs/mine")
    net = lm.load_shipped("runs/mine/layermerge-0.70", model=model)

:func:`compress` runs the stages of ``layermerge compress`` (cached in
``run_dir`` like the CLI's, keyed by digests of the model's class and weights and
of the datasets) with the model as given as the base network, and writes the
report and one folder per plan (:mod:`layermerge.pipeline.ship`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..channelprune import PRUNED_SCHEMA, rebuild_pruned
from ..models import load_model
from ..plan import Plan
from ..tasks import ClassificationTask
from ..trace import trace
from ..train import save_state_dict
from ..transform import deploy_network
from .compress import compress as run_compress
from .config import ConfigError, parse_config
from .hooks import TaskHooks
from .loading import apply_smoke, deep_merge
from .objects import ObjectSource, make_splits_of, model_digest
from .run import RunResult

#: what ``smoke=True`` shrinks a run to: a step or two of every training, a few
#: timed calls, small batches (the same idea as a config's ``smoke:`` section)
SMOKE: dict[str, Any] = {
    "latency": {"max_time_s": 0.02, "protocol": "adaptive"},
    "importance": {"steps": 1, "batch_size": 8},
    "finetune": {"steps": 2, "batch_size": 8},
    "benchmark": {"rounds": 2, "calls_per_round": 2, "max_time_s": 5.0},
}


class MetricTask(ClassificationTask):
    """A task scored by the user's ``metric(outputs, targets)`` (the batch mean of a
    quality, higher is better) and trained with ``loss(outputs, targets)`` (default:
    cross-entropy). Importance: ``exp(delta_metric / 100)`` of holdout-val, as top-1
    accuracy in percent is scored (score ``acc``), or the loss change (score ``loss``)."""

    name = "metric"

    def __init__(self, metric: Callable, loss: Callable | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.metric_fn, self.loss_fn = metric, loss

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "task": self.name,
            "metric": getattr(self.metric_fn, "__qualname__", repr(self.metric_fn)),
            "loss": getattr(self.loss_fn, "__qualname__", "cross_entropy"),
        }

    def training_loss(self, model, batch, *, teacher=None) -> torch.Tensor:
        if self.loss_fn is None:
            return super().training_loss(model, batch, teacher=teacher)
        x, y = batch
        return self.loss_fn(model(x), y)

    def evaluation_outputs(self, model, batch):
        x, y = batch
        out = model(x)
        loss = self.loss_fn(out, y) if self.loss_fn else F.cross_entropy(out.float(), y)
        n = float(len(y))
        quality = float(self.metric_fn(out, y))
        sums = torch.tensor([float(loss) * n, quality * n, n], dtype=torch.float64)
        return sums, out.float()

    def metrics(self, sums) -> dict[str, float]:
        loss, quality, count = (float(v) for v in sums)
        if count == 0:
            raise ValueError("no samples were evaluated")
        # "accuracy" is where the classification importance score reads the quality
        return {"loss": loss / count, "accuracy": quality / count}


class MetricHooks(TaskHooks):
    """The classification stages, scored by a user's metric."""

    def __init__(self, cfg, metric: Callable, loss: Callable | None, name: str) -> None:
        super().__init__(cfg)
        self.metric, self.loss = metric, loss
        self.metrics = ({"key": "metric", "label": name, "digits": 4, "delta": f"Δ{name}"},)

    def task(self):
        return MetricTask(self.metric, self.loss)

    def train_task(self):
        return MetricTask(self.metric, self.loss)

    def finetune_task(self):
        ft = self.cfg.finetune
        return MetricTask(
            self.metric,
            self.loss,
            distill_weight=ft.distill,
            distill_temperature=ft.distill_temperature,
        )

    def quality_of(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"metric": metrics["accuracy"], "loss": metrics["loss"]}


def compress(
    model: nn.Module,
    *,
    train,
    val,
    test=None,
    input_shape: Sequence[int] | None = None,
    budgets: Sequence[float] = (0.7,),
    methods: Sequence[str] = ("layermerge",),
    run_dir: str | Path = "runs/compress",
    smoke: bool = False,
    metric: Callable | None = None,
    loss: Callable | None = None,
    log=print,
    **settings: Any,
) -> RunResult:
    """Compress ``model`` (its current weights are the base network) on torch datasets.

    ``train``, ``val`` and ``test``: map-style ``Dataset`` objects or ``DataLoader``
    objects over them, yielding ``(input, target)``; the user's own transforms and
    normalisation apply. ``train`` fine-tunes the plans (importance fine-tunes on a
    seeded subset of it as large as ``val``), ``val`` scores each option's
    importance, ``test`` (default ``val``) the reported quality. ``input_shape``:
    one input's shape (default: the first training input's). ``metric(outputs,
    targets)``: the batch mean of a higher-is-better quality instead of top-1
    accuracy, with ``loss(outputs, targets)`` for training (default cross-entropy).
    ``settings``: config keys and sections, e.g. ``device="cuda"``,
    ``latency={"backends": ["onnxruntime"]}``, ``finetune={"epochs": 3}``,
    ``export={"formats": ["onnx", "pt2"]}``. ``smoke=True``: the shrunk settings of
    :data:`SMOKE`. Returns the run's :class:`RunResult` (``report``: report.md; one
    folder per plan beside it, e.g. ``layermerge-0.70/``)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch nn.Module, got {type(model).__name__}")
    for k in ("model", "data", "weights", "train"):
        if k in settings:
            raise ConfigError(
                f"{k}=: compress() takes the model and datasets as objects; use the config "
                "file and `layermerge compress` for registry models and data specs"
            )
    splits = make_splits_of({"train": train, "val": val, "test": test})
    rd = Path(run_dir)
    rd.mkdir(parents=True, exist_ok=True)
    mdig = model_digest(model)
    weights = rd / f"given-{mdig}.pt"
    if not weights.is_file():
        save_state_dict(model, weights)
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    data: dict[str, Any] = {
        # the weights' digest is in the base stage's key (file_digest of the weights);
        # the latency tables depend on the class (and its traced fingerprint) alone
        "model": f"object:{cls}",
        "data": f"objects:{splits.digest()}",
        "train": None,
        "weights": str(weights),
        "solve": {"methods": list(methods), "budgets": [float(b) for b in budgets]},
        "export": {"formats": ["onnx", "pt2"]},
        "smoke": SMOKE,
    }
    if input_shape is not None:
        data["input_shape"] = [int(v) for v in input_shape]
    if metric is not None:
        data["model"] += f"|metric:{getattr(metric, '__qualname__', 'metric')}"
    is_smoke = False
    if smoke:
        data = apply_smoke(data, "compress()")
        is_smoke = bool(data.pop("is_smoke"))
    data = deep_merge(data, settings)
    cfg = replace(parse_config(data, "compress()"), is_smoke=is_smoke)
    hooks = None
    if metric is not None:
        name = getattr(metric, "__name__", "metric")
        hooks = MetricHooks(cfg, metric, loss, name if name != "<lambda>" else "metric")
    return run_compress(cfg, rd, log=log, source=ObjectSource(splits, model, hooks))


def load_shipped(
    folder: str | Path, model: nn.Module | None = None, *, verify: bool = True
) -> nn.Module:
    """The deploy network of a plan folder (``RUN_DIR/<method>-<budget>/``): rebuilt
    from the original model (``model``; default: the registry model ``model.json``
    names) and ``plan.json``, with ``weights.safetensors`` loaded into it.

    A channelprune folder (``pruning.json`` instead of ``plan.json``) holds a network
    pruned from the base network: the original architecture (``model``, whose weights
    do not matter; default: the registry model) is cut to the output widths of every
    conv and linear layer recorded in ``pruning.json`` (a folder shipped before they
    were: the widths of the weights in ``weights.safetensors``), coupled layers
    together, and the weights are loaded; the run's base weights are not needed. It
    needs torch-pruning. ``verify``: check that the rebuilt pruned network computes
    what the folder's ``model.onnx`` computes (ONNX Runtime, a random batch), raising
    ``ValueError`` when it does not."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / "model.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{folder} is not a plan folder of a compress run (no model.json in it)"
        )
    meta = json.loads(meta_file.read_text())
    shape = tuple(meta["input_shape"])
    if (folder / "pruning.json").is_file():
        return _load_pruned_folder(folder, meta, shape, model, verify=verify)
    if model is None:
        if meta["model"].startswith("object:"):
            raise ValueError(
                f"{folder} was made from a Python object ({meta['model']}): pass it, "
                "load_shipped(folder, model=the_original_model)"
            )
        model = load_model(meta["model"], meta.get("model_kwargs") or {}, None, shape).model
    traced = trace(copy.deepcopy(model), shape)
    net = deploy_network(traced, Plan.load(folder / "plan.json"), verify=False)
    net.load_state_dict(load_file(str(folder / "weights.safetensors")))
    return net.eval()


def _load_pruned_folder(
    folder: Path, meta: dict, shape: tuple, model: nn.Module | None, *, verify: bool
) -> nn.Module:
    """The pruned network of a channelprune folder, rebuilt on the unpruned architecture
    from the widths of ``pruning.json`` (schema 2) or of ``weights.safetensors``."""
    info_file, weights = folder / "pruning.json", folder / "weights.safetensors"
    info = json.loads(info_file.read_text())
    schema = int(info.get("schema", 1))
    if schema > PRUNED_SCHEMA:
        raise ValueError(
            f"{info_file}: schema {schema}, written by a newer layermerge (this one reads "
            f"up to {PRUNED_SCHEMA}): upgrade layermerge"
        )
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no weights.safetensors: load model.onnx instead")
    widths = info.get("widths")  # schema 1 has none: rebuild_pruned reads the weights'
    if widths is not None and not (
        isinstance(widths, dict) and all(isinstance(v, int) for v in widths.values())
    ):
        raise ValueError(f"{info_file}: widths must map layer names to channel counts")
    if model is None:
        if meta["model"].startswith("object:"):
            raise ValueError(
                f"{folder} was made from a Python object ({meta['model']}): pass it (any "
                "weights), load_shipped(folder, model=the_original_model)"
            )
        model = load_model(meta["model"], meta.get("model_kwargs") or {}, None, shape).model
    x = torch.zeros(1, *shape)
    source = str(info_file) if widths is not None else None
    net = rebuild_pruned(model, weights, x, widths=widths, source=source)
    if verify and (folder / "model.onnx").is_file():
        _check_against_onnx(net, folder / "model.onnx", shape)
    return net


def _check_against_onnx(net: nn.Module, onnx_file: Path, shape: tuple) -> None:
    """Raise ``ValueError`` unless ``net`` computes what ``onnx_file`` does on a seeded
    random batch of 2, to the export check's relative tolerance."""
    from ..export import EXPORT_TOLERANCE, load_onnx, max_rel_err, run_onnx

    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = net(x).double()
    ref = run_onnx(load_onnx(onnx_file), x).double()
    if ref.shape != got.shape:
        raise ValueError(
            f"the network rebuilt from {onnx_file.parent} gives outputs of shape "
            f"{tuple(got.shape)}, {onnx_file} of shape {tuple(ref.shape)}"
        )
    err = max_rel_err(ref, got)
    if not err <= EXPORT_TOLERANCE:
        raise ValueError(
            f"the network rebuilt from {onnx_file.parent / 'weights.safetensors'} does not "
            f"compute what {onnx_file} does (max relative error {err:.2e} > "
            f"{EXPORT_TOLERANCE:g}): are the files from the same network?"
        )
