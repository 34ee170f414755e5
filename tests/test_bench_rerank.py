"""The re-ranking benchmark's summary: what it counts as a plan, and its rewrite from a
recorded JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rerank.py"


@pytest.fixture(scope="module")
def rerank():
    spec = importlib.util.spec_from_file_location("bench_rerank", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rec(method, budget, changed=False, gap=None, candidates=2):
    rec = {
        "arch": "a",
        "method": method,
        "budget": budget,
        "backend": "onnxruntime",
        "solver": {},
        "reranked": {},
        "candidates": [{"objective": 1.0, "score": 90.0}] * candidates,
        "chosen": None,
        "rerank_seconds": 10.0,
        "changed": changed,
        "spearman_objective_score": float("nan"),
    }
    if gap is not None:
        rec.update(gap=gap, pooled_sd=0.1)
    return rec


def test_budgets_without_a_plan_are_not_counted_as_plans(rerank):
    recs = [
        _rec("layermerge", 0.9, changed=True, gap=0.8),
        _rec("layermerge", 0.8, gap=0.0),
        _rec("layerprune", 0.9, candidates=0),  # below the method's fastest plan
        _rec("layerprune", 0.8, candidates=0),
    ]
    s = rerank.summary(recs)
    assert (s["rows"], s["without_plan"], s["changed"]) == (2, 2, 1)
    assert (s["better"], s["clear_better"], s["worse"]) == (1, 1, 0)


def test_from_json_rewrites_the_summary_and_the_section(rerank, tmp_path, monkeypatch):
    result = {
        "k": 4,
        "steps": 100,
        "backend": "onnxruntime",
        "flags": "",
        "archs": {
            "a": [
                _rec("layermerge", 0.9, changed=True, gap=0.8),
                _rec("layerprune", 0.9, candidates=0),
            ]
        },
        "wall_s": 1.0,
        "finetune_steps": 300,
        "seeds": 3,
        "summary": {"rows": 99},
    }
    path = tmp_path / "bench_rerank.json"
    path.write_text(json.dumps(result))
    monkeypatch.setattr(sys, "argv", ["bench_rerank.py", "--from-json", str(path)])
    assert rerank.main() == 0
    assert json.loads(path.read_text())["summary"]["rows"] == 1
    text = (tmp_path / "methods.md").read_text()
    assert "changed 1 of 1 plans (1 budgets below a method's fastest plan had none)" in text
