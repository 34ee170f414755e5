"""What a network costs beyond the entries of its blocks: the constant, and two
terms that turn a layer's entry (timed alone) into what it costs inside a network.

A prediction is ``constant + sum over blocks of (1 + slowdown) * entry + beta *
weights`` (blocks that keep no conv add their ``dropped_ms`` or empty-option row
as measured). The three numbers are fitted on whole networks timed interleaved:
the identity network (BatchNorm folded) and reference plans of every method,
whose entries, weights and layers differ in ways the plans users ask for do:

- ``slowdown`` (a fraction of each entry): a network's best call is slower than
  the sum of its layers' best calls. Each entry keeps its fastest call out of
  many short ones, in which the machine was at its quietest; a network cannot
  be that lucky in all its layers at once, so the difference grows with the work
  a plan keeps, not with its number of layers. On PyTorch eager MobileNetV2 at
  224 px it is about 10 %, and it changes between processes: in one process the
  network measured 13.6 ms and in others 12.3-13.2 ms, with the same entries.
  A term proportional to the entries keeps a plan's share of the identity's time
  right whatever the process measured; in the constant it would not.
- ``beta`` (``memory_ms_per_mweight``, ms per million weights): inside a network a
  layer reads its weights after the rest of the network went through the caches,
  while a layer timed alone finds them nearer.

Both are fitted by least squares with neither below 0 (every subset of terms is
tried, the best fit whose terms are all at least 0 is kept) on
``T - entries - fixed = constant + slowdown * entries + beta * weights``; the
constant is then the identity network's time minus what its blocks cost, so the
prediction for the unmodified network is its measured time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..costs import block_latency_ms
from ..families import TracedModel
from ..plan import Plan
from ..space import SearchSpace, build_space
from ..tables import Table, make_table
from .backends import Backend
from .entries import deploy_network, dropped_block
from .timing import Measurement, TimingConfig, measure, measure_interleaved

__all__ = [
    "MEMORY_FIT_MIN_SHARE",
    "REFERENCES",
    "PlanSums",
    "measure_constant",
    "plan_sums",
    "pruned_plan",
    "reference_plan",
    "table_statistic",
]

#: The memory term is fitted only when the reference networks' weights differ by at
#: least this share of the identity network's; below it the fit says too little
#: about weights (MobileNetV2's pruned network drops only depthwise convs: 1 %).
MEMORY_FIT_MIN_SHARE = 0.25

#: The reference plans besides the identity and the pruned network: name ->
#: (method, where its budget lies between the method's fastest plan by the entries
#: (0) and the identity (1)), all importances equal. The fastest plans give the
#: fit its leverage (MobileNetV2: 5 or 6 layers of 50 for LayerMerge, a few large
#: merged kernels for kim23); those halfway are plans like those users ask for.
REFERENCES = {
    "merged": ("layermerge", 0.0),
    "merged_half": ("layermerge", 0.5),
    "noact": ("kim23", 0.0),
    "noact_half": ("kim23", 0.5),
}

#: Rounds of the interleaved timing of the reference networks (3 calls each).
REFERENCE_ROUNDS = 12


def _constant_timing(timing: TimingConfig) -> TimingConfig:
    """How the whole identity network is timed for the constant: as every whole
    network is (plans, `layermerge benchmark`), back to back without cache
    eviction, which only emulates, for a layer timed alone, the caches it finds
    inside a network. Timed with eviction, MobileNetV2 at 160 px measured 3-5 %
    slower, and every plan was over-predicted by that much. Every prediction
    contains the constant, so it also gets a tighter interval and a longer cap than
    a single entry (the fixed protocol keeps its number of calls)."""
    if timing.fixed:
        return replace(timing, flush_mb=0.0)
    return replace(
        timing,
        min_runs=max(timing.min_runs, 30),
        rel_tol=min(timing.rel_tol, 0.01),
        max_time_s=timing.max_time_s * 20,
        flush_mb=0.0,
    )


def table_statistic(table: Table) -> str:
    """The statistic a table's entries are (``median`` for tables that do not say)."""
    return str(table.meta.get("statistic") or "median")


def pruned_plan(space: SearchSpace) -> Plan | None:
    """The plan that drops every conv layer pruning may drop (None when none may):
    the reference network with the fewest weights."""
    chain = space.chain
    identity = space.identity_plan()
    blocks = [
        dropped_block(chain, b.end) if not chain.conv(b.end).irreducible else b
        for b in identity.blocks
    ]
    if blocks == identity.blocks:
        return None
    return space.plan(blocks, method="layerprune")


@dataclass(frozen=True)
class PlanSums:
    """What a plan's blocks add up to in a table, before the terms.

    ``entries``: the measured entries of the blocks that run a conv (with or
    without their end activation, as the plan keeps it); ``fixed``: the blocks
    that keep no conv, priced as a prediction prices them; ``weights``, ``layers``:
    the conv weights and conv layers the plan keeps.
    """

    entries: float
    fixed: float
    weights: float
    layers: int


def _raw(row: Mapping[str, Any], activation: bool) -> float:
    """An entry as measured, before the terms (a finished table keeps it in
    ``entry_ms`` / ``entry_noact_ms``)."""
    if activation:
        v = row.get("entry_ms")
        return float(row["latency_ms"] if v is None else v)
    v = row.get("entry_noact_ms")
    return float(row["latency_noact_ms"] if v is None else v)


def plan_sums(table: Table, plan: Plan) -> PlanSums:
    """:class:`PlanSums` of ``plan`` by ``table``."""
    entries = fixed = weights = 0.0
    layers = 0
    for b in plan.blocks:
        if not b.kept_convs:
            fixed += block_latency_ms(table, b, missing_dropped_ms=0.0)
            continue
        r = table.row(b.key)
        entries += _raw(r, b.activation)
        weights += float(r.get("weights") or 0)
        layers += 1
    return PlanSums(entries, fixed, weights, layers)


def reference_plan(
    table: Table, space: SearchSpace, method: str = "layermerge", where: float = 0.0
) -> Plan | None:
    """A reference network for the fit (None when the solver cannot give one):
    ``method``'s plan, all importances equal, at the budget ``where`` of the way
    from its fastest plan by the entries (0) to the identity's entries (1)."""
    from ..solve import InfeasibleBudgetError, solve_tables  # the solver reads tables

    imp = make_table(
        "importance", [k | {"importance": 1.0} for k in space.option_rows()], space.table_meta()
    )
    lat = Table(table.kind, table.columns, table.rows, {**table.meta, "constant_ms": 0.0})
    sums = plan_sums(table, space.identity_plan())
    top = sums.entries + sums.fixed
    try:
        solve_tables(lat, imp, method=method, budget_ms=1e-9)
        return None
    except InfeasibleBudgetError as e:
        fastest = e.min_feasible_ms
    except Exception:  # noqa: BLE001 - no reference network, one point less
        return None
    try:
        budget = fastest + where * max(top - fastest, 0.0)
        return solve_tables(lat, imp, method=method, budget_ms=budget * (1 + 1e-9)).plan
    except Exception:  # noqa: BLE001
        return None


#: The features of the terms in a fit point (gap, entries, million weights).
_FEATURE = {"slowdown": 1, "beta": 2}


def _fit_terms(points: Mapping[str, tuple[float, float, float]], terms: Sequence[str]) -> dict:
    """Fit ``gap = constant + slowdown * entries + beta * weights`` over ``points``
    (name -> (gap = T - entries - fixed, entries, weights in millions)) for the
    constant and the terms named in ``terms``, least squares with every term at
    least 0: each subset of the terms is fitted, and the best fit whose terms are
    all at least 0 is kept (with as few terms as fit as well). A term below 0
    would be noise: inside a network a layer does not cost less than alone, once
    the call and the layout conversions are taken out. Terms left out are 0."""
    import numpy as np

    pts = list(points.values())
    y = np.array([p[0] for p in pts])
    best: tuple[float, tuple[str, ...], Any] | None = None
    for k in range(len(terms) + 1):
        for combo in itertools.combinations(terms, k):
            if len(pts) < k + 1:
                continue
            a = np.array([[1.0] + [p[_FEATURE[t]] for t in combo] for p in pts])
            sol = np.linalg.lstsq(a, y, rcond=None)[0]
            if any(v < 0 for v in sol[1:]):
                continue
            res = float(np.sum((a @ sol - y) ** 2))
            if best is None or res < best[0] * (1 - 1e-9) - 1e-18:
                best = (res, combo, sol)
    assert best is not None  # the constant alone always fits
    _, combo, sol = best
    out = {t: 0.0 for t in terms}
    out.update(constant=float(sol[0]), **{t: float(v) for t, v in zip(combo, sol[1:], strict=True)})
    return out


def _references(
    table: Table, space: SearchSpace, memory_term: bool, slowdown_term: bool, out: dict
) -> dict[str, Plan]:
    """The reference plans of the fit, each network once (the first name wins)."""
    refs: dict[str, Plan] = {}
    pruned = pruned_plan(space) if memory_term or slowdown_term else None
    if pruned is not None:
        refs["pruned"] = pruned
    for name, (method, where) in REFERENCES.items() if memory_term or slowdown_term else ():
        plan = reference_plan(table, space, method, where)
        if plan is not None:
            refs[name] = plan
    seen: set = {tuple(space.identity_plan().blocks)}
    for name, plan in list(refs.items()):
        key = tuple(plan.blocks)
        if key in seen:
            del refs[name]
        seen.add(key)
    if not refs:
        out["terms_skipped"] = "no reference network other than the identity"
    return refs


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
    slowdown_term: bool = True,
) -> dict[str, Any]:
    """``constant_ms``, ``slowdown`` and ``memory_ms_per_mweight`` (``beta``) of a
    table whose rows are as measured (see the module docstring).

    The identity network ``I`` is timed on its own (``T(I)`` pooled with
    ``samples_ms``, calls spread over the build), then with the reference networks
    interleaved: the pruned network (:func:`pruned_plan`) and the plans of
    :data:`REFERENCES`; their times are rescaled to the pooled ``T(I)``. The terms
    are fitted over all of them (:func:`_fit_terms`); ``beta`` only when the
    networks' weights differ by :data:`MEMORY_FIT_MIN_SHARE` of the identity's.
    Neither term may make the constant negative: both are then scaled down
    together (``terms_capped``). ``memory_term=False`` / ``slowdown_term=False``
    leave a term out (0). Returns the values for the sidecar.
    """
    space = space or build_space(traced.chain)
    identity = space.identity_plan()
    if runner is None:
        runner = backend.prepare(deploy_network(traced, identity), traced.chain.input_shape)
    if timing is None:
        timing = _constant_timing(TimingConfig(statistic=table_statistic(table)))
    stat = timing.statistic
    with backend.session():
        m = measure(runner, timing, backend.clock)
    pooled = Measurement.from_samples(
        list(samples_ms) + list(m.samples_ms), m.warmup_runs, m.elapsed_s, m.stopped
    )
    value = pooled.value(stat)
    s_i = plan_sums(table, identity)
    out: dict[str, Any] = {"slowdown": 0.0, "memory_ms_per_mweight": 0.0}
    refs = _references(table, space, memory_term, slowdown_term, out)
    runs = {"identity": runner}
    for name, plan in list(refs.items()):
        try:
            runs[name] = backend.prepare(deploy_network(traced, plan), traced.chain.input_shape)
        except Exception as e:  # a family that cannot build it: one point less
            out[f"{name}_skipped"] = f"{type(e).__name__}: {e}"[:200]
            del refs[name]
    points = {"identity": (value - s_i.entries - s_i.fixed, s_i.entries, s_i.weights / 1e6)}
    weights = [s_i.weights]
    if refs:
        with backend.session():
            timed = measure_interleaved(
                runs,
                rounds=REFERENCE_ROUNDS,
                calls_per_round=3,
                max_time_s=max(timing.max_time_s, 20.0),
                clock=backend.clock,
            )
        for name, plan in refs.items():
            # timed after the spread samples: rescaled to the pooled identity time
            t = timed[name].value(stat) * value / timed["identity"].value(stat)
            s = plan_sums(table, plan)
            points[name] = (t - s.entries - s.fixed, s.entries, s.weights / 1e6)
            weights.append(s.weights)
            out.update({f"{name}_ms": t, f"{name}_entries_ms": s.entries + s.fixed})
            out.update({f"{name}_layers": s.layers, f"{name}_mweights": s.weights / 1e6})
    terms = ["slowdown"] if slowdown_term and refs else []
    if memory_term and refs:
        if max(weights) - min(weights) >= MEMORY_FIT_MIN_SHARE * s_i.weights:
            terms.append("beta")
        else:
            spread = (max(weights) - min(weights)) / max(s_i.weights, 1.0)
            out["memory_term_skipped"] = f"the reference networks' weights differ by {spread:.0%}"
    fit = _fit_terms(points, terms)
    slowdown, beta = fit.get("slowdown", 0.0), fit.get("beta", 0.0)
    gap = points["identity"][0]
    used = slowdown * s_i.entries + beta * s_i.weights / 1e6
    if used > max(gap, 0.0):
        # noise on a reference network: the terms may not make the constant negative
        out["terms_capped"] = f"fitted slowdown {slowdown:.4f}, beta {beta:.4f}"
        scale = max(gap, 0.0) / used
        slowdown, beta = slowdown * scale, beta * scale
    out.update(slowdown=slowdown, memory_ms_per_mweight=beta)
    constant = gap - slowdown * s_i.entries - beta * s_i.weights / 1e6
    if constant < 0:
        # the entries add up to more than the network (noise on a tiny network):
        # a latency cannot be negative, so the identity plan is then predicted at
        # its entries, -constant_raw_ms above its measured time
        out["constant_raw_ms"] = constant
        constant = 0.0
    out.update(
        constant_ms=constant,
        constant_method="identity network - its blocks (entries scaled by the slowdown, "
        "plus the memory term); terms fitted on reference networks",
        identity_ms=value,
        identity_median_ms=pooled.median_ms,
        identity_entries_ms=(1 + slowdown) * s_i.entries + beta * s_i.weights / 1e6 + s_i.fixed,
        identity_runs=pooled.runs,
        identity_spread_runs=len(samples_ms),
    )
    return out


def apply_terms(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> list[dict]:
    """The rows of a finished table with the fitted terms applied: ``latency_ms`` =
    (1 + ``slowdown``) x ``entry_ms`` + ``beta`` x weights / 1e6 for every row that
    runs a conv, the same for ``latency_noact_ms`` (measured value kept in
    ``entry_noact_ms``). Rows that run no conv are kept as measured."""
    slowdown = float(meta.get("slowdown") or 0.0)
    beta = float(meta.get("memory_ms_per_mweight") or 0.0)
    out = []
    for r in rows:
        r = dict(r)
        if r["kept_convs"]:
            extra = beta * float(r.get("weights") or 0) / 1e6
            if r.get("entry_ms") is not None:
                r["latency_ms"] = (1 + slowdown) * float(r["entry_ms"]) + extra
            noact = r.get("entry_noact_ms")
            if noact is None:  # a table read back has the column, empty until now
                noact = r.get("latency_noact_ms")
            if noact is not None:
                r["entry_noact_ms"] = float(noact)
                r["latency_noact_ms"] = (1 + slowdown) * float(noact) + extra
        out.append(r)
    return out
