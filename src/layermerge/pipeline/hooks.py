"""What a compress run does differently per task (``task:`` in the config).

The stage loop (:mod:`layermerge.pipeline.compress`) is the same for every task;
a :class:`TaskHooks` supplies the rest: the :class:`~layermerge.tasks.Task` that
trains and scores networks, the quality metric and the split it is measured on,
what a budget fraction is a fraction of, extra quality stages (FID of samples for
diffusion), extra benchmarks (whole sampling runs) and extra report sections.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..data import Split, open_dataset
from ..diffusion import DiffusionTask, NoiseSchedule, image_grid, sample
from ..distributed import DistInfo
from ..fid import classifier_features, inception_features, quality_of_images, reference_features
from ..fileio import file_digest
from ..models import load_model
from ..plan import Plan
from ..sampling import sampling_pool
from ..tables import Table
from ..tasks import ClassificationTask, Task
from ..train import Recipe, fit, save_state_dict
from .config import CompressConfig
from .diffusion_report import diffusion_report
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

    #: what :meth:`extra_benchmarks` times and how (part of the timing pool's stage
    #: key); ``None``: nothing
    extra_pool: str | None = None

    def extra_benchmark(self, run: Run, plan: Plan, backend) -> dict[str, Any]:
        """More timings of ``plan`` on ``backend``, one plan at a time."""
        return {}

    def extra_benchmarks(
        self, run: Run, plans: dict[str, Plan], backend
    ) -> dict[str, dict[str, Any]]:
        """More timings of every plan of the timing pool (by digest) on ``backend``,
        run inside the pool's stage (diffusion: whole sampling runs, all plans and the
        base network in one interleaved pool). By default :meth:`extra_benchmark` of
        each plan."""
        return {d: self.extra_benchmark(run, p, backend) for d, p in plans.items()}

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
        {"key": "kid_x1e3", "label": "KID x1e3", "digits": 3, "delta": "ΔKID x1e3"},
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
            self._ref = reference_features(
                self._extractor,
                run.splits.test,
                cache=run.rd / "fid_ref_test_features.npz",
                source={"data": cfg.data, "shape": list(run.input_shape)},
            )
        return self._extractor, self._ref

    def quality_stage(self, run, label, depends, make_net):
        """FID and KID of ``quality.n`` DDIM samples of the network against the test
        split (each with its bootstrap SD over the samples), and a sample grid. The
        result's numbers become report fields (``fid``, ``kid_x1e3``; with
        ``finetune.seeds`` their mean and SD over the seeds); ``samples`` names the
        grid. A quality metric beside these goes into the result returned here."""
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
            save_grid(images[:GRID_IMAGES], run.rd / png)
            res = quality_of_images(images, extractor, ref, draws=QUALITY_DRAWS, seed=self.cfg.seed)
            return {
                "fid": res.fid,
                # KID in units of 1e-3; the spreads: bootstrap over this network's samples
                "kid_x1e3": res.kid * 1e3,
                # None where too few samples give no spread (summaries skip it)
                "fid_sampling_sd": _finite(res.fid_sd),
                "kid_x1e3_sampling_sd": _finite(res.kid_sd * 1e3),
                "feature_space": res.label,
                "n": res.n,
                "n_ref": res.n_ref,
                "sampling_seconds": seconds,
                "samples": png,
                "files": [png],
            }

        key = {"net": depends, "quality": self.cfg.section("quality"), "clf": self._clf_key}
        key["schedule"] = self.cfg.section("schedule")
        key["grid"] = {"images": GRID_IMAGES, "min_width": GRID_WIDTH}
        key["metrics"] = {"fid": 1, "kid": "cubic polynomial kernel", "draws": QUALITY_DRAWS}
        return run.runner.run(f"quality:{label}", key, stage)

    # -- benchmarks and report -------------------------------------------------------

    extra_pool = "sampling: the base network and every plan in one interleaved pool"

    def extra_benchmarks(self, run, plans, backend):
        """Whole DDIM sampling runs (``benchmark.sampling_steps`` steps, eta 0, at the
        backend's batch size, the scheduler on the CPU) of the base network and of
        every plan's deploy network, in one interleaved pool: each round runs each
        network once, the order alternating; the minimum over ``benchmark.rounds``
        rounds, after one untimed run each."""
        b = self.cfg.benchmark
        nets = {"base": run.space.identity_plan(), **plans}
        res = sampling_pool(
            run.traced,
            nets,
            backend,
            steps=b.sampling_steps,
            seed=self.cfg.seed,
            rounds=b.rounds,
            max_time_s=SAMPLING_MAX_S * len(nets) / 2,
            scheduler_config=vars(self.cfg.schedule),
        )
        base_ms = res["base"].value("min")
        out = {}
        for d in plans:
            ms = res[d].value("min")
            out[d] = {
                "sampling_baseline_s": base_ms / 1e3,
                "sampling_s": ms / 1e3,
                "sampling_speedup": base_ms / ms,
                "sampling_runs": res[d].summary()["runs"],
                "sampling_pool": len(nets),
                "sampling_batch": backend.settings.batch_size,
            }
        return out

    def report_extras(self, run, report):
        diffusion_report(self.cfg, report, run.tables.get(run.primary))


#: the samples a grid shows, and the width (pixels) it is scaled up to at least
GRID_IMAGES = 64
GRID_WIDTH = 512
#: bootstrap resamples of the samples for the spreads of FID and KID
QUALITY_DRAWS = 200


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


#: the wall-clock cap of the sampling pool per pair of networks (at least two rounds run)
SAMPLING_MAX_S = 600.0


def save_grid(images: torch.Tensor, path) -> None:
    """A PNG grid of ``images``, scaled up by a whole factor (nearest neighbour) to at
    least :data:`GRID_WIDTH` pixels wide, so that a report shows it at a readable size."""
    from PIL import Image

    grid = image_grid(images)
    scale = max(1, -(-GRID_WIDTH // grid.width))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    grid.save(path)


HOOKS: dict[str, type[TaskHooks]] = {"classification": TaskHooks, "diffusion": DiffusionHooks}


def hooks_for(cfg: CompressConfig) -> TaskHooks:
    return HOOKS[cfg.task](cfg)
