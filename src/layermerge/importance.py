"""Importance tables: how much of the task each option of the search space keeps.

For every option of every valid block the *single-block plan* is applied to the
trained network (that block compressed as the option says, every other conv its
own block), the whole network goes through a *protocol* (a short fine-tune on
holdout-train of a number of optimiser steps, and/or a recalibration of its
BatchNorm statistics, see :data:`PROTOCOLS`), and the task is measured on
holdout-val. The change against the *calibrated base* gives the option's
importance (classification: ``exp(delta_acc / 100)``, ``exp(-delta_loss)`` or
``exp(-delta_kl)`` by the protocol's score).

Calibration: the identity plan (nothing compressed) goes through the same
protocol with ``calibration`` derived seeds before any other entry; the mean of
its measurements is the base the entries are scored against (so an untouched
network scores neutral, importance 1) and their standard deviation is the
table's noise floor. Calibration entries are entries like the others (derived
seeds, shared over ranks, resumed) but are stored beside the table in
``I.csv.calib.json`` (ranks: ``I.csv.calib.shardN.json``, merged by rank 0); the
mean and SD are part of the table's metadata.

The per-conv table of the layer-pruning baseline measures, for every reducible
conv, the network with that conv replaced by identity (the ``layerprune`` plan
whose block ``(i-1, i)`` keeps no conv), fine-tuned the same way.

One entry is one fine-tune; entries are independent, so:

- each entry's randomness (data order, augmentation, re-initialisation) comes
  from a seed derived from the run's seed and the entry's key, never from what
  ran before it, so an entry gives the same row whether it runs first, last, in
  a resumed run or on another rank (same threads, same device);
- rows are appended one at a time (:class:`~layermerge.tables.TableWriter`) and
  a rerun skips entries already in the table, so an interrupted run (even
  ``kill -9``) loses at most the entry in flight;
- under ``torchrun`` entry ``k`` goes to rank ``k % world``; ranks write shard
  files beside the output and rank 0 merges them, after a barrier, into the
  finished table sorted by key (byte-identical to a single-process build).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import (
    calibrated_base,
    calibration_path,
    calibration_shard_path,
    calibration_shards,
    measure_split,
    noise_floor,
    read_calibration,
    recalibrate_batchnorm,
    spread,
    summarize,
    write_calibration,
)
from .data import DataSplits
from .distributed import DistInfo, all_reduce_sum, barrier, from_env
from .families import TracedModel, family_of
from .plan import Plan, PlanBlock
from .protocols import (  # noqa: F401  (re-exported: the protocols' old home)
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    REINIT_MODES,
    Protocol,
    get_protocol,
    protocol_splits,
)
from .space import SearchSpace
from .tables import (
    CONV_COLUMN,
    KEPT_COLUMN,
    KEY_COLUMNS,
    VOLATILE_META_KEYS,
    Table,
    TableError,
    TableWriter,
    lock_table,
    read_partial,
    remove_table,
    write_table,
)
from .tasks import Task
from .train import Recipe, fit, importance_recipe
from .transform import apply


@dataclass(frozen=True)
class Entry:
    """One fine-tune: an option of the search space, or one conv dropped."""

    index: int  # position in the run's entry list (decides the rank)
    table: str  # "importance" or "conv_importance"
    key: Any  # option key (start, end, kernel, stride, depthwise) or conv index
    plan: Plan
    option: PlanBlock | None = None

    @property
    def label(self) -> str:
        if self.table == "calibration":
            return f"calibration {self.key}"
        if self.table == "conv_importance":
            return f"conv {self.key}"
        s, e, k, st, dw = self.key
        return f"block ({s}, {e}) k{k}" + (f" s{st}" if st > 1 else "") + (" dw" if dw else "")


def entry_seed(seed: int, table: str, key: Any) -> int:
    """A seed for one entry from the run's seed and the entry's key (not its position)."""
    if table == "conv_importance":
        text = f"{seed}|conv|{int(key)}"
    elif table == "calibration":
        text = f"{seed}|calibration|{int(key)}"
    else:
        s, e, k, st, dw = key
        text = f"{seed}|option|{s},{e},{k},{st},{int(dw)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**62 - 1)


def single_block_plan(space: SearchSpace, option: PlanBlock) -> Plan:
    """``option`` for its block; every other conv its own block, as in the identity plan."""
    blocks = [option]
    for i in range(1, space.chain.length + 1):
        if not option.start < i <= option.end:
            blocks.append(space.kept_conv_block(i))
    return space.plan(blocks, method="layermerge", measures=list(option.key))


def drop_conv_plan(space: SearchSpace, conv: int) -> Plan:
    """Conv ``conv`` replaced by identity, every other conv kept (a layerprune plan)."""
    blocks = [
        PlanBlock(conv - 1, conv, kernel=1, stride=1, depthwise=False, kept_convs=())
        if i == conv
        else space.kept_conv_block(i)
        for i in range(1, space.chain.length + 1)
    ]
    return space.plan(blocks, method="layerprune", drops=conv)


def calibration_entries(space: SearchSpace, n: int) -> list[Entry]:
    """``n`` identity-plan entries (keys 0..n-1): the calibrated base and noise floor."""
    plan = space.identity_plan()
    return [Entry(k, "calibration", k, plan) for k in range(n)]


def reducible_convs(space: SearchSpace) -> list[int]:
    return [c.index for c in space.chain.convs if not c.irreducible]


def importance_entries(space: SearchSpace, *, convs: bool = True) -> list[Entry]:
    """Every option (in key order), then every reducible conv when ``convs``."""
    out = [
        Entry(k, "importance", o.key, single_block_plan(space, o), o)
        for k, o in enumerate(space.options)
    ]
    if convs:
        for i in reducible_convs(space):
            out.append(Entry(len(out), "conv_importance", i, drop_conv_plan(space, i)))
    return out


def weights_digest(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers (which weights were measured)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------
# one entry


def _reinit(net: nn.Module, entry: Entry, chain) -> None:
    """Fresh weights for the conv (and BatchNorm) of a single-conv block, as the
    reference does: the option is then scored by how well the network recovers
    that conv in the short fine-tune."""
    o = entry.option
    if o is None or o.length != 1 or not o.kept_convs:
        return
    family_of(net).reinit_single_conv(net, o, chain)


def measure_entry(
    traced: TracedModel,
    entry: Entry,
    task: Task,
    splits: DataSplits,
    recipe: Recipe | None,
    base: dict[str, dict[str, float]],
    *,
    device: torch.device | str = "cpu",
    reinit: str = "single",
    workers: int = 0,
    bn_batches: int = 0,
    bn_batch_size: int | None = None,
    teacher: torch.Tensor | None = None,
    score: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the protocol on the network of ``entry`` and return its table row.

    ``recipe``: the fine-tune (``None``: no optimiser step); ``bn_batches``:
    BatchNorm recalibration afterwards; ``teacher``: the unmodified network's
    holdout-val outputs (the KL score); ``base``: what the entry is scored against
    (the calibrated base); ``bn_batch_size``: the recalibration's batch size (default
    the recipe's, else 128); ``workers``: processes decoding image-folder batches.
    A calibration entry's row holds its raw metrics (``val_*``, ``train_*``)."""
    seed = entry_seed(recipe.seed if recipe is not None else seed, entry.table, entry.key)
    torch.manual_seed(seed)
    net = apply(traced, entry.plan)
    if reinit == "single":
        _reinit(net, entry, traced.chain)
    single = DistInfo()  # one entry is one process's work, whatever the world size
    if recipe is not None:
        fit(
            net,
            task,
            splits.holdout_train,
            dataclasses.replace(recipe, seed=seed),
            device=device,
            dist=single,
            progress=False,
            workers=workers,
        )
    net.to(device)
    eval_bs = recipe.eval_batch_size if recipe is not None else 500
    if bn_batches:
        bs = bn_batch_size or (recipe.batch_size if recipe is not None else 128)
        recalibrate_batchnorm(net, splits.holdout_train, bn_batches, bs, seed=seed, device=device)
    measured = {
        name: measure_split(
            net,
            task,
            splits.holdout_val if name == "val" else splits.holdout_train,
            batch_size=eval_bs,
            device=device,
            teacher=teacher if name == "val" else None,
        )[0]
        for name in task.importance_splits
    }
    if entry.table == "calibration":
        row = {f"{split}_{k}": v for split, m in measured.items() for k, v in m.items()}
        return {"index": entry.key, **row, "seed": seed}
    row: dict[str, Any] = task.importance_values(base, measured, score)
    if entry.table == "conv_importance":
        row[CONV_COLUMN] = entry.key
    else:
        o = entry.option
        row.update(
            start=o.start,
            end=o.end,
            kernel=o.kernel,
            stride=o.stride,
            depthwise=o.depthwise,
            kept_convs=o.kept_convs,
        )
    row["seed"] = seed
    return row


def measure_base(
    traced: TracedModel,
    task: Task,
    splits: DataSplits,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, dict[str, float]], torch.Tensor | None]:
    """The unmodified network on the holdout splits, and its holdout-val outputs (the
    teacher of the KL score; ``None`` when the task has no output divergence)."""
    net = copy.deepcopy(traced.model).to(device)
    base, teacher = {}, None
    for name in task.importance_splits:
        split = splits.holdout_val if name == "val" else splits.holdout_train
        base[name], outs = measure_split(
            net, task, split, batch_size=batch_size, device=device, keep_outputs=name == "val"
        )
        if name == "val":
            teacher = outs
    if teacher is not None:
        base["val"]["kl"] = 0.0
    return base, teacher


# ---------------------------------------------------------------------------
# the tables


def default_conv_out(out: str | Path) -> Path:
    """``I.csv`` -> ``I.conv.csv`` (the per-conv table next to the importance table)."""
    out = Path(out)
    return out.with_name(out.stem + ".conv" + (out.suffix or ".csv"))


def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.shard{rank}")


def _shards(out: Path) -> list[Path]:
    # exactly NAME.shardN: not the sidecars, nor the temporary files of a rank that is
    # writing its shard at this moment (NAME.shardN.tmp, which have no sidecar yet)
    return sorted(
        p
        for p in out.parent.glob(out.name + ".shard*")
        if p.name[len(out.name) + len(".shard") :].isdigit() and p.is_file()
    )


def _columns(task: Task, table: str) -> list[str]:
    key = [CONV_COLUMN] if table == "conv_importance" else [*KEY_COLUMNS, KEPT_COLUMN]
    return [*key, "importance", *task.importance_columns, "seed"]


def _done_keys(out: Path, kind: str, meta: dict[str, Any]) -> set[Any]:
    """Keys already measured in ``out`` or any of its shards (of this run's settings)."""
    done: set[Any] = set()
    for p in ([out] if out.exists() else []) + _shards(out):
        t = read_partial(p, kind)
        _check_meta(t, meta)
        done |= set(t.keys())
    return done


def _check_meta(t: Table, meta: dict[str, Any]) -> None:
    if "calibration" in meta and "calibration" not in t.meta:
        raise TableError(
            f"cannot resume {t.name}: it was made without calibration (by an older version); "
            "write the table to another file, or delete it to rebuild"
        )
    for k, v in meta.items():
        if k in t.meta and k not in VOLATILE_META_KEYS and t.meta[k] != v:
            raise TableError(
                f"cannot resume {t.name}: it was made with {k}={t.meta[k]!r}, this run has "
                f"{k}={v!r}; use the same settings, or another output file"
            )


def _finish(
    out: Path,
    kind: str,
    columns: list[str],
    meta: dict[str, Any],
    order: list[Any],
    elapsed: float,
    *,
    locked: bool = False,
) -> None:
    """Merge ``out`` and its shards into the finished table, sorted by key, and remove
    the shards (their CSV, sidecar and leftover temporary files). ``locked``: the
    caller holds ``out``'s lock."""
    rows: dict[Any, dict[str, Any]] = {}
    sources = ([out] if out.exists() else []) + _shards(out)
    for p in sources:
        t = read_partial(p, kind)
        _check_meta(t, meta)
        for r in t.rows:
            rows.setdefault(t.key_of(r), r)
    missing = [k for k in order if k not in rows]
    if missing:
        raise TableError(
            f"{out}: {len(missing)} entries are missing after every rank finished "
            f"(first: {missing[0]}); rerun the same command to measure them"
        )
    ordered = [rows[k] for k in order]
    table_meta = {**meta, "complete": True, "elapsed_s": round(elapsed, 1)}
    write_table(out, kind, ordered, table_meta, columns, lock=not locked)
    # every rank has closed its shard (they wait at a barrier): no lock needed
    for p in sources:
        if p != out:
            remove_table(p, lock=False)


@dataclass
class ImportanceResult:
    importance: Path
    conv_importance: Path | None
    measured: int  # entries measured in this run (calibration included; all ranks)
    skipped: int  # entries found already measured (all ranks)
    seconds: float
    base: dict[str, dict[str, float]]  # the unmodified network on the holdout splits
    protocol: Protocol | None = None
    score: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)  # seeds, mean and SD
    noise_floor: float | None = None  # calibration SD in the score column's units
    spread: float | None = None  # SD of the options' score column (finished tables)

    @property
    def within_noise(self) -> bool:
        """The options' spread is within twice the noise floor."""
        return (
            self.noise_floor is not None
            and self.spread is not None
            and self.spread <= 2 * self.noise_floor
        )


def build_importance_tables(
    traced: TracedModel,
    space: SearchSpace,
    task: Task,
    splits: DataSplits,
    out: str | Path,
    *,
    conv_out: str | Path | None = None,
    protocol: str | Protocol | None = None,
    recipe: Recipe | None = None,
    reinit: str | None = None,
    score: str | None = None,
    calibration: int | None = None,
    bn_batches: int | None = None,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    dist: DistInfo | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    limit: int | None = None,
    on_entry: Callable[[Entry, dict[str, Any]], None] | None = None,
    workers: int = 0,
) -> ImportanceResult:
    """Measure every option (``out``) and every reducible conv (``conv_out``; ``None``
    for :func:`default_conv_out`, ``False`` to skip) and write both tables.

    ``protocol`` (a name of :data:`PROTOCOLS` or a :class:`Protocol`) says what each
    entry does: its fine-tune, BatchNorm recalibration, holdout size (``splits`` are
    redrawn to it), re-initialisation, score and calibration. Without one, ``recipe``
    (default: the reference's) is the fine-tune on ``splits`` as given, scored by
    the task's default score. ``recipe``, ``reinit``, ``score``, ``calibration`` and
    ``bn_batches``, when given, override the protocol's.

    The ``calibration`` identity-plan entries run first; entries are scored against
    their mean. Resumes from ``out``, ``conv_out``, the calibration file and their
    shard files. ``limit`` stops this process after measuring that many entries
    (calibration included; without finishing the tables). ``meta`` is added to the
    tables' metadata (e.g. the model spec). ``workers``: processes decoding
    image-folder batches for each entry's fine-tune.
    """
    proto = get_protocol(protocol) if protocol is not None else None
    if proto is not None:
        splits = protocol_splits(splits, proto)
        if recipe is None and proto.fine_tunes:
            recipe = proto.recipe(seed=seed)
        reinit = proto.reinit if reinit is None else reinit
        if score is None:
            score = proto.score
            if score not in task.importance_scores:
                score = task.importance_scores[0]  # e.g. the diffusion task: its loss ratio
        calibration = proto.calibration if calibration is None else calibration
        bn_batches = proto.bn_batches if bn_batches is None else bn_batches
    else:
        recipe = recipe or importance_recipe()
        reinit = reinit or "single"
        score = score or task.importance_scores[0]
        calibration = 3 if calibration is None else calibration
        bn_batches = bn_batches or 0
    if reinit not in REINIT_MODES:
        raise ValueError(f"reinit must be one of {', '.join(REINIT_MODES)}")
    if score not in task.importance_scores:
        raise ValueError(
            f"the {task.name} task scores importance by {', '.join(task.importance_scores)}, "
            f"not {score!r}"
        )
    if calibration < 0 or bn_batches < 0:
        raise ValueError("calibration and bn_batches must be >= 0")
    if recipe is None and not bn_batches:
        raise ValueError("a protocol without optimiser steps needs bn_batches > 0")
    dist = dist or from_env()
    if recipe is not None and seed is not None and seed != recipe.seed:
        recipe = dataclasses.replace(recipe, seed=seed)
    seed = recipe.seed if recipe is not None else (seed or 0)
    out = Path(out)
    want_convs = conv_out is not False
    conv_path = None if not want_convs else Path(conv_out or default_conv_out(out))
    entries = importance_entries(space, convs=want_convs)
    if want_convs and not any(e.table == "conv_importance" for e in entries):
        conv_path = None
    t0 = time.time()
    # the files this process writes are locked before any work: a second writer of
    # the same output is refused at once, not after its first entry
    targets = [out] + ([conv_path] if conv_path is not None else [])
    if dist.active:
        targets = [shard_path(p, dist.rank) for p in targets]
    with contextlib.ExitStack() as held:
        locks: dict[Path, Any] = {}
        for p in targets:
            locks[p] = lock_table(p)
            held.callback(locks[p].release)
        traced.model.to(device)
        eval_bs = recipe.eval_batch_size if recipe is not None else 500
        base, teacher = measure_base(traced, task, splits, batch_size=eval_bs, device=device)
        common = {
            **space.table_meta(),
            "threads": torch.get_num_threads(),
            "device": torch.device(device).type,
            **(meta or {}),
            **splits.describe(),
            **task.settings(),
            "protocol": proto.name if proto is not None else "custom",
            "recipe": recipe.to_dict() if recipe is not None else {"seed": seed},
            "reinit": reinit,
            "bn_batches": bn_batches,
            "score": score,
            "weights_digest": weights_digest(traced.model),
            "torch": torch.__version__,
            "base": base,
        }
        if "accuracy" in base["val"]:
            common.update(base_val_acc=base["val"]["accuracy"], base_val_loss=base["val"]["loss"])
        run = dict(
            device=device,
            reinit=reinit,
            workers=workers,
            bn_batches=bn_batches,
            bn_batch_size=proto.batch_size if proto is not None else None,
            teacher=teacher,
            score=score,
            seed=seed,
        )

        from tqdm import tqdm

        measured = 0
        total = len(entries) + calibration
        bar = tqdm(
            total=total,
            desc="importance" + (f" rank {dist.rank}/{dist.world}" if dist.active else ""),
            unit="entry",
            file=sys.stderr,
            disable=not (progress and dist.is_main),
            dynamic_ncols=True,
        )

        def stopped() -> bool:
            return limit is not None and measured >= limit

        # calibration: the identity plan, ``calibration`` seeds, before every other entry
        cal_settings = {**common, "calibration_seeds": calibration}
        records = read_calibration(out, cal_settings)
        cal_file = (
            calibration_path(out) if not dist.active else calibration_shard_path(out, dist.rank)
        )
        mine_cal = [
            e for e in calibration_entries(space, calibration) if e.index % dist.world == dist.rank
        ]
        bar.update(sum(1 for e in mine_cal if e.key in records))
        try:
            for e in mine_cal:
                if e.key in records:
                    continue
                if stopped():
                    return _partial(out, conv_path, measured, base, proto, score)
                bar.set_postfix_str(e.label)
                records[e.key] = measure_entry(traced, e, task, splits, recipe, base, **run)
                # a rank's shard holds its own entries (the others' are in their shards)
                own = {
                    k: r
                    for k, r in records.items()
                    if not dist.active or k % dist.world == dist.rank
                }
                write_calibration(cal_file, cal_settings, own)
                measured += 1
                bar.update()
                if on_entry is not None:
                    on_entry(e, records[e.key])
            barrier(dist)
            if dist.active and dist.is_main:
                merged = read_calibration(out, cal_settings)
                write_calibration(calibration_path(out), cal_settings, merged)
                for p in calibration_shards(out):
                    p.unlink(missing_ok=True)
            barrier(dist)
            records = read_calibration(out, cal_settings)
            if len(records) < calibration:
                raise TableError(
                    f"{calibration_path(out)}: {calibration - len(records)} calibration entries "
                    "are missing after every rank finished; rerun the same command"
                )
            summary = summarize({k: records[k] for k in range(calibration)})
            scored_against = calibrated_base(summary, base)
            common["calibration"] = summary

            kinds = {"importance": out}
            if conv_path is not None:
                kinds["conv_importance"] = conv_path
            metas = {
                kind: {**common, "entries": sum(1 for e in entries if e.table == kind)}
                for kind in kinds
            }
            done = {kind: _done_keys(p, kind, metas[kind]) for kind, p in kinds.items()}
            mine = [e for e in entries if e.index % dist.world == dist.rank and e.table in kinds]
            todo = [e for e in mine if e.key not in done[e.table]]
            skipped = len(mine) - len(todo) + len(mine_cal) - measured
            rows_measured = 0
            bar.update(len(mine) - len(todo))
            writers: dict[str, TableWriter] = {}

            def writer(kind: str) -> TableWriter:
                if kind not in writers:
                    p = kinds[kind] if not dist.active else shard_path(kinds[kind], dist.rank)
                    writers[kind] = TableWriter(
                        p, kind, metas[kind], _columns(task, kind), lock=locks[p]
                    )
                return writers[kind]

            try:
                for e in todo:
                    if stopped():
                        break
                    bar.set_postfix_str(e.label)
                    row = measure_entry(traced, e, task, splits, recipe, scored_against, **run)
                    if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
                        raise TableError(f"{e.label}: measured a non-finite value {row}")
                    writer(e.table).write(row)
                    measured += 1
                    rows_measured += 1
                    bar.update()
                    if on_entry is not None:
                        on_entry(e, row)
            finally:
                for w in writers.values():
                    w.close()
        finally:
            bar.close()
        result = ImportanceResult(
            out,
            conv_path,
            measured,
            skipped,
            time.time() - t0,
            base,
            proto,
            score,
            summary,
            noise_floor(summary, score),
        )
        if stopped() and rows_measured < len(todo):
            return result
        barrier(dist)
        if dist.is_main:
            for kind, p in kinds.items():
                order = [e.key for e in entries if e.table == kind]
                _finish(
                    p, kind, _columns(task, kind), metas[kind], order, time.time() - t0,
                    locked=p in locks,
                )  # fmt: skip
        if dist.active:  # the summary counts every rank's entries
            counts = all_reduce_sum(torch.tensor([float(measured), float(skipped)]), dist)
            result.measured, result.skipped = int(counts[0]), int(counts[1])
        barrier(dist)
        result.seconds = time.time() - t0
        if dist.is_main:
            result.spread = spread(read_partial(out, "importance").rows, score)
        return result


def _partial(out, conv_path, measured, base, proto, score) -> ImportanceResult:
    """What a run stopped by ``limit`` during calibration returns."""
    return ImportanceResult(out, conv_path, measured, 0, 0.0, base, proto, score)
