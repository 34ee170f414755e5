"""One timing pool per backend: every latency a compress report gives comes from it.

The BatchNorm-folded base network and the deploy network of every distinct plan of
every method (and of every network row, such as channelprune's) are timed in one
interleaved round-robin per backend (one process, one backend's settings; in each
round every network runs ``calls_per_round`` times, the order alternating between
rounds), so that any two rows of the report, and each row and the base, were
measured under the same load. On ONNX Runtime the shipped ONNX files themselves are
timed (the base network's exported the same way).

The pool is one stage per backend whose key holds every network in it: a plan added
to (or removed from) a run re-times the whole pool, so a report never mixes
measurements of two pools. A task's own timings (a diffusion UNet's whole DDIM
sampling runs, :meth:`~layermerge.pipeline.hooks.TaskHooks.extra_benchmarks`) are
made in the same stage, right after the forward pool, as one interleaved pool of
their own: the base network and every plan, each round running each once.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..export import export
from ..latency import (
    TimingConfig,
    check_settings,
    measure_interleaved,
    predict_latency,
    table_statistic,
)
from ..plan import Plan
from ..transform import DEPLOY_VERSION, deploy_network
from .networks import deploy_module, row_plan
from .run import Run
from .ship import file_run, sha256

POOL_SCHEMA = 1


def one_input(run: Run) -> bool:
    """Whether the exported network takes one input (then its ONNX file is timed)."""
    return not getattr(run.traced.family, "takes_timestep", False)


def base_onnx(run: Run) -> Path:
    """The base network (BatchNorm folded) as ONNX, exported as the plans are."""
    name = "export/base.onnx"

    def stage():
        net = deploy_network(run.traced, run.space.identity_plan())
        export(run.traced.family.export_module(net), "onnx", run.rd / name, run.input_shape)
        return {"path": name}

    run.runner.run("export:base", {"base": run.runner.key("base")}, stage, outputs=[name])
    return run.rd / name


def _spread(m: dict[str, Any]) -> float | None:
    """The interquartile range of a network's calls relative to its median."""
    return (m["p75_ms"] - m["p25_ms"]) / m["median_ms"] if m["median_ms"] > 0 else None


def time_pool(run: Run, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Time the base network and every distinct plan of ``rows`` in one pool per
    backend; fill each row's ``measured_ms_by_backend``, ``speedup_by_backend``,
    ``benchmarks``, ``measured_ms`` and ``speedup``. Returns, per backend, what the
    report says about the pool (networks, rounds, calls, spreads)."""
    cfg, bench = run.cfg, run.cfg.benchmark
    first: dict[str, dict[str, Any]] = {}  # digest -> its first row
    for row in rows:
        first.setdefault(row["digest"], row)
    digests = sorted(first)
    # the plans (None: a network row, e.g. channelprune's, which no table predicts)
    plans: dict[str, Plan | None] = {d: row_plan(run, r) for d, r in first.items()}
    shape = run.traced.chain.input_shape
    pools: dict[str, dict[str, Any]] = {}
    for b in cfg.latency.backends:
        by_file = b == "onnxruntime" and one_input(run) and "onnx" in cfg.export.formats
        base_file = base_onnx(run) if by_file else None
        # the files (or, timed from the model, the plans and network rows) of every
        # network in the pool
        networks = {d: run.runner.key(f"export:{d}") if by_file else d for d in digests}

        def stage(b=b, by_file=by_file, base_file=base_file):
            backend = run.backends[b]
            table = run.tables[b] if b == run.primary else None
            statistic = table_statistic(table) if table is not None else TimingConfig().statistic
            settings = {**backend.meta(), "statistic": statistic}
            if table is not None:
                check_settings(table, settings, "the timing pool")
            if by_file:
                runs = {"base": file_run(backend, base_file, shape)}
                for d in digests:
                    runs[d] = file_run(backend, run.rd / f"export/{d}.onnx", shape)
            else:
                identity = deploy_network(run.traced, run.space.identity_plan(), one_input=True)
                runs = {"base": backend.prepare(identity, shape)}
                for d in digests:
                    runs[d] = backend.prepare(deploy_module(run, first[d]), shape)
            rounds = bench.forward_rounds or bench.rounds
            with backend.session():
                res = measure_interleaved(
                    runs,
                    rounds=rounds,
                    calls_per_round=bench.calls_per_round,
                    # the same time per network as a pair of networks was given
                    max_time_s=bench.max_time_s * len(runs) / 2,
                    clock=backend.clock,
                )
            nets = {name: {**m.summary(), "ms": m.value(statistic)} for name, m in res.items()}
            out: dict[str, Any] = {
                "schema": POOL_SCHEMA,
                "statistic": statistic,
                "settings": settings,
                "calls_per_round": bench.calls_per_round,
                "rounds": min(m["runs"] for m in nets.values()) // bench.calls_per_round,
                "networks": nets,
                "timed": "the shipped ONNX files (model.onnx)"
                if by_file
                else "the deploy networks",
            }
            if by_file:
                out["onnx_sha256"] = {d: sha256(run.rd / f"export/{d}.onnx") for d in digests}
            if table is not None:
                out["predicted"] = {
                    d: predict_latency(table, plans[d]) for d in digests if plans[d] is not None
                }
                out["predicted"]["base"] = predict_latency(table, run.space.identity_plan())
            # the task's own timings of every plan (diffusion: whole sampling runs,
            # in a pool of their own after this one)
            out["extra"] = run.hooks.extra_benchmarks(
                run, {d: plans[d] for d in digests if plans[d] is not None}, backend
            )
            return out

        inputs = {
            "fingerprint": run.traced.fingerprint,
            "backend": b,
            "networks": networks,
            **cfg.section("latency"),
            **cfg.section("benchmark"),
            "deploy": DEPLOY_VERSION,
        }
        if by_file:
            inputs["base_onnx"] = run.runner.key("export:base")
        if run.hooks.extra_pool:  # how the task's own timings are made
            inputs["extra_pool"] = run.hooks.extra_pool
        pools[b] = run.runner.run(f"benchmark:pool:{b}", inputs, stage)
    for row in rows:
        _fill_row(row, pools)
        row["measured_ms"] = row["measured_ms_by_backend"][run.primary]
        row["speedup"] = row["speedup_by_backend"][run.primary]
    return {b: _describe(p) for b, p in pools.items()}


def _fill_row(row: dict[str, Any], pools: dict[str, dict[str, Any]]) -> None:
    d = row["digest"]
    row["measured_ms_by_backend"], row["speedup_by_backend"], row["benchmarks"] = {}, {}, {}
    for b, pool in pools.items():
        base, net = pool["networks"]["base"], pool["networks"][d]
        predicted = pool.get("predicted", {})
        row["measured_ms_by_backend"][b] = net["ms"]
        row["speedup_by_backend"][b] = base["ms"] / net["ms"]
        row["benchmarks"][b] = {
            "baseline_ms": base["ms"],
            "compressed_ms": net["ms"],
            "speedup": base["ms"] / net["ms"],
            "spread": _spread(net),
            "runs": net["runs"],
            "predicted_ms": predicted.get(d),
            "predicted_baseline_ms": predicted.get("base"),
            "timed": pool["timed"],
            **({"onnx_sha256": pool["onnx_sha256"][d]} if "onnx_sha256" in pool else {}),
            **pool["extra"].get(d, {}),
        }


def _describe(pool: dict[str, Any]) -> dict[str, Any]:
    spreads = [s for s in (_spread(m) for m in pool["networks"].values()) if s is not None]
    return {
        "networks": len(pool["networks"]),
        "rounds": pool["rounds"],
        "calls_per_round": pool["calls_per_round"],
        "statistic": pool["statistic"],
        "timed": pool["timed"],
        "base_ms": pool["networks"]["base"]["ms"],
        "spread_median": statistics.median(spreads) if spreads else None,
        "spread_max": max(spreads) if spreads else None,
    }
