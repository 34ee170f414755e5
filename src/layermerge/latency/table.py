"""The latency table: one entry per option, and what a table predicts.

An entry times what choosing the option costs in the deploy network (the model
family's :meth:`~layermerge.families.Family.option_module`), at the real input
shapes: for a CNN the merged conv, the residual adds the option *owns*, and the
activation its block end keeps, as one module. A skip ``(p, q)`` is folded into
the kernel of a block that contains it (``s <= p`` and ``q <= e``); otherwise its
add survives right after the conv of node ``q``, and the block deciding that is
the one ending at ``q`` and starting after ``p``: that option owns the add
(:func:`~layermerge.families.base.owned_skips`) and is timed with a second input,
the skip's tensor, through the skip's projection conv if it has one (a folding
block removes the projection too, so it is the owner's cost, not the constant's).
Timing conv + add + activation as one module lets a runtime fuse them as it does
inside the network (ONNX Runtime's Conv+Add+Relu). Two more kinds of cost are
measured, so that every plan of every method is predicted by the same sum:

- ``latency_noact_ms``: an option keeping all its convs, timed without its end
  activation, for the inner blocks of the activation-removal baseline (kim23);
- ``dropped_ms`` (sidecar): for each conv the layer-pruning baseline may drop, what
  its node still computes without it (the adds it owns, its activation).

Entries are written one at a time, so an interrupted build resumes where it
stopped. The sidecar holds ``constant_ms``, the latency of what no plan changes
(stem, head, pooling, the ops at breaks), so that ``constant_ms`` + each block's
cost (:func:`block_latency_ms`) predicts the plan's latency (:func:`predict_latency`).
``latency_model`` in the sidecar (:data:`LATENCY_MODEL`) says which of these
definitions a table follows; tables of another one are refused for prediction
and set aside (renamed) and measured again by a build.

How the constant is measured (:mod:`.constant`). The BN-folded network of the
identity plan is timed as a whole, and what its blocks cost is subtracted. Two
costs of a layer inside a network are not in its entry and are fitted on reference
networks timed interleaved with it: a slowdown, a share of every entry (a
network's best call is slower than the sum of its layers' best calls), and a memory
term per weight (inside a network a layer reads its weights after the rest of the
network went through the caches). Every row's ``latency_ms`` is its measured
``entry_ms`` times ``1 + slowdown`` plus ``memory_ms_per_mweight`` times its
``weights`` / 1e6. The network is timed with single calls spread over the whole
build, pooled with a final burst, so that it sees the same load of other jobs as
the entries did. The prediction for the identity plan is therefore exact by
construction, and for any other plan its error is the error in the entries plus
whatever does not add up between layers timed alone and layers inside a network.
Two such costs are removed explicitly, so that they end up once in the constant
instead of once per entry, and one is emulated:

- the fixed cost of one backend call (ONNX Runtime's run and binding, a Python
  module call, a CUDA synchronisation), measured on a one-element model;
- on ONNX Runtime's CPU provider, the layout conversions around a lone conv
  (ReorderInput/ReorderOutput to and from the blocked NCHWc layout), which a
  network pays at its ends only. Their time is read from ORT's profiler
  (``layout_ms`` per entry);
- the caches: timed back to back, a layer finds its weights and input hot from
  its own previous call, which inside a network that does not fit in the caches
  it never does. The core's private caches are then evicted before every timed
  call (``TimingConfig.flush_mb``, by default twice the L2 size); a network whose
  weights and largest activations fit in the L2 is timed without eviction.

The entry's own statistic is kept in ``min_ms``/``median_ms``; ``entry_ms`` is
that minus both corrections (``entry_noact_ms`` for ``latency_noact_ms``), and
``latency_ms`` adds the fitted terms to it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..costs import block_latency_ms
from ..families import TracedModel
from ..ops import option_conv
from ..plan import Plan, check_plan_for_chain
from ..space import SearchSpace, build_space
from ..tables import (
    LATENCY_SETTINGS,
    Table,
    TableError,
    TableWriter,
    check_same_settings,
    concat_tables,
    format_key,
    meta_path,
    read_table,
    required_columns,
    write_table,
)
from .backends import Backend
from .constant import (
    _constant_timing,
    apply_terms,
    measure_constant,
    pruned_plan,
    table_statistic,
)
from .entries import (
    _cache_policy,
    _measure_dropped,
    _measure_option,
    deploy_network,
    dropped_block,
    option_input_shape,
    option_input_shapes,
    option_module,
)
from .timing import TimingConfig

__all__ = [
    "LATENCY_COLUMNS",
    "SETTINGS_KEYS",
    "LATENCY_MODEL",
    "build_latency_table",
    "check_latency_model",
    "check_settings",
    "deploy_network",
    "block_latency_ms",
    "dropped_block",
    "measure_constant",
    "pruned_plan",
    "option_conv",
    "option_input_shape",
    "option_input_shapes",
    "option_module",
    "predict_latency",
    "read_latency_tables",
    "table_meta",
    "table_statistic",
]

#: settings that must agree before latencies may be combined or compared. The
#: table layer checks :data:`layermerge.tables.LATENCY_SETTINGS`; the backend
#: descriptor stored under ``backend`` already names providers and compilation,
#: so those checks see them too. This list adds what a descriptor cannot hold.
SETTINGS_KEYS = (
    *LATENCY_SETTINGS,
    "providers",
    "compile",
    "device_name",
    "exporter",
    "statistic",
    "clock",
)
LATENCY_COLUMNS = (
    *required_columns("latency"),
    "median_ms",
    "min_ms",
    "layout_ms",
    "p25_ms",
    "p75_ms",
    "ci_rel",
    "runs",
    "warmup_runs",
    "stopped",
    "elapsed_s",
    "in_channels",
    "out_channels",
    "padding",
    "groups",
    "activation",
    "input_shape",
    "skips",
    "latency_noact_ms",
    "entry_ms",
    "entry_noact_ms",
    "weights",
    "run",
)

#: Version of what an entry means, stored as ``latency_model`` in every table's
#: sidecar. 1: the merged conv and its end activation alone, every residual add in
#: the constant. 2: each option timed in context, with the residual adds it owns
#: (:func:`~layermerge.families.base.owned_skips`); rows for removable activations
#: (``latency_noact_ms``) and costs of dropped convs (``dropped_ms``). 3: on ONNX
#: Runtime's CPU provider the layout conversions subtracted from an entry are read
#: from calls made after the same cache eviction as its timed calls, and the network
#: of the constant is timed without eviction, as whole networks are. 4: entries are
#: scaled by a fitted slowdown (a share of each entry) instead of a cost per conv
#: layer being added, fitted on reference plans of every method
#: (:mod:`.constant`). Tables of another model are refused
#: (:func:`check_latency_model`).
LATENCY_MODEL = 4

#: What changed in each latency model, for the messages about older tables.
_MODEL_CHANGES = {
    1: "each conv was timed without the residual adds it keeps",
    2: "ONNX Runtime's layout conversions were subtracted as timed on hot caches, "
    "so entries of layers with large activations were too high",
    3: "a cost per conv layer was added to each entry; a network's time beyond its "
    "entries grows with their time, so plans that merge many layers were predicted "
    "too slow",
}


# ---------------------------------------------------------------------------
# what a table entry times


def _progress(total: int, initial: int, enabled: bool | None, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return contextlib.nullcontext(None)
    return tqdm(total=total, initial=initial, desc=desc, unit="entry", file=sys.stderr)


def table_meta(
    traced: TracedModel, backend: Backend, timing: TimingConfig, model: str | None = None
) -> dict[str, Any]:
    """The sidecar of a latency table: the model, the backend settings, the protocol."""
    chain = traced.chain
    return {
        "model": model,
        "model_fingerprint": chain.fingerprint(),
        "chain_length": chain.length,
        "input_shape": list(chain.input_shape),
        **backend.meta(),
        "timing": timing.describe(),
        "statistic": timing.statistic,
        "latency_model": LATENCY_MODEL,
        # the package is imported before any of its modules, so no import is needed
        "layermerge_version": __version__,
    }


def build_latency_table(
    traced: TracedModel,
    out: str | Path,
    backend: Backend,
    *,
    space: SearchSpace | None = None,
    timing: TimingConfig | None = None,
    model: str | None = None,
    constant: bool = True,
    subtract_overhead: bool = True,
    progress: bool | None = None,
    max_entries: int | None = None,
) -> Table:
    """Measure every option of ``space`` (default: the model's whole search space)
    and write the table to ``out`` (CSV + sidecar), one durable row per entry.

    An existing file with the same settings is resumed: entries already in it are
    not measured again. ``constant`` then measures the rest of the network (see
    the module docstring) and stores ``constant_ms``; ``max_entries`` stops after
    that many new entries (the table stays resumable). Returns the table read back.
    """
    timing = _cache_policy(traced, timing or TimingConfig())
    space = space or build_space(traced.chain)
    out = Path(out)
    _set_aside_older_model(out)
    meta = table_meta(traced, backend, timing, model)
    meta["overhead_subtracted"] = subtract_overhead
    # not all digits or digits-e-digits, which the table would read back as a number
    run_id = "r" + uuid.uuid4().hex[:8]
    t_start = time.perf_counter()
    with TableWriter(out, "latency", meta, LATENCY_COLUMNS) as writer:
        todo = [o for o in space.options if o.key not in writer.done]
        unknown = writer.done - {o.key for o in space.options}
        if unknown:
            raise TableError(
                f"{out} holds {len(unknown)} entries that are not options of this model "
                f"(e.g. {format_key(sorted(unknown)[0])}); use a new file"
            )
        if max_entries is not None:
            todo = todo[:max_entries]
        overhead_ms = 0.0
        if subtract_overhead:
            overhead_ms = _overhead(writer, backend, timing)
        sampler = None
        if constant and todo and "constant_ms" not in writer.meta:
            sampler = _IdentitySampler(traced, backend, space, writer)
        done_before = len(writer.done)
        with (
            _progress(len(space.options), done_before, progress, "latency table") as bar,
            backend.session(),
        ):
            for option in todo:
                row = _measure_option(traced, backend, option, timing, overhead_ms, run_id)
                if sampler is not None:
                    sampler.maybe_sample()
                writer.write(row)
                if bar is not None:
                    bar.update(1)
        complete = len(writer.done) == len(space.options)
        elapsed = time.perf_counter() - t_start
        writer.update_meta(
            complete=complete,
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
            elapsed_s=round(elapsed + float(writer.meta.get("elapsed_s", 0) or 0), 3),
        )
        if complete and "dropped_ms" not in writer.meta:
            with backend.session():
                tick = sampler.maybe_sample if sampler is not None else None
                dropped = _measure_dropped(traced, backend, space, timing, tick)
            writer.update_meta(dropped_ms=dropped)
        if sampler is not None:
            sampler.save()
        constant_meta = None
        if constant and complete and "constant_ms" not in writer.meta:
            rows = read_table(out, "latency")
            earlier = list(writer.meta.get("identity_samples_ms") or [])
            constant_meta = measure_constant(
                traced,
                backend,
                rows,
                space=space,
                timing=_constant_timing(timing),
                samples_ms=earlier,
                runner=sampler.run if sampler is not None else None,
            )
    if constant_meta is not None:
        _write_with_terms(out, constant_meta)
    return read_table(out, "latency")


def _write_with_terms(out: Path, constant_meta: dict[str, Any]) -> None:
    """Rewrite the finished table with the fitted terms applied to its rows
    (:func:`~.constant.apply_terms`) and the constant in the sidecar, both files
    atomically."""
    table = read_table(out, "latency")
    meta = {**table.meta, **constant_meta}
    write_table(out, "latency", apply_terms(table.rows, meta), meta, table.columns)


class _IdentitySampler:
    """Times the BN-folded original now and then while the entries are measured.

    The constant is the original's time minus its entries, so the two must see
    the same machine. On a shared machine the load of other jobs changes over
    minutes; timing the original only at the end would compare entries and
    network under different loads. Single calls spread over the whole build (about
    a tenth of its time), pooled with a final burst, see the same mix of load as
    the entries. The samples are kept in the sidecar, so a resumed build keeps them.
    """

    def __init__(self, traced: TracedModel, backend: Backend, space: SearchSpace, writer):
        self.writer = writer
        self.run = backend.prepare(
            deploy_network(traced, space.identity_plan()), traced.chain.input_shape
        )
        self.samples = list(writer.meta.get("identity_samples_ms") or [])
        self.clock = backend.clock
        t = time.perf_counter()
        self.run()  # first call: allocations, not a sample
        self.interval = max(0.25, 20 * (time.perf_counter() - t))
        self.last = time.perf_counter()
        self.unsaved = 0

    def maybe_sample(self) -> None:
        if time.perf_counter() - self.last < self.interval:
            return
        # the entries just measured pushed the network out of the caches, which a
        # network run back to back would not see: one call to bring it back first
        self.run()
        a = self.clock()
        self.run()
        b = self.clock()
        self.samples.append(round((b - a) * 1e3, 6))
        self.last = time.perf_counter()
        self.unsaved += 1
        if self.unsaved >= 10:
            self.save()

    def save(self) -> None:
        if self.unsaved:
            self.writer.update_meta(identity_samples_ms=self.samples)
            self.unsaved = 0


def _set_aside_older_model(out: Path) -> None:
    """A table at ``out`` whose entries mean something else (another
    :data:`LATENCY_MODEL`) is renamed to ``<name>.model<N>.csv`` (with its sidecar), so
    that the build measures a new one, and says so."""
    side = meta_path(out)
    if not out.exists() or not side.exists():
        return
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return  # not ours to judge: the table layer reports it
    old = meta.get("latency_model", 1) if isinstance(meta, dict) else LATENCY_MODEL
    if old == LATENCY_MODEL:
        return
    dest = out.with_name(f"{out.stem}.model{old}{out.suffix}")
    out.replace(dest)
    side.replace(meta_path(dest))
    why = _MODEL_CHANGES.get(old, "its entries mean something else")
    warnings.warn(
        f"{out} was measured with latency model {old} ({why}); this version uses model "
        f"{LATENCY_MODEL}, so the table is measured again (the old one is kept as {dest})",
        stacklevel=3,
    )


def check_latency_model(table: Table) -> None:
    """Refuse a table whose entries were measured under another latency model
    (:data:`LATENCY_MODEL`): its predictions would not add up."""
    found = table.meta.get("latency_model", 1)
    if found != LATENCY_MODEL:
        why = _MODEL_CHANGES.get(found, "its entries mean something else")
        raise TableError(
            f"{table.name} was measured with latency model {found}, which this version no "
            f"longer predicts with (in model {found}, {why}; this version uses model "
            f"{LATENCY_MODEL}); measure it again with `layermerge latency` or "
            "build_latency_table (an existing file is set aside and re-measured)"
        )


def _overhead(writer: TableWriter, backend: Backend, timing: TimingConfig) -> float:
    """The per-call overhead of this table: measured once, kept in the sidecar so
    that a resumed build subtracts the same amount from its entries."""
    if "call_overhead_ms" in writer.meta:
        return float(writer.meta["call_overhead_ms"])
    value = backend.call_overhead(timing).value(timing.statistic)
    writer.update_meta(call_overhead_ms=value)
    return value


# ---------------------------------------------------------------------------
# using tables


def _settings_table(meta: Mapping[str, Any], like: Table, name: str) -> Table:
    return Table(like.kind, like.columns, [], {**like.meta, **meta}, source=name)


def check_settings(
    table: Table, settings: Mapping[str, Any], what: str = "this measurement"
) -> None:
    """Refuse to use ``table`` with latencies measured under other ``settings``
    (a backend's :meth:`Backend.meta`, or a plan's recorded settings)."""
    keys = [k for k in SETTINGS_KEYS if k in table.meta or k in settings]
    check_same_settings(table, _settings_table(settings, table, what), keys)


def read_latency_tables(paths: Sequence[str | Path]) -> Table:
    """One latency table from one file or several shards; shards measured under
    different settings (:data:`SETTINGS_KEYS`) are refused."""
    tables = [read_table(p, "latency") for p in paths]
    for t in tables:
        check_latency_model(t)
    for t in tables[1:]:
        check_same_settings(tables[0], t, SETTINGS_KEYS)
    return concat_tables(tables)


def predict_latency(table: Table, plan: Plan) -> float:
    """``constant_ms`` + what each block of the plan costs (:func:`block_latency_ms`).

    Refuses a table of another latency model, a plan made for another model, and a
    plan solved with a latency table measured under other settings than ``table``.
    """
    check_latency_model(table)
    check_plan_for_chain(plan, table.model_fingerprint, table.chain_length)
    recorded = plan.meta.get("latency_settings")
    if recorded:
        keys = [k for k in LATENCY_SETTINGS if k in recorded]
        check_same_settings(
            table, _settings_table(recorded, table, "the table the plan was solved with"), keys
        )
    total = table.constant_ms
    for b in plan.blocks:
        total += block_latency_ms(table, b)
    return total
