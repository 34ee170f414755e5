"""The latency table: one entry per option, and what a table predicts.

An entry times what the option costs in the deploy network (the model family's
:meth:`~layermerge.families.Family.option_module`: for a CNN the merged conv
plus the activation its block end keeps) at the real input shape of the block's
first node. Entries are written one at a time, so an interrupted build resumes
where it stopped. The sidecar holds ``constant_ms``, the latency of everything
outside the chain, so that ``constant_ms + sum of a plan's entries`` predicts the
plan's latency (:func:`predict_latency`).

How the constant is measured. The BN-folded network of the identity plan is
timed as a whole, and the entries of its blocks (one per conv) are subtracted:
``constant = T(identity network) - sum_i T(conv i)``. The network is timed with
single calls spread over the whole build, pooled with a final burst, so that
it sees the same load of other jobs as the entries did. The prediction for the
identity plan is therefore exact by construction, and for any other plan its
error is the error in the entries plus whatever does not add up between convs
timed alone and convs inside a network: residual adds that a plan merges into
a kernel (their cost stays in the constant), cache effects between neighbouring
layers, and work a lone layer does that a layer in a network does not. Two such
costs are removed explicitly, so that they end up once in the constant instead
of once per entry, and one is emulated:

- the fixed cost of one backend call (ONNX Runtime's run and binding, a Python
  module call, a CUDA synchronisation), measured on a one-element model;
- on ONNX Runtime's CPU provider, the layout conversions around a lone conv
  (ReorderInput/ReorderOutput to and from the blocked NCHWc layout), which a
  network pays at its ends only. Their time is read from ORT's profiler
  (``layout_ms`` per entry);
- the caches: timed back to back, a layer finds its weights and input hot from
  its own previous call, which inside a network it never does. The core's
  private caches are evicted before every timed call (``TimingConfig.flush_mb``,
  by default twice the L2 size).

The entry's own statistic is kept in ``min_ms``/``median_ms``; ``latency_ms``
is that minus both corrections.
"""

from __future__ import annotations

import contextlib
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from .._version import __version__
from ..chain import Chain
from ..families import TracedModel, family_of
from ..ops import option_conv
from ..plan import Plan, PlanBlock, check_plan_for_chain
from ..space import SearchSpace, build_space
from ..tables import (
    LATENCY_SETTINGS,
    Table,
    TableError,
    TableWriter,
    check_same_settings,
    concat_tables,
    format_key,
    read_table,
    required_columns,
)
from ..transform import deploy_network as _deploy_network
from .backends import Backend, BackendError
from .timing import Measurement, TimingConfig, measure

__all__ = [
    "LATENCY_COLUMNS",
    "SETTINGS_KEYS",
    "build_latency_table",
    "check_settings",
    "deploy_network",
    "measure_constant",
    "option_conv",
    "option_input_shape",
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
    "run",
)


# ---------------------------------------------------------------------------
# what a table entry times


def option_module(traced: TracedModel, option: PlanBlock) -> nn.Module:
    """What ``option`` costs in the deploy network, with random weights (its model
    family's :meth:`~layermerge.families.Family.option_module`); an empty option,
    allowed by some families, is the identity."""
    return family_of(traced).option_module(traced, option)


def option_input_shape(chain: Chain, option: PlanBlock) -> tuple[int, ...]:
    """(C, H, W) the option's conv reads: the real shape at its start node."""
    return tuple(chain.nodes[option.start].shape)


def deploy_network(traced: TracedModel, plan: Plan, *, verify: bool = True) -> nn.Module:
    """The deploy network of ``plan`` as the backends time it (one input, one output);
    the identity plan gives the original network with BatchNorm folded, the fair
    baseline. Same as :func:`layermerge.transform.deploy_network` with ``one_input``."""
    return _deploy_network(traced, plan, verify=verify, one_input=True)


# ---------------------------------------------------------------------------
# the latency table


def _row_of(
    option: PlanBlock,
    conv: nn.Module,
    act: str | None,
    shape: Sequence[int],
    m: Measurement | None,
    statistic: str,
    overhead_ms: float,
    layout_ms: float,
    run_id: str,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "start": option.start,
        "end": option.end,
        "kernel": option.kernel,
        "stride": option.stride,
        "depthwise": option.depthwise,
        "kept_convs": option.kept_convs,
        "activation": act or "",
        "input_shape": "x".join(map(str, shape)),
        "run": run_id,
    }
    if isinstance(conv, nn.Conv2d):
        row.update(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            padding=conv.padding[0],
            groups=conv.groups,
        )
    if m is None:  # an identity option costs nothing
        row.update(latency_ms=0.0, runs=0, warmup_runs=0, stopped="empty")
        return row
    row.update(
        latency_ms=max(m.value(statistic) - overhead_ms - layout_ms, 0.0),
        median_ms=m.median_ms,
        min_ms=m.min_ms,
        layout_ms=layout_ms,
        p25_ms=m.p25_ms,
        p75_ms=m.p75_ms,
        ci_rel=m.ci_rel,
        runs=m.runs,
        warmup_runs=m.warmup_runs,
        stopped=m.stopped,
        elapsed_s=round(m.elapsed_s, 4),
    )
    return row


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
    timing = timing or TimingConfig()
    space = space or build_space(traced.chain)
    out = Path(out)
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
                module = option_module(traced, option)
                shape = option_input_shape(traced.chain, option)
                act = None
                if isinstance(module, nn.Sequential):
                    act = type(module[1]).__name__.lower()
                conv = module[0] if isinstance(module, nn.Sequential) else module
                m, layout_ms = None, 0.0
                if option.kept_convs:
                    try:
                        run, layout_ms = backend.prepare_entry(module, shape, timing.statistic)
                        m = measure(run, timing, backend.clock)
                    except BackendError:
                        raise
                    except Exception as e:
                        raise RuntimeError(
                            f"measuring option {format_key(option.key)} (conv {conv}) failed: "
                            f"{type(e).__name__}: {e}"
                        ) from e
                    del run
                if sampler is not None:
                    sampler.maybe_sample()
                writer.write(
                    _row_of(
                        option,
                        conv,
                        act,
                        shape,
                        m,
                        timing.statistic,
                        overhead_ms,
                        layout_ms,
                        run_id,
                    )
                )
                if bar is not None:
                    bar.update(1)
        complete = len(writer.done) == len(space.options)
        elapsed = time.perf_counter() - t_start
        writer.update_meta(
            complete=complete,
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
            elapsed_s=round(elapsed + float(writer.meta.get("elapsed_s", 0) or 0), 3),
        )
        if sampler is not None:
            sampler.save()
        if constant and complete and "constant_ms" not in writer.meta:
            rows = read_table(out, "latency")
            earlier = list(writer.meta.get("identity_samples_ms") or [])
            writer.update_meta(
                **measure_constant(
                    traced,
                    backend,
                    rows,
                    space=space,
                    timing=_constant_timing(timing),
                    samples_ms=earlier,
                    runner=sampler.run if sampler is not None else None,
                )
            )
    return read_table(out, "latency")


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


def measure_constant(
    traced: TracedModel,
    backend: Backend,
    table: Table,
    *,
    space: SearchSpace | None = None,
    timing: TimingConfig | None = None,
    samples_ms: Sequence[float] = (),
    runner: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """``constant_ms``: the latency of the network outside the chain's convs.

    Times the BN-folded identity-plan network and subtracts the table's entries
    for its blocks (each conv with its activation); see the module docstring for
    what this does and does not capture. ``samples_ms``, calls of the same network
    timed earlier (spread over the table's build), are pooled with this burst.
    Returns the values for the sidecar.
    """
    space = space or build_space(traced.chain)
    identity = space.identity_plan()
    if runner is None:
        runner = backend.prepare(deploy_network(traced, identity), traced.chain.input_shape)
    timing = timing or _constant_timing(TimingConfig(statistic=table_statistic(table)))
    with backend.session():
        m = measure(runner, timing, backend.clock)
    pooled = Measurement.from_samples(
        list(samples_ms) + list(m.samples_ms), m.warmup_runs, m.elapsed_s, m.stopped
    )
    value = pooled.value(timing.statistic)
    entries = sum(table.row(b.key)["latency_ms"] for b in identity.blocks)
    return {
        "constant_ms": value - entries,
        "constant_method": "identity network - sum of its entries",
        "identity_ms": value,
        "identity_median_ms": pooled.median_ms,
        "identity_entries_ms": entries,
        "identity_runs": pooled.runs,
        "identity_spread_runs": len(samples_ms),
    }


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
    for t in tables[1:]:
        check_same_settings(tables[0], t, SETTINGS_KEYS)
    return concat_tables(tables)


def predict_latency(table: Table, plan: Plan) -> float:
    """``constant_ms`` + the entries of the plan's blocks (identity blocks are free).

    Refuses a plan made for another model, and a plan solved with a latency table
    measured under other settings than ``table``.
    """
    check_plan_for_chain(plan, table.model_fingerprint, table.chain_length)
    recorded = plan.meta.get("latency_settings")
    if recorded:
        keys = [k for k in LATENCY_SETTINGS if k in recorded]
        check_same_settings(
            table, _settings_table(recorded, table, "the table the plan was solved with"), keys
        )
    total = table.constant_ms
    for b in plan.blocks:
        if not b.kept_convs:
            continue
        try:
            total += table.row(b.key)["latency_ms"]
        except KeyError:
            raise TableError(
                f"{table.name} has no entry for the plan's block {format_key(b.key)}; "
                "measure the whole search space"
            ) from None
    return total
