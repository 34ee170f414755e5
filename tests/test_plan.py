"""Plans are parsed strictly: wrong types and unknown fields are refused, naming them."""

import json
import re

import pytest

from layermerge.plan import Plan, PlanBlock, PlanError


def _plan_dict() -> dict:
    blocks = [
        PlanBlock(0, 2, 3, 1, False, (2,)),
        PlanBlock(2, 3, 3, 1, False, (3,)),
    ]
    return Plan("abc", 3, blocks).to_dict()


def test_round_trip(tmp_path):
    p = Plan.from_dict(_plan_dict())
    p.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").to_dict() == p.to_dict()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("activation", "false", "'activation' must be true or false"),
        ("depthwise", 0, "'depthwise' must be true or false"),
        ("start", 0.7, "'start' must be an integer"),
        ("end", "2", "'end' must be an integer"),
        ("kernel", True, "'kernel' must be an integer"),
        ("kept_convs", [2.0], "'kept_convs' must be an integer"),
        ("kept_convs", "2", "'kept_convs' must be a list"),
        ("speed", 3, "unknown field(s) ['speed']"),
    ],
)
def test_block_fields_are_typed(field, value, message):
    d = _plan_dict()
    d["blocks"][0][field] = value
    with pytest.raises(PlanError, match=re.escape(message)):
        Plan.from_dict(d)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("chain_length", 3.0, "'chain_length' must be an integer"),
        ("blocks", {}, "'blocks' must be a list"),
        ("meta", [], "'meta' must be an object"),
        ("budget", 0.5, "unknown field"),
    ],
)
def test_plan_fields_are_typed(field, value, message):
    d = _plan_dict()
    d[field] = value
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(d)


def test_missing_activation_defaults_to_kept():
    d = _plan_dict()
    del d["blocks"][0]["activation"]
    assert Plan.from_dict(d).blocks[0].activation is True


def test_load_names_the_file(tmp_path):
    d = _plan_dict()
    d["blocks"][0]["activation"] = "false"
    (tmp_path / "p.json").write_text(json.dumps(d))
    with pytest.raises(PlanError, match="p.json"):
        Plan.load(tmp_path / "p.json")
    with pytest.raises(PlanError, match="is a directory"):
        Plan.load(tmp_path)
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bin.json")
