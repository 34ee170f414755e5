"""The importance experiment of docs/importance.md, end to end on Fashion-MNIST.

1. ``layermerge train`` a small ResNet (skipped when ``base.pt`` exists);
2. ``layermerge importance`` in one go, timed;
3. the same command again into another file, killed with SIGKILL midway and
   rerun: the finished CSVs must be byte-identical to those of step 2;
4. the mean importance by block length and by number of pruned convs;
5. a latency table (``layermerge.latency``, torch on the CPU; ``--latency proxy``
   uses multiply-adds instead), a plan from ``layermerge.solve``;
6. ``layermerge finetune`` of that plan with and without distillation: accuracy
   of the base network, of the plan's network before fine-tuning, after.

Every step writes into ``--workdir`` and is skipped when its output is there, so
the script can be rerun after an interruption. Results go to
``WORKDIR/results.json`` and a Markdown summary to stdout.

    .venv/bin/python benchmarks/bench_importance.py --workdir /tmp/lm-fmnist
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "layermerge.cli", *args, "--threads", str(threads)]


def run(cmd: list[str], log: Path) -> float:
    """Run a command (output appended to ``log``); return its wall time."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"command failed (see {log}): {' '.join(cmd)}")
    return time.time() - t0


def run_json(cmd: list[str], log: Path) -> tuple[dict, float]:
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n" + r.stderr[-4000:] + r.stdout)
    if r.returncode != 0:
        raise SystemExit(f"command failed (see {log}): {' '.join(cmd)}")
    return json.loads(r.stdout.strip().splitlines()[-1]), time.time() - t0


def rows(path: Path) -> int:
    return max(0, path.read_text().count("\n") - 1) if path.exists() else 0


def kill_and_resume(cmd: list[str], out: Path, kill_after: int, log: Path) -> dict:
    """Start ``cmd``, SIGKILL it once ``out`` holds ``kill_after`` rows, rerun it."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "   (to be killed)\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None and rows(out) < kill_after:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise SystemExit("the run finished before it could be killed; lower --kill-after")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    first = time.time() - t0
    killed_at = rows(out)
    second = run(cmd, log)
    return {"killed_after_rows": killed_at, "first_s": first, "resume_s": second}


def group_stats(table, key) -> list[dict]:
    groups: dict = {}
    for r in table.rows:
        groups.setdefault(key(r), []).append(r)
    out = []
    for k in sorted(groups):
        g = groups[k]
        imp = [r["importance"] for r in g]
        acc = [r["delta_acc"] for r in g]
        out.append(
            {
                "group": k,
                "n": len(g),
                "mean_importance": statistics.fmean(imp),
                "mean_delta_acc": statistics.fmean(acc),
                "median_delta_acc": statistics.median(acc),
                "min_delta_acc": min(acc),
                "max_delta_acc": max(acc),
            }
        )
    return out


def proxy_latency(space, path: Path) -> Path:
    """Latency proportional to the merged conv's multiply-adds (kernel^2 x channels x
    output pixels); the constant is a tenth of the unmodified chain's total."""
    from layermerge.tables import write_table

    rows_ = []
    for r in space.option_rows():
        first, last = space.chain.conv(r["kept_convs"][0]), space.chain.conv(r["kept_convs"][-1])
        h, w = space.chain.nodes[r["end"]].shape[-2:]
        macs = r["kernel"] ** 2 * first.in_channels * last.out_channels * h * w
        rows_.append({**r, "latency_ms": macs * 1e-6})
    single = sum(x["latency_ms"] for x in rows_ if x["end"] - x["start"] == 1)
    meta = {**space.table_meta(), "constant_ms": 0.1 * single, "backend": "proxy-macs"}
    return write_table(path, "latency", rows_, meta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--model", default="layermerge:resnet14")
    ap.add_argument("--model-kwargs", default='{"in_chans": 1}')
    ap.add_argument("--input-shape", default="1,28,28")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-epochs", default="3")
    ap.add_argument("--holdout-per-class", default="50")
    ap.add_argument("--kill-after", type=int, default=12, help="rows before the SIGKILL")
    ap.add_argument("--no-resume-test", action="store_true", help="skip step 3")
    ap.add_argument("--reinit", choices=["single", "none"], default="single")
    ap.add_argument("--importance-lr", default="0.1")
    ap.add_argument("--base", type=Path, default=None, help="trained weights (skips step 1)")
    ap.add_argument("--latency", choices=["measured", "proxy"], default="measured")
    ap.add_argument("--latency-batch", type=int, default=32)
    ap.add_argument("--budget-frac", type=float, default=0.6)
    ap.add_argument("--score", choices=["exp", "additive"], default="exp")
    ap.add_argument("--finetune-epochs", default="1")
    ap.add_argument("--finetune-lr", default="0.01")
    ap.add_argument("--distill-weight", default="0.5")
    args = ap.parse_args()

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / "log.txt"
    res_path = wd / "results.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}

    def save() -> None:
        res_path.write_text(json.dumps(res, indent=2) + "\n")

    model = [args.model, "--model-kwargs", args.model_kwargs, "--input-shape", args.input_shape]
    model += ["--data", args.data, "--no-progress"]
    base = args.base or wd / "base.pt"
    if not base.exists():
        res["train_s"] = run(
            cli(
                "train",
                *model,
                "--epochs",
                args.train_epochs,
                "--out",
                str(base),
                threads=args.threads,
            ),
            log,
        )
        save()
    imp_args = [*model, "--weights", str(base), "--holdout-per-class", args.holdout_per_class]
    imp_args += ["--reinit", args.reinit, "--lr", args.importance_lr]
    one = wd / "one_go" / "I.csv"
    if not (one.exists() and json.loads(Path(str(one) + ".meta.json").read_text()).get("complete")):
        s, t = run_json(
            cli("importance", *imp_args, "--out", str(one), "--json", threads=args.threads), log
        )
        res["importance_one_go"] = {**s, "wall_s": t}
        save()
    resumed = wd / "resumed" / "I.csv"
    if "importance_resumed" not in res and not args.no_resume_test:
        cmd = cli("importance", *imp_args, "--out", str(resumed), threads=args.threads)
        info = kill_and_resume(cmd, resumed, args.kill_after, log)
        conv = lambda p: p.with_name("I.conv.csv")  # noqa: E731
        info["csv_identical"] = resumed.read_bytes() == one.read_bytes()
        info["conv_csv_identical"] = conv(resumed).read_bytes() == conv(one).read_bytes()
        res["importance_resumed"] = info
        save()

    from layermerge import build_space, conv_weights, load_model, trace
    from layermerge.tables import read_table

    loaded = load_model(args.model, args.model_kwargs, base, args.input_shape)
    traced = trace(loaded.model, loaded.input_shape)
    space = build_space(traced.chain, conv_weights(traced))
    imp = read_table(one, "importance")
    conv_imp = read_table(one.with_name("I.conv.csv"), "conv_importance")
    res["by_block_length"] = group_stats(imp, lambda r: r["end"] - r["start"])
    res["by_pruned_convs"] = group_stats(
        imp, lambda r: r["end"] - r["start"] - len(r["kept_convs"])
    )
    res["by_kind"] = group_stats(
        imp,
        lambda r: (
            "single conv"
            if r["end"] - r["start"] == 1
            else (
                "merge, prune none"
                if len(r["kept_convs"]) == r["end"] - r["start"]
                else "merge + prune"
            )
        ),
    )
    res["conv_table"] = group_stats(conv_imp, lambda r: "conv dropped")
    res["base"] = imp.meta["base"]
    res["options"] = len(space.options)
    save()

    lat_path = wd / f"latency_{args.latency}.csv"
    if not lat_path.exists():
        if args.latency == "proxy":
            proxy_latency(space, lat_path)
        else:
            from layermerge.latency import build_latency_table, make_backend

            backend = make_backend(
                backend="torch", device="cpu", threads=args.threads, batch_size=args.latency_batch
            )
            t0 = time.time()
            build_latency_table(
                traced, lat_path, backend, space=space, model=args.model, progress=False
            )
            res["latency_table_s"] = time.time() - t0
    from layermerge.solve import InfeasibleBudgetError, solve_tables

    lat = read_table(lat_path, "latency")
    try:
        sol = solve_tables(lat, imp, budget_frac=args.budget_frac, score=args.score, precision=1000)
    except InfeasibleBudgetError as e:
        # The part outside the chain can make a small budget impossible: take the
        # smallest one that is not, and say so in the results.
        res["budget_raised_to_ms"] = e.min_feasible_ms
        sol = solve_tables(lat, imp, budget_ms=e.min_feasible_ms, score=args.score, precision=1000)
    plan_path = wd / f"plan_{args.latency}_{args.score}_{args.budget_frac:g}.json"
    sol.plan.save(plan_path)
    res["plan"] = {
        "file": str(plan_path),
        "latency": args.latency,
        "score": args.score,
        "budget_frac": args.budget_frac,
        "summary": sol.plan.summary(),
        "blocks": [[b.start, b.end, b.kernel, list(b.kept_convs)] for b in sol.plan.blocks],
        "predicted_ms": sol.predicted_latency_ms,
        "base_ms": sol.problem.base_latency_ms,
    }
    save()
    for name, kd in (("finetune", "0"), ("finetune_kd", args.distill_weight)):
        key = f"{name}_{plan_path.stem}"
        if key in res:
            continue
        out = wd / f"{key}.pt"
        s, t = run_json(
            cli(
                "finetune", *model, "--weights", str(base), "--plan", str(plan_path),
                "--epochs", args.finetune_epochs, "--lr", args.finetune_lr,
                "--distill", kd, "--eval-before", "--out", str(out), "--json",
                threads=args.threads,
            ),
            log,
        )  # fmt: skip
        res[key] = {**s, "wall_s": t, "distill_weight": float(kd)}
        save()

    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
