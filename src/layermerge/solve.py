"""The LayerMerge dynamic program and its two baselines.

All three methods reduce to one problem on the chain ``0..L``: choose a
partition into spans, one *choice* per span, maximising the sum of the
choices' scores subject to the sum of their latencies (plus the constant part
of the network) staying within a budget. They differ only in the choices:

- ``layermerge``: every option of every valid block (merge + prune).
- ``kim23``: activation removal only (Kim et al. 2023). A span's one choice
  keeps all its convs; its latency is the cheapest way to realise the
  activation-free span as consecutive merged convs (a second DP level).
- ``layerprune``: every activation stays; conv ``i`` is kept (latency of the
  single-conv block) or, when it has a per-conv importance, dropped (free).

Two solvers:

- exact (the default, ``precision=None``): a dynamic program over Pareto
  frontiers. ``F[e]`` holds every partial plan of ``0..e`` that no other
  partial plan beats on both latency and score, as (latency, score) pairs over
  the table's real-valued latencies; ``F[0] = {(0, 0)}`` and ``F[e]`` is the
  non-dominated part of ``F[s_k] + (T_k, I_k)`` over the choices ``k`` ending at
  ``e``. Partial plans that cannot reach ``L`` within the budget (their latency
  plus the fastest way on from ``e``) are dropped. ``F[L]`` is the whole
  score/latency trade-off curve up to the budget, exact at every breakpoint,
  and the plan returned is the true optimum: its latency, summed in plan order
  and added to the constant part, is compared with the budget as it is reported.
- discretised (opt-in, ``precision=P``): latencies are rounded *up* to integer
  units of ``1/P`` ms so that a plan that fits the discretised budget also fits
  the real one (to a relative 1e-9: float noise is not rounded up). The DP table ``D[e][t]`` holds the best score of a partition of
  ``0..e`` whose units are at most ``t``; ``D[0][t] = 0`` and
  ``D[e][t] = max_k D[s_k][t - g_k] + I_k``. Rounding up costs objective: each
  block can lose up to one unit of the budget, so the plan can fall short of
  the optimum, and a budget that the fastest plan meets can be reported as
  infeasible when that plan's rounded latency exceeds it.

Tie-breaking (deterministic): among plans whose score is within a tiny
tolerance of the best, the one with the lowest latency (the fewest units when
discretised) is returned. Exact ties at one state keep the choice seen first,
in the order (end, start, kernel, stride, depthwise): the longest last block,
then the smallest merged kernel.

This module needs only numpy.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from layermerge.plan import Plan, PlanBlock
from layermerge.tables import (
    KEPT_COLUMN,
    LATENCY_SETTINGS,
    Table,
    TableError,
    check_same_model,
    format_key,
    join_tables,
)

METHODS = ("layermerge", "kim23", "layerprune")
SCORE_MODES = ("exp", "additive")
# A typical precision for an explicit discretised solve (units of 0.01 ms). The
# solver itself is exact unless a precision is given.
DEFAULT_PRECISION = 100.0
# Relative float-noise guard when converting ms to units: 1.1 * 100 is
# 110.00000000000001, which must round up to 110 units, not 111, and a budget of
# 0.29 * 100 = 28.999999999999996 is 29 units. A plan within the discretised budget
# can then exceed the real one by at most this fraction (twice), never more.
_UNIT_RTOL = 1e-9
# Refuse DP tables larger than this many cells (about 1.2 GB with back-pointers).
MAX_DP_CELLS = 100_000_000
# Refuse an exact solve whose candidate partial plans at one node exceed this
# (the frontiers of real search spaces hold hundreds of points).
MAX_FRONTIER_CANDIDATES = 20_000_000


class InfeasibleBudgetError(ValueError):
    """No plan fits the budget; carries the smallest budget that would."""

    def __init__(
        self,
        method: str,
        budget_ms: float,
        min_feasible_ms: float,
        fastest_ms: float,
        precision: float | None,
    ) -> None:
        self.method = method
        self.budget_ms = budget_ms
        self.min_feasible_ms = min_feasible_ms
        self.fastest_ms = fastest_ms
        self.precision = precision
        if precision is None:
            message = (
                f"no {method} plan fits a latency budget of {budget_ms:.6g} ms: the fastest "
                f"plan takes {fastest_ms:.6g} ms; raise the budget"
            )
        else:
            message = (
                f"no {method} plan fits a latency budget of {budget_ms:.4f} ms: the smallest "
                f"feasible budget is {min_feasible_ms:.4f} ms (the fastest plan takes "
                f"{fastest_ms:.4f} ms before rounding latencies up to 1/{precision:g} ms); "
                "raise the budget, or solve exactly (no precision)"
            )
        super().__init__(message)


def to_units(latency_ms: np.ndarray | float, precision: float) -> np.ndarray:
    """Latencies in integer units of ``1/precision`` ms, rounded up."""
    x = np.asarray(latency_ms, dtype=np.float64) * precision
    return np.maximum(np.ceil(x * (1 - _UNIT_RTOL)), 0).astype(np.int64)


def budget_to_units(chain_budget_ms: float, precision: float) -> int:
    """A budget in units, rounded down (so plans within it fit the real budget)."""
    return math.floor(chain_budget_ms * precision * (1 + _UNIT_RTOL))


def option_scores(table: Table, score: str = "exp") -> np.ndarray:
    """Per-row scores of an importance (or per-conv importance) table.

    ``exp``: the table's ``importance`` column, the paper's normalised importance
    (``exp(delta_acc/100)``, or ``exp(-val_loss_ratio)`` for diffusion).
    ``additive``: the raw additive value, ``delta_acc`` when present, else
    ``-val_loss_ratio``; sums of it are comparable to sums of accuracy changes,
    and unlike the exp score it does not reward plans for having more blocks.
    """
    if score == "exp":
        return table.column("importance")
    if score == "additive":
        if table.has_column("delta_acc"):
            return table.column("delta_acc")
        if table.has_column("val_loss_ratio"):
            return -table.column("val_loss_ratio")
        raise TableError(
            f"{table.name}: the additive score needs a 'delta_acc' (classification) or "
            f"'val_loss_ratio' (diffusion) column, and this table has only "
            f"{', '.join(table.columns)}; use --score exp or rebuild the table with raw values"
        )
    raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORE_MODES)}")


def _all_kept(row: dict[str, Any]) -> bool:
    return row[KEPT_COLUMN] == tuple(range(row["start"] + 1, row["end"] + 1))


def _block(row: dict[str, Any], activation: bool = True) -> PlanBlock:
    return PlanBlock(
        start=row["start"],
        end=row["end"],
        kernel=row["kernel"],
        stride=row["stride"],
        depthwise=row["depthwise"],
        kept_convs=row[KEPT_COLUMN],
        activation=activation,
    )


def _single_conv_rows(latency: Table, purpose: str) -> list[dict[str, Any]]:
    """The option of each block ``(i-1, i)`` that keeps conv ``i``."""
    found: dict[int, dict[str, Any]] = {}
    for r in latency.rows:
        if r["end"] == r["start"] + 1 and r[KEPT_COLUMN] == (r["end"],):
            found[r["end"]] = r
    missing = [i for i in range(1, latency.chain_length + 1) if i not in found]
    if missing:
        shown = ", ".join(f"({i - 1}, {i})" for i in missing[:5])
        raise TableError(
            f"{latency.name}: no option keeping the conv of single-conv block(s) {shown}"
            f"{' and more' if len(missing) > 5 else ''}; {purpose} needs them: measure "
            "every block of the options table"
        )
    return [found[i] for i in range(1, latency.chain_length + 1)]


def base_latency_ms(latency: Table) -> float:
    """Latency of the unmodified network: every conv and activation kept, plus the constant."""
    rows = _single_conv_rows(latency, "the unmodified network's latency")
    return latency.constant_ms + float(sum(r["latency_ms"] for r in rows))


def resolve_budget(
    base_ms: float,
    *,
    budget_ms: float | None = None,
    budget_frac: float | None = None,
    speedup: float | None = None,
) -> float:
    """The budget in ms from exactly one of: ms, a fraction of ``base_ms``, a speed-up."""
    given = [
        (n, v)
        for n, v in (("budget_ms", budget_ms), ("budget_frac", budget_frac), ("speedup", speedup))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError("give exactly one of budget_ms, budget_frac and speedup")
    name, value = given[0]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value}")
    if name == "budget_ms":
        return float(value)
    if name == "budget_frac":
        return base_ms * value
    return base_ms / value


# ---------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class Problem:
    """Choices of one method over a chain, ready for the DP.

    Choice ``k`` covers span ``(start[k], end[k]]``, costs ``latency_ms[k]``
    (``units[k]`` after rounding up, for a discretised problem) and scores
    ``score[k]``; applying it puts ``blocks[k]`` into the plan (several blocks
    for a kim23 span realised as consecutive merged convs). ``precision`` is
    ``None`` for an exact problem, which has no ``units``.
    """

    method: str
    model_fingerprint: str
    chain_length: int
    constant_ms: float
    base_latency_ms: float
    precision: float | None
    score_mode: str
    start: np.ndarray
    end: np.ndarray
    units: np.ndarray | None
    latency_ms: np.ndarray
    score: np.ndarray
    blocks: tuple[tuple[PlanBlock, ...], ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_choices(self) -> int:
        return len(self.blocks)

    @property
    def exact(self) -> bool:
        """Solved over real-valued latencies (no precision)."""
        return self.precision is None


def _check_precision(precision: float | None) -> None:
    if precision is not None and not (
        isinstance(precision, int | float) and math.isfinite(precision) and precision > 0
    ):
        raise ValueError(
            f"precision must be a positive number of units per ms (or None for an exact "
            f"solve), got {precision}"
        )


def _units(latency_ms: np.ndarray | float, precision: float | None) -> np.ndarray:
    """Rounded-up units, or zeros for an exact problem (units then play no part)."""
    if precision is None:
        return np.zeros(np.shape(latency_ms), dtype=np.int64)
    return to_units(latency_ms, precision)


def _problem(
    method: str,
    latency: Table,
    precision: float | None,
    score_mode: str,
    choices: Sequence[tuple[tuple[PlanBlock, ...], int, float, float]],
) -> Problem:
    """``choices``: (blocks, units, latency_ms, score), in any order."""
    _check_precision(precision)
    # The DP's tie rule relies on this order: by end, then longest span first.
    order = sorted(
        range(len(choices)),
        key=lambda i: (
            choices[i][0][-1].end,
            choices[i][0][0].start,
            [b.key for b in choices[i][0]],
            [b.kept_convs for b in choices[i][0]],
        ),
    )
    ch = [choices[i] for i in order]
    return Problem(
        method=method,
        model_fingerprint=latency.model_fingerprint,
        chain_length=latency.chain_length,
        constant_ms=latency.constant_ms,
        base_latency_ms=base_latency_ms(latency),
        precision=None if precision is None else float(precision),
        score_mode=score_mode,
        start=np.array([c[0][0].start for c in ch], dtype=np.int64),
        end=np.array([c[0][-1].end for c in ch], dtype=np.int64),
        units=None if precision is None else np.array([c[1] for c in ch], dtype=np.int64),
        latency_ms=np.array([c[2] for c in ch], dtype=np.float64),
        score=np.array([c[3] for c in ch], dtype=np.float64),
        blocks=tuple(c[0] for c in ch),
        meta={k: latency.meta[k] for k in LATENCY_SETTINGS if k in latency.meta},
    )


def layermerge_problem(
    latency: Table,
    importance: Table,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """Every option of every block is a choice (keeping the importance table's convs)."""
    _check_precision(precision)
    lat, imp = join_tables(latency, importance)
    scores = option_scores(imp, score)
    units = _units(lat.column("latency_ms"), precision)
    choices = [
        ((_block(r),), int(u), r["latency_ms"], float(sc))
        for r, u, sc in zip(lat.rows, units, scores)
    ]
    return _problem("layermerge", lat, precision, score, choices)


def kim23_problem(
    latency: Table,
    importance: Table,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """Activation removal only: all-kept options, spans realised at their cheapest.

    A span ``(s, e)`` with an all-kept option is one choice scored by that
    option's importance. With its inner activations gone it may run as one
    merged conv or as several consecutive merged convs (sub-blocks that are
    themselves blocks with an all-kept option): its cost is
    ``T_opt(s, e) = min(T(s, e), min_m T_opt(s, m) + T_opt(m, e))``, in ms for an
    exact problem; a discretised one takes it in units (the budget is in units),
    then in ms.
    """
    _check_precision(precision)
    lat, imp = join_tables(latency, importance)
    scores = option_scores(imp, score)
    units = _units(lat.column("latency_ms"), precision)
    by_span: dict[tuple[int, int], int] = {}
    for i, r in enumerate(lat.rows):
        if _all_kept(r):
            span = (r["start"], r["end"])
            if span in by_span:
                raise TableError(
                    f"{lat.name}: block {span} has two options keeping all its convs, "
                    f"{format_key(lat.key_of(lat.rows[by_span[span]]))} and "
                    f"{format_key(lat.key_of(r))}; the options table is inconsistent"
                )
            by_span[span] = i
    ends_at: dict[int, list[int]] = {}
    for s, e in by_span:
        ends_at.setdefault(e, []).append(s)
    L = lat.chain_length
    choices = []
    for s0 in sorted({s for s, _ in by_span}):
        # Cheapest activation-free realisation of (s0, e] for every e: a shortest
        # path from s0 over all-kept blocks, cost (units, ms) compared in that order.
        best: dict[int, tuple[int, float, int]] = {s0: (0, 0.0, -1)}
        for e in range(s0 + 1, L + 1):
            for m in sorted(ends_at.get(e, ())):
                if m < s0 or m not in best:
                    continue
                i = by_span[(m, e)]
                cand = (best[m][0] + int(units[i]), best[m][1] + lat.rows[i]["latency_ms"], m)
                if e not in best or cand[:2] < best[e][:2]:
                    best[e] = cand
        for e in range(s0 + 1, L + 1):
            if (s0, e) not in by_span:
                continue
            parts = []
            node = e
            while node != s0:
                m = best[node][2]
                parts.append((m, node))
                node = m
            parts.reverse()
            blocks = tuple(
                _block(lat.rows[by_span[p]], activation=j == len(parts) - 1)
                for j, p in enumerate(parts)
            )
            choices.append((blocks, best[e][0], best[e][1], float(scores[by_span[(s0, e)]])))
    return _problem("kim23", lat, precision, score, choices)


def layerprune_problem(
    latency: Table,
    conv_importance: Table,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """Layer pruning only: keep each conv (its single-conv latency) or drop it (free).

    Convs without a row in ``conv_importance`` are irreducible and always kept.
    A kept conv scores 1 (exp) or 0 (additive), the values of an unchanged network;
    a dropped conv scores its per-conv importance.
    """
    if latency.kind != "latency":
        raise TableError(f"{latency.name} is a {latency.kind} table, not a latency table")
    if conv_importance.kind != "conv_importance":
        raise TableError(
            f"{conv_importance.name} is a {conv_importance.kind} table, not a per-conv "
            "importance (conv_importance) table"
        )
    check_same_model(latency, conv_importance)
    _check_precision(precision)
    keep_score = 1.0 if score == "exp" else 0.0
    drop_score = dict(zip(conv_importance.keys(), option_scores(conv_importance, score)))
    choices = []
    for r in _single_conv_rows(latency, "layer pruning"):
        i = r["end"]
        choices.append(
            ((_block(r),), int(_units(r["latency_ms"], precision)), r["latency_ms"], keep_score)
        )
        if i in drop_score:
            dropped = PlanBlock(i - 1, i, kernel=1, stride=1, depthwise=False, kept_convs=())
            choices.append(((dropped,), 0, 0.0, float(drop_score[i])))
    return _problem("layerprune", latency, precision, score, choices)


def build_problem(
    method: str,
    latency: Table,
    importance: Table | None = None,
    conv_importance: Table | None = None,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """The problem of ``method`` from its tables (see the three functions above).

    ``precision=None`` (the default) makes an exact problem; a number of units per
    ms makes a discretised one (faster to state, coarser: see the module docs)."""
    if score not in SCORE_MODES:
        raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORE_MODES)}")
    if method == "layerprune":
        if conv_importance is None:
            raise TableError("the layerprune method needs a per-conv importance table")
        if importance is not None:
            check_same_model(latency, importance)
        return layerprune_problem(latency, conv_importance, score=score, precision=precision)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if importance is None:
        raise TableError(f"the {method} method needs an importance table")
    make = layermerge_problem if method == "layermerge" else kim23_problem
    return make(latency, importance, score=score, precision=precision)


# ---------------------------------------------------------------------------
# the dynamic program


def _infeasible(problem: Problem, bounds: _Bounds, budget_ms: float) -> InfeasibleBudgetError:
    L = problem.chain_length
    return InfeasibleBudgetError(
        problem.method,
        budget_ms,
        problem.constant_ms + bounds.lo[L] / problem.precision,
        problem.constant_ms + _fastest_ms(problem),
        problem.precision,
    )


@dataclass(frozen=True)
class _Bounds:
    """Per node ``n``: fewest and most units of a partition of ``0..n`` (-1 where
    there is none) and fewest units of one of ``n..L``."""

    lo: list[int]
    hi: list[int]
    to_end: list[int]


def _bounds(problem: Problem) -> _Bounds:
    L = problem.chain_length
    start, end, units = problem.start.tolist(), problem.end.tolist(), problem.units.tolist()
    lo, hi = [-1] * (L + 1), [-1] * (L + 1)
    lo[0] = hi[0] = 0
    for s, e, g in zip(start, end, units):  # ordered by end: node s is final
        if lo[s] >= 0:
            lo[e] = lo[s] + g if lo[e] < 0 else min(lo[e], lo[s] + g)
            hi[e] = max(hi[e], hi[s] + g)
    if lo[L] < 0:
        stuck = max(n for n in range(L + 1) if lo[n] >= 0)
        raise TableError(
            f"the tables hold no partition of the chain 0..{L} for {problem.method}: no "
            f"block leads on from node {stuck}; check that the tables cover every block"
        )
    to_end = [-1] * (L + 1)
    to_end[L] = 0
    for k in sorted(range(len(start)), key=start.__getitem__, reverse=True):
        s, e, g = start[k], end[k], units[k]
        if to_end[e] >= 0:
            to_end[s] = to_end[e] + g if to_end[s] < 0 else min(to_end[s], to_end[e] + g)
    return _Bounds(lo, hi, to_end)


def _fastest_ms(problem: Problem) -> float:
    """Fewest ms of any plan, before rounding to units."""
    fast = [math.inf] * (problem.chain_length + 1)
    fast[0] = 0.0
    for s, e, ms in zip(problem.start.tolist(), problem.end.tolist(), problem.latency_ms.tolist()):
        fast[e] = min(fast[e], fast[s] + ms)
    return fast[-1]


def _dp(problem: Problem, T: int, bounds: _Bounds) -> tuple[np.ndarray, np.ndarray]:
    """``D[e][t]`` and the back-pointers ``ptr[e][t]`` (choice index), for ``t <= T``.

    One shifted, vectorised max per choice: the candidate for every budget ``t``
    at once is ``D[s][t - g] + I``. Choices come ordered by end, so ``D[s]`` is
    final when used. Only states that some plan within ``T`` passes through are
    computed: ``t >= lo[s] + g`` (below, ``D[s]`` is -inf) and
    ``t <= T - to_end[e]`` (above, no plan gets from ``e`` to ``L`` in time).
    The rest of ``D`` stays -inf and is never read when plans are traced back.
    """
    L = problem.chain_length
    D = np.full((L + 1, T + 1), -np.inf)
    D[0] = 0.0
    ptr = np.full((L + 1, T + 1), -1, dtype=np.int32)
    cand = np.empty(T + 1)
    better = np.empty(T + 1, dtype=bool)
    lo, to_end = bounds.lo, bounds.to_end
    for k, (s, e, g, score) in enumerate(
        zip(
            problem.start.tolist(),
            problem.end.tolist(),
            problem.units.tolist(),
            problem.score.tolist(),
        )
    ):
        if lo[s] < 0 or to_end[e] < 0:
            continue
        first, stop = lo[s] + g, T + 1 - to_end[e]
        if first >= stop:
            continue
        c = cand[: stop - first]
        b = better[: stop - first]
        dst = D[e, first:stop]
        np.add(D[s, first - g : stop - g], score, out=c)
        # Strictly greater: on exact ties the earlier choice keeps the state.
        np.greater(c, dst, out=b)
        np.fmax(dst, c, out=dst)
        np.putmask(ptr[e, first:stop], b, k)
    return D, ptr


@dataclass(frozen=True)
class Frontier:
    """The trade-off curve: for each budget, the best score and the predicted latency
    of the plan returned at that budget. An exact solve lists the curve's breakpoints
    (the budgets at which the best score goes up: the latencies of the non-dominated
    plans, constant part included; the curve is flat between them); a discretised
    one lists every latency unit."""

    budget_ms: np.ndarray
    objective: np.ndarray  # -inf where no plan fits
    latency_ms: np.ndarray  # nan where no plan fits
    tolerance: float = 0.0

    def steps(self) -> Frontier:
        """Only the budgets at which the best score goes up (the curve is flat between)."""
        prev = np.concatenate(([-np.inf], self.objective[:-1]))
        keep = np.isfinite(self.objective) & (self.objective - self.tolerance > prev)
        return Frontier(
            self.budget_ms[keep], self.objective[keep], self.latency_ms[keep], self.tolerance
        )

    def write_csv(self, path: str | Path) -> Path:
        """The steps of the curve as CSV: budget_ms, objective, latency_ms."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        st = self.steps()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["budget_ms", "objective", "latency_ms"])
            for b, o, lat in zip(
                st.budget_ms.tolist(), st.objective.tolist(), st.latency_ms.tolist()
            ):
                w.writerow([f"{b:.6f}", repr(o), f"{lat:.6f}"])
        tmp.replace(path)
        return path


@dataclass
class Solution:
    """The result of one solve: the plan at the budget and the curve below it.

    ``budget_units`` is ``None`` for an exact solve. :meth:`plan_at` reads the plan
    for any smaller budget from the same pass.
    """

    problem: Problem
    budget_ms: float
    budget_units: int | None
    objective: float
    predicted_latency_ms: float
    plan: Plan
    frontier: Frontier
    _D: np.ndarray | None = field(default=None, repr=False)
    _ptr: np.ndarray | None = field(default=None, repr=False)
    _pareto: _Pareto | None = field(default=None, repr=False)

    @property
    def exact(self) -> bool:
        return self.problem.exact

    def plan_at(self, budget_ms: float) -> Plan:
        """The plan the solver returns for a budget up to the solved one, from the same
        pass (no new solve)."""
        p = self.problem
        if self._pareto is not None:
            if budget_ms > self.budget_ms:
                raise ValueError(
                    f"this solution covers budgets up to {self.budget_ms} ms; solve again for "
                    f"{budget_ms} ms"
                )
            i = _pick(p, self._pareto, budget_ms)
            return _plan(p, _trace_pareto(p, self._pareto, i), budget_ms)
        assert self._D is not None and self._ptr is not None and p.precision is not None
        t = budget_to_units(budget_ms - p.constant_ms, p.precision)
        if t > self.budget_units:
            raise ValueError(
                f"this solution covers budgets up to {self.budget_ms} ms; solve again for "
                f"{budget_ms} ms"
            )
        if t < 0 or not np.isfinite(self._D[-1, min(t, self._D.shape[1] - 1)]):
            raise _infeasible(p, _bounds(p), budget_ms)
        return _make_plan(p, self._D, self._ptr, budget_ms)


def _tolerance(D_last: np.ndarray) -> float:
    finite = D_last[np.isfinite(D_last)]
    return 1e-9 * max(1.0, float(np.max(np.abs(finite)))) if finite.size else 0.0


def _trace(problem: Problem, ptr: np.ndarray, t: int) -> list[int]:
    """Choice indices of the plan at ``D[L][t]``, first block first."""
    assert problem.units is not None
    e, out = problem.chain_length, []
    while e > 0:
        k = int(ptr[e, t])
        out.append(k)
        t -= int(problem.units[k])
        e = int(problem.start[k])
    return out[::-1]


def _cheapest_equal(D_last: np.ndarray, t: int | np.ndarray, tol: float) -> Any:
    """Smallest budget whose best score is within ``tol`` of the best score at ``t``."""
    return np.searchsorted(D_last, D_last[t] - tol, side="left")


def _plan(problem: Problem, ks: Sequence[int], budget_ms: float) -> Plan:
    """The plan made of choices ``ks`` (first block first), with what the solve predicts.

    The latency is summed in plan order and then added to the constant part: the
    exact solver compares exactly this number with the budget.
    """
    latency = problem.constant_ms + float(sum(problem.latency_ms[k] for k in ks))
    objective = float(sum(problem.score[k] for k in ks))
    if problem.units is None or problem.precision is None:
        budget_units = plan_units = None
    else:
        budget_units = budget_to_units(budget_ms - problem.constant_ms, problem.precision)
        plan_units = int(sum(problem.units[k] for k in ks))
    return Plan(
        model_fingerprint=problem.model_fingerprint,
        chain_length=problem.chain_length,
        blocks=[b for k in ks for b in problem.blocks[k]],
        method=problem.method,
        meta={
            "budget_ms": budget_ms,
            "predicted_latency_ms": latency,
            "base_latency_ms": problem.base_latency_ms,
            "predicted_speedup": problem.base_latency_ms / latency if latency > 0 else None,
            "constant_ms": problem.constant_ms,
            "objective": objective,
            "score": problem.score_mode,
            "solver": "exact" if problem.exact else "discretised",
            "precision": problem.precision,
            "budget_units": budget_units,
            "plan_units": plan_units,
            "latency_settings": problem.meta,
        },
    )


def _make_plan(problem: Problem, D: np.ndarray, ptr: np.ndarray, budget_ms: float) -> Plan:
    """The plan at ``budget_ms`` (within the DP's budgets, or beyond the slowest plan)."""
    assert problem.precision is not None
    units = budget_to_units(budget_ms - problem.constant_ms, problem.precision)
    t0 = int(_cheapest_equal(D[-1], min(units, D.shape[1] - 1), _tolerance(D[-1])))
    return _plan(problem, _trace(problem, ptr, t0), budget_ms)


def _frontier(problem: Problem, D: np.ndarray, ptr: np.ndarray) -> Frontier:
    """Objective and plan latency at every budget.

    Budgets with the same best score share one plan (read back from the cheapest
    of them), so only the distinct plans are traced, all at once, one block per step.
    """
    assert problem.units is not None and problem.precision is not None
    T = D.shape[1] - 1
    D_last = D[-1]
    tol = _tolerance(D_last)
    feasible = np.isfinite(D_last)
    cheapest = _cheapest_equal(D_last, np.arange(T + 1), tol)
    starts, which = np.unique(cheapest[feasible], return_inverse=True)
    lat = np.zeros(len(starts))
    live = np.arange(len(starts))
    e = np.full(len(starts), problem.chain_length)
    t = starts
    while live.size:
        k = ptr[e, t]
        lat[live] += problem.latency_ms[k]
        t = t - problem.units[k]
        e = problem.start[k]
        going = e > 0
        live, t, e = live[going], t[going], e[going]
    latency = np.full(T + 1, np.nan)
    latency[feasible] = problem.constant_ms + lat[which]
    budget = problem.constant_ms + np.arange(T + 1) / problem.precision
    return Frontier(budget, D_last.copy(), latency, tol)


# ---------------------------------------------------------------------------
# the exact solver: Pareto frontiers over real-valued latencies


@dataclass(frozen=True)
class _Pareto:
    """Per node ``n``: the non-dominated partial plans of ``0..n`` that can still
    finish within the budget, by ascending latency (strictly increasing score).

    ``latency[n][i]`` is the plan's chain latency summed in plan order,
    ``choice[n][i]`` its last choice and ``parent[n][i]`` the index of the rest of
    it in the frontier of that choice's start node.
    """

    latency: list[np.ndarray]
    score: list[np.ndarray]
    choice: list[np.ndarray]
    parent: list[np.ndarray]
    fastest_ms: float  # the fastest plan's chain latency (no budget)

    @property
    def size(self) -> int:
        """Points held over all nodes."""
        return sum(len(x) for x in self.latency)


def _reach(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Fewest ms from node 0 to each node (``inf`` where no partition reaches it) and
    from each node on to ``L`` (``inf`` where none finishes)."""
    L = problem.chain_length
    start, end, ms = problem.start.tolist(), problem.end.tolist(), problem.latency_ms.tolist()
    fast = [math.inf] * (L + 1)
    fast[0] = 0.0
    for s, e, m in zip(start, end, ms):  # ordered by end: node s is final
        if fast[s] + m < fast[e]:
            fast[e] = fast[s] + m
    if not math.isfinite(fast[L]):
        stuck = max(n for n in range(L + 1) if math.isfinite(fast[n]))
        raise TableError(
            f"the tables hold no partition of the chain 0..{L} for {problem.method}: no "
            f"block leads on from node {stuck}; check that the tables cover every block"
        )
    to_end = [math.inf] * (L + 1)
    to_end[L] = 0.0
    for k in sorted(range(len(start)), key=start.__getitem__, reverse=True):
        if to_end[end[k]] + ms[k] < to_end[start[k]]:
            to_end[start[k]] = to_end[end[k]] + ms[k]
    return np.array(fast), np.array(to_end)


def _pareto_dp(problem: Problem, chain_budget_ms: float) -> _Pareto:
    """Non-dominated partial plans of every prefix within ``chain_budget_ms``.

    At node ``e`` the candidates are every point of ``F[s_k]`` shifted by choice
    ``k``'s (latency, score), for the choices ``k`` ending at ``e``, cut where the
    fastest way on from ``e`` would break the budget. Sorting them (stably) by
    latency, keeping each one that scores strictly more than every one before it,
    and of equal latencies only the last kept leaves the frontier. Float addition is monotone, so a point
    that dominates another still does after the same choices are added to both:
    dropping dominated points loses no optimum. The budget cut carries a relative
    slack of 1e-9 (sums in another order can differ in the last bits); the plan's
    own latency is checked against the budget exactly when it is picked.
    """
    L = problem.chain_length
    fast, to_end = _reach(problem)
    slack = 1e-9 * max(1.0, abs(chain_budget_ms)) if math.isfinite(chain_budget_ms) else 0.0
    start, end = problem.start, problem.end
    lat, score = problem.latency_ms, problem.score
    empty_f, empty_i = np.empty(0), np.empty(0, dtype=np.int64)
    F_lat: list[np.ndarray] = [empty_f] * (L + 1)
    F_score: list[np.ndarray] = [empty_f] * (L + 1)
    F_choice: list[np.ndarray] = [empty_i] * (L + 1)
    F_parent: list[np.ndarray] = [empty_i] * (L + 1)
    F_lat[0], F_score[0] = np.zeros(1), np.zeros(1)
    F_choice[0] = F_parent[0] = np.full(1, -1, dtype=np.int64)
    bounds = np.searchsorted(end, np.arange(L + 2), side="left").tolist()  # choices by end
    start_of, lat_of, score_of = start.tolist(), lat.tolist(), score.tolist()
    for e in range(1, L + 1):
        cap = chain_budget_ms - float(to_end[e]) + slack
        parts_l, parts_s, ks, ns = [], [], [], []
        for k in range(bounds[e], bounds[e + 1]):
            s = start_of[k]
            fl = F_lat[s]
            if not fl.size:
                continue
            shifted = fl + lat_of[k]
            n = fl.size
            if shifted[-1] > cap:
                n = int(shifted.searchsorted(cap, side="right"))
                if n == 0:
                    continue
                shifted = shifted[:n]
            parts_l.append(shifted)
            parts_s.append(F_score[s][:n] + score_of[k])
            ks.append(k)
            ns.append(n)
        if not parts_l:
            continue
        if len(parts_l) == 1:
            cl, cs = parts_l[0], parts_s[0]
            order = None
        else:
            cl = np.concatenate(parts_l)
            if cl.size > MAX_FRONTIER_CANDIDATES:
                raise ValueError(
                    f"the exact solve would weigh {cl.size:,} partial plans at node {e}; "
                    "give a precision (units per ms) for a discretised solve"
                )
            # Stable: of equal candidates the earlier choice (and parent) stays first.
            order = np.argsort(cl, kind="stable")
            cl, cs = cl[order], np.concatenate(parts_s)[order]
        # Keep each candidate that scores strictly more than every cheaper (or earlier)
        # one, then of equal latencies only the last kept, which scores most.
        keep = np.empty(cs.size, dtype=bool)
        keep[0] = True
        if cs.size > 1:
            np.greater(cs[1:], np.maximum.accumulate(cs)[:-1], out=keep[1:])
        idx = np.flatnonzero(keep)
        if idx.size > 1:
            kl = cl[idx]
            idx = idx[np.append(kl[1:] != kl[:-1], True)]
        F_lat[e], F_score[e] = cl[idx], cs[idx]
        pos = idx if order is None else order[idx]  # position among the candidates
        first = np.cumsum([0, *ns])
        part = np.searchsorted(first, pos, side="right") - 1
        F_choice[e] = np.asarray(ks, dtype=np.int64)[part]
        F_parent[e] = pos - first[part]
    return _Pareto(F_lat, F_score, F_choice, F_parent, float(fast[L]))


def _exact_infeasible(problem: Problem, pareto: _Pareto, budget_ms: float) -> Exception:
    fastest = problem.constant_ms + pareto.fastest_ms
    return InfeasibleBudgetError(problem.method, budget_ms, fastest, fastest, None)


def _final(problem: Problem, pareto: _Pareto, budget_ms: float) -> tuple[np.ndarray, int]:
    """Whole-network latency of the frontier's plans and how many fit ``budget_ms``."""
    total = problem.constant_ms + pareto.latency[-1]
    return total, int(np.searchsorted(total, budget_ms, side="right"))


def _pick(problem: Problem, pareto: _Pareto, budget_ms: float) -> int:
    """Index in ``F[L]`` of the plan returned at ``budget_ms``: the best score among
    the plans within it, the cheapest plan within the tolerance of that score."""
    total, n = _final(problem, pareto, budget_ms)
    if n == 0:
        raise _exact_infeasible(problem, pareto, budget_ms)
    scores = pareto.score[-1]
    tol = _tolerance(scores[:n])
    return int(np.searchsorted(scores[:n], scores[n - 1] - tol, side="left"))


def _trace_pareto(problem: Problem, pareto: _Pareto, i: int) -> list[int]:
    e, out = problem.chain_length, []
    while e > 0:
        k = int(pareto.choice[e][i])
        out.append(k)
        i = int(pareto.parent[e][i])
        e = int(problem.start[k])
    return out[::-1]


def _pareto_frontier(problem: Problem, pareto: _Pareto, budget_ms: float) -> Frontier:
    """The curve at its breakpoints within ``budget_ms``: each point of ``F[L]`` is a
    budget at which the best score goes up; the plan returned there is the cheapest
    one within the tolerance of that score."""
    total, n = _final(problem, pareto, budget_ms)
    scores = pareto.score[-1][:n]
    tol = _tolerance(scores)
    cheapest = np.searchsorted(scores, scores - tol, side="left")
    # Distinct chain latencies can give the same total once the constant is added
    # (the smaller is absorbed): one budget, the better score.
    last = np.append(total[1:n] != total[: n - 1], True) if n else np.zeros(0, dtype=bool)
    return Frontier(total[:n][last], scores[last], total[cheapest][last], tol)


def _solve_exact(problem: Problem, budget_ms: float) -> Solution:
    pareto = _pareto_dp(problem, budget_ms - problem.constant_ms)
    i = _pick(problem, pareto, budget_ms)
    plan = _plan(problem, _trace_pareto(problem, pareto, i), budget_ms)
    return Solution(
        problem=problem,
        budget_ms=budget_ms,
        budget_units=None,
        objective=plan.meta["objective"],
        predicted_latency_ms=plan.meta["predicted_latency_ms"],
        plan=plan,
        frontier=_pareto_frontier(problem, pareto, budget_ms),
        _pareto=pareto,
    )


def solve(problem: Problem, budget_ms: float) -> Solution:
    """Best plan of ``problem`` within ``budget_ms`` (constant part included) and the
    trade-off curve for every budget up to it.

    Exact for a problem built without a precision; for a discretised one, the best
    plan whose rounded-up latency fits the budget in units.
    """
    if not math.isfinite(budget_ms):
        raise ValueError(f"the budget must be a finite number of ms, got {budget_ms}")
    if problem.exact:
        return _solve_exact(problem, budget_ms)
    assert problem.precision is not None
    bounds = _bounds(problem)
    L = problem.chain_length
    T = budget_to_units(budget_ms - problem.constant_ms, problem.precision)
    if T < bounds.lo[L]:
        raise _infeasible(problem, bounds, budget_ms)
    # Beyond the slowest plan's units every budget has the same answer.
    T_dp = min(T, bounds.hi[L])
    cells = (L + 1) * (T_dp + 1)
    if cells > MAX_DP_CELLS:
        raise ValueError(
            f"the DP would need {cells:,} cells ({L + 1} nodes x {T_dp + 1} latency units); "
            "lower the precision (units per ms), or solve exactly (no precision)"
        )
    D, ptr = _dp(problem, T_dp, bounds)
    plan = _make_plan(problem, D, ptr, budget_ms)
    return Solution(
        problem=problem,
        budget_ms=budget_ms,
        budget_units=T,
        objective=plan.meta["objective"],
        predicted_latency_ms=plan.meta["predicted_latency_ms"],
        plan=plan,
        frontier=_frontier(problem, D, ptr),
        _D=D,
        _ptr=ptr,
    )


def solve_tables(
    latency: Table,
    importance: Table | None = None,
    *,
    method: str = "layermerge",
    conv_importance: Table | None = None,
    budget_ms: float | None = None,
    budget_frac: float | None = None,
    speedup: float | None = None,
    score: str = "exp",
    precision: float | None = None,
) -> Solution:
    """Build the problem of ``method`` from tables and solve it at one budget, given in
    ms, as a fraction of the unmodified network's latency, or as a speed-up over it.

    Exact unless ``precision`` (units per ms) asks for a discretised solve."""
    problem = build_problem(
        method, latency, importance, conv_importance, score=score, precision=precision
    )
    budget = resolve_budget(
        problem.base_latency_ms, budget_ms=budget_ms, budget_frac=budget_frac, speedup=speedup
    )
    return solve(problem, budget)


def _reference_dp(problem: Problem, T: int) -> tuple[list[float], dict[tuple[int, int], int]]:
    """The recurrence transcribed directly: per-state Python loops over dictionaries
    keyed by node, budget, block and option, no vectorisation and no pruning.

    Kept as an independent check of :func:`_dp` (same choice order, so the same
    tie-breaking) and as the speed baseline of ``benchmarks/bench_solve.py``.
    Returns ``D[L][0..T]`` and the back-pointers keyed by ``(node, budget)``.
    """
    L = problem.chain_length
    options: dict[tuple[int, int], list[int]] = {}
    units: dict[tuple[int, int, int], int] = {}
    score: dict[tuple[int, int, int], float] = {}
    for k in range(problem.n_choices):
        s, e = int(problem.start[k]), int(problem.end[k])
        options.setdefault((s, e), []).append(k)
        units[(s, e, k)] = int(problem.units[k])
        score[(s, e, k)] = float(problem.score[k])
    D: dict[tuple[int, int], float] = {(0, t): 0.0 for t in range(T + 1)}
    ptr: dict[tuple[int, int], int] = {}
    for e in range(1, L + 1):
        for t in range(T + 1):
            best, arg = -math.inf, -1
            for s in range(e):
                for k in options.get((s, e), ()):
                    g = units[(s, e, k)]
                    if g <= t and (s, t - g) in D:
                        value = D[(s, t - g)] + score[(s, e, k)]
                        if value > best:
                            best, arg = value, k
            if arg >= 0:
                D[(e, t)] = best
                ptr[(e, t)] = arg
    return [D.get((L, t), -math.inf) for t in range(T + 1)], ptr
