"""The compress pipeline: a tiny end-to-end run, caching, config validation."""

import json

import pytest
import torch
import yaml

from layermerge.cli import main
from layermerge.pipeline import ConfigError, compress, load_config, parse_config

TINY = {
    "model": "layermerge:resnet8",
    "model_kwargs": {"in_chans": 1, "width": 8},
    "input_shape": [1, 16, 16],
    "data": "fashion-mnist",
    # one thread: two contend on a busy 2-core machine (tiny networks gain nothing)
    "threads": 1,
    "train": {"steps": 8, "batch_size": 32, "lr": 0.05},
    "latency": {"backends": ["onnxruntime", "torch"], "max_time_s": 0.02},
    "importance": {"holdout_per_class": 4, "steps": 1, "batch_size": 40},
    "solve": {"budgets": [0.95, 0.8], "precision": 10000},
    "finetune": {"steps": 3, "batch_size": 32, "lr": 0.01, "distill": 0.5},
    "export": {"formats": ["onnx"]},
    "benchmark": {"rounds": 2, "calls_per_round": 2, "max_time_s": 3},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("compress")
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(d / "tiny.yaml")
    result = compress(cfg, d / "run", log=lambda m: None)
    return d, cfg, result


def test_run_writes_a_report_of_measured_numbers(finished_run):
    d, _, result = finished_run
    report = json.loads((d / "run" / "report.json").read_text())
    assert 0 <= report["base"]["accuracy"] <= 100
    assert report["base"]["latency_ms"]["onnxruntime"] > 0
    assert report["base"]["latency_ms"]["torch"] > 0
    assert report["rows"], report["notes"]
    for row in report["rows"]:
        assert row["method"] in ("layermerge", "kim23", "layerprune")
        assert row["budget_frac"] in (0.95, 0.8)
        assert row["predicted_ms"] <= row["budget_ms"] + 1e-9
        assert row["measured_ms"] > 0 and row["speedup"] > 0
        assert row["speedup"] == row["speedup_by_backend"]["onnxruntime"]
        assert row["measured_ms_by_backend"]["torch"] > 0
        assert 0 <= row["accuracy"] <= 100
        onnx = row["exports"]["onnx"]
        assert (d / "run" / onnx["path"]).exists() and onnx["max_rel_err"] <= 1e-4
    # every method that had a feasible budget has a curve and a plan file
    assert {r["method"] for r in report["rows"]} <= {"layermerge", "kim23", "layerprune"}
    for name in ("report.md", "accuracy_vs_speedup.png", "chain.png", "stages.json"):
        assert (d / "run" / name).exists()
    assert "base" in result.ran
    # one timing pool per backend timed the base and every distinct plan: every row's
    # latency and speed-up, and the base's, come from it
    stages = json.loads((d / "run" / "stages.json").read_text())["stages"]
    assert sorted(s for s in stages if s.startswith("benchmark")) == [
        "benchmark:pool:onnxruntime",
        "benchmark:pool:torch",
    ]
    plans = {r["digest"] for r in report["rows"]}
    for b, pool in report["timing_pool"].items():
        assert pool["networks"] == 1 + len(plans) and pool["rounds"] >= 2
        assert pool["base_ms"] == report["base"]["latency_ms"][b]
        for row in report["rows"]:
            bench = row["benchmarks"][b]
            assert bench["baseline_ms"] == pool["base_ms"]
            assert row["speedup_by_backend"][b] == pytest.approx(
                pool["base_ms"] / row["measured_ms_by_backend"][b]
            )
    assert "one interleaved pool per backend" in (d / "run" / "report.md").read_text()
    # the importance table's protocol and noise floor, in the report
    imp = report["importance"]
    assert (imp["protocol"], imp["score"], imp["calibration_seeds"]) == ("default", "kl", 3)
    assert imp["noise_floor"] >= 0 and imp["spread"] > 0
    md = (d / "run" / "report.md").read_text()
    assert "## Importance table" in md and f"{imp['noise_floor']:.4g}" in md
    # a first run caches nothing but plans that two methods/budgets share
    assert set(result.cached) <= set(result.ran)


def test_rerun_redoes_nothing(finished_run, capsys):
    d, cfg, _ = finished_run
    lines = []
    again = compress(cfg, d / "run", log=lines.append)
    assert again.ran == []
    assert any("nothing to redo" in m for m in lines)


def test_changing_budgets_redoes_only_solve_and_later(finished_run):
    d, _, _ = finished_run
    data = dict(TINY, solve={**TINY["solve"], "budgets": [0.95, 0.8, 0.9]})
    (d / "budgets.yaml").write_text(yaml.safe_dump(data))
    # a copy of the finished run, so the other tests keep theirs
    import shutil

    shutil.copytree(d / "run", d / "run2")
    res = compress(load_config(d / "budgets.yaml"), d / "run2", log=lambda m: None)
    assert not {"base", "importance", "latency:onnxruntime", "latency:torch"} & set(res.ran)
    assert {"base", "importance", "latency:onnxruntime"} <= set(res.cached)
    assert all(s.split(":")[0] in ("solve", "finetune", "export", "benchmark") for s in res.ran)
    assert any(s.startswith("solve:") for s in res.ran)


@pytest.mark.parametrize(
    "patch,msg",
    [
        ({"bogus": 1}, "unknown key"),
        ({"solve": {"budgets": [1.5]}}, "fractions"),
        ({"solve": {"methods": ["kim23"]}}, "must include layermerge"),
        ({"latency": {"backends": ["tensorrt"]}}, "backends"),
        ({"train": {"epochs": "many"}}, "expected float"),
        ({"weights": "/no/such/file.pt"}, "does not exist"),
        ({"threads": "two"}, "threads: a whole number of threads >= 1"),
        ({"solve": {"precision": 0}}, "solve.precision: a number > 0"),
        ({"benchmark": {"rounds": 0}}, "benchmark.rounds: a whole number of rounds >= 1"),
    ],
)
def test_config_errors(patch, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config({**TINY, **patch})
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        parse_config({"model": "layermerge:resnet8"})


def test_cli_reports_config_errors(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: layermerge:resnet8\ndata: fashion-mnist\nfoo: 1\n")
    assert main(["compress", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown key(s) foo" in capsys.readouterr().err


def test_changing_the_finetune_recipe_restarts_finetuning(finished_run):
    """A changed recipe must not meet the old recipe's checkpoint (it would be refused)."""
    import shutil

    d, _, _ = finished_run
    data = dict(TINY, finetune={**TINY["finetune"], "steps": 4})
    (d / "ft.yaml").write_text(yaml.safe_dump(data))
    shutil.copytree(d / "run", d / "run3")
    res = compress(load_config(d / "ft.yaml"), d / "run3", log=lambda m: None)
    assert any(s.startswith("finetune:") for s in res.ran)
    assert not any(
        s.startswith(("solve:", "latency:")) or s in ("base", "importance") for s in res.ran
    )


def test_seeds_add_finetunes_and_the_report_gives_mean_and_sd(finished_run):
    """finetune.seeds: 2 keeps the first seed's fine-tunes, adds one per plan, reports
    the mean and SD, ships the seed of median accuracy and re-times the pool."""
    import shutil
    import statistics

    d, _, _ = finished_run
    data = dict(TINY, finetune={**TINY["finetune"], "seeds": 2})
    (d / "seeds.yaml").write_text(yaml.safe_dump(data))
    shutil.copytree(d / "run", d / "run4")
    res = compress(load_config(d / "seeds.yaml"), d / "run4", log=lambda m: None)
    report = json.loads((d / "run4" / "report.json").read_text())
    plans = {r["digest"] for r in report["rows"]}
    ran_ft = sorted(s for s in res.ran if s.startswith("finetune:"))
    assert ran_ft == sorted(f"finetune:{p}:seed+1" for p in plans)
    # onnxruntime times the shipped files: re-timed when another seed's files ship;
    # torch times the plans' networks, whose latency does not depend on the weights
    shipped_other = any(r["exported_seed"] != 0 for r in report["rows"])
    assert ("benchmark:pool:onnxruntime" in res.ran) == shipped_other
    assert "benchmark:pool:torch" not in res.ran
    for row in report["rows"]:
        accs = row["accuracy_by_seed"]
        assert row["seeds"] == 2 and len(accs) == 2
        assert row["accuracy"] == pytest.approx(statistics.fmean(accs))
        assert row["accuracy_mean"] == row["accuracy"]
        assert row["accuracy_std"] == pytest.approx(statistics.stdev(accs))
        # of two, the lower one is the median that is shipped
        assert row["exported_quality"]["accuracy"] == min(accs)
        assert row["exported_seed"] == accs.index(min(accs))
    md = (d / "run4" / "report.md").read_text()
    assert "mean ± SD over 2 fine-tunes" in md and " ± " in md


def test_finetune_plan_trains_saves_and_merges(tmp_path):
    """The library entry point the pipeline and `layermerge finetune` share."""
    from layermerge import build_space, conv_weights, load_model, trace
    from layermerge.pipeline import finetune_plan
    from layermerge.tasks import ClassificationTask
    from layermerge.train import Recipe
    from layermerge.transform import count_layers, deploy_network

    traced = trace(load_model("layermerge:resnet8", {"in_chans": 1, "width": 4}).model, (1, 8, 8))
    space = build_space(traced.chain, conv_weights(traced))
    plan = space.deepest_plan()
    task = ClassificationTask()
    splits = task.make_data("fashion-mnist", (1, 8, 8), holdout_per_class=2)
    res = finetune_plan(
        traced,
        plan,
        task,
        splits.holdout_train,
        Recipe(steps=2, batch_size=8, lr=0.01),
        teacher=traced.model,
        eval_split=splits.holdout_val,
        evaluate_before=True,
        out=tmp_path / "ft.pt",
        progress=False,
    )
    assert res.steps == 2 and res.merge_max_rel_err <= 1e-4
    assert set(res.before) == set(res.after) == {"accuracy", "loss"}
    # the deepest plan merges convs: fewer of them than in the original network
    whole = count_layers(deploy_network(traced, space.identity_plan()))
    assert res.layers["convs"] < whole["convs"]
    # the saved train-time weights give the same deploy network back
    again = deploy_network(traced, plan, tmp_path / "ft.pt")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(again(x), res.deploy(x), atol=1e-5)


def test_one_config_type_for_both_tasks():
    """Stage keys of classification sections do not hold the diffusion keys, and a
    diffusion config gets its task's defaults."""
    cfg = parse_config(dict(TINY))
    assert cfg.task == "classification" and cfg.quality is None and cfg.schedule is None
    assert "eval_draws" not in cfg.section("importance")
    assert "sampling_steps" not in cfg.section("benchmark")
    assert "ema_decay" not in cfg.section("finetune")
    assert cfg.recipe("importance").optimizer == "sgd"
    ema = parse_config({**TINY, "finetune": {**TINY["finetune"], "ema_decay": 0.9}})
    assert ema.section("finetune")["ema_decay"] == 0.9 and ema.recipe("finetune").ema_decay == 0.9
    with pytest.raises(ConfigError, match="eval_draws is a key of task: diffusion"):
        parse_config({**TINY, "importance": {"eval_draws": 2}})


def test_demo_smoke_runs_every_stage_into_its_own_directory(tmp_path, monkeypatch, capsys):
    """`layermerge demo --smoke` shrinks the demo by its smoke: section (a smoke run,
    marked so in the report) and keeps out of the real demo's run directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--smoke"]) == 0
    report = json.loads((tmp_path / "runs" / "demo-smoke" / "report.json").read_text())
    assert report["smoke"] is True and report["rows"]
    assert not (tmp_path / "runs" / "demo").exists()
    assert "report written to runs/demo-smoke/report.md" in capsys.readouterr().out
