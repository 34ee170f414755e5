"""Table files: round trip, validation messages, joining by key, resumable writing."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from layermerge.tables import (
    TableError,
    TableWriter,
    check_same_settings,
    concat_tables,
    join_tables,
    make_table,
    meta_path,
    read_partial,
    read_table,
    write_table,
)

META = {"model_fingerprint": "fp0", "chain_length": 4, "backend": "torch", "threads": 1}
LAT_COLUMNS = ("start", "end", "kernel", "stride", "depthwise", "kept_convs", "latency_ms")


def lat_rows():
    return [
        dict(start=0, end=1, kernel=3, stride=1, depthwise=False, kept_convs=(1,), latency_ms=1.25),
        dict(start=1, end=2, kernel=3, stride=2, depthwise=True, kept_convs=[2], latency_ms=0.5),
        dict(
            start=0, end=2, kernel=5, stride=2, depthwise=False, kept_convs=(1, 2), latency_ms=1.5
        ),
        dict(start=2, end=4, kernel=1, stride=1, depthwise=False, kept_convs=(), latency_ms=0.0),
        dict(
            start=2,
            end=4,
            kernel=3,
            stride=1,
            depthwise=False,
            kept_convs=(3, 4),
            latency_ms=0.1 + 0.2,
        ),
    ]


def imp_rows():
    return [
        {k: v for k, v in r.items() if k != "latency_ms"}
        | {"importance": 1.0 - i / 10, "delta_acc": -10.0 * i}
        for i, r in enumerate(lat_rows())
    ]


def write_csv(path, text, meta=None, kind="latency"):
    path.write_text(text)
    if meta is not False:
        m = {"schema": 1, "table": kind, **META, **(meta or {})}
        meta_path(path).write_text(json.dumps(m))
    return path


def test_round_trip_keeps_types_values_and_extra_columns(tmp_path):
    rows = lat_rows()
    rows[0]["repeats"] = 200
    rows[1]["latency_std_ms"] = 0.01
    path = write_table(tmp_path / "sub" / "lat.csv", "latency", rows, {**META, "constant_ms": 2.5})
    t = read_table(path, "latency")
    assert t.columns == LAT_COLUMNS + ("repeats", "latency_std_ms")
    assert t.keys() == [
        (0, 1, 3, 1, False),
        (1, 2, 3, 2, True),
        (0, 2, 5, 2, False),
        (2, 4, 1, 1, False),
        (2, 4, 3, 1, False),
    ]
    assert [r["kept_convs"] for r in t.rows] == [(1,), (2,), (1, 2), (), (3, 4)]
    # floats are written with repr, so they come back bit for bit
    assert t.column("latency_ms").tolist() == [1.25, 0.5, 1.5, 0.0, 0.1 + 0.2]
    assert t.rows[0]["repeats"] == 200 and t.rows[1]["repeats"] is None
    assert t.constant_ms == 2.5 and t.chain_length == 4 and t.model_fingerprint == "fp0"
    assert t.meta["schema"] == 1 and t.meta["table"] == "latency"
    text = path.read_text().splitlines()
    assert text[0] == ",".join(t.columns)
    assert text[2] == "1,2,3,2,1,2,0.5,,0.01"  # depthwise as 0/1
    assert text[4].startswith("2,4,1,1,0,,")  # no kept conv: empty cell
    assert sorted(p.name for p in path.parent.iterdir()) == ["lat.csv", "lat.csv.meta.json"]


def test_conv_importance_round_trip(tmp_path):
    rows = [
        {"conv": 2, "importance": 0.9, "delta_acc": -10.5},
        {"conv": 4, "importance": 1.0, "delta_acc": 0.0},
    ]
    t = read_table(write_table(tmp_path / "c.csv", "conv_importance", rows, META))
    assert t.kind == "conv_importance"
    assert t.keys() == [2, 4]
    assert t.row(4)["delta_acc"] == 0.0
    with pytest.raises(TableError, match="conv 5 is outside the chain 1..4"):
        make_table("conv_importance", [{"conv": 5, "importance": 1.0}], META)


def test_options_table_has_no_value_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "latency_ms"} for r in lat_rows()]
    t = read_table(write_table(tmp_path / "o.csv", "options", rows, META), "options")
    assert t.columns == LAT_COLUMNS[:-1]
    assert len(t) == 5


HEADER = ",".join(LAT_COLUMNS) + "\n"


@pytest.mark.parametrize(
    "body, message",
    [
        ("0,1,3,1,0,1,nan\n", r"line 2: column 'latency_ms' is nan; NaN/inf values are not"),
        ("0,1,3,1,0,1,1.0\n1,2,3,1,0,2,inf\n", r"line 3: column 'latency_ms' is inf"),
        ("0,1,3,1,0,1,-0.5\n", r"line 2: negative latency -0.5 ms"),
        (
            "0,1,3,1,0,1,1.0\n0,1,3,1,0,1,2.0\n",
            r"line 3: duplicate key \(0, 1, kernel=3, stride=1, depthwise=0\) \(first at line 2\)",
        ),
        ("0,1,3,1,2,1,1.0\n", r"line 2: column 'depthwise' must be 0 or 1, found '2'"),
        ("0,1,3.5,1,0,1,1.0\n", r"line 2: column 'kernel' must be an integer"),
        ("0,5,3,1,0,1,1.0\n", r"line 2: block \(0, 5\) is not a span of the chain 0..4"),
        ("0,2,3,1,0,3,1.0\n", r"line 2: kept_convs 3 are not all inside the block \(0, 2\]"),
        ("0,2,3,1,0,2 1,1.0\n", r"line 2: kept_convs 2 1 must be strictly increasing"),
        ("0,1,3,1,0,1,fast\n", r"line 2: column 'latency_ms' must be a number"),
        ("0,1,3,1,0,1,\n", r"line 2: column 'latency_ms' is empty"),
        ("0,1,3,1,0,1\n", r"line 2: 6 fields, the header has 7"),
    ],
)
def test_bad_rows_are_refused_with_file_and_line(tmp_path, body, message):
    path = write_csv(tmp_path / "lat.csv", HEADER + body)
    with pytest.raises(TableError, match=message) as err:
        read_table(path)
    assert str(path) in str(err.value)


def test_missing_columns_are_named(tmp_path):
    path = write_csv(tmp_path / "lat.csv", "start,end,kernel,stride,kept_convs\n0,1,3,1,1\n")
    with pytest.raises(
        TableError,
        match=r"missing column\(s\) depthwise, latency_ms for a "
        "latency table",
    ):
        read_table(path)


def test_missing_file_and_sidecar(tmp_path):
    with pytest.raises(TableError, match="does not exist"):
        read_table(tmp_path / "nope.csv")
    path = write_csv(tmp_path / "lat.csv", HEADER, meta=False)
    with pytest.raises(TableError, match=r"the sidecar lat.csv.meta.json is missing"):
        read_table(path)


@pytest.mark.parametrize(
    "meta, kind, message",
    [
        ({"schema": None}, None, r"table schema None is not supported"),
        ({"schema": 2}, None, r"table schema 2 is not supported \(this version reads schema 1\)"),
        ({"table": "speed"}, None, r"unknown table kind 'speed'"),
        ({}, "importance", r"this is a latency table, but a importance table is needed here"),
        ({"chain_length": "4"}, None, r"'chain_length' must be a positive integer"),
        ({"model_fingerprint": 3}, None, r"'model_fingerprint' is missing or not a string"),
    ],
)
def test_bad_meta_is_refused(tmp_path, meta, kind, message):
    path = write_csv(tmp_path / "lat.csv", HEADER, meta=meta)
    with pytest.raises(TableError, match=message):
        read_table(path, kind)


def test_meta_without_schema_is_refused(tmp_path):
    path = tmp_path / "lat.csv"
    path.write_text(HEADER)
    meta_path(path).write_text(json.dumps({"table": "latency", **META}))
    with pytest.raises(TableError, match=r"no 'schema' field"):
        read_table(path)


def test_writer_refuses_what_the_reader_would_refuse(tmp_path):
    rows = lat_rows()
    rows[2]["latency_ms"] = float("nan")
    with pytest.raises(TableError, match=r"row 3: column 'latency_ms' is nan"):
        write_table(tmp_path / "lat.csv", "latency", rows, META)
    with pytest.raises(TableError, match="'model_fingerprint' is missing"):
        write_table(tmp_path / "lat.csv", "latency", lat_rows(), {"chain_length": 4})
    assert not (tmp_path / "lat.csv").exists()


def test_join_is_by_key_not_row_order():
    lat = make_table("latency", lat_rows(), META)
    shuffled = imp_rows()
    random.Random(0).shuffle(shuffled)
    imp = make_table("importance", shuffled, META)
    jl, ji = join_tables(lat, imp)
    assert jl.keys() == ji.keys() == sorted(lat.keys())
    by_key = {
        k: r["importance"]
        for k, r in zip(make_table("importance", imp_rows(), META).keys(), imp_rows())
    }
    assert ji.column("importance").tolist() == [by_key[k] for k in jl.keys()]
    assert np.all(jl.column("latency_ms") == [lat.row(k)["latency_ms"] for k in jl.keys()])


def test_join_refuses_missing_keys_in_either_table():
    lat = make_table("latency", lat_rows(), META)
    imp = make_table("importance", imp_rows()[:3], META)
    with pytest.raises(
        TableError,
        match=r"<importance table> has no row for 2 option\(s\) of "
        r"<latency table>: \(2, 4, kernel=1, stride=1, "
        r"depthwise=0\), \(2, 4, kernel=3",
    ):
        join_tables(lat, imp)
    with pytest.raises(TableError, match=r"<latency table> has no row for 2 option\(s\)"):
        join_tables(
            make_table("latency", lat_rows()[:3], META), make_table("importance", imp_rows(), META)
        )


def test_join_refuses_other_model_or_chain_or_kept_convs():
    lat = make_table("latency", lat_rows(), META)
    other = make_table("importance", imp_rows(), {**META, "model_fingerprint": "fp1"})
    with pytest.raises(TableError, match="different models .fingerprints fp0 and fp1"):
        join_tables(lat, other)
    longer = make_table("importance", imp_rows(), {**META, "chain_length": 5})
    with pytest.raises(TableError, match="chains of different length .4 and 5"):
        join_tables(lat, longer)
    rows = imp_rows()
    rows[2]["kept_convs"] = (2,)
    with pytest.raises(
        TableError,
        match=r"keeps 2 conv\(s\) \[1, 2\] in <latency table> but 1 \[2\] in "
        r"<importance table>; the tables describe different options",
    ):
        join_tables(lat, make_table("importance", rows, META))
    with pytest.raises(TableError, match="is a importance table, not a latency table"):
        join_tables(make_table("importance", imp_rows(), META), lat)


def test_join_takes_kept_convs_from_the_importance_table():
    """Latency does not depend on which convs an option keeps (they are chosen on the
    weights), so a latency table built on other weights joins, and the importance
    table's choice wins."""
    lat_r = lat_rows()
    lat_r[4]["kept_convs"] = (3,)
    lat_r[4]["kernel"] = 3
    imp_r = imp_rows()
    imp_r[4]["kept_convs"] = (4,)
    lat = make_table("latency", lat_r, META)
    imp = make_table("importance", imp_r, META)
    jl, ji = join_tables(lat, imp)
    assert [r["kept_convs"] for r in jl.rows] == [r["kept_convs"] for r in ji.rows]
    assert jl.row((2, 4, 3, 1, False))["kept_convs"] == (4,)
    assert jl.row((2, 4, 3, 1, False))["latency_ms"] == 0.1 + 0.2
    assert lat.row((2, 4, 3, 1, False))["kept_convs"] == (3,)  # the input is not changed


def test_check_same_settings_names_the_differences():
    a = make_table("latency", lat_rows(), META)
    b = make_table("latency", lat_rows(), {**META, "threads": 4, "batch_size": 8})
    check_same_settings(a, make_table("latency", lat_rows()[:2], META))
    with pytest.raises(TableError, match=r"threads 1 vs 4; batch_size '<unset>' vs 8"):
        check_same_settings(a, b)
    check_same_settings(a, b, keys=("backend",))


def test_concat_shards():
    rows = lat_rows()
    a = make_table("latency", rows[:2], META)
    b = make_table("latency", rows[2:], {**META, "constant_ms": 3.0, "shard": 1})
    t = concat_tables([a, b])
    assert sorted(t.keys()) == sorted(make_table("latency", rows, META).keys())
    assert t.constant_ms == 3.0
    with pytest.raises(TableError, match=r"duplicate key \(0, 1, kernel=3.*first at row 1 of"):
        concat_tables([a, make_table("latency", rows[:1], META)])
    with pytest.raises(TableError, match="threads 1 vs 2"):
        concat_tables([a, make_table("latency", rows[2:], {**META, "threads": 2})])
    with pytest.raises(TableError, match="different models"):
        concat_tables([a, make_table("latency", rows[2:], {**META, "model_fingerprint": "x"})])
    imp_a = make_table("importance", imp_rows()[:2], {**META, "epochs": 1})
    imp_b = make_table("importance", imp_rows()[2:], {**META, "epochs": 2})
    with pytest.raises(TableError, match="epochs 1 vs 2"):
        concat_tables([imp_a, imp_b])


def test_writer_appends_durably_and_resumes_after_a_torn_line(tmp_path):
    path = tmp_path / "lat.csv"
    columns = LAT_COLUMNS + ("repeats",)
    rows = lat_rows()
    with TableWriter(path, "latency", META, columns) as w:
        assert w.done == set()
        w.write(rows[0] | {"repeats": 10})
        w.write(rows[1] | {"repeats": 10})
        with pytest.raises(TableError, match="already in the table"):
            w.write(rows[1])
    # an interrupted run leaves half a line behind
    with open(path, "a") as f:
        f.write("0,2,5,2,0,1 2,1.")
    with pytest.raises(TableError, match=r"line 4: the last line has no newline"):
        read_table(path)
    assert read_partial(path).keys() == [(0, 1, 3, 1, False), (1, 2, 3, 2, True)]

    with TableWriter(path, "latency", META, columns) as w:
        assert w.done == {(0, 1, 3, 1, False), (1, 2, 3, 2, True)}
        for r in rows:
            if (r["start"], r["end"], r["kernel"], r["stride"], r["depthwise"]) not in w.done:
                w.write(r | {"repeats": 20})
        w.update_meta(constant_ms=4.0)
    t = read_table(path, "latency")
    assert len(t) == 5
    assert t.row((0, 2, 5, 2, False))["latency_ms"] == 1.5
    assert [r["repeats"] for r in t.rows] == [10, 10, 20, 20, 20]
    assert t.constant_ms == 4.0


def test_writer_refuses_to_resume_with_other_settings_or_columns(tmp_path):
    path = tmp_path / "lat.csv"
    with TableWriter(path, "latency", META) as w:
        w.write(lat_rows()[0])
    with pytest.raises(TableError, match="made with threads=1, this run has threads=8"):
        TableWriter(path, "latency", {**META, "threads": 8})
    with pytest.raises(TableError, match="cannot resume .* columns"):
        TableWriter(path, "latency", META, LAT_COLUMNS + ("repeats",))
    # a run-specific key may change, and new keys are added
    with TableWriter(path, "latency", {**META, "host": "b", "dtype": "float32"}) as w:
        assert len(w.done) == 1
    assert read_table(path).meta["dtype"] == "float32"


def test_writer_validates_rows(tmp_path):
    with TableWriter(tmp_path / "lat.csv", "latency", META) as w:
        with pytest.raises(TableError, match="new row: negative latency"):
            w.write(lat_rows()[0] | {"latency_ms": -1.0})
    assert read_table(tmp_path / "lat.csv").rows == []
