"""The exact solver (the default): brute force on small random chains, an independent
Pareto-frontier oracle on the ResNet-34 and MobileNetV2 search spaces, reproducible
search spaces without weights, and latency tables that join whatever the weights."""

from __future__ import annotations

import filecmp
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layermerge import build_space, conv_weights, load_model, trace
from layermerge.solve import (
    InfeasibleBudgetError,
    build_problem,
    option_scores,
    solve,
    solve_tables,
)
from layermerge.tables import KEY_COLUMNS, make_table, read_table

from .test_solve import drop_cost

METHODS = ("layermerge", "kim23", "layerprune")


# ---------------------------------------------------------------------------
# small random chains against brute force


@st.composite
def tables(draw, max_len=6):
    """Every single-conv block (keeping its conv), random longer blocks with 1-3 options
    (at most one keeping all its convs), real-valued latencies (a few repeated, so that
    ties and exact budget boundaries happen), scores and a constant part."""
    L = draw(st.integers(1, max_len))
    spans = [(i - 1, i) for i in range(1, L + 1)]
    spans += [(s, e) for s in range(L) for e in range(s + 2, L + 1) if draw(st.booleans())]
    pool = draw(st.lists(st.floats(0.0, 3.0, allow_nan=False), min_size=1, max_size=4))
    latency = st.one_of(st.floats(0.0, 3.0, allow_nan=False), st.sampled_from(pool))
    lat_rows, imp_rows = [], []
    for s, e in spans:
        convs = list(range(s + 1, e + 1))
        kernels = draw(
            st.lists(st.sampled_from([1, 3, 5, 7, 9]), min_size=1, max_size=3, unique=True)
        )
        for j, k in enumerate(kernels):
            if j == 0 and (e - s == 1 or draw(st.booleans())):
                kept = tuple(convs)
            else:
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


def _fold(values):
    """Left-to-right float sum, the order in which a plan's latency is added up."""
    total = 0.0
    for v in values:
        total += v
    return total


def _chains(pos, L, by_start):
    """Every sequence of (end, latency, score, blocks) items partitioning pos..L."""
    if pos == L:
        yield ()
        return
    for item in by_start.get(pos, ()):
        for rest in _chains(item[0], L, by_start):
            yield (item, *rest)


def _by_start(items):
    out = {}
    for s, e, ms, score, blocks in items:
        out.setdefault(s, []).append((e, ms, score, blocks))
    return out


def brute_plans(method, lat, imp, conv, score):
    """Every plan of ``method`` as (chain latency, score, blocks) with the latency summed
    in plan order (a kim23 span: the sum of its cheapest realisation, itself summed in
    order), blocks as (start, end, kernel, kept_convs)."""
    L = lat.chain_length
    if method == "layerprune":
        keep = 1.0 if score == "exp" else 0.0
        drop = dict(zip(conv.keys(), option_scores(conv, score)))
        single = {r["end"]: r for r in lat.rows if r["end"] - r["start"] == 1 and r["kept_convs"]}
        plans = []
        for dropped in itertools.product(
            *[[False, True] if i in drop else [False] for i in range(1, L + 1)]
        ):
            plans.append(
                (
                    _fold(
                        drop_cost(lat, i) if d else single[i]["latency_ms"]
                        for i, d in enumerate(dropped, 1)
                    ),
                    _fold(drop[i] if d else keep for i, d in enumerate(dropped, 1)),
                    tuple(
                        (i - 1, i, 1 if d else single[i]["kernel"], () if d else (i,))
                        for i, d in enumerate(dropped, 1)
                    ),
                )
            )
        return plans
    scores = dict(zip(imp.keys(), option_scores(imp, score)))
    rows = [
        (r["start"], r["end"], r["latency_ms"], scores[lat.key_of(r)], r)
        for r in lat.rows
        if method == "layermerge" or r["kept_convs"] == tuple(range(r["start"] + 1, r["end"] + 1))
    ]
    if method == "layermerge":
        items = [
            (s, e, ms, sc, ((s, e, r["kernel"], r["kept_convs"]),)) for s, e, ms, sc, r in rows
        ]
    else:
        blocks = _by_start(
            (s, e, ms, 0.0, ((s, e, r["kernel"], r["kept_convs"]),)) for s, e, ms, _, r in rows
        )
        items = []
        for s, e, _, sc, _ in rows:
            inside = {a: [b for b in bs if b[0] <= e] for a, bs in blocks.items() if a >= s}
            cheapest = min(_fold(b[1] for b in part) for part in _chains(s, e, inside))
            items.append((s, e, cheapest, sc, ()))
    return [
        (_fold(i[1] for i in plan), _fold(i[2] for i in plan), tuple(b for i in plan for b in i[3]))
        for plan in _chains(0, L, _by_start(items))
    ]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    space=tables(),
    method=st.sampled_from(METHODS),
    frac=st.one_of(st.floats(0.0, 1.2), st.sampled_from([0.5, 1.0])),
    score=st.sampled_from(["exp", "additive"]),
)
def test_exact_solve_matches_brute_force(space, method, frac, score):
    lat, imp, conv = space
    plans = brute_plans(method, lat, imp, conv, score)
    c = lat.constant_ms
    slowest = max(p[0] for p in plans)
    budget = c + frac * slowest
    if frac == 0.5 or frac == 1.0:  # a budget exactly at some plan's latency
        budget = c + sorted(p[0] for p in plans)[int(frac * (len(plans) - 1))]
    fitting = [p for p in plans if c + p[0] <= budget]
    problem = build_problem(method, lat, imp, conv, score=score)
    if not fitting:
        with pytest.raises(InfeasibleBudgetError) as err:
            solve(problem, budget)
        assert err.value.fastest_ms == c + min(p[0] for p in plans)
        return
    sol = solve(problem, budget)
    best = max(p[1] for p in fitting)
    tol = 1e-9 * max(1.0, max(abs(p[1]) for p in fitting))
    # the true optimum, never over budget (the reported latency, compared as reported)
    assert abs(sol.objective - best) <= tol
    assert sol.predicted_latency_ms <= budget
    # the plan is one of the enumerated plans, with the latency and score it reports
    found = [p for p in fitting if p[0] + c == sol.predicted_latency_ms]
    if method != "kim23":  # kim23 blocks differ from the spans the brute force scores
        blocks = tuple((b.start, b.end, b.kernel, b.kept_convs) for b in sol.plan.blocks)
        assert any(p[2] == blocks and abs(p[1] - sol.objective) <= tol for p in found)
    else:
        assert any(abs(p[1] - sol.objective) <= tol for p in found)
    assert sol.plan.meta["precision"] is None and sol.plan.meta["solver"] == "exact"
    # ties: every cheaper plan scores less (by more than the tolerance)
    assert all(p[1] < best - 0.999 * tol for p in plans if c + p[0] < sol.predicted_latency_ms)
    # the curve, exact at its breakpoints, and plan_at from the same pass
    f = sol.frontier
    assert np.all(np.diff(f.budget_ms) > 0) and np.all(f.budget_ms <= budget)
    for b, obj, plan_lat in zip(f.budget_ms, f.objective, f.latency_ms):
        below = [p[1] for p in plans if c + p[0] <= b]
        assert abs(max(below) - obj) <= tol and plan_lat <= b
        assert any(c + p[0] == b for p in plans)
    for b in (budget, c + 0.5 * (budget - c)):
        below = [p[1] for p in plans if c + p[0] <= b]
        if below:
            assert abs(sol.plan_at(b).meta["objective"] - max(below)) <= tol
        else:
            with pytest.raises(InfeasibleBudgetError):
                sol.plan_at(b)


# ---------------------------------------------------------------------------
# real search spaces against an independent Pareto-frontier oracle


def synthetic_tables(options_rows, meta, seed):
    """Seeded latency (merged kernel area, a per-node scale) and importance tables."""
    rng = np.random.default_rng(seed)
    L = meta["chain_length"]
    scale = np.exp(np.cumsum(rng.normal(0, 0.15, L + 1)))
    lat_rows, imp_rows = [], []
    for r in options_rows:
        area = r["kernel"] ** 2 / 9 * (0.15 if r["depthwise"] else 1.0)
        span = r["end"] - r["start"]
        pruned = span - len(r["kept_convs"])
        delta = -rng.gamma(2.0, 0.4 + 0.8 * pruned + 0.3 * (span - 1))
        key = {k: r[k] for k in (*KEY_COLUMNS, "kept_convs")}
        ms = scale[r["start"]] * (0.3 + 0.7 * area) * rng.uniform(0.9, 1.1) * 0.4
        lat_rows.append(key | {"latency_ms": ms})
        imp_rows.append(key | {"importance": math.exp(delta / 100), "delta_acc": delta})
    m = {**meta, "constant_ms": 2.5}
    return make_table("latency", lat_rows, m), make_table("importance", imp_rows, m)


def oracle(lat, imp, method, budget, conv=None):
    """Best score within ``budget`` by Pareto frontiers of (latency, score) lists, written
    independently of the solver: plain Python, every point of every prefix kept unless
    another is at least as fast and at least as good."""
    L, c = lat.chain_length, lat.constant_ms
    choices = []  # (start, end, latency, score)
    if method == "layerprune":
        drop = dict(zip(conv.keys(), option_scores(conv, "exp")))
        for r in lat.rows:
            if r["end"] - r["start"] == 1 and r["kept_convs"] == (r["end"],):
                choices.append((r["start"], r["end"], r["latency_ms"], 1.0))
                if r["end"] in drop:
                    choices.append((r["start"], r["end"], drop_cost(lat, r["end"]), drop[r["end"]]))
    else:
        scores = dict(zip(imp.keys(), option_scores(imp, "exp")))
        rows = [
            r
            for r in lat.rows
            if method == "layermerge"
            or r["kept_convs"] == tuple(range(r["start"] + 1, r["end"] + 1))
        ]
        cheapest = {}  # kim23: (s, e) -> fewest ms to run the span without activations
        for r in sorted(rows, key=lambda r: (r["end"], -r["start"])):
            s, e = r["start"], r["end"]
            best = r["latency_ms"]
            for m in range(s + 1, e):
                if (s, m) in cheapest and (m, e) in cheapest:
                    best = min(best, cheapest[(s, m)] + cheapest[(m, e)])
            cheapest[(s, e)] = min(best, cheapest.get((s, e), math.inf))
        for r in rows:
            s, e = r["start"], r["end"]
            ms = r["latency_ms"] if method == "layermerge" else cheapest[(s, e)]
            choices.append((s, e, ms, scores[lat.key_of(r)]))
    frontier = {0: [(0.0, 0.0)]}
    for e in range(1, L + 1):
        points = sorted(
            (
                (t + ms, v + sc)
                for s, end, ms, sc in choices
                if end == e
                for t, v in frontier.get(s, [])
                if c + t + ms <= budget + 1e-9
            ),
            key=lambda p: (p[0], -p[1]),
        )
        kept, top = [], -math.inf
        for t, v in points:
            if v > top:
                kept.append((t, v))
                top = v
        frontier[e] = kept
    fits = [v for t, v in frontier[L] if c + t <= budget]
    return max(fits) if fits else None


@pytest.fixture(scope="module")
def real_spaces():
    out = {}
    for name in ("resnet34", "mobilenet_v2"):
        loaded = load_model(f"torchvision:{name}")
        traced = trace(loaded.model, loaded.input_shape)
        out[name] = (traced, build_space(traced.chain, conv_weights(traced)))
    return out


@pytest.mark.parametrize("name", ["resnet34", "mobilenet_v2"])
def test_real_spaces_match_a_pareto_oracle(real_spaces, name):
    _, space = real_spaces[name]
    assert len(space.options) == {"resnet34": 150, "mobilenet_v2": 391}[name]
    lat, imp = synthetic_tables(space.option_rows(), space.table_meta(), seed=len(name))
    conv = make_table(
        "conv_importance",
        [
            {"conv": i, "importance": math.exp(-0.5 * (i % 4))}
            for i in range(1, lat.chain_length + 1)
            if not space.chain.conv(i).irreducible
        ],
        lat.meta,
    )
    for method in METHODS:
        problem = build_problem(method, lat, imp, conv)
        for frac in (0.9, 0.7, 0.5):
            budget = problem.constant_ms + frac * (problem.base_latency_ms - problem.constant_ms)
            best = oracle(lat, imp, method, budget, conv)
            if best is None:
                with pytest.raises(InfeasibleBudgetError):
                    solve(problem, budget)
                continue
            sol = solve(problem, budget)
            assert abs(sol.objective - best) <= 1e-9, (method, frac)
            assert sol.predicted_latency_ms <= budget
            space.check_plan(sol.plan)
    # the discretised solve at 100 units/ms never beats the exact one
    for frac in (0.9, 0.7, 0.5):
        exact = solve_tables(lat, imp, budget_frac=frac)
        coarse = solve_tables(lat, imp, budget_frac=frac, precision=100)
        assert coarse.objective <= exact.objective + 1e-12
        assert coarse.predicted_latency_ms <= exact.budget_ms


# ---------------------------------------------------------------------------
# reproducible search spaces and weight-independent latency tables


def test_inspect_without_weights_writes_identical_options(tmp_path):
    import torch

    from layermerge.cli import main

    torch.manual_seed(1)
    assert main(["inspect", "torchvision:resnet34", "--options-csv", str(tmp_path / "a.csv")]) == 0
    torch.manual_seed(2)  # the caller's random state plays no part
    assert main(["inspect", "torchvision:resnet34", "--options-csv", str(tmp_path / "b.csv")]) == 0
    assert filecmp.cmp(tmp_path / "a.csv", tmp_path / "b.csv", shallow=False)
    assert len(read_table(tmp_path / "a.csv", "options")) == 150


def test_load_model_seeds_the_initialisation_and_keeps_the_callers_state():
    import torch

    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a = load_model("layermerge:resnet8")
    assert torch.equal(torch.random.get_rng_state(), before)
    b = load_model("layermerge:resnet8")
    c = load_model("layermerge:resnet8", seed=1)
    assert a.init_seed == 0 and c.init_seed == 1
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_latency_table_from_an_untrained_model_joins_trained_importance(real_spaces):
    """Latency measured on the untrained model (kept convs: the first ones), importance
    measured on 'trained' weights (kept convs chosen by their L1 norms): the tables join
    and the plan keeps the convs chosen on the trained weights."""
    import torch

    traced, _ = real_spaces["resnet34"]
    chain = traced.chain
    untrained = build_space(chain)  # what a latency table without weights lists
    g = torch.Generator().manual_seed(7)  # stand-in trained weights
    weights = {
        c.index: torch.randn(
            c.out_channels, c.in_channels // c.groups, c.kernel, c.kernel, generator=g
        )
        for c in chain.convs
    }
    space = build_space(chain, weights)
    lat_opts = {o.key: o.kept_convs for o in untrained.options}
    differ = {o.key for o in space.options if o.kept_convs != lat_opts[o.key]}
    assert differ
    lat, _ = synthetic_tables(untrained.option_rows(), untrained.table_meta(), seed=3)
    imp = make_table(
        "importance",
        [
            {
                **r,
                "importance": 1.2
                if (r["start"], r["end"], r["kernel"], r["stride"], r["depthwise"]) in differ
                else 0.9,
            }
            for r in space.option_rows()
        ],
        space.table_meta(),
    )
    sol = solve_tables(lat, imp, budget_frac=0.7)
    imp_kept = {imp.key_of(r): r["kept_convs"] for r in imp.rows}
    assert all(b.kept_convs == imp_kept[b.key] for b in sol.plan.blocks)
    assert any(b.key in differ for b in sol.plan.blocks)
    space.check_plan(sol.plan)
