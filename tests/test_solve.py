"""The discretised DP and the baselines against brute-force enumeration, plus error paths
and fixed examples (exact by default; tests/test_solve_exact.py checks the exact solver)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layermerge.costs import block_latency_ms
from layermerge.plan import Plan, PlanBlock
from layermerge.solve import (
    MAX_DP_CELLS,
    InfeasibleBudgetError,
    base_latency_ms,
    budget_to_units,
    build_problem,
    option_scores,
    resolve_budget,
    solve,
    solve_tables,
    to_units,
)
from layermerge.solve import _reference_dp as reference_dp
from layermerge.tables import TableError, make_table

KEYS = ("start", "end", "kernel", "stride", "depthwise")
TOL = 1e-9


# ---------------------------------------------------------------------------
# random search spaces


@st.composite
def spaces(draw, max_len=6):
    """Random chains: every single-conv block (with its all-kept option), a random set of
    longer blocks with 1-3 options each, random latencies, scores and constant part."""
    L = draw(st.integers(1, max_len))
    longer = [(s, e) for s in range(L) for e in range(s + 2, L + 1)]
    spans = [(i - 1, i) for i in range(1, L + 1)]
    spans += [sp for sp in longer if draw(st.booleans())]
    latency = st.one_of(
        st.integers(0, 300).map(lambda x: x / 100),  # on the unit grid: exact boundaries
        st.floats(0.0, 3.0, allow_nan=False, allow_infinity=False),
    )
    lat_rows, imp_rows = [], []
    for s, e in spans:
        convs = list(range(s + 1, e + 1))
        kernels = draw(
            st.lists(st.sampled_from([1, 3, 5, 7, 9]), min_size=1, max_size=3, unique=True)
        )
        for j, k in enumerate(kernels):
            if j == 0 and (e - s == 1 or draw(st.booleans())):
                kept = tuple(convs)
            else:  # at most one option of a block keeps all its convs
                dropped = draw(st.sampled_from(convs))
                kept = tuple(c for c in convs if c != dropped and draw(st.booleans()))
            delta = draw(st.floats(-20.0, 5.0, allow_nan=False))
            key = dict(start=s, end=e, kernel=k, stride=1, depthwise=False, kept_convs=kept)
            lat_rows.append(key | {"latency_ms": draw(latency)})
            imp_rows.append(key | {"importance": math.exp(delta / 100), "delta_acc": delta})
    conv_rows = [
        {"conv": c, "importance": math.exp(d / 100), "delta_acc": d}
        for c in range(1, L + 1)
        if draw(st.booleans())
        for d in [draw(st.floats(-20.0, 5.0, allow_nan=False))]
    ]
    meta = {
        "model_fingerprint": "fp",
        "chain_length": L,
        "constant_ms": draw(st.sampled_from([0.0, 0.5, 1.37])),
    }
    return (
        make_table("latency", lat_rows, meta),
        make_table("importance", imp_rows, meta),
        make_table("conv_importance", conv_rows, meta, columns=("conv", "importance", "delta_acc")),
    )


def key_of(b):
    return (b.start, b.end, b.kernel, b.stride, b.depthwise)


def options_by_start(lat, imp, score, predicate=lambda row: True):
    """start -> [(end, key, kept, latency_ms, score)] for rows passing ``predicate``."""
    scores = dict(zip(imp.keys(), option_scores(imp, score)))
    out = {}
    for r in lat.rows:
        if predicate(r):
            k = lat.key_of(r)
            out.setdefault(r["start"], []).append(
                (r["end"], k, r["kept_convs"], r["latency_ms"], scores[k])
            )
    return out


def partitions(pos, L, by_start):
    """Every sequence of (option) tuples partitioning pos..L."""
    if pos == L:
        yield ()
        return
    for opt in by_start.get(pos, ()):
        for rest in partitions(opt[0], L, by_start):
            yield (opt, *rest)


def brute_layermerge(lat, imp, score, precision):
    """All plans as (units, latency_ms, score)."""
    by_start = options_by_start(lat, imp, score)
    return [
        (sum(int(to_units(o[3], precision)) for o in p), sum(o[3] for o in p), sum(o[4] for o in p))
        for p in partitions(0, lat.chain_length, by_start)
    ]


def all_kept(r):
    return r["kept_convs"] == tuple(range(r["start"] + 1, r["end"] + 1))


def brute_kim23(lat, imp, score, precision):
    """Spans with an all-kept option, each realised by every partition into all-kept blocks."""
    by_start = options_by_start(lat, imp, score, all_kept)
    L = lat.chain_length
    plans = []
    for spans in partitions(0, L, by_start):
        realisations = [list(partitions_between(sp, by_start)) for sp in spans]
        for real in itertools.product(*realisations):
            blocks = [b for part in real for b in part]
            plans.append(
                (
                    sum(int(to_units(b[3], precision)) for b in blocks),
                    sum(b[3] for b in blocks),
                    sum(sp[4] for sp in spans),
                )
            )
    return plans


def partitions_between(span, by_start):
    """Partitions of one span's nodes into blocks (of ``by_start``) inside it."""
    start, end = span[1][0], span[0]
    inside = {s: [o for o in opts if o[0] <= end] for s, opts in by_start.items() if s >= start}
    return partitions(start, end, inside)


def drop_cost(lat, i):
    """What a dropped conv costs, as the latency prediction prices it (its empty
    option's row, else the table's dropped_ms, else nothing)."""
    dropped = PlanBlock(i - 1, i, kernel=1, stride=1, depthwise=False, kept_convs=())
    return block_latency_ms(lat, dropped, missing_dropped_ms=0.0)


def brute_layerprune(lat, conv_imp, score, precision):
    keep_score = 1.0 if score == "exp" else 0.0
    drop = dict(zip(conv_imp.keys(), option_scores(conv_imp, score)))
    single = {
        r["end"]: r["latency_ms"]
        for r in lat.rows
        if r["end"] == r["start"] + 1 and r["kept_convs"] == (r["end"],)
    }
    plans = []
    for dropped in itertools.product(
        *[[False, True] if i in drop else [False] for i in range(1, lat.chain_length + 1)]
    ):
        kept = [i for i, d in zip(range(1, lat.chain_length + 1), dropped) if not d]
        gone = [i for i in range(1, lat.chain_length + 1) if i not in kept]
        plans.append(
            (
                sum(int(to_units(single[i], precision)) for i in kept)
                + sum(int(to_units(drop_cost(lat, i), precision)) for i in gone),
                sum(single[i] for i in kept) + sum(drop_cost(lat, i) for i in gone),
                sum(keep_score if i in kept else drop[i] for i in range(1, lat.chain_length + 1)),
            )
        )
    return plans


BRUTE = {"layermerge": brute_layermerge, "kim23": brute_kim23, "layerprune": brute_layerprune}


def solve_method(method, lat, imp, conv, budget_ms, score, precision):
    problem = build_problem(method, lat, imp, conv, score=score, precision=precision)
    return solve(problem, budget_ms)


def check_plan_uses_table_options(method, plan, lat, imp, score, precision):
    """The plan's blocks exist in the tables (as the method allows) and its recorded
    objective and latency are the sums the method defines."""
    rows = {lat.key_of(r): r for r in lat.rows}
    scores = dict(zip(imp.keys(), option_scores(imp, score)))
    units = 0
    for b in plan.blocks:
        if method == "layerprune" and b.kept_convs == ():
            assert (b.kernel, b.stride, b.depthwise, b.end - b.start) == (1, 1, False, 1)
            units += int(to_units(drop_cost(lat, b.end), precision))
            continue
        r = rows[key_of(b)]
        assert r["kept_convs"] == b.kept_convs
        units += int(to_units(r["latency_ms"], precision))
        if method != "layermerge":
            assert all_kept(r)
    latency = lat.constant_ms + sum(
        rows[key_of(b)]["latency_ms"]
        if b.kept_convs or method != "layerprune"
        else drop_cost(lat, b.end)
        for b in plan.blocks
    )
    assert plan.meta["predicted_latency_ms"] == pytest.approx(latency, abs=1e-9)
    assert plan.meta["plan_units"] == units
    if method == "layermerge":
        assert all(b.activation for b in plan.blocks)
        assert plan.meta["objective"] == pytest.approx(
            sum(scores[key_of(b)] for b in plan.blocks), abs=TOL
        )
    if method == "kim23":
        assert plan.blocks[-1].activation
        span_start, objective = 0, 0.0
        for b in plan.blocks:
            if b.activation:  # a span ends here; its all-kept option gives its score
                span = [
                    k
                    for k in scores
                    if k[:2] == (span_start, b.end)
                    and rows[k]["kept_convs"] == tuple(range(span_start + 1, b.end + 1))
                ]
                assert len(span) == 1
                objective += scores[span[0]]
                span_start = b.end
        assert plan.meta["objective"] == pytest.approx(objective, abs=TOL)
    if method == "layerprune":
        assert all(b.activation and b.end == b.start + 1 for b in plan.blocks)
    return units


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    space=spaces(),
    method=st.sampled_from(["layermerge", "kim23", "layerprune"]),
    frac=st.floats(0.0, 1.2),
    score=st.sampled_from(["exp", "additive"]),
    precision=st.sampled_from([10, 100]),
)
def test_matches_brute_force(space, method, frac, score, precision):
    lat, imp, conv = space
    plans = BRUTE[method](lat, conv if method == "layerprune" else imp, score, precision)
    slowest = max(p[1] for p in plans)
    budget = lat.constant_ms + frac * slowest
    T = budget_to_units(budget - lat.constant_ms, precision)
    fitting = [p for p in plans if p[0] <= T]
    if not fitting:
        with pytest.raises(InfeasibleBudgetError) as err:
            solve_method(method, lat, imp, conv, budget, score, precision)
        fewest = min(p[0] for p in plans)
        assert err.value.min_feasible_ms == pytest.approx(lat.constant_ms + fewest / precision)
        assert err.value.fastest_ms == pytest.approx(lat.constant_ms + min(p[1] for p in plans))
        assert f"{lat.constant_ms + fewest / precision:.4f} ms" in str(err.value)
        return
    sol = solve_method(method, lat, imp, conv, budget, score, precision)
    best = max(p[2] for p in fitting)
    assert sol.objective == pytest.approx(best, abs=1e-7)
    plan = sol.plan
    assert isinstance(plan, Plan) and plan.method == method
    assert plan.model_fingerprint == "fp" and plan.chain_length == lat.chain_length
    units = check_plan_uses_table_options(method, plan, lat, imp, score, precision)
    assert units <= T
    assert sol.predicted_latency_ms - lat.constant_ms <= (budget - lat.constant_ms) * (1 + 3e-9)
    # tie-breaking: the solver treats scores within 1e-9 (relative) as equal and returns
    # the plan with the fewest units among them, so every plan with fewer units scores less
    assert sol.objective >= best - 1e-9 * max(1.0, abs(best)) - 1e-12
    assert all(p[2] < best - 1e-10 for p in plans if p[0] < units)

    # the curve: best objective at every budget up to this one
    f = sol.frontier
    for t in range(0, len(f.objective), max(1, len(f.objective) // 15)):
        below = [p[2] for p in plans if p[0] <= t]
        if below:
            assert f.objective[t] == pytest.approx(max(below), abs=1e-7)
            assert f.latency_ms[t] - lat.constant_ms <= t / precision * (1 + 3e-9)
            assert f.budget_ms[t] == pytest.approx(lat.constant_ms + t / precision)
        else:
            assert f.objective[t] == -np.inf and np.isnan(f.latency_ms[t])


@settings(max_examples=100, deadline=None)
@given(space=spaces(), precision=st.sampled_from([10, 100]))
def test_kim23_span_cost_is_its_cheapest_realisation(space, precision):
    """Second DP level: each span costs the fewest units over all ways to run it as
    consecutive all-kept blocks, and only its last block keeps an activation."""
    lat, imp, _ = space
    problem = build_problem("kim23", lat, imp, precision=precision)
    by_start = options_by_start(lat, imp, "exp", all_kept)
    spans = {(o[1][0], o[0]): o for opts in by_start.values() for o in opts}
    assert sorted(zip(problem.start.tolist(), problem.end.tolist())) == sorted(spans)
    for k, blocks in enumerate(problem.blocks):
        span = spans[(blocks[0].start, blocks[-1].end)]
        costs = [
            sum(int(to_units(b[3], precision)) for b in part)
            for part in partitions_between(span, by_start)
        ]
        assert problem.units[k] == min(costs)
        assert problem.units[k] == sum(
            int(to_units(lat.row(key_of(b))["latency_ms"], precision)) for b in blocks
        )
        assert problem.score[k] == span[4]
        assert [b.activation for b in blocks] == [False] * (len(blocks) - 1) + [True]
        assert all(all_kept(lat.row(key_of(b))) for b in blocks)


@settings(max_examples=60, deadline=None)
@given(space=spaces(), method=st.sampled_from(["layermerge", "kim23", "layerprune"]))
def test_dict_reference_gives_the_same_curve(space, method):
    lat, imp, conv = space
    problem = build_problem(method, lat, imp, conv, precision=100)
    T = int(problem.units.sum())
    sol = solve(problem, problem.constant_ms + T / problem.precision)
    ref, _ = reference_dp(problem, T)
    ours = sol.frontier.objective
    n = len(ours)  # the DP stops at the slowest plan's units; beyond, the curve is flat
    assert np.allclose(ours, ref[:n], atol=1e-9, rtol=0) or np.array_equal(ours, ref[:n])
    assert np.all(np.asarray(ref[n:]) == ref[n - 1])


@settings(max_examples=40, deadline=None)
@given(space=spaces(), frac=st.floats(0.2, 1.0))
def test_plan_at_matches_the_curve(space, frac):
    lat, imp, _ = space
    problem = build_problem("layermerge", lat, imp, precision=100)
    top = problem.constant_ms + (problem.units.sum() + 1) / 100
    sol = solve(problem, top)
    budget = lat.constant_ms + frac * (top - lat.constant_ms)
    t = min(budget_to_units(budget - lat.constant_ms, 100), len(sol.frontier.objective) - 1)
    if not np.isfinite(sol.frontier.objective[t]):
        with pytest.raises(InfeasibleBudgetError):
            sol.plan_at(budget)
        return
    plan = sol.plan_at(budget)
    assert plan.blocks == solve(problem, budget).plan.blocks
    assert plan.meta["objective"] == pytest.approx(sol.frontier.objective[t], abs=1e-7)
    assert plan.meta["predicted_latency_ms"] == pytest.approx(sol.frontier.latency_ms[t])


# ---------------------------------------------------------------------------
# fixed examples

META = {"model_fingerprint": "fp", "chain_length": 3, "constant_ms": 1.0}


def row(s, e, k, kept, **values):
    return dict(start=s, end=e, kernel=k, stride=1, depthwise=False, kept_convs=kept, **values)


def small_tables(importance=None, meta=META):
    """Chain of 3 convs: singles at 1 ms, merges and prunes cheaper."""
    spec = [
        (0, 1, 3, (1,), 1.0),
        (1, 2, 3, (2,), 1.0),
        (2, 3, 3, (3,), 1.0),
        (0, 2, 5, (1, 2), 1.5),
        (0, 2, 3, (2,), 0.9),
        (1, 3, 5, (2, 3), 1.2),
        (0, 3, 7, (1, 2, 3), 2.5),
    ]
    lat = [row(s, e, k, kept, latency_ms=ms) for s, e, k, kept, ms in spec]
    imp = [
        row(
            s,
            e,
            k,
            kept,
            importance=importance if importance is not None else 0.9 + 0.01 * i,
            delta_acc=-float(i),
        )
        for i, (s, e, k, kept, _) in enumerate(spec)
    ]
    return make_table("latency", lat, meta), make_table("importance", imp, meta)


def test_units_round_latency_up_but_not_float_noise():
    assert to_units([1.1, 2.0000000001, 0.001, 0.0, 0.29, 0.57], 100).tolist() == [
        110,
        200,
        1,
        0,
        29,
        57,
    ]
    assert to_units(1.234, 10).tolist() == 13


def test_known_optimum_and_budget_forms():
    lat, imp = small_tables()
    assert base_latency_ms(lat) == 4.0
    sol = solve_tables(lat, imp, budget_ms=3.2)
    # (0,2) pruned to conv 2 (0.9 ms, 0.94) + (2,3) (1.0 ms, 0.92): 2.9 ms with constant
    assert [(b.start, b.end, b.kept_convs) for b in sol.plan.blocks] == [(0, 2, (2,)), (2, 3, (3,))]
    assert sol.objective == pytest.approx(0.94 + 0.92)
    assert sol.predicted_latency_ms == pytest.approx(2.9)
    assert sol.plan.meta["budget_ms"] == 3.2 and sol.plan.meta["precision"] is None
    assert sol.plan.meta["solver"] == "exact" and sol.budget_units is None
    assert sol.plan.meta["predicted_speedup"] == pytest.approx(4.0 / 2.9)
    for kw in ({"budget_frac": 0.8}, {"speedup": 1.25}):
        other = solve_tables(lat, imp, **kw)
        assert other.budget_ms == pytest.approx(3.2)
        assert other.plan.blocks == sol.plan.blocks
    assert sol.plan_at(3.0).blocks == sol.plan.blocks  # 2.9 ms is the fastest plan
    with pytest.raises(InfeasibleBudgetError, match="the fastest plan takes 2.9 ms"):
        sol.plan_at(2.8)
    coarse = solve_tables(lat, imp, budget_ms=3.2, precision=100)
    assert coarse.plan.blocks == sol.plan.blocks and coarse.plan.meta["precision"] == 100
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget is 2.9000 ms"):
        coarse.plan_at(2.8)
    with pytest.raises(ValueError, match="covers budgets up to 3.2 ms; solve again"):
        sol.plan_at(3.5)
    assert resolve_budget(10.0, speedup=4.0) == 2.5
    with pytest.raises(ValueError, match="exactly one"):
        resolve_budget(10.0, budget_ms=3.0, speedup=2.0)
    with pytest.raises(ValueError, match="speedup must be a positive number"):
        resolve_budget(10.0, speedup=0.0)


def test_budget_at_full_latency_keeps_the_best_scoring_plan():
    lat, imp = small_tables()
    sol = solve_tables(lat, imp, budget_frac=1.0)
    # exp scores near 1 per block: three blocks beat any merge
    assert len(sol.plan.blocks) == 3
    assert sol.objective == pytest.approx(0.90 + 0.91 + 0.92)


def test_infeasible_budget_reports_the_smallest_feasible_latency():
    lat, imp = small_tables()
    with pytest.raises(InfeasibleBudgetError) as err:
        solve_tables(lat, imp, budget_ms=2.0)
    # fastest: (0,2) pruned (0.9) + (2,3) (1.0) + constant 1.0
    assert err.value.min_feasible_ms == pytest.approx(2.9)
    assert "the fastest plan takes 2.9 ms" in str(err.value)
    assert isinstance(err.value, ValueError)
    assert solve_tables(lat, imp, budget_ms=2.9).predicted_latency_ms == pytest.approx(2.9)
    with pytest.raises(InfeasibleBudgetError, match="the fastest plan takes 2.9 ms"):
        solve_tables(lat, imp, budget_ms=0.5)  # below the constant part
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget is 2.9000 ms"):
        solve_tables(lat, imp, budget_ms=2.0, precision=100)


def test_rounding_up_can_make_a_budget_infeasible_and_says_so():
    lat = make_table(
        "latency",
        [row(0, 1, 3, (1,), latency_ms=1.004)],
        {"model_fingerprint": "fp", "chain_length": 1, "constant_ms": 0.0},
    )
    imp = make_table(
        "importance",
        [row(0, 1, 3, (1,), importance=1.0)],
        {"model_fingerprint": "fp", "chain_length": 1},
    )
    with pytest.raises(InfeasibleBudgetError) as err:
        solve_tables(lat, imp, budget_ms=1.005, precision=100)
    assert "smallest feasible budget is 1.0100 ms" in str(err.value)
    assert "fastest plan takes 1.0040 ms" in str(err.value)
    assert solve_tables(lat, imp, budget_ms=1.005, precision=1000).objective == 1.0
    # the exact solver needs no precision, and the budget is met to the last bit
    assert solve_tables(lat, imp, budget_ms=1.005).objective == 1.0
    assert solve_tables(lat, imp, budget_ms=1.004).predicted_latency_ms == 1.004
    with pytest.raises(InfeasibleBudgetError, match="fastest plan takes 1.004 ms"):
        solve_tables(lat, imp, budget_ms=np.nextafter(1.004, 0))


def test_ties_prefer_the_lower_latency_plan():
    meta = {"model_fingerprint": "fp", "chain_length": 2, "constant_ms": 0.0}
    lat = make_table(
        "latency",
        [
            row(0, 1, 3, (1,), latency_ms=1.0),
            row(1, 2, 3, (2,), latency_ms=1.0),
            row(0, 2, 5, (1, 2), latency_ms=1.7),
            row(0, 2, 3, (2,), latency_ms=1.2),
        ],
        meta,
    )
    imp = make_table(
        "importance",
        [
            row(0, 1, 3, (1,), importance=0.5),
            row(1, 2, 3, (2,), importance=0.5),
            row(0, 2, 5, (1, 2), importance=1.0),
            row(0, 2, 3, (2,), importance=1.0),
        ],
        meta,
    )
    sol = solve_tables(lat, imp, budget_ms=5.0)
    assert sol.objective == 1.0
    assert [b.kernel for b in sol.plan.blocks] == [3] and sol.predicted_latency_ms == 1.2


def test_equal_importance_kim23_never_prunes_and_layerprune_never_merges():
    lat, imp = small_tables(importance=1.0)
    conv = make_table("conv_importance", [{"conv": c, "importance": 1.0} for c in (1, 2, 3)], META)
    for frac in (0.6, 0.75, 0.9, 1.0):
        try:
            k = solve_tables(lat, imp, method="kim23", budget_frac=frac).plan
        except InfeasibleBudgetError:
            k = None
        if k is not None:
            assert k.kept_convs == [1, 2, 3]
        p = solve_tables(lat, imp, method="layerprune", conv_importance=conv, budget_frac=frac).plan
        assert p.kept_activations == [1, 2, 3]
        assert all(b.end - b.start == 1 for b in p.blocks)
    # kim23 at 0.9 (3.6 ms): the fastest all-kept realisation merges (1,3): 1 + 1.2 + 1
    k = solve_tables(lat, imp, method="kim23", budget_frac=0.9).plan
    assert [(b.start, b.end) for b in k.blocks] == [(0, 1), (1, 3)]


def test_kim23_realises_a_span_as_consecutive_merged_convs():
    meta = {"model_fingerprint": "fp", "chain_length": 3, "constant_ms": 0.0}
    spec = [
        (0, 1, 3, (1,), 1.0, 0.1),
        (1, 2, 3, (2,), 1.0, 0.1),
        (2, 3, 3, (3,), 1.0, 0.1),
        (0, 2, 5, (1, 2), 0.5, 0.1),
        (0, 3, 7, (1, 2, 3), 5.0, 10.0),
    ]
    lat = make_table(
        "latency", [row(s, e, k, kept, latency_ms=ms) for s, e, k, kept, ms, _ in spec], meta
    )
    imp = make_table(
        "importance", [row(s, e, k, kept, importance=i) for s, e, k, kept, _, i in spec], meta
    )
    sol = solve_tables(lat, imp, method="kim23", budget_ms=2.0)
    # span (0,3) scores 10; realised as (0,2) merged + (2,3) with no activation at node 2
    assert [(b.start, b.end, b.activation) for b in sol.plan.blocks] == [
        (0, 2, False),
        (2, 3, True),
    ]
    assert sol.objective == 10.0 and sol.predicted_latency_ms == 1.5
    assert sol.plan.kept_activations == [3]
    assert sol.plan.kept_convs == [1, 2, 3]


def test_layerprune_keeps_convs_without_importance():
    lat, imp = small_tables()
    conv = make_table("conv_importance", [{"conv": 2, "importance": 0.5, "delta_acc": -50.0}], META)
    sol = solve_tables(lat, None, method="layerprune", conv_importance=conv, budget_ms=3.0)
    assert [b.kept_convs for b in sol.plan.blocks] == [(1,), (), (3,)]
    assert sol.plan.blocks[1].kernel == 1 and sol.plan.blocks[1].activation
    assert sol.objective == 2.5 and sol.predicted_latency_ms == 3.0
    with pytest.raises(InfeasibleBudgetError, match="the fastest plan takes 3 ms"):
        solve_tables(lat, None, method="layerprune", conv_importance=conv, budget_ms=2.5)
    additive = solve_tables(
        lat, None, method="layerprune", conv_importance=conv, budget_ms=3.0, score="additive"
    )
    assert additive.objective == -50.0


def test_scores():
    lat, imp = small_tables()
    assert option_scores(imp, "exp").tolist() == [0.9 + 0.01 * i for i in range(7)]
    assert option_scores(imp, "additive").tolist() == [-float(i) for i in range(7)]
    diff = make_table(
        "importance", [row(0, 1, 3, (1,), importance=math.exp(-0.25), val_loss_ratio=0.25)], META
    )
    assert option_scores(diff, "additive").tolist() == [-0.25]
    bare = make_table("importance", [row(0, 1, 3, (1,), importance=0.9)], META)
    with pytest.raises(
        TableError,
        match="additive score needs a 'delta_acc' .* or 'val_loss_ratio'.*use --score exp",
    ):
        option_scores(bare, "additive")
    gap = make_table(
        "importance",
        [
            row(0, 1, 3, (1,), importance=0.9, delta_acc=None),
            row(1, 2, 3, (2,), importance=0.9, delta_acc=-1.0),
        ],
        META,
    )
    with pytest.raises(TableError, match="row 1 has no number in column 'delta_acc'"):
        option_scores(gap, "additive")
    with pytest.raises(ValueError, match="unknown score 'log'"):
        option_scores(imp, "log")


def test_additive_score_sums_delta_acc():
    lat, imp = small_tables()
    sol = solve_tables(lat, imp, budget_ms=3.2, score="additive")
    # delta_acc = -row index: (0,2) pruned is row 4 (-4), (2,3) row 2 (-2) vs (0,1)+(1,3): 0-5
    assert sol.objective == -5.0
    assert [(b.start, b.end) for b in sol.plan.blocks] == [(0, 1), (1, 3)]
    assert sol.plan.meta["score"] == "additive"


def test_mismatched_tables_are_refused():
    lat, imp = small_tables()
    _, other = small_tables(meta={**META, "model_fingerprint": "zz"})
    with pytest.raises(TableError, match="different models"):
        solve_tables(lat, other, budget_frac=0.9)
    conv = make_table(
        "conv_importance", [{"conv": 1, "importance": 1.0}], {**META, "chain_length": 4}
    )
    with pytest.raises(TableError, match="chains of different length"):
        solve_tables(lat, None, method="layerprune", conv_importance=conv, budget_frac=0.9)
    with pytest.raises(TableError, match="layerprune method needs a per-conv importance"):
        solve_tables(lat, imp, method="layerprune", budget_frac=0.9)
    with pytest.raises(TableError, match="kim23 method needs an importance table"):
        solve_tables(lat, None, method="kim23", budget_frac=0.9)


def test_missing_single_conv_block_is_reported():
    lat, imp = small_tables()
    keep = [r for r in lat.rows if (r["start"], r["end"]) != (1, 2)]
    lat2 = make_table("latency", keep, META)
    imp2 = make_table("importance", [r for r in imp.rows if (r["start"], r["end"]) != (1, 2)], META)
    with pytest.raises(
        TableError,
        match=r"no option keeping the conv of single-conv block\(s\) "
        r"\(1, 2\)",
    ):
        solve_tables(lat2, imp2, budget_ms=10.0)


@pytest.mark.parametrize("precision", [None, 100])
def test_chain_without_partition_is_reported(precision):
    lat, imp = small_tables()
    p = build_problem("layermerge", lat, imp, precision=precision)
    keep = p.end != 3  # no block reaches node 3
    broken = dataclasses.replace(
        p,
        start=p.start[keep],
        end=p.end[keep],
        units=None if p.units is None else p.units[keep],
        latency_ms=p.latency_ms[keep],
        score=p.score[keep],
        blocks=tuple(b for b, k in zip(p.blocks, keep) if k),
    )
    with pytest.raises(
        TableError,
        match="no partition of the chain 0..3 for layermerge: no block leads on from node 2",
    ):
        solve(broken, 10.0)


def test_oversized_dp_is_refused():
    lat, imp = small_tables()
    problem = build_problem("layermerge", lat, imp, precision=MAX_DP_CELLS)
    with pytest.raises(ValueError, match="lower the precision"):
        solve(problem, 4.0)
