"""What a compress run does differently per task (``task:`` in the config).

The stage loop (:mod:`layermerge.pipeline.compress`) is the same for every task;
a :class:`TaskHooks` supplies the rest: the :class:`~layermerge.tasks.Task` that
trains and scores networks, the quality metric and the split it is measured on,
what a budget fraction is a fraction of, extra quality stages (FID of samples for
diffusion), extra benchmarks (whole sampling runs) and extra report sections.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..data import Split, open_dataset
from ..diffusion import DiffusionTask, NoiseSchedule, image_grid, sample
from ..distributed import DistInfo
from ..fid import classifier_features, fid_of_images, inception_features, reference_stats
from ..fileio import file_digest
from ..models import load_model
from ..plan import Plan
from ..sampling import benchmark_sampling
from ..tables import Table
from ..tasks import ClassificationTask, Task
from ..train import Recipe, fit, save_state_dict
from .config import CompressConfig
from .run import Run


class TaskHooks:
    """The classification behaviour; :class:`DiffusionHooks` overrides what differs."""

    name = "classification"
    #: the quality columns of the report: key, label, digits; the first is plotted
    #: against the speed-up and its change from the base network is shown
    metrics: tuple[dict[str, Any], ...] = (
        {"key": "accuracy", "label": "accuracy %", "digits": 2, "delta": "Δacc"},
    )
    #: what the budgets of ``solve.budgets`` are fractions of
    budgets_are = (
        "fractions of the base network's latency, as the primary backend's table predicts "
        "it for the whole network"
    )
    #: score the train-time network before fine-tuning too
    score_before = True

    def __init__(self, cfg: CompressConfig) -> None:
        self.cfg = cfg

    # -- tasks --------------------------------------------------------------------

    def task(self) -> Task:
        """Evaluation and importance."""
        return ClassificationTask(label_smoothing=0.0)

    def train_task(self) -> Task:
        return ClassificationTask(label_smoothing=self.cfg.train.label_smoothing)

    def finetune_task(self) -> Task:
        ft = self.cfg.finetune
        return ClassificationTask(
            label_smoothing=ft.label_smoothing,
            distill_weight=ft.distill,
            distill_temperature=ft.distill_temperature,
        )

    # -- quality -------------------------------------------------------------------

    def eval_split(self, run: Run) -> Split:
        """The split :meth:`quality_of` scores networks on."""
        return run.splits.test

    def quality_of(self, metrics: dict[str, float]) -> dict[str, float]:
        """Report fields of the task's metrics on :meth:`eval_split`."""
        return {"accuracy": metrics["accuracy"], "loss": metrics["loss"]}

    def prepare_quality(self, run: Run) -> None:
        """Stages every quality stage needs (all ranks call it)."""

    def quality_stage(
        self, run: Run, label: str, depends: str | None, make_net: Callable[[], nn.Module]
    ) -> dict[str, Any]:
        """Extra quality of one network (``label``: base or a plan digest), as a stage
        keyed by ``depends`` (the stage its weights come from). Classification: none."""
        return {}

    # -- budgets and benchmarks ----------------------------------------------------

    def budget(self, table: Table, base_predicted_ms: float, frac: float) -> dict[str, float]:
        """The budget keywords of :func:`~layermerge.solve.solve_tables` for ``frac``."""
        return {"budget_frac": frac}

    def extra_benchmark(self, run: Run, plan: Plan, backend) -> dict[str, Any]:
        """More timings of ``plan`` on ``backend`` (diffusion: whole sampling runs)."""
        return {}

    # -- report --------------------------------------------------------------------

    def report_extras(self, run: Run, report: dict[str, Any]) -> None:
        """Add the task's fields and Markdown sections (``report["sections"]``)."""


class DiffusionHooks(TaskHooks):
    """Denoising UNets: EMA fine-tuning, holdout denoising loss and FID of DDIM
    samples, budgets as fractions of the table latency (the paper's DDPM
    convention), whole DDIM sampling runs benchmarked beside the forward pass."""

    name = "diffusion"
    metrics = (
        {"key": "fid", "label": "FID", "digits": 3, "delta": "ΔFID"},
        {"key": "val_loss", "label": "holdout loss", "digits": 5},
    )
    budgets_are = (
        "fractions of the table latency of the unmodified network (its chain's entries); "
        "the constant rest of the network comes on top"
    )
    score_before = False

    def __init__(self, cfg: CompressConfig) -> None:
        super().__init__(cfg)
        self.schedule = NoiseSchedule(**vars(cfg.schedule))
        self._extractor = None
        self._ref = None

    def _task(self, distill: float = 0.0) -> DiffusionTask:
        return DiffusionTask(
            self.schedule,
            eval_draws=self.cfg.importance.eval_draws,
            eval_seed=self.cfg.seed,
            distill_weight=distill,
        )

    def task(self) -> Task:
        return self._task()

    def train_task(self) -> Task:
        return self._task()

    def finetune_task(self) -> Task:
        return self._task(self.cfg.finetune.distill)

    def eval_split(self, run: Run) -> Split:
        return run.splits.holdout_val

    def quality_of(self, metrics: dict[str, float]) -> dict[str, float]:
        return {"val_loss": metrics["loss"]}

    def budget(self, table: Table, base_predicted_ms: float, frac: float) -> dict[str, float]:
        const = table.constant_ms
        return {"budget_ms": const + frac * (base_predicted_ms - const)}

    # -- FID -----------------------------------------------------------------------

    def prepare_quality(self, run: Run) -> None:
        """The FID classifier (trained on the same data unless given), the feature
        extractor and the test split's reference statistics."""
        cfg, q = self.cfg, self.cfg.quality
        shape = run.input_shape

        def classifier_stage():
            torch.manual_seed(cfg.seed)
            clf = load_model(q.classifier, q.classifier_kwargs, q.classifier_weights, shape).model
            if not q.classifier_weights:
                ctask = ClassificationTask()
                csplits = ctask.make_data(cfg.data, shape, seed=cfg.seed)
                fit(
                    clf,
                    ctask,
                    csplits.train,
                    Recipe(steps=q.classifier_steps, batch_size=128, lr=0.1, seed=cfg.seed),
                    device=run.device,
                    dist=DistInfo(),  # rank 0 alone
                    desc="FID classifier",
                )
            save_state_dict(clf.cpu(), run.rd / "fid_classifier.pt")
            return {"files": ["fid_classifier.pt"]}

        clf_keys = ("classifier", "classifier_kwargs", "classifier_weights", "classifier_steps")
        run.runner.run(
            "fid-classifier",
            {
                "q": {k: getattr(q, k) for k in clf_keys},
                "data": cfg.data,
                "shape": list(shape),
                "seed": cfg.seed,
            },
            classifier_stage,
        )
        self._clf_key = run.runner.key("fid-classifier")

    def _features(self, run: Run):
        if self._extractor is None:
            cfg, q = self.cfg, self.cfg.quality
            weights = run.rd / "fid_classifier.pt"
            if q.features == "inception":
                self._extractor = inception_features(q.inception_weights, device=run.device)
            else:
                clf = load_model(q.classifier, q.classifier_kwargs, weights, run.input_shape)
                ds = open_dataset(cfg.data)
                self._extractor = classifier_features(
                    clf.model,
                    mean=tuple(ds.mean),
                    std=tuple(ds.std),
                    name=q.classifier,
                    data=cfg.data,
                    weights_digest=file_digest(weights),
                )
            self._ref = reference_stats(
                self._extractor,
                run.splits.test,
                cache=run.rd / "fid_ref_test.npz",
                source={"data": cfg.data, "shape": list(run.input_shape)},
            )
        return self._extractor, self._ref

    def quality_stage(self, run, label, depends, make_net):
        q = self.cfg.quality
        png = f"samples_{label}.png"

        def stage():
            extractor, ref = self._features(run)
            t0 = time.time()
            images = sample(
                make_net(),
                q.n,
                steps=q.steps,
                seed=self.cfg.seed,
                batch_size=q.batch_size,
                schedule=self.schedule,
                device=run.device,
            )
            seconds = time.time() - t0
            image_grid(images[:64]).save(run.rd / png)
            res = fid_of_images(images, extractor, ref)
            return {
                "fid": res.fid,
                "feature_space": res.label,
                "n": res.n,
                "n_ref": res.n_ref,
                "sampling_seconds": seconds,
                "files": [png],
            }

        key = {"net": depends, "quality": self.cfg.section("quality"), "clf": self._clf_key}
        key["schedule"] = self.cfg.section("schedule")
        return run.runner.run(f"quality:{label}", key, stage)

    # -- benchmarks and report -------------------------------------------------------

    def extra_benchmark(self, run, plan, backend):
        b = self.cfg.benchmark
        smp = benchmark_sampling(run.traced, plan, backend, steps=b.sampling_steps, rounds=b.rounds)
        return {
            "sampling_baseline_s": smp.baseline_ms / 1e3,
            "sampling_s": smp.compressed_ms / 1e3,
            "sampling_speedup": smp.speedup,
        }

    def report_extras(self, run, report):
        q, b = self.cfg.quality, self.cfg.benchmark
        base = report["base"]
        report["feature_space"] = base.get("feature_space")
        report["quality_settings"] = {"n": q.n, "steps": q.steps}
        report["sampling_steps"] = b.sampling_steps
        for row in report["rows"]:
            row["sampling_s_by_backend"] = {
                k: v.get("sampling_s") for k, v in row["benchmarks"].items()
            }
            row["sampling_speedup_by_backend"] = {
                k: v.get("sampling_speedup") for k, v in row["benchmarks"].items()
            }
            row["sampling_speedup"] = row["sampling_speedup_by_backend"][report["primary_backend"]]
        lines = [
            f"Quality: FID of {q.n} DDIM samples ({q.steps} steps) against the test split, "
            f"lower is better; feature space: **{report['feature_space']}**. Holdout loss: "
            "the denoising loss on the holdout-val split with fixed noise.",
            "",
            f"Sampling: whole DDIM runs of {b.sampling_steps} step(s) at batch 1, base and "
            "merged network interleaved.",
            "",
            "| method | budget | backend | sampling s (base -> merged) | sampling speed-up |",
            "|---|---|---|---|---|",
        ]
        for row in report["rows"]:
            for backend, m in row["benchmarks"].items():
                lines.append(
                    f"| {row['method']} | {row['budget_frac']:.2f} | {backend} | "
                    f"{m['sampling_baseline_s']:.3f} -> {m['sampling_s']:.3f} | "
                    f"{m['sampling_speedup']:.2f}x |"
                )
        samples = ["- base network: ![base](samples_base.png)"]
        seen = set()
        for row in report["rows"]:
            if row["digest"] not in seen:
                seen.add(row["digest"])
                name = f"samples_{row['digest']}.png"
                samples.append(f"- {row['method']} at {row['budget_frac']:g}: ![{name}]({name})")
        report.setdefault("sections", []).extend(
            [
                {"title": "Sampling and quality", "text": "\n".join(lines)},
                {"title": "Samples", "text": "\n".join(samples)},
            ]
        )


HOOKS: dict[str, type[TaskHooks]] = {"classification": TaskHooks, "diffusion": DiffusionHooks}


def hooks_for(cfg: CompressConfig) -> TaskHooks:
    return HOOKS[cfg.task](cfg)
