"""Run directories are self-contained and self-checking: relative paths only, digests
of what every stage produced and consumed, stale stages redone with the reason,
corrupt bookkeeping refused in one line, one compress at a time per directory."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from layermerge.cli import main
from layermerge.pipeline import ConfigError, compress, load_config
from layermerge.pipeline.stages import RunDirBusyError, RunDirError, StageRunner
from layermerge.tables import TableError

TINY = {
    "model": "layermerge:resnet8",
    "model_kwargs": {"in_chans": 1, "width": 4},
    "input_shape": [1, 8, 8],
    "data": "fashion-mnist",
    "train": {"steps": 4, "batch_size": 16, "lr": 0.05},
    "latency": {"backends": ["torch"], "max_time_s": 0.01},
    "importance": {"holdout_per_class": 2, "steps": 1, "batch_size": 20},
    "solve": {"methods": ["layermerge"], "budgets": [1.0], "precision": 10000},
    "finetune": {"steps": 2, "batch_size": 16, "lr": 0.01},
    "export": {"formats": ["onnx"]},
    "benchmark": {"rounds": 1, "calls_per_round": 1, "max_time_s": 2},
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished tiny run, made once; tests copy it."""
    d = tmp_path_factory.mktemp("rundirs")
    (d / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(d / "tiny.yaml")
    compress(cfg, d / "run", log=lambda m: None)
    return d / "run", cfg


def _copy(pristine, dest: Path) -> Path:
    shutil.copytree(pristine[0], dest)
    return dest


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_a_copy_resumes_from_anywhere_after_the_original_is_gone(pristine, tmp_path, monkeypatch):
    original = _copy(pristine, tmp_path / "original")
    copy = shutil.copytree(original, tmp_path / "elsewhere" / "copy")
    shutil.rmtree(original)
    monkeypatch.chdir(tmp_path / "elsewhere")
    lines = []
    res = compress(pristine[1], "copy", log=lines.append)
    assert res.ran == [], lines
    assert any("nothing to redo" in m for m in lines)
    assert any(s.startswith("finetune:") for s in res.cached)
    state = json.loads((copy / "stages.json").read_text())
    assert state["stages"]["base"]["result"]["weights"] == "base.pt"
    for name, rec in state["stages"].items():
        # what each stage produced is recorded by digest, relative to the run directory
        for f, d in rec["outputs"].items():
            assert not Path(f).is_absolute() and ".." not in Path(f).parts
            assert (copy / f).is_file() and d, (name, f)
        # no string names the original directory or an absolute path
        for s in _strings(rec):
            assert "original" not in s and not s.startswith("/"), (name, s)
    assert state["stages"]["importance"]["consumed"].keys() == {"base"}
    # ... and from a third directory, by absolute path
    monkeypatch.chdir(tmp_path)
    assert compress(pristine[1], copy, log=lambda m: None).ran == []


def test_a_truncated_base_is_redone_and_says_why(pristine, tmp_path):
    run = _copy(pristine, tmp_path / "run")
    data = (run / "base.pt").read_bytes()
    (run / "base.pt").write_bytes(data[: len(data) // 2])
    lines = []
    res = compress(pristine[1], run, log=lines.append)
    assert "[redo] base: base.pt changed since it was recorded" in lines
    assert "base" in res.ran
    # trained again from its finished checkpoint: the same weights, so what was made from
    # them is still served
    assert {"importance", "latency:torch", "solve:layermerge"} <= set(res.cached)
    torch.load(run / "base.pt", weights_only=True)  # whole again
    assert compress(pristine[1], run, log=lambda m: None).ran == []


def test_a_changed_plan_file_redoes_its_solve(pristine, tmp_path):
    run = _copy(pristine, tmp_path / "run")
    plan = next((run / "plans").glob("*.json"))
    plan.write_text(plan.read_text() + " ")
    lines = []
    res = compress(pristine[1], run, log=lines.append)
    rel = plan.relative_to(run).as_posix()
    assert f"[redo] solve:layermerge: {rel} changed since it was recorded" in lines
    assert "base" in res.cached and "importance" in res.cached


def test_a_malformed_cached_table_is_one_line_naming_it(pristine, tmp_path):
    run = _copy(pristine, tmp_path / "run")
    (run / "latency_torch.csv").write_bytes(b"\x00\x01garbage\xff")
    with pytest.raises(TableError) as e:
        compress(pristine[1], run, log=lambda m: None)
    msg = str(e.value)
    assert str(run / "latency_torch.csv") in msg and "\n" not in msg
    assert "delete it to start the stage over" in msg


def test_a_corrupt_table_sidecar_is_one_line_naming_it(pristine, tmp_path):
    run = _copy(pristine, tmp_path / "run")
    (run / "latency_torch.csv.meta.json").write_text("{garbage")
    with pytest.raises(TableError) as e:
        compress(pristine[1], run, log=lambda m: None)
    msg = str(e.value)
    assert str(run / "latency_torch.csv.meta.json") in msg and "\n" not in msg
    assert "delete it and latency_torch.csv to start the stage over" in msg


def test_a_truncated_cached_table_is_resumed(pristine, tmp_path):
    run = _copy(pristine, tmp_path / "run")
    data = (run / "latency_torch.csv").read_bytes()
    (run / "latency_torch.csv").write_bytes(data[: len(data) * 2 // 3])
    lines = []
    res = compress(pristine[1], run, log=lines.append)
    assert "[redo] latency:torch: latency_torch.csv changed since it was recorded" in lines
    assert "latency:torch" in res.ran and "base" in res.cached


@pytest.mark.parametrize(
    "text,why",
    [
        ("{not json", "not valid JSON"),
        ('{"schema": 2, "stages": []}', "no 'stages' mapping"),
        ('{"schema": 2, "stages": {"base": {"result": 1}}}', "'base' is malformed"),
        ('{"schema": 99, "stages": {}}', "schema 99"),
        ("[1, 2]", "no 'stages' mapping"),
        (
            '{"schema": 2, "stages": {"b": {"key": "k", "result": {}, "outputs": {"/etc/x": 1}}}}',
            "a path outside the run directory",
        ),
        (
            '{"schema": 2, "stages": {"b": {"key": "k", "result": {"files": ["../x.pt"]}}}}',
            "a path outside the run directory",
        ),
    ],
)
def test_garbage_stages_json_is_refused_in_one_line(tmp_path, text, why):
    (tmp_path / "stages.json").write_text(text)
    with pytest.raises(RunDirError) as e:
        StageRunner(tmp_path, log=lambda m: None)
    msg = str(e.value)
    assert str(tmp_path / "stages.json") in msg and why in msg and "\n" not in msg
    assert (tmp_path / "stages.json").read_text() == text  # left as it was
    assert not (tmp_path / "stages.json.lock").exists()  # and not locked


def test_cli_refuses_garbage_stages_json(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stages.json").write_bytes(b"\x89PNG\x00\xff")
    code = main(["compress", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "stages.json" in err and "delete it" in err


# --------------------------------------------------------------------------- the runner


def _write(path: Path, text: str):
    path.write_text(text)
    return {"n": len(text)}


def test_runner_redoes_consumers_of_changed_products(tmp_path):
    log = []
    with StageRunner(tmp_path, log=log.append) as r:
        r.run("a", {"x": 1}, lambda: _write(tmp_path / "a.txt", "one"), outputs=["a.txt"])
        r.run("b", {"a": r.key("a")}, lambda: _write(tmp_path / "b.txt", "b"), outputs=["b.txt"])
    rec = json.loads((tmp_path / "stages.json").read_text())["stages"]
    assert set(rec["a"]["outputs"]) == {"a.txt"} and set(rec["b"]["consumed"]) == {"a"}
    # a's file changes behind the record: a is redone (and writes "two"), then b
    (tmp_path / "a.txt").write_text("tampered")
    log.clear()
    with StageRunner(tmp_path, log=log.append) as r:
        r.run("a", {"x": 1}, lambda: _write(tmp_path / "a.txt", "two"), outputs=["a.txt"])
        r.run("b", {"a": r.key("a")}, lambda: _write(tmp_path / "b.txt", "b"), outputs=["b.txt"])
    assert log == [
        "[redo] a: a.txt changed since it was recorded",
        "[redo] b: what a produced changed since it was recorded",
    ]
    # redone with the same product: its consumers stay cached
    (tmp_path / "a.txt").write_text("xxx")
    log.clear()
    with StageRunner(tmp_path, log=log.append) as r:
        r.run("a", {"x": 1}, lambda: _write(tmp_path / "a.txt", "two"), outputs=["a.txt"])
        r.run("b", {"a": r.key("a")}, lambda: _write(tmp_path / "b.txt", "b"), outputs=["b.txt"])
    assert log == ["[redo] a: a.txt changed since it was recorded", "[cached] b"]


def test_runner_hashes_each_file_once(tmp_path, monkeypatch):
    import layermerge.pipeline.stages as stages

    calls = []
    real = stages.file_digest
    monkeypatch.setattr(stages, "file_digest", lambda p: calls.append(p) or real(p))
    with StageRunner(tmp_path, log=lambda m: None) as r:
        r.run("a", {}, lambda: _write(tmp_path / "a.txt", "one"), outputs=["a.txt"])
    with StageRunner(tmp_path, log=lambda m: None) as r:
        for _ in range(3):
            r.run("a", {}, lambda: _write(tmp_path / "a.txt", "one"), outputs=["a.txt"])
    assert len(calls) == 2  # once when written, once when the next run first checks it


def test_runner_adopts_records_without_digests(tmp_path, monkeypatch):
    """A run directory of an older layermerge (schema 1: no digests, the base weights
    path relative to where compress ran) stays cached and gains digests."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "base.pt").write_text("weights")
    old = {"key": None, "result": {"weights": "run/base.pt", "acc": 1}}
    monkeypatch.chdir(tmp_path)
    with StageRunner("run", log=lambda m: None) as r:
        r.run("base", {"m": 1}, lambda: old["result"], outputs=["base.pt"])
        old["key"] = r.state["base"]["key"]
    (tmp_path / "run" / "stages.json").write_text(
        json.dumps({"schema": 1, "stages": {"base": old}})
    )
    log = []
    with StageRunner("run", log=log.append) as r:
        res = r.run("base", {"m": 1}, lambda: pytest.fail("redone"), outputs=["base.pt"])
    assert log == ["[cached] base"] and res["weights"] == "base.pt"
    rec = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert rec["schema"] == 2 and rec["stages"]["base"]["outputs"]["base.pt"]


# --------------------------------------------------------------------------- the lock


def test_a_second_compress_on_one_run_dir_is_refused(pristine, tmp_path):
    run = _copy(pristine, tmp_path / "run")
    with StageRunner(run, log=lambda m: None):
        with pytest.raises(RunDirBusyError, match=f"pid {os.getpid()}.* is running compress in"):
            compress(pristine[1], run, log=lambda m: None)
    # released: the next one runs
    assert compress(pristine[1], run, log=lambda m: None).ran == []
    assert not (run / "stages.json.lock").exists()


def test_a_second_run_can_wait_for_the_first(tmp_path):
    first = StageRunner(tmp_path, log=lambda m: None)
    threading.Timer(0.3, first.close).start()
    t0 = time.monotonic()
    with StageRunner(tmp_path, log=lambda m: None, wait=10):
        assert time.monotonic() - t0 >= 0.2


def test_cli_refuses_a_run_dir_another_process_runs_in(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from layermerge.pipeline.stages import StageRunner; "
            "r = StageRunner(sys.argv[1], log=print); print('locked', flush=True); "
            "time.sleep(60)",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["compress", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1
        assert f"another process (pid {holder.pid}) is running compress in" in err
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "patch,key",
    [
        ({"solve": {"precision": 0}}, "solve.precision"),
        ({"solve": {"precision": -5}}, "solve.precision"),
        ({"benchmark": {"rounds": 0}}, "benchmark.rounds"),
        ({"benchmark": {"calls_per_round": 0}}, "benchmark.calls_per_round"),
        ({"benchmark": {"max_time_s": 0}}, "benchmark.max_time_s"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"lr": -0.1}}, "train.lr"),
        ({"finetune": {"batch_size": 0}}, "finetune.batch_size"),
        ({"importance": {"holdout_per_class": 0}}, "importance.holdout_per_class"),
        ({"importance": {"lr": ".nan"}}, "importance.lr"),
        ({"finetune": {"distill_temperature": 0}}, "finetune.distill_temperature"),
        ({"latency": {"threads": 0}}, "latency.threads"),
        ({"threads": 0}, "c.yaml.threads:"),
        ({"seed": -1}, "c.yaml.seed:"),
        ({"solve": {"budgets": [0]}}, "solve.budgets"),
        ({"solve": {"budgets": [1.2]}}, "solve.budgets"),
        ({"task": "diffusion", "benchmark": {"sampling_steps": 0}}, "benchmark.sampling_steps"),
        ({"task": "diffusion", "importance": {"eval_draws": 0}}, "importance.eval_draws"),
        ({"task": "diffusion", "quality": {"n": 0}}, "quality.n"),
        ({"task": "diffusion", "schedule": {"beta_start": 0}}, "schedule.beta_start"),
    ],
)
def test_config_values_are_refused_at_load_naming_the_key(tmp_path, patch, key):
    data = {**TINY, **patch}
    if data.get("task") == "diffusion":
        data = {k: v for k, v in data.items() if k not in ("train", "finetune", "importance")}
        data.update({k: v for k, v in patch.items()})
    text = yaml.safe_dump(data).replace("'.nan'", ".nan")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as e:
        load_config(tmp_path / "c.yaml")
    assert "\n" not in str(e.value)
