"""The discretised DP (opt-in ``precision``): latencies rounded up to units of
``1/precision`` ms, ``D[e][t]`` over nodes and units."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..plan import Plan
from ..tables import (
    TableError,
)
from .problem import (
    MAX_DP_CELLS,
    Frontier,
    InfeasibleBudgetError,
    Problem,
    Solution,
    _plan,
    budget_to_units,
)


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


def _solve_discrete(problem: Problem, budget_ms: float) -> Solution:
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
        _read_plan=_plan_reader(problem, D, ptr, T, budget_ms),
    )


def _plan_reader(problem: Problem, D: np.ndarray, ptr: np.ndarray, T: int, solved_ms: float):
    def read(budget_ms: float) -> Plan:
        assert problem.precision is not None
        t = budget_to_units(budget_ms - problem.constant_ms, problem.precision)
        if t > T:
            raise ValueError(
                f"this solution covers budgets up to {solved_ms} ms; solve again for {budget_ms} ms"
            )
        if t < 0 or not np.isfinite(D[-1, min(t, D.shape[1] - 1)]):
            raise _infeasible(problem, _bounds(problem), budget_ms)
        return _make_plan(problem, D, ptr, budget_ms)

    return read
