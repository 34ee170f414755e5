"""Importance tables: how much of the task each option of the search space keeps.

For every option of every valid block the *single-block plan* is applied to the
trained network (that block compressed as the option says, every other conv its
own block), the whole network is fine-tuned briefly on holdout-train, and the
task is measured on holdout-train and holdout-val. The change against the
unmodified network on holdout-val gives the option's importance (classification:
``importance = exp(delta_acc / 100)``, ``delta_acc`` in percentage points).

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

import copy
import dataclasses
import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import DataSplits
from .distributed import DistInfo, barrier, from_env
from .families import TracedModel, family_of
from .plan import Plan, PlanBlock
from .space import SearchSpace
from .tables import (
    CONV_COLUMN,
    KEPT_COLUMN,
    KEY_COLUMNS,
    VOLATILE_META_KEYS,
    Table,
    TableError,
    TableWriter,
    meta_path,
    read_partial,
    write_table,
)
from .tasks import Task
from .train import Recipe, evaluate, fit, importance_recipe
from .transform import apply

REINIT_MODES = ("single", "none")


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
        if self.table == "conv_importance":
            return f"conv {self.key}"
        s, e, k, st, dw = self.key
        return f"block ({s}, {e}) k{k}" + (f" s{st}" if st > 1 else "") + (" dw" if dw else "")


def entry_seed(seed: int, table: str, key: Any) -> int:
    """A seed for one entry from the run's seed and the entry's key (not its position)."""
    if table == "conv_importance":
        text = f"{seed}|conv|{int(key)}"
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
    recipe: Recipe,
    base: dict[str, dict[str, float]],
    *,
    device: torch.device | str = "cpu",
    reinit: str = "single",
    workers: int = 0,
) -> dict[str, Any]:
    """Fine-tune the network of ``entry`` and return its table row (``workers``: processes
    decoding image-folder batches for the fine-tune)."""
    seed = entry_seed(recipe.seed, entry.table, entry.key)
    torch.manual_seed(seed)
    net = apply(traced, entry.plan)
    if reinit == "single":
        _reinit(net, entry, traced.chain)
    entry_recipe = dataclasses.replace(recipe, seed=seed)
    single = DistInfo()  # one entry is one process's work, whatever the world size
    fit(
        net,
        task,
        splits.holdout_train,
        entry_recipe,
        device=device,
        dist=single,
        progress=False,
        workers=workers,
    )
    measured = {
        "train": evaluate(
            net, task, splits.holdout_train, batch_size=recipe.eval_batch_size, dist=single
        ),
        "val": evaluate(
            net, task, splits.holdout_val, batch_size=recipe.eval_batch_size, dist=single
        ),
    }
    row: dict[str, Any] = task.importance_values(base, measured)
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
) -> dict[str, dict[str, float]]:
    """The unmodified network on holdout-train and holdout-val."""
    net = copy.deepcopy(traced.model).to(device)
    single = DistInfo()
    return {
        "train": evaluate(net, task, splits.holdout_train, batch_size=batch_size, dist=single),
        "val": evaluate(net, task, splits.holdout_val, batch_size=batch_size, dist=single),
    }


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
) -> None:
    """Merge ``out`` and its shards into the finished table, sorted by key."""
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
    write_table(out, kind, ordered, table_meta, columns)
    for p in sources:
        if p != out:
            p.unlink(missing_ok=True)
            meta_path(p).unlink(missing_ok=True)


@dataclass
class ImportanceResult:
    importance: Path
    conv_importance: Path | None
    measured: int  # entries measured by this process in this run
    skipped: int  # entries found already measured
    seconds: float
    base: dict[str, dict[str, float]]


def build_importance_tables(
    traced: TracedModel,
    space: SearchSpace,
    task: Task,
    splits: DataSplits,
    out: str | Path,
    *,
    conv_out: str | Path | None = None,
    recipe: Recipe | None = None,
    reinit: str = "single",
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

    Resumes from ``out``, ``conv_out`` and their shard files. ``limit`` stops this
    process after measuring that many entries (without finishing the tables).
    ``meta`` is added to the tables' metadata (e.g. the model spec). ``workers``:
    processes decoding image-folder batches for each entry's fine-tune.
    """
    if reinit not in REINIT_MODES:
        raise ValueError(f"reinit must be one of {', '.join(REINIT_MODES)}")
    dist = dist or from_env()
    recipe = recipe or importance_recipe()
    out = Path(out)
    want_convs = conv_out is not False
    conv_path = None if not want_convs else Path(conv_out or default_conv_out(out))
    entries = importance_entries(space, convs=want_convs)
    if want_convs and not any(e.table == "conv_importance" for e in entries):
        conv_path = None
    t0 = time.time()

    traced.model.to(device)
    base = measure_base(traced, task, splits, batch_size=recipe.eval_batch_size, device=device)
    common = {
        **space.table_meta(),
        "threads": torch.get_num_threads(),
        "device": torch.device(device).type,
        **(meta or {}),
        **splits.describe(),
        **task.settings(),
        "recipe": recipe.to_dict(),
        "reinit": reinit,
        "weights_digest": weights_digest(traced.model),
        "torch": torch.__version__,
        "base": base,
    }
    if "accuracy" in base["val"]:
        common.update(
            base_val_acc=base["val"]["accuracy"],
            base_val_loss=base["val"]["loss"],
            base_train_acc=base["train"]["accuracy"],
            base_train_loss=base["train"]["loss"],
        )
    kinds = {"importance": out}
    if conv_path is not None:
        kinds["conv_importance"] = conv_path
    metas = {
        kind: {**common, "entries": sum(1 for e in entries if e.table == kind)} for kind in kinds
    }
    done = {kind: _done_keys(p, kind, metas[kind]) for kind, p in kinds.items()}
    mine = [e for e in entries if e.index % dist.world == dist.rank and e.table in kinds]
    todo = [e for e in mine if e.key not in done[e.table]]
    skipped = len(mine) - len(todo)
    writers: dict[str, TableWriter] = {}

    def writer(kind: str) -> TableWriter:
        if kind not in writers:
            p = kinds[kind] if not dist.active else shard_path(kinds[kind], dist.rank)
            writers[kind] = TableWriter(p, kind, metas[kind], _columns(task, kind))
        return writers[kind]

    from tqdm import tqdm

    measured = 0
    bar = tqdm(
        total=len(mine),
        initial=skipped,
        desc="importance" + (f" rank {dist.rank}/{dist.world}" if dist.active else ""),
        unit="entry",
        file=sys.stderr,
        disable=not (progress and dist.is_main),
        dynamic_ncols=True,
    )
    try:
        for e in todo:
            if limit is not None and measured >= limit:
                break
            bar.set_postfix_str(e.label)
            row = measure_entry(
                traced, e, task, splits, recipe, base, device=device, reinit=reinit, workers=workers
            )
            if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
                raise TableError(f"{e.label}: measured a non-finite value {row}")
            writer(e.table).write(row)
            measured += 1
            bar.update()
            if on_entry is not None:
                on_entry(e, row)
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if limit is not None and measured >= limit and len(todo) > measured:
        return ImportanceResult(out, conv_path, measured, skipped, time.time() - t0, base)
    barrier(dist)
    if dist.is_main:
        for kind, p in kinds.items():
            order = [e.key for e in entries if e.table == kind]
            _finish(p, kind, _columns(task, kind), metas[kind], order, time.time() - t0)
    barrier(dist)
    return ImportanceResult(out, conv_path, measured, skipped, time.time() - t0, base)
