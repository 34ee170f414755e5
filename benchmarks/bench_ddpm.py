"""Measured speed-ups of the DDPM CIFAR-10 UNet at the paper's budget fractions.

For ``diffusers:ddpm-cifar10`` (35.7 M parameters) on each backend (PyTorch eager
and ONNX Runtime, CPU, batch 1): build the latency table, solve LayerMerge at the
paper's budgets (0.73, 0.70 and 0.58 of the table latency of the unmodified
UNet: the sum of its chain's entries, with the constant rest of the network on
top), merge and verify each plan, then time the UNet forward and whole DDIM
sampling runs of the original and the merged UNet side by side.

No trained CIFAR-10 DDPM can be had on this machine (nothing is downloaded and
training one needs a GPU), so the importance table is uniform (every option 1.0):
the plans show what the latency budgets buy, not which spans matter for sample
quality. With real weights, ``layermerge importance --task diffusion`` makes the
importance table and the rest is the same. Latency does not depend on weights.

    python benchmarks/bench_ddpm.py --write-docs              # about 30 min here
    python benchmarks/bench_ddpm.py --steps 10 --rounds 2     # a quicker look

Tables and plans go to ``runs/bench_ddpm`` (resumable: rerun to continue).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from layermerge import build_space, conv_weights, load_model, trace
from layermerge.latency import (
    TimingConfig,
    benchmark,
    build_latency_table,
    make_backend,
    predict_latency,
)
from layermerge.sampling import benchmark_sampling
from layermerge.solve import InfeasibleBudgetError, solve_tables
from layermerge.tables import write_table
from layermerge.transform import apply, merge

BUDGETS = (0.73, 0.70, 0.58)


def uniform_importance(space, path: Path) -> Path:
    rows = [{**r, "importance": 1.0} for r in space.option_rows()]
    meta = {
        "model_fingerprint": space.fingerprint,
        "chain_length": space.chain.length,
        "note": "uniform: no trained CIFAR-10 DDPM on this machine",
    }
    return write_table(path, "importance", rows, meta)


def plan_summary(space, plan) -> dict:
    merged = sum(1 for b in plan.blocks if len(b.kept_convs) > 1)
    dropped_up = sum(1 for b in plan.blocks if not b.kept_convs)
    kept = sum(len(b.kept_convs) for b in plan.blocks)
    return {
        "blocks": len(plan.blocks),
        "merged_spans": merged,
        "kept_convs": kept,
        "pruned_convs": space.chain.length - kept,
        "dropped_upsampling_convs": dropped_up,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100, help="DDIM steps per sampling run")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved sampling rounds")
    ap.add_argument("--out", default="runs/bench_ddpm")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model("diffusers:ddpm-cifar10").model
    traced = trace(model, (3, 32, 32))
    space = build_space(traced.chain, conv_weights(traced))
    imp_path = uniform_importance(space, out / "importance_uniform.csv")
    from layermerge.tables import read_table

    importance = read_table(imp_path, "importance")
    results = []
    t_start = time.perf_counter()
    for name in args.backends:
        backend = make_backend(backend=name, threads=args.threads)
        t0 = time.perf_counter()
        table = build_latency_table(
            traced,
            out / f"latency_{name}.csv",
            backend,
            space=space,
            timing=TimingConfig(max_time_s=0.3),
            model="diffusers:ddpm-cifar10",
            progress=False,
        )
        table_s = time.perf_counter() - t0
        base_pred = predict_latency(table, space.identity_plan())
        print(f"{name}: table {len(table)} entries ({table_s:.0f} s), predicted {base_pred:.1f} ms")
        for frac in BUDGETS:
            # the paper's fractions are of the table latency: the chain's entries;
            # what lies outside the chain (constant_ms) comes on top unchanged
            budget = table.constant_ms + frac * (base_pred - table.constant_ms)
            note = ""
            try:
                sol = solve_tables(table, importance, budget_ms=budget)
            except InfeasibleBudgetError as e:
                # report it, and time the fastest plan there is instead
                note = (
                    f"infeasible here: the smallest feasible budget is {e.min_feasible_ms:.1f} "
                    f"ms (fraction {(e.min_feasible_ms - table.constant_ms) / (base_pred - table.constant_ms):.2f}); "
                    "timed at that budget"
                )
                print(f"{name} {frac}: {note}")
                budget = e.min_feasible_ms
                sol = solve_tables(table, importance, budget_ms=budget)
            plan = sol.plan
            plan.save(out / f"plan_{name}_{frac:.2f}.json")
            merge(apply(traced, plan))  # verified against the train-time UNet
            fwd = benchmark(traced, plan, backend, table=table, rounds=6, calls_per_round=3)
            smp = benchmark_sampling(traced, plan, backend, steps=args.steps, rounds=args.rounds)
            row = {
                "backend": fwd.settings["backend"],
                "budget_frac": frac,
                "budget_ms": budget,
                "note": note,
                "constant_ms": table.constant_ms,
                "predicted_ms": fwd.predicted_ms,
                "predicted_baseline_ms": fwd.predicted_baseline_ms,
                "forward_baseline_ms": fwd.baseline_ms,
                "forward_ms": fwd.compressed_ms,
                "forward_speedup": fwd.speedup,
                "sampling_steps": args.steps,
                "sampling_baseline_s": smp.baseline_ms / 1e3,
                "sampling_s": smp.compressed_ms / 1e3,
                "sampling_speedup": smp.speedup,
                "table_s": round(table_s, 1),
                **plan_summary(space, plan),
            }
            results.append(row)
            print(json.dumps(row))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    if args.write_docs:
        write_docs(results, args, total)
    return 0


def write_docs(results, args, total_s: float) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _docs import cpu_name, write_section

    lines = [
        "## DDPM (diffusion UNet)",
        "",
        "`python benchmarks/bench_ddpm.py --write-docs` "
        f"(`--steps {args.steps} --rounds {args.rounds}`, {total_s / 60:.0f} min here): "
        "the DDPM CIFAR-10 UNet (`diffusers:ddpm-cifar10`, 35.7 M parameters), "
        f"{cpu_name()}, {args.threads} thread(s), batch 1, float32. LayerMerge at the "
        "paper's budget fractions of the unmodified UNet's table latency (its chain's "
        "entries; the constant rest, `constant_ms`, comes on top); every plan "
        "merged and verified. Forward: the UNet at one timestep (6 interleaved rounds "
        "of 3 calls, minimum of process CPU time). Sampling: whole DDIM runs "
        f"({args.steps} steps, eta 0, the scheduler on the CPU as in a diffusers "
        f"pipeline), {args.rounds} interleaved rounds, minimum.",
        "",
        "The importance table is uniform (no trained CIFAR-10 DDPM can be had here), so "
        "these plans show what each budget buys in measured time, not sample quality; "
        "the Fashion-MNIST example (docs/diffusion.md) measures quality.",
        "",
        "| backend | budget | predicted ms (base) | forward ms base -> merged | forward speed-up "
        "| sampling s base -> merged | sampling speed-up | merged spans | pruned convs "
        "| dropped up-sampling convs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['budget_frac']:.2f} | {r['predicted_ms']:.1f} "
            f"({r['predicted_baseline_ms']:.1f}) | {r['forward_baseline_ms']:.1f} -> "
            f"{r['forward_ms']:.1f} | {r['forward_speedup']:.2f}x | "
            f"{r['sampling_baseline_s']:.2f} -> {r['sampling_s']:.2f} | "
            f"{r['sampling_speedup']:.2f}x | {r['merged_spans']} | {r['pruned_convs']} | "
            f"{r['dropped_upsampling_convs']} |"
        )
    for r in results:
        if r["note"]:
            lines.append("")
            lines.append(f"- {r['backend']}, budget {r['budget_frac']:.2f}: {r['note']}.")
    lines.append("")
    lines.append(
        "The paper reports 1.13x (PyTorch) for DDPM CIFAR-10 at its budgets, on an RTX "
        "2080 Ti at batch 128, with FID 4.18 -> 4.16 after 100k fine-tuning steps."
    )
    print("wrote", write_section("## DDPM (diffusion UNet)", "\n".join(lines)))


if __name__ == "__main__":
    sys.exit(main())
