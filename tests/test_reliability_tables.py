"""Hostile inputs to tables, sidecars and the solvers, and concurrent writers: each
case is refused with one line naming the file and value, or gives the right answer."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from layermerge import fileio
from layermerge.fileio import FileLock, LockError, atomic_write_text, lock_path
from layermerge.plan import Plan, PlanBlock
from layermerge.solve import build_problem, option_scores, solve, solve_tables, to_units
from layermerge.tables import (
    TableError,
    TableWriter,
    lock_table,
    make_table,
    meta_path,
    read_partial,
    read_table,
    remove_table,
    write_table,
)

ROOT = Path(__file__).resolve().parents[1]
META = {"model_fingerprint": "fp", "chain_length": 2, "constant_ms": 0.5}
LAT_COLUMNS = ("start", "end", "kernel", "stride", "depthwise", "kept_convs", "latency_ms")


def row(s, e, k, kept, **values):
    return dict(start=s, end=e, kernel=k, stride=1, depthwise=False, kept_convs=kept, **values)


def tables(huge=1e17, importance=(1.0, 0.5, 1.0, 3.0), meta=META):
    """Chain of 2 convs: keep or drop conv 1, keep conv 2, or merge both (``huge`` ms)."""
    spec = [(0, 1, 3, (1,), 1.0), (0, 1, 1, (), 0.2), (1, 2, 3, (2,), 1.0), (0, 2, 5, (1, 2), huge)]
    lat = make_table("latency", [row(*r[:4], latency_ms=r[4]) for r in spec], meta)
    imp = make_table(
        "importance",
        [row(*r[:4], importance=v, delta_acc=v) for r, v in zip(spec, importance)],
        {k: v for k, v in meta.items() if k != "constant_ms"},
    )
    return lat, imp


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---------------------------------------------------------------------------
# sidecar values


@pytest.mark.parametrize(
    "value, shown",
    [(-1, "-1"), (-0.5, "-0.5"), (float("nan"), "nan"), (float("inf"), "inf"), ("abc", "'abc'")],
)
def test_bad_constant_ms_is_refused_naming_the_sidecar(tmp_path, value, shown):
    path = write_table(tmp_path / "lat.csv", "latency", tables()[0].rows, META)
    meta = json.loads(meta_path(path).read_text())
    meta["constant_ms"] = value
    meta_path(path).write_text(json.dumps(meta))
    with pytest.raises(TableError) as err:
        read_table(path)
    msg = one_line(err)
    assert f"lat.csv.meta.json: constant_ms is {shown}" in msg and "re-measure" in msg
    with pytest.raises(TableError, match="constant_ms is"):
        make_table("latency", [], {**META, "constant_ms": value})


def test_negative_constant_no_longer_gives_a_negative_prediction(tmp_path):
    # the reported case: constant_ms -1 gave "predicted latency -0.54 ms" and exit 0
    path = write_table(tmp_path / "lat.csv", "latency", tables(huge=2.5)[0].rows, META)
    meta_path(path).write_text(
        meta_path(path).read_text().replace('"constant_ms": 0.5', '"constant_ms": -1')
    )
    with pytest.raises(TableError, match="constant_ms is -1"):
        read_table(path)


def test_a_measured_negative_constant_is_accepted_but_not_an_edited_one():
    # the network timed whole minus its entries timed alone can come out below 0
    measured = {**META, "identity_ms": 1.9, "identity_entries_ms": 2.0}
    lat, imp = tables(huge=2.5, meta={**measured, "constant_ms": 1.9 - 2.0})
    assert lat.constant_ms == pytest.approx(-0.1)
    assert solve_tables(lat, imp, budget_ms=1.9).predicted_latency_ms == pytest.approx(1.9)
    with pytest.raises(TableError, match="constant_ms is -1; a negative constant is only"):
        make_table("latency", [], {**measured, "constant_ms": -1})
    # nor one that makes a plan's predicted latency negative
    edited = {"identity_ms": 0.1, "identity_entries_ms": 2.0, "constant_ms": 0.1 - 2.0}
    lat, imp = tables(huge=2.5, meta={**META, **edited})
    with pytest.raises(TableError, match="fastest layermerge plan would be predicted to take -0.7"):
        solve_tables(lat, imp, budget_ms=1.0)


def test_bad_dropped_ms_and_update_meta_are_refused(tmp_path):
    with pytest.raises(TableError, match=r"dropped_ms\['2'\] is -0.1"):
        make_table("latency", [], {**META, "dropped_ms": {"1": 0.1, "2": -0.1}})
    with pytest.raises(TableError, match="dropped_ms must map"):
        make_table("latency", [], {**META, "dropped_ms": [0.1]})
    with TableWriter(tmp_path / "lat.csv", "latency", META) as w:
        with pytest.raises(TableError, match="constant_ms is -2"):
            w.update_meta(constant_ms=-2.0)
        assert w.meta["constant_ms"] == 0.5  # the sidecar is left as it was
    assert read_table(tmp_path / "lat.csv").constant_ms == 0.5


def test_missing_constant_ms_is_refused_with_the_fix():
    meta = {k: v for k, v in META.items() if k != "constant_ms"}
    lat, imp = tables(huge=2.5, meta=meta)
    with pytest.raises(TableError) as err:
        solve_tables(lat, imp, budget_frac=0.95)
    msg = one_line(err)
    assert "has no constant_ms" in msg and '"constant_ms": 0' in msg and "layermerge latency" in msg
    # set explicitly, the same tables solve
    lat0, _ = tables(huge=2.5, meta={**meta, "constant_ms": 0.0})
    sol = solve_tables(lat0, imp, budget_frac=0.95)
    assert sol.budget_ms == pytest.approx(0.95 * 2.0)


def test_budget_fraction_counts_the_constant():
    lat, imp = tables(huge=2.5)
    sol = solve_tables(lat, imp, budget_frac=0.95)
    assert sol.problem.base_latency_ms == 2.5  # 0.5 + two single convs of 1 ms
    assert sol.budget_ms == pytest.approx(0.95 * 2.5)


# ---------------------------------------------------------------------------
# latencies and importances the solvers must get right or refuse


def test_huge_latency_exact_solver_is_right():
    lat, imp = tables(huge=1e17)
    sol = solve_tables(lat, imp, budget_ms=1.9, score="additive")
    # the merge (1e17 ms) never fits: drop conv 1 (0.2 ms) and keep conv 2 (1 ms)
    assert [(b.start, b.end, b.kept_convs) for b in sol.plan.blocks] == [(0, 1, ()), (1, 2, (2,))]
    assert sol.predicted_latency_ms == pytest.approx(0.5 + 1.2)
    big = solve_tables(lat, imp, budget_ms=2e17, score="additive")
    assert [(b.start, b.end) for b in big.plan.blocks] == [(0, 2)] and big.objective == 3.0


@pytest.mark.parametrize("method", ["layermerge", "kim23"])
def test_huge_latency_discretised_solver_refuses_clearly(method):
    lat, imp = tables(huge=1e17)
    with pytest.raises(TableError) as err:
        build_problem(method, lat, imp, precision=100)
    msg = one_line(err)
    assert "option (0, 2, kernel=5" in msg and "1e+17" in msg and "solve exactly" in msg
    # a latency that fits is solved as before
    lat, imp = tables(huge=3.0)
    assert solve(build_problem(method, lat, imp, precision=100), 2.5).objective > 0
    with pytest.raises(ValueError, match="beyond what the discretised solver counts"):
        to_units(np.array([1.0, 1e17]), 100)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_non_positive_importance_is_refused_under_exp(tmp_path, bad):
    lat, imp = tables(huge=3.0, importance=(1.0, bad, 1.0, 3.0))
    path = write_table(tmp_path / "imp.csv", "importance", imp.rows, imp.meta)
    imp = read_table(path)
    with pytest.raises(TableError) as err:
        solve_tables(lat, imp, budget_ms=2.0)
    msg = one_line(err)
    assert str(path) in msg and "option (0, 1, kernel=1, stride=1, depthwise=0)" in msg
    assert f"is {bad!r}" in msg and "--score additive" in msg
    # the additive score takes any finite value
    assert option_scores(imp, "additive").tolist() == [1.0, bad, 1.0, 3.0]
    assert solve_tables(lat, imp, budget_ms=2.0, score="additive").objective == 1.0 + bad


def test_non_positive_conv_importance_is_refused_under_exp():
    lat, _ = tables(huge=3.0)
    conv = make_table(
        "conv_importance",
        [{"conv": 1, "importance": 0.0}],
        {"model_fingerprint": "fp", "chain_length": 2},
    )
    with pytest.raises(TableError, match=r"importance of conv 1 is 0\.0"):
        solve_tables(lat, method="layerprune", conv_importance=conv, budget_ms=2.0)


def test_negative_latency_without_activation_and_huge_integers_are_refused(tmp_path):
    with pytest.raises(TableError, match=r"negative latency -0.1 ms \(latency_noact_ms\)"):
        make_table("latency", [row(0, 1, 3, (1,), latency_ms=1.0, latency_noact_ms=-0.1)], META)
    path = tmp_path / "lat.csv"
    write_table(path, "latency", [row(0, 1, 3, (1,), latency_ms=1.0)], META)
    path.write_text(path.read_text().replace("1.0\n", "1" + "0" * 30 + "\n"))
    with pytest.raises(TableError, match="line 2: column 'latency_ms' holds '10+', too large"):
        read_table(path)


# ---------------------------------------------------------------------------
# garbage and torn files


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage", "not valid JSON"),
        (b'{"schema": 1, "table": "latency",', "not valid JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b"", "not valid JSON"),
    ],
)
def test_garbage_sidecar_is_one_line_naming_it(tmp_path, content, message):
    path = write_table(tmp_path / "lat.csv", "latency", tables()[0].rows, META)
    meta_path(path).write_bytes(content)
    for read in (read_table, read_partial):
        with pytest.raises(TableError) as err:
            read(path)
        msg = one_line(err)
        assert msg.startswith(str(meta_path(path))) and message in msg


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda t: t[: len(t) - 5], "the last line has no newline"),  # torn by a kill
        (lambda t: t.replace(b"1.0\n", b"1.\x000\n", 1), "must be a number"),  # NUL byte
        (lambda t: t + b'0,1,"' + b"x" * 200_000 + b'"\n', "not valid CSV"),  # huge field
        (lambda t: b"\xff\xfe\x00\x81" * 10, "not a text (CSV) file"),
        (lambda t: t.replace(b"\n", b",9\n", 2), "fields, the header has"),
        (lambda t: b"", "the file is empty"),
    ],
)
def test_torn_or_malformed_cached_table_is_one_line_naming_it(tmp_path, mangle, message):
    path = write_table(tmp_path / "lat.csv", "latency", tables()[0].rows, META)
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(TableError) as err:
        read_table(path)
    msg = one_line(err)
    assert str(path) in msg and message in msg


def test_table_that_is_a_directory_is_one_line(tmp_path):
    (tmp_path / "lat.csv").mkdir()
    with pytest.raises(TableError, match="cannot read table file .*lat.csv"):
        read_table(tmp_path / "lat.csv")


# ---------------------------------------------------------------------------
# failed writes leave nothing behind


def _full_disk(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def test_failed_table_write_leaves_no_file(tmp_path, monkeypatch):
    _full_disk(monkeypatch)
    with pytest.raises(TableError) as err:
        write_table(tmp_path / "lat.csv", "latency", tables()[0].rows, META)
    msg = one_line(err)
    assert "cannot write" in msg and "lat.csv" in msg and "No space left" in msg
    assert listing(tmp_path) == []  # no 0-byte table, no temp file, no lock file


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_table(tmp_path / "lat.csv", "latency", tables()[0].rows, META)
    before = path.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(TableError):
        write_table(path, "latency", tables(huge=2.0)[0].rows, META)
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["lat.csv", "lat.csv.meta.json"]


def test_failed_writer_start_and_row_are_clean(tmp_path, monkeypatch):
    path = tmp_path / "lat.csv"
    with TableWriter(path, "latency", META) as w:
        w.write(row(0, 1, 3, (1,), latency_ms=1.0))
        _full_disk(monkeypatch)
        with pytest.raises(TableError, match="cannot write .*lat.csv: No space left"):
            w.write(row(1, 2, 3, (2,), latency_ms=1.0))
        monkeypatch.undo()
    assert listing(tmp_path) == ["lat.csv", "lat.csv.meta.json"]  # the lock is gone
    _full_disk(monkeypatch)
    with pytest.raises(TableError, match="cannot write"):
        TableWriter(tmp_path / "other.csv", "latency", META)
    monkeypatch.undo()
    assert listing(tmp_path) == ["lat.csv", "lat.csv.meta.json"]
    # the torn line (if any) is cut and the table resumes
    with TableWriter(path, "latency", META) as w:
        assert w.done == {(0, 1, 3, 1, False)}


def test_failed_plan_and_frontier_writes_leave_no_file(tmp_path, monkeypatch):
    plan = Plan("fp", 1, [PlanBlock(0, 1, 3, 1, False, (1,))])
    lat, imp = tables(huge=3.0)
    sol = solve_tables(lat, imp, budget_ms=3.0)
    _full_disk(monkeypatch)
    with pytest.raises(OSError):
        plan.save(tmp_path / "plan.json")
    with pytest.raises(OSError):
        sol.frontier.write_csv(tmp_path / "frontier.csv")
    assert listing(tmp_path) == []


def test_stale_temps_of_killed_writes_are_removed_by_the_next_writer(tmp_path):
    path = tmp_path / "imp.csv.shard1"
    for name in (
        ".imp.csv.shard1.tmp-0123abcd",
        "imp.csv.shard1.tmp",
        ".imp.csv.shard1.meta.json.tmp-deadbeef",
    ):
        (tmp_path / name).write_text("")
    other = tmp_path / ".imp.csv.shard2.tmp-0123abcd"  # another shard's: left alone
    other.write_text("")
    with TableWriter(path, "importance", {**META, "chain_length": 2}, None) as w:
        w.write(row(0, 1, 3, (1,), importance=1.0))
    assert listing(tmp_path) == [other.name, "imp.csv.shard1", "imp.csv.shard1.meta.json"]
    (tmp_path / "imp.csv.shard1.tmp").write_text("")
    remove_table(path)
    assert listing(tmp_path) == [other.name]


# ---------------------------------------------------------------------------
# concurrent writers


def test_two_writers_in_one_process_exclude_each_other(tmp_path):
    path = tmp_path / "lat.csv"
    with TableWriter(path, "latency", META) as w:
        assert lock_path(path).read_text().strip() == str(os.getpid())
        with pytest.raises(LockError) as err:
            TableWriter(path, "latency", META)
        msg = one_line(err)
        assert f"is writing {path}" in msg and f"pid {os.getpid()}" in msg
        with pytest.raises(LockError):
            write_table(path, "latency", [], META)
        w.write(row(0, 1, 3, (1,), latency_ms=1.0))
    assert not lock_path(path).exists()
    with TableWriter(path, "latency", META) as w:  # free again
        assert len(w.done) == 1
    write_table(path, "latency", [], META)


# Holds the lock of a table as a TableWriter does (same lock file), in another
# process; fileio is loaded by path (standard library only), so the child starts fast.
_HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("fileio", sys.argv[2])
fileio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fileio)
lock = fileio.FileLock(sys.argv[1]).acquire()
print("ready", flush=True)
sys.stdin.readline()
lock.release()
"""


def _holder(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), fileio.__file__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_process_is_refused_at_once_or_waits(tmp_path):
    path = tmp_path / "lat.csv"
    proc = _holder(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockError) as err:
            TableWriter(path, "latency", META)
        assert time.monotonic() - t0 < 1.0
        msg = one_line(err)
        assert msg.startswith(f"another process is writing {path} (pid {proc.pid})")
        with pytest.raises(LockError):
            TableWriter(path, "latency", META, wait=0.2)  # waits, then gives up
        got = []

        def wait_for_it():
            with TableWriter(path, "latency", META, wait=True) as w:
                got.append(w.path)

        t = threading.Thread(target=wait_for_it)
        t.start()
        time.sleep(0.3)
        assert not got  # still waiting
        proc.stdin.write("\n")
        proc.stdin.flush()
        t.join(timeout=30)
        assert got == [path]
    finally:
        proc.kill() if proc.poll() is None else None
        proc.wait()
    assert listing(tmp_path) == ["lat.csv", "lat.csv.meta.json"]


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / "lat.csv"
    proc = _holder(path)
    proc.kill()
    proc.wait()
    assert lock_path(path).exists()  # left behind, but no longer locked
    with TableWriter(path, "latency", META) as w:
        assert lock_path(path).read_text().strip() == str(os.getpid())
        w.write(row(0, 1, 3, (1,), latency_ms=1.0))
    assert listing(tmp_path) == ["lat.csv", "lat.csv.meta.json"]


def test_file_lock_released_twice_and_reacquired(tmp_path):
    lock = FileLock(tmp_path / "x")
    with lock:
        assert lock.held
    lock.release()
    assert not lock.held and not lock_path(tmp_path / "x").exists()
    with FileLock(tmp_path / "x"), pytest.raises(LockError):
        FileLock(tmp_path / "x").acquire()
    atomic_write_text(tmp_path / "y", "z")
    assert (tmp_path / "y").read_text() == "z" and fileio.remove_stale_temps(tmp_path / "y") == []


def test_a_lock_taken_before_the_work_is_handed_to_the_writer(tmp_path):
    path = tmp_path / "imp.csv"
    lock = lock_table(path)  # e.g. before measuring the base network
    with pytest.raises(LockError):
        TableWriter(path, "importance", {**META, "chain_length": 2})
    with TableWriter(path, "importance", {**META, "chain_length": 2}, lock=lock) as w:
        w.write(row(0, 1, 3, (1,), importance=1.0))
    assert lock.held  # still the caller's
    with pytest.raises(LockError):
        remove_table(path)
    write_table(path, "importance", [], {**META, "chain_length": 2}, lock=False)
    lock.release()
    with pytest.raises(ValueError, match="must be that table's lock"):
        TableWriter(path, "importance", META, lock=lock)
    assert listing(tmp_path) == ["imp.csv", "imp.csv.meta.json"]


def test_remove_table_clears_an_orphan_shard_of_a_killed_rank(tmp_path):
    # killed while creating its shard: the sidecar, the header's temp file, the lock
    shard = tmp_path / "imp.csv.shard1"
    meta_path(shard).write_text("{}")
    for name in (".imp.csv.shard1.tmp-0badf00d", "imp.csv.shard1.tmp", "imp.csv.shard1.lock"):
        (tmp_path / name).write_text("12345\n")
    remove_table(shard)
    assert listing(tmp_path) == []


def test_file_systems_without_locks_still_write_with_a_warning(tmp_path, monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fileio.fcntl, "flock", flock)
    with pytest.warns(UserWarning, match="does not support locks"):
        write_table(tmp_path / "lat.csv", "latency", tables()[0].rows, META)
    assert listing(tmp_path) == ["lat.csv", "lat.csv.meta.json"]


def test_budgets_beyond_any_unit_count_solve_discretised():
    lat, imp = tables(huge=3.0)
    problem = build_problem("layermerge", lat, imp, precision=100)
    for budget in (1e300, 1.7e308):  # budget x precision overflows a float
        assert solve(problem, budget).objective == solve(problem, 10.0).objective


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_full_disk_while_saving_weights_leaves_no_partial_file(tmp_path, monkeypatch, suffix):
    """A state dict save that fails part-way (disk full) leaves neither the target nor
    its temporary file behind, and the error reaches the caller."""
    import safetensors.torch
    import torch

    from layermerge.train import save_state_dict

    def full_disk(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_state_dict(torch.nn.Linear(2, 2), tmp_path / f"w{suffix}")
    assert list(tmp_path.iterdir()) == []
