"""Re-ranking the solver's candidate plans: the K best Pareto-optimal plans within a
budget (against brute force) and the compress pipeline's short fine-tune of each."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layermerge.pipeline import ConfigError, compress, parse_config
from layermerge.solve import build_problem, solve

from .test_compress import TINY
from .test_solve_exact import brute_plans, tables


def _blocks(plan):
    return tuple((b.start, b.end, b.kernel, b.kept_convs) for b in plan.blocks)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    space=tables(),
    method=st.sampled_from(["layermerge", "layerprune"]),
    frac=st.floats(0.6, 1.2),
    k=st.integers(1, 8),
)
def test_top_plans_are_distinct_pareto_optimal_and_within_budget(space, method, frac, k):
    lat, imp, conv = space
    plans = brute_plans(method, lat, imp, conv, "exp")
    c = lat.constant_ms
    budget = c + frac * max(p[0] for p in plans)
    if not any(c + p[0] <= budget for p in plans):
        return
    sol = solve(build_problem(method, lat, imp, conv, score="exp"), budget)
    top = sol.top_plans(k)
    assert 1 <= len(top) <= k
    assert _blocks(top[0]) == _blocks(sol.plan)  # the first is the solver's plan
    assert len({_blocks(p) for p in top}) == len(top)  # distinct
    objs = [p.meta["objective"] for p in top]
    assert objs == sorted(objs, reverse=True) and len(set(objs)) == len(objs)
    tol = 1e-9 * max(1.0, max(abs(p[1]) for p in plans))
    for p in top:
        ms, obj = p.meta["predicted_latency_ms"], p.meta["objective"]
        assert ms <= budget
        assert any(_blocks(p) == q[2] for q in plans)  # a real plan
        # Pareto-optimal: no plan is at least as fast and scores more
        assert not any(c + q[0] <= ms and q[1] > obj + tol for q in plans)
    # as many as the curve holds below the budget (each step a distinct plan)
    steps = sol.frontier.steps()
    assert len(top) == min(k, int((steps.budget_ms <= budget).sum()))


@settings(max_examples=1, deadline=None)
@given(space=tables())
def test_top_plans_rejects_a_bad_k(space):
    lat, imp, conv = space
    sol = solve(build_problem("layermerge", lat, imp, conv), 1e9)
    with pytest.raises(ValueError, match="k must be"):
        sol.top_plans(0)


RERANK = {
    **TINY,
    "latency": {"backends": ["torch"], "max_time_s": 0.02},
    "solve": {"methods": ["layermerge"], "budgets": [1.0], "rerank": 3, "rerank_steps": 2},
    "finetune": {"steps": 2, "batch_size": 16, "lr": 0.01, "distill": 0.5},
    "benchmark": {"rounds": 1, "calls_per_round": 1, "max_time_s": 1},
}


def test_compress_reranks_candidates_by_a_short_finetune(tmp_path):
    cfg = parse_config(RERANK)
    res = compress(cfg, tmp_path / "run", log=lambda m: None)
    assert "rerank:layermerge:1" in res.ran
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    (row,) = report["rows"]
    rr = row["rerank"]
    assert rr["k"] == 3 and 1 <= len(rr["candidates"]) <= 3 and rr["split"] == "holdout-val"
    assert all(0 <= c["score"] <= 100 for c in rr["candidates"])
    chosen = rr["candidates"][rr["chosen"]]
    assert row["digest"] == chosen["digest"] and row["predicted_ms"] <= row["budget_ms"]
    assert all(c["predicted_ms"] <= row["budget_ms"] for c in rr["candidates"])
    best = max(c["score"] for c in rr["candidates"])
    assert chosen["score"] == best
    md = (tmp_path / "run" / "report.md").read_text()
    assert "Re-ranking:" in md and "candidate" in md
    again = compress(cfg, tmp_path / "run", log=lambda m: None)
    assert again.ran == []
    # other steps redo the re-ranking (and what follows from its choice), not the solve
    steps = parse_config({**RERANK, "solve": {**RERANK["solve"], "rerank_steps": 1}})
    res = compress(steps, tmp_path / "run", log=lambda m: None)
    assert "rerank:layermerge:1" in res.ran
    assert not any(s.startswith("solve:") or s in ("base", "importance") for s in res.ran)
    # a budget that only the fastest plan meets: one candidate, nothing fine-tuned
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())["stages"]
    fastest = min(stages["solve:layermerge"]["result"]["curve"]["budget_ms"])
    frac = round(fastest / report["base"]["predicted_ms"] + 1e-6, 6)
    tight = parse_config({**RERANK, "solve": {**RERANK["solve"], "budgets": [frac]}})
    res = compress(tight, tmp_path / "run", log=lambda m: None)
    assert f"rerank:layermerge:{frac:g}" not in res.ran
    (row,) = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    rr = row["rerank"]
    assert len(rr["candidates"]) == 1 and rr["chosen"] == 0 and not rr["differs"]
    assert rr["candidates"][0]["score"] is None and rr["seconds"] == 0.0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "the only plan within the budget, not fine-tuned" in md


@pytest.mark.parametrize(
    "patch, msg",
    [
        ({"rerank": -1}, "solve.rerank: a whole number of plans >= 0"),
        ({"rerank": 1.5}, "solve.rerank: expected int"),
        ({"rerank_steps": 0}, "solve.rerank_steps: a whole number of steps >= 1"),
    ],
)
def test_rerank_config_errors(patch, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config({**TINY, "solve": {**TINY["solve"], **patch}})


def test_cli_solve_writes_the_top_plans(tmp_path, capsys):
    import math

    from layermerge.cli import main
    from layermerge.plan import Plan
    from layermerge.tables import write_table

    from .test_cli_solve import META, SPEC, key

    lat = write_table(
        tmp_path / "lat.csv",
        "latency",
        [key(s, e, k, kept) | {"latency_ms": ms} for s, e, k, kept, ms, _ in SPEC],
        META,
    )
    imp = write_table(
        tmp_path / "imp.csv",
        "importance",
        [
            key(s, e, k, kept) | {"importance": math.exp(d / 100), "delta_acc": d}
            for s, e, k, kept, _, d in SPEC
        ],
        META,
    )
    line = f"solve --latency {lat} --importance {imp} --budget-ms 3.5 --top 3 --json"
    assert main([*line.split(), "--out", str(tmp_path / "plan.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    top = out["top"]
    assert 2 <= len(top) <= 3
    assert top[0]["objective"] == out["objective"]
    assert Plan.load(top[0]["plan"]).blocks == Plan.load(out["plan"]).blocks
    objs = [t["objective"] for t in top]
    assert objs == sorted(objs, reverse=True)
    assert all(t["predicted_latency_ms"] <= 3.5 for t in top)
    assert main([*line.replace("--json", "").split(), "--out", str(tmp_path / "p.json")]) == 0
    assert "top 2: objective" in capsys.readouterr().out
