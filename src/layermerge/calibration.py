"""What an importance entry measures, and the calibration of an importance table: its
identity-plan entries, their file, the calibrated base and the noise floor.

:func:`measure_split` evaluates a network on a holdout split in one process (with
the KL divergence from the unmodified network's outputs when given), and
:func:`recalibrate_batchnorm` re-estimates BatchNorm statistics without an
optimiser step.

Calibration entries (the unmodified network put through the table's protocol with
derived seeds) are stored beside the table in ``I.csv.calib.json`` — one JSON
object holding the build's settings and one record per entry, rewritten
atomically after each entry — and under ``torchrun`` each rank writes
``I.csv.calib.shardN.json``, merged by rank 0. Records are kept sorted by key, so
the file is byte-identical however the build ran (in one go, resumed, sharded).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Split
from .tables import VOLATILE_META_KEYS, TableError
from .tasks import Task

CALIBRATION_SCHEMA = 1

#: score -> (the calibration metric whose SD is its noise floor, the table column of
#: the entries' score)
SCORE_COLUMNS: dict[str, tuple[str, str]] = {
    "acc": ("val_accuracy", "delta_acc"),
    "loss": ("val_loss", "delta_loss"),
    "kl": ("val_kl", "delta_kl"),
    "loss_ratio": ("val_loss", "loss_ratio"),
}


@torch.no_grad()
def recalibrate_batchnorm(
    net: nn.Module,
    split: Split,
    batches: int,
    batch_size: int,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> None:
    """Replace the running statistics of every BatchNorm of ``net`` by their average
    over ``batches`` shuffled, un-augmented batches of ``split`` (no optimiser step)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches < 1:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    was_training = net.training
    net.train()
    try:
        for i, (x, _) in enumerate(split.batches(batch_size, train=True, seed=seed, augment=False)):
            if i >= batches:
                break
            net(x.to(device))
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        net.train(was_training)


@torch.no_grad()
def measure_split(
    net: nn.Module,
    task: Task,
    split: Split,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    teacher: torch.Tensor | None = None,
    keep_outputs: bool = False,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """The task's metrics of ``net`` (eval mode) on ``split`` in one process, plus
    ``kl`` (mean divergence from the ``teacher`` outputs, in split order) when given;
    with ``keep_outputs`` also the outputs (CPU, float32), else ``None``."""
    net.eval()
    sums, outs, kl, pos = None, [], 0.0, 0
    for x, y in split.batches(batch_size, train=False):
        s_, o = task.evaluation_outputs(net, (x.to(device), y.to(device)))
        sums = s_.cpu() if sums is None else sums + s_.cpu()
        if o is not None and teacher is not None:
            kl += task.divergence_sum(o.cpu(), teacher[pos : pos + len(o)])
        if o is not None and keep_outputs:
            outs.append(o.detach().float().cpu())
        pos += len(x)
    if sums is None:
        raise TableError(f"the {split.name} split gave no batches to measure")
    metrics = task.metrics(sums)
    if teacher is not None:
        metrics["kl"] = kl / pos
    return metrics, (torch.cat(outs) if outs else None)


def calibration_path(out: str | Path) -> Path:
    """``I.csv`` -> ``I.csv.calib.json``."""
    out = Path(out)
    return out.with_name(out.name + ".calib.json")


def calibration_shard_path(out: str | Path, rank: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.calib.shard{rank}.json")


def calibration_shards(out: str | Path) -> list[Path]:
    out = Path(out)
    prefix = out.name + ".calib.shard"
    return sorted(
        p
        for p in out.parent.glob(prefix + "*.json")
        if p.name[len(prefix) : -len(".json")].isdigit() and p.is_file()
    )


def _check_settings(path: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want.items():
        if k in VOLATILE_META_KEYS:
            continue
        if k not in have or have[k] != v:
            raise TableError(
                f"cannot resume the calibration in {path}: it was made with "
                f"{k}={have.get(k)!r}, this run has {k}={v!r}; use the same settings, or "
                "another output file"
            )


def _read(path: Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TableError(f"cannot read the calibration file {path} ({e}); delete it") from None
    if not isinstance(data, dict) or data.get("schema") != CALIBRATION_SCHEMA:
        raise TableError(f"{path} is not a layermerge calibration file; delete or move it")
    entries = data.get("entries")
    if not isinstance(entries, list) or not all(
        isinstance(r, dict) and isinstance(r.get("index"), int) for r in entries
    ):
        raise TableError(f"{path}: 'entries' must be a list of records with an 'index'")
    _check_settings(path, data.get("settings") or {}, settings)
    return {r["index"]: r for r in entries}


def read_calibration(out: str | Path, settings: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Calibration records already measured for ``out`` (its file and its shards),
    refused when made with other settings."""
    records: dict[int, dict[str, Any]] = {}
    main = calibration_path(out)
    for p in ([main] if main.exists() else []) + calibration_shards(out):
        for k, r in _read(p, settings).items():
            records.setdefault(k, r)
    return records


def write_calibration(
    path: str | Path, settings: dict[str, Any], records: dict[int, dict[str, Any]]
) -> Path:
    """Write the records (sorted by key) atomically: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "schema": CALIBRATION_SCHEMA,
        "settings": {k: v for k, v in settings.items() if k not in VOLATILE_META_KEYS},
        "entries": [records[k] for k in sorted(records)],
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, sort_keys=True, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def summarize(records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``seeds`` and, per measured metric, the ``mean`` and ``sd`` (sample SD; 0 for
    one entry) of the calibration records."""
    rows = [records[k] for k in sorted(records)]
    metrics = [k for k in rows[0] if k not in ("index", "seed")] if rows else []
    out: dict[str, Any] = {"seeds": len(rows)}
    for m in metrics:
        vals = [float(r[m]) for r in rows]
        out[m] = {
            "mean": statistics.fmean(vals),
            "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        }
    return out


def calibrated_base(
    summary: dict[str, Any], base: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """The means of the calibration entries in the shape of ``base`` (``base`` itself
    when there is no calibration)."""
    if not summary.get("seeds"):
        return base
    out: dict[str, dict[str, float]] = {}
    for split, metrics in base.items():
        out[split] = {
            k: summary[f"{split}_{k}"]["mean"] if f"{split}_{k}" in summary else v
            for k, v in metrics.items()
        }
    return out


def noise_floor(summary: dict[str, Any], score: str) -> float | None:
    """The SD of the calibration entries in the units of ``score``'s column (``None``
    without calibration)."""
    if not summary.get("seeds") or score not in SCORE_COLUMNS:
        return None
    metric = SCORE_COLUMNS[score][0]
    if metric not in summary:
        return None
    sd = summary[metric]["sd"]
    if score == "loss_ratio":
        mean = summary[metric]["mean"]
        return sd / mean if mean > 0 else math.inf
    return sd


def spread(rows: list[dict[str, Any]], score: str) -> float | None:
    """The SD of the entries' score column (``None`` for fewer than 2 entries)."""
    column = SCORE_COLUMNS.get(score, (None, None))[1]
    vals = [float(r[column]) for r in rows if column in r]
    return statistics.stdev(vals) if len(vals) > 1 else None
