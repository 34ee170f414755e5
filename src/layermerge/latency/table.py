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

How the constant is measured. The BN-folded network of the identity plan is
timed as a whole, and the entries of its blocks (one per conv, each with the adds
it owns) are subtracted: ``constant = T(identity network) - sum_i T(option i)``.
Inside a network a layer reads its weights after the rest of the network went
through the caches, which a layer timed alone does not; that cost grows with the
weights a plan keeps. So a second network, the one that drops every conv layer
pruning may drop, is timed interleaved with the identity network, and
``T = constant + sum of entries + beta * weights`` is solved for the constant and
``beta`` (``memory_ms_per_mweight``, ms per million weights); every row's
``latency_ms`` is its measured ``entry_ms`` plus ``beta`` times its ``weights``.
The network is timed with single calls spread over the whole build, pooled with a
final burst, so that it sees the same load of other jobs as the entries did. The
prediction for the identity plan is therefore exact by construction, and for any
other plan its error is the error in the entries plus whatever does not add up
between layers timed alone and layers inside a network (cache effects between
neighbouring layers, work a lone layer does that a layer in a network does not).
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

The entry's own statistic is kept in ``min_ms``/``median_ms``; ``latency_ms``
is that minus both corrections.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

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
from ..transform import deploy_network as _deploy_network
from .backends import Backend
from .entries import (
    _cache_policy,
    _measure_dropped,
    _measure_option,
    dropped_block,
    option_input_shape,
    option_input_shapes,
    option_module,
)
from .timing import Measurement, TimingConfig, measure, measure_interleaved

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
    "weights",
    "run",
)

#: Version of what an entry means, stored as ``latency_model`` in every table's
#: sidecar. 1: the merged conv and its end activation alone, every residual add in
#: the constant. 2: each option timed in context, with the residual adds it owns
#: (:func:`~layermerge.families.base.owned_skips`); rows for removable activations
#: (``latency_noact_ms``) and costs of dropped convs (``dropped_ms``). Tables of
#: another model are refused (:func:`check_latency_model`).
LATENCY_MODEL = 2


# ---------------------------------------------------------------------------
# what a table entry times


def deploy_network(traced: TracedModel, plan: Plan, *, verify: bool = True) -> nn.Module:
    """The deploy network of ``plan`` as the backends time it (one input, one output);
    the identity plan gives the original network with BatchNorm folded, the fair
    baseline. Same as :func:`layermerge.transform.deploy_network` with ``one_input``."""
    return _deploy_network(traced, plan, verify=verify, one_input=True)


# ---------------------------------------------------------------------------
# the latency table


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
        _write_with_memory_term(out, constant_meta)
    return read_table(out, "latency")


def _write_with_memory_term(out: Path, constant_meta: dict[str, Any]) -> None:
    """Rewrite the finished table with each entry's memory term added (``latency_ms``
    = ``entry_ms`` + ``memory_ms_per_mweight`` x its weights / 1e6; the same for
    ``latency_noact_ms``) and the constant in the sidecar, both files atomically."""
    table = read_table(out, "latency")
    beta = float(constant_meta.get("memory_ms_per_mweight") or 0.0)
    rows = []
    for r in table.rows:
        r = dict(r)
        extra = beta * float(r.get("weights") or 0) / 1e6
        if r.get("entry_ms") is not None:
            r["latency_ms"] = float(r["entry_ms"]) + extra
        if r.get("latency_noact_ms") is not None:
            r["latency_noact_ms"] = float(r["latency_noact_ms"]) + extra
        rows.append(r)
    write_table(out, "latency", rows, {**table.meta, **constant_meta}, table.columns)


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
    warnings.warn(
        f"{out} was measured with latency model {old} (each conv timed without the residual "
        f"adds it keeps); this version uses model {LATENCY_MODEL}, so the table is measured "
        f"again (the old one is kept as {dest})",
        stacklevel=3,
    )


def check_latency_model(table: Table) -> None:
    """Refuse a table whose entries were measured under another latency model
    (:data:`LATENCY_MODEL`): its predictions would not add up."""
    found = table.meta.get("latency_model", 1)
    if found != LATENCY_MODEL:
        raise TableError(
            f"{table.name} was measured with latency model {found}, which this version no "
            f"longer predicts with (model {LATENCY_MODEL} times each option with the "
            "residual adds it keeps); measure it again with `layermerge latency build` "
            "or build_latency_table (an existing file is set aside and re-measured)"
        )


def _constant_timing(timing: TimingConfig) -> TimingConfig:
    # Every prediction contains the constant, so it gets a tighter interval and a
    # longer cap than a single entry (the fixed protocol stays fixed).
    if timing.fixed:
        return timing
    return replace(
        timing,
        min_runs=max(timing.min_runs, 30),
        rel_tol=min(timing.rel_tol, 0.01),
        max_time_s=timing.max_time_s * 20,
    )


def _overhead(writer: TableWriter, backend: Backend, timing: TimingConfig) -> float:
    """The per-call overhead of this table: measured once, kept in the sidecar so
    that a resumed build subtracts the same amount from its entries."""
    if "call_overhead_ms" in writer.meta:
        return float(writer.meta["call_overhead_ms"])
    value = backend.call_overhead(timing).value(timing.statistic)
    writer.update_meta(call_overhead_ms=value)
    return value


#: The memory term is fitted only when the pruned network drops at least this share
#: of the weights; below it the difference between the two networks says too little
#: about weights (MobileNetV2 drops only depthwise convs: about 1 %).
MEMORY_FIT_MIN_SHARE = 0.25


def pruned_plan(space: SearchSpace) -> Plan | None:
    """The plan that drops every conv layer pruning may drop (None when none may):
    the second reference network of the constant's fit."""
    chain = space.chain
    identity = space.identity_plan()
    blocks = [
        dropped_block(chain, b.end) if not chain.conv(b.end).irreducible else b
        for b in identity.blocks
    ]
    if blocks == identity.blocks:
        return None
    return space.plan(blocks, method="layerprune")


def _entry(row: Mapping[str, Any]) -> float:
    v = row.get("entry_ms")
    return float(row["latency_ms"] if v is None else v)


def _plan_entries(table: Table, plan: Plan) -> tuple[float, float]:
    """(sum of the plan's measured entries, its weights) before the memory term; a
    block that keeps no conv is priced as the prediction prices it."""
    ms = weights = 0.0
    for b in plan.blocks:
        if not b.kept_convs:
            ms += block_latency_ms(table, b, missing_dropped_ms=0.0)
            continue
        r = table.row(b.key)
        ms += _entry(r)
        weights += float(r.get("weights") or 0)
    return ms, weights


def measure_constant(
    traced: TracedModel,
    backend: Backend,
    table: Table,
    *,
    space: SearchSpace | None = None,
    timing: TimingConfig | None = None,
    samples_ms: Sequence[float] = (),
    runner: Callable[[], Any] | None = None,
    memory_term: bool = True,
) -> dict[str, Any]:
    """``constant_ms`` and ``memory_ms_per_mweight``: what the network costs outside
    the entries.

    Inside a network a layer reads its weights after the rest of the network has
    passed through the caches; a layer timed alone finds them nearer. That cost
    grows with the weights a plan keeps, so it is fitted as a term per weight:
    the identity network (``I``) and the network that drops every conv layer
    pruning may drop (``P``) are timed interleaved, and
    ``T = constant + sum of entries + beta * weights`` is solved for ``beta`` (ms
    per million weights, at least 0) and the constant. ``T(I)`` is the identity
    network's time pooled with ``samples_ms`` (calls spread over the build), so the
    identity plan's prediction stays its measured time. ``memory_term=False`` (or a
    model without droppable convs) fits the constant alone (``beta = 0``).
    Returns the values for the sidecar.
    """
    space = space or build_space(traced.chain)
    identity = space.identity_plan()
    if runner is None:
        runner = backend.prepare(deploy_network(traced, identity), traced.chain.input_shape)
    timing = timing or _constant_timing(TimingConfig(statistic=table_statistic(table)))
    stat = timing.statistic
    with backend.session():
        m = measure(runner, timing, backend.clock)
    pooled = Measurement.from_samples(
        list(samples_ms) + list(m.samples_ms), m.warmup_runs, m.elapsed_s, m.stopped
    )
    value = pooled.value(stat)
    e_i, w_i = _plan_entries(table, identity)
    out: dict[str, Any] = {"memory_ms_per_mweight": 0.0}
    pruned = pruned_plan(space) if memory_term else None
    if pruned is not None:
        e_p, w_p = _plan_entries(table, pruned)
        if w_i - w_p < MEMORY_FIT_MIN_SHARE * w_i:
            out["memory_term_skipped"] = (
                f"the pruned network keeps {w_p / max(w_i, 1):.0%} of the weights"
            )
            pruned = None
    if pruned is not None:
        try:
            run_p = backend.prepare(deploy_network(traced, pruned), traced.chain.input_shape)
        except Exception as e:  # a family that cannot build it: no memory term
            out["memory_term_skipped"] = f"{type(e).__name__}: {e}"[:200]
            pruned = None
    if pruned is not None:
        with backend.session():
            pair = measure_interleaved(
                {"identity": runner, "pruned": run_p},
                rounds=8,
                calls_per_round=3,
                max_time_s=max(timing.max_time_s, 5.0),
                clock=backend.clock,
            )
        # the pair was timed after the spread samples: rescale to the pooled time
        t_p = pair["pruned"].value(stat) * value / pair["identity"].value(stat)
        beta = ((value - e_i) - (t_p - e_p)) / ((w_i - w_p) / 1e6)
        # a constant below 0 or a negative term would be noise, not a cost
        beta = min(max(beta, 0.0), max(value - e_i, 0.0) / (w_i / 1e6))
        out.update(memory_ms_per_mweight=beta, pruned_ms=t_p, pruned_entries_ms=e_p)
    beta = out["memory_ms_per_mweight"]
    constant = value - e_i - beta * w_i / 1e6
    if constant < 0:
        # the entries add up to more than the network (noise on a tiny network, or
        # layers that cost less inside it): a latency cannot be negative, so the
        # identity plan is then predicted at its entries, -constant_raw_ms above
        out["constant_raw_ms"] = constant
        constant = 0.0
    out.update(
        constant_ms=constant,
        constant_method="identity network - its entries - memory term (pruned network fit)",
        identity_ms=value,
        identity_median_ms=pooled.median_ms,
        identity_entries_ms=e_i + beta * w_i / 1e6,
        identity_runs=pooled.runs,
        identity_spread_runs=len(samples_ms),
    )
    return out


# ---------------------------------------------------------------------------
# using tables


def table_statistic(table: Table) -> str:
    """The statistic a table's entries are (``median`` for tables that do not say)."""
    return str(table.meta.get("statistic") or "median")


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
