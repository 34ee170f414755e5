"""The exact solver: a DP over Pareto frontiers of (latency, score) pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..plan import Plan
from ..tables import (
    TableError,
)
from .discrete import _tolerance
from .problem import (
    MAX_FRONTIER_CANDIDATES,
    Frontier,
    InfeasibleBudgetError,
    Problem,
    Solution,
    _plan,
)


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
        _read_plan=_plan_reader(problem, pareto, budget_ms),
        frontier_points=pareto.size,
    )


def _plan_reader(problem: Problem, pareto: _Pareto, solved_ms: float):
    def read(budget_ms: float) -> Plan:
        if budget_ms > solved_ms:
            raise ValueError(
                f"this solution covers budgets up to {solved_ms} ms; solve again for {budget_ms} ms"
            )
        i = _pick(problem, pareto, budget_ms)
        return _plan(problem, _trace_pareto(problem, pareto, i), budget_ms)

    return read
