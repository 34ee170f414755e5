"""Tasks: what a network is trained for and how it is scored.

Training (:mod:`layermerge.train`) and importance measurement
(:mod:`layermerge.importance`) only talk to a :class:`Task`: it makes the data
splits, computes the training loss of a batch (optionally distilled from a
teacher), accumulates evaluation sums that add up across batches and ranks,
turns sums into metrics, and turns metrics into importance values. Classification
is :class:`ClassificationTask`; the diffusion task
(:class:`layermerge.diffusion.DiffusionTask`: denoising loss, importance
``exp(-(L - L_base) / L_base)``, the paper's diffusion importance) plugs into the same code by
implementing the same methods.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataSpec, DataSplits, make_splits

Batch = tuple[torch.Tensor, torch.Tensor]


class Task(ABC):
    """Loss, metrics, data and importance of one kind of model."""

    name: str = "task"
    #: raw columns an importance row holds besides ``importance`` (in table order)
    importance_columns: tuple[str, ...] = ()
    #: the scores an importance table can take its ``importance`` column from (first:
    #: the task's default)
    importance_scores: tuple[str, ...] = ("loss",)
    #: the holdout splits an importance entry is measured on
    importance_splits: tuple[str, ...] = ("train", "val")

    def settings(self) -> dict[str, Any]:
        """What the task's numbers depend on (recorded in table metadata)."""
        return {"task": self.name}

    @abstractmethod
    def make_data(
        self,
        spec: str | DataSpec,
        input_shape: tuple[int, ...],
        *,
        holdout_per_class: int = 50,
        seed: int = 0,
    ) -> DataSplits:
        """The training, holdout-train, holdout-val and test splits."""

    @abstractmethod
    def training_loss(
        self, model: nn.Module, batch: Batch, *, teacher: nn.Module | None = None
    ) -> torch.Tensor:
        """Scalar loss to minimise on ``batch`` (``teacher``: the uncompressed network)."""

    @abstractmethod
    def evaluation_sums(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """A float64 vector of sums over the batch; sums of batches (and of ranks) add."""

    @abstractmethod
    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """Metrics from the summed :meth:`evaluation_sums`."""

    def evaluation_outputs(
        self, model: nn.Module, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`evaluation_sums` of ``batch`` and the outputs :meth:`divergence_sum`
        compares (``None`` when the task has no output divergence)."""
        return self.evaluation_sums(model, batch), None

    def divergence_sum(self, outputs: torch.Tensor, teacher_outputs: torch.Tensor) -> float:
        """Summed divergence of ``outputs`` from the unmodified network's outputs."""
        raise NotImplementedError(f"the {self.name} task has no output divergence")

    @abstractmethod
    def importance_values(
        self,
        base: dict[str, dict[str, float]],
        measured: dict[str, dict[str, float]],
        score: str | None = None,
    ) -> dict[str, float]:
        """``importance`` and the raw :attr:`importance_columns` of one table entry.

        ``base`` and ``measured`` map ``"train"``/``"val"`` (holdout splits) to
        metrics of the reference network (the unmodified one, or the mean of the
        calibration entries) and of the compressed, fine-tuned network. ``score``
        (one of :attr:`importance_scores`, default the first) picks what
        ``importance`` is made of.
        """


class ClassificationTask(Task):
    """Cross-entropy classification scored by top-1 accuracy (in percent).

    ``label_smoothing`` applies to the training loss only. With
    ``distill_weight`` w > 0 and a teacher, the training loss is
    ``(1 - w) * CE + w * T^2 * KL(softmax(t / T) || softmax(s / T))`` (Hinton et
    al. 2015; the ``T^2`` keeps the gradient scale independent of T).

    Importance: ``delta_acc`` is the holdout-val accuracy change in percentage
    points, ``delta_loss`` the holdout-val loss change, ``kl`` the mean
    ``KL(p_unmodified || p_measured)`` of the softmax outputs on holdout-val and
    ``delta_kl`` its change. Score ``acc``: ``importance = exp(delta_acc / 100)``
    (the paper's normalisation); ``loss``: ``exp(-delta_loss)``; ``kl``:
    ``exp(-delta_kl)`` (both in nats).
    """

    name = "classification"
    importance_columns = ("delta_acc", "delta_loss", "delta_kl", "val_acc", "val_loss", "kl")
    importance_scores = ("acc", "loss", "kl")
    importance_splits = ("val",)

    def __init__(
        self,
        label_smoothing: float = 0.0,
        distill_weight: float = 0.0,
        distill_temperature: float = 4.0,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"the distillation weight must be in [0, 1], got {distill_weight}")
        if distill_temperature <= 0:
            raise ValueError(f"the distillation temperature must be > 0, got {distill_temperature}")
        self.label_smoothing = label_smoothing
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature

    def settings(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "label_smoothing": self.label_smoothing,
            "distill_weight": self.distill_weight,
            "distill_temperature": self.distill_temperature,
        }

    def make_data(
        self, spec, input_shape, *, holdout_per_class=50, seed=0, normalization=None
    ) -> DataSplits:
        """``normalization`` = (mean, std) replaces the dataset's statistics."""
        return make_splits(
            spec,
            input_shape,
            holdout_per_class=holdout_per_class,
            seed=seed,
            normalization=normalization,
        )

    def training_loss(self, model, batch, *, teacher=None) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        if teacher is None or self.distill_weight == 0.0:
            return loss
        with torch.no_grad():
            t_logits = teacher(x).float()
        T = self.distill_temperature
        kd = F.kl_div(
            F.log_softmax(logits.float() / T, dim=1),
            F.log_softmax(t_logits / T, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        return (1.0 - self.distill_weight) * loss + self.distill_weight * T * T * kd

    def evaluation_sums(self, model, batch) -> torch.Tensor:
        return self.evaluation_outputs(model, batch)[0]

    def evaluation_outputs(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = model(x).float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(1) == y).sum()
        sums = torch.stack(
            [loss.double(), correct.double(), loss.new_tensor(float(len(y)), dtype=torch.float64)]
        )
        return sums, logits

    def divergence_sum(self, outputs, teacher_outputs) -> float:
        t = F.log_softmax(teacher_outputs.double(), dim=1)
        s = F.log_softmax(outputs.double(), dim=1)
        return float((t.exp() * (t - s)).sum())

    def metrics(self, sums) -> dict[str, float]:
        loss, correct, count = (float(v) for v in sums)
        if count == 0:
            raise ValueError("no samples were evaluated")
        return {"loss": loss / count, "accuracy": 100.0 * correct / count}

    def importance_values(self, base, measured, score=None) -> dict[str, float]:
        score = score or self.importance_scores[0]
        b, m = base["val"], measured["val"]
        delta = m["accuracy"] - b["accuracy"]
        delta_loss = m["loss"] - b["loss"]
        delta_kl = m.get("kl", 0.0) - b.get("kl", 0.0)
        if score == "acc":
            importance = math.exp(delta / 100.0)
        elif score == "loss":
            importance = math.exp(-delta_loss)
        elif score == "kl":
            importance = math.exp(-delta_kl)
        else:
            raise ValueError(f"unknown score {score!r}; expected acc, loss or kl")
        return {
            "importance": importance,
            "delta_acc": delta,
            "delta_loss": delta_loss,
            "delta_kl": delta_kl,
            "val_acc": m["accuracy"],
            "val_loss": m["loss"],
            "kl": m.get("kl", 0.0),
        }
