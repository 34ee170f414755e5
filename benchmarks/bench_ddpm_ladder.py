"""Does the sample-quality metric rank DDPMs correctly? A ladder of known order.

Trains a small DDPM on Fashion-MNIST (32x32, zero-padded) with the library's own
training code, and a ResNet-20 classifier on the same data whose penultimate
features the metric uses. Then samples every rung of a ladder whose order is known
by construction, and scores it with classifier-feature FID and KID (with bootstrap
spreads) against the test split:

- the trained base (EMA weights), DDIM 25 steps;
- the same run after 1/2, 1/4 and 1/8 of its 4000 steps (its own checkpoints);
- the base with Gaussian noise added to every weight tensor (a fraction of each
  tensor's standard deviation);
- the base sampled with fewer DDIM steps (10, 4);

and real images against the same reference (the floor). Writes docs/ddpm-metric.md
(with sample grids under docs/ddpm-metric/) and docs/bench_ddpm_ladder.json, whose
path it prints last.

    python benchmarks/bench_ddpm_ladder.py --threads 1            # about 1 h of one idle core
    python benchmarks/bench_ddpm_ladder.py --quick --threads 1    # a check of the script

Every stage is cached in --work (default /tmp/lm-ddpm-ladder): rerun to resume.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

MODEL = "diffusers:ddpm-fmnist"
DATA = "fashion-mnist"
SHAPE = (1, 32, 32)
CLASSIFIER = "layermerge:resnet20"
CLASSIFIER_KWARGS = {"in_chans": 1}


@dataclass
class Settings:
    steps: int = 4000  # DDPM training steps
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    rungs_every: int = 8  # checkpoints at 1/8 of the steps
    classifier_epochs: float = 4.0
    classifier_steps: int | None = None
    n: int = 500  # samples per rung
    ddim_steps: int = 25
    few_steps: tuple[int, ...] = (10, 4)
    noise_scales: tuple[float, ...] = (0.05, 0.1)
    draws: int = 200  # bootstrap resamples of the generated samples
    grid: int = 64  # images in each grid


QUICK = Settings(
    steps=16,
    batch_size=8,
    warmup_steps=2,
    ema_decay=0.9,
    classifier_epochs=0.0,
    classifier_steps=20,
    n=40,
    ddim_steps=6,
    few_steps=(3, 2),
    draws=20,
    grid=16,
)


def recipe_of(s: Settings):
    from layermerge.train import Recipe

    return Recipe(
        steps=s.steps,
        batch_size=s.batch_size,
        optimizer="adamw",
        lr=s.lr,
        weight_decay=0.0,
        warmup_steps=s.warmup_steps,
        grad_clip=s.grad_clip,
        ema_decay=s.ema_decay,
        amp=False,
        seed=0,
    )


class ChunkedSplit:
    """A training split whose 'epoch' is ``steps`` batches of a fresh shuffle of the
    whole split, so ``fit`` checkpoints (and the ladder saves a rung) every ``steps``."""

    def __init__(self, split, steps: int) -> None:
        self.split, self.steps, self.name = split, steps, split.name

    def __len__(self) -> int:
        return len(self.split)

    def num_batches(self, batch_size, *, train, rank=0, world=1):
        return min(self.steps, self.split.num_batches(batch_size, train=train))

    def batches(self, batch_size, **kw):
        for i, b in enumerate(self.split.batches(batch_size, **kw)):
            if i >= self.steps:
                return
            yield b


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_ddpm(s: Settings, work: Path) -> dict:
    """The base DDPM; its EMA weights after every 1/rungs_every of the steps are saved
    as ``ddpm-step{N}.pt``. Resumes from ``ddpm.ckpt``."""
    from layermerge.diffusion import DiffusionTask
    from layermerge.models import load_model
    from layermerge.train import fit

    final = work / f"ddpm-step{s.steps}.pt"
    info_path = work / "ddpm-train.json"
    if final.exists() and info_path.exists():
        return json.loads(info_path.read_text())
    task = DiffusionTask()
    splits = task.make_data(DATA, SHAPE, holdout_per_class=10, seed=0)
    chunk = s.steps // s.rungs_every
    model = load_model(MODEL).model
    ckpt = work / "ddpm.ckpt"

    def save_rung(record):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        torch.save(state["ema"], work / f"ddpm-step{record['step']}.pt")
        log(
            f"ddpm step {record['step']}/{s.steps}: train loss {record['train_loss']:.4f}, "
            f"{record['seconds']:.0f} s"
        )

    t0 = time.process_time()
    w0 = time.time()
    res = fit(
        model,
        task,
        ChunkedSplit(splits.train, chunk),
        recipe_of(s),
        checkpoint=ckpt,
        progress=False,
        on_epoch_end=save_rung,
    )
    info = {
        "model": MODEL,
        "params": sum(p.numel() for p in model.parameters()),
        "recipe": recipe_of(s).to_dict(),
        "steps": res.steps,
        "final_loss": res.history[-1]["train_loss"],
        "history": res.history,
        "train_seconds_this_run": round(time.time() - w0, 1),
        "train_cpu_seconds_this_run": round(time.process_time() - t0, 1),
        "train_seconds_total": round(sum(r["seconds"] for r in res.history), 1),
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


class Timer:
    """Wall and CPU seconds per stage, accumulated over resumed runs (timings.json)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def add(self, stage: str, wall: float, cpu: float) -> None:
        w, c = self.data.get(stage, (0.0, 0.0))
        self.data[stage] = (w + wall, c + cpu)
        self.path.write_text(json.dumps(self.data, indent=1))

    def run(self, stage: str, fn, *a, **kw):
        w0, c0 = time.time(), time.process_time()
        try:
            return fn(*a, **kw)
        finally:
            self.add(stage, time.time() - w0, time.process_time() - c0)


def classifier_command(s: Settings, out: Path, threads: int) -> list[str]:
    length = (
        ["--steps", str(s.classifier_steps), "--batch-size", "32"]
        if s.classifier_steps
        else ["--epochs", f"{s.classifier_epochs:g}", "--batch-size", "128"]
    )
    return [
        "layermerge",
        "train",
        CLASSIFIER,
        "--model-kwargs",
        json.dumps(CLASSIFIER_KWARGS),
        "--input-shape",
        ",".join(map(str, SHAPE)),
        "--data",
        DATA,
        *length,
        "--lr",
        "0.1",
        "--threads",
        str(threads),
        "--no-progress",
        "--json",
        "--out",
        str(out),
    ]


def train_classifier(s: Settings, work: Path, threads: int) -> dict:
    """ResNet-20 on Fashion-MNIST at 32x32 by ``layermerge train`` (resumes from its
    checkpoint); its test accuracy."""
    import subprocess

    from layermerge.models import load_model
    from layermerge.tasks import ClassificationTask
    from layermerge.train import evaluate

    out = work / "classifier-resnet20.pt"
    info_path = work / "classifier.json"
    cmd = classifier_command(s, out, threads)
    if info_path.exists():
        return json.loads(info_path.read_text())
    if not out.exists():
        log("training the classifier: " + shlex.join(cmd))
        subprocess.run([sys.executable, "-m", "layermerge.cli", *cmd[1:]], check=True)
    model = load_model(CLASSIFIER, CLASSIFIER_KWARGS, out, SHAPE).model
    splits = ClassificationTask().make_data(DATA, SHAPE)
    acc = evaluate(model, ClassificationTask(), splits.test)
    # its training's wall time, from the history in its checkpoint (epochs and evaluation)
    state = torch.load(Path(f"{out}.ckpt"), map_location="cpu", weights_only=True)
    history = json.loads(state["history"])
    info = {
        "command": shlex.join(cmd),
        "test": acc,
        "weights": str(out),
        "history": history,
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
    }
    info_path.write_text(json.dumps(info, indent=1))
    return info


@dataclass
class Rung:
    name: str
    family: str
    expected_rank: int  # within its family, 1 = best (the base)
    weights_step: int
    ddim_steps: int
    noise: float = 0.0
    what: str = ""


def ladder(s: Settings) -> list[Rung]:
    base = Rung(
        "base", "all", 1, s.steps, s.ddim_steps, what=f"{s.steps} steps, DDIM {s.ddim_steps}"
    )
    rungs = [base]
    steps = [s.steps // k for k in (2, 4, 8)]
    for r, st in enumerate(steps, 2):
        rungs.append(
            Rung(
                f"step{st}",
                "training steps",
                r,
                st,
                s.ddim_steps,
                what=f"after {st} of {s.steps} training steps",
            )
        )
    for r, sc in enumerate(s.noise_scales, 2):
        rungs.append(
            Rung(
                f"noise{sc:g}",
                "weight noise",
                r,
                s.steps,
                s.ddim_steps,
                sc,
                what=f"weights + N(0, ({sc:g} std)^2) per tensor",
            )
        )
    for r, k in enumerate(s.few_steps, 2):
        rungs.append(Rung(f"ddim{k}", "DDIM steps", r, s.steps, k, what=f"DDIM {k} steps"))
    return rungs


def noisy_copy(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """``model`` with N(0, (scale * std(W))^2) added to every weight tensor W (a tensor
    of one element or of zero spread is left as it is)."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=g) * (scale * p.std()))
    return m


def rung_samples(r: Rung, s: Settings, work: Path) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    from layermerge.diffusion import sample
    from layermerge.models import load_model

    path = work / f"samples-{r.name}.safetensors"
    if path.exists():
        return load_file(path)["images"]
    model = load_model(MODEL, None, work / f"ddpm-step{r.weights_step}.pt").model
    if r.noise:
        model = noisy_copy(model, r.noise)
    w0, c0 = time.time(), time.process_time()
    images = sample(model, s.n, steps=r.ddim_steps, seed=0, batch_size=100)
    save_file({"images": images.contiguous()}, str(path))
    log(
        f"sampled {r.name}: {s.n} images, DDIM {r.ddim_steps}, {time.time() - w0:.0f} s wall, "
        f"{time.process_time() - c0:.0f} s CPU"
    )
    return images


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, scale: int = 2) -> None:
    from PIL import Image

    from layermerge.diffusion import image_grid

    img = image_grid(images, nrow=nrow)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def check_order(rows: list[dict], floor: dict, key: str) -> dict:
    """Within each family, is ``key`` increasing with the expected rank (the base
    first), and does every rung sit above real-vs-real? Adjacent pairs whose 95 %
    intervals overlap are listed (ordered, but not separated at this n)."""
    base = next(r for r in rows if r["name"] == "base")
    wrong, overlapping = [], []
    for fam in sorted({r["family"] for r in rows} - {"all"}):
        chain = [base] + sorted(
            (r for r in rows if r["family"] == fam), key=lambda r: r["expected_rank"]
        )
        for a, b in zip(chain, chain[1:]):
            if not a[key] < b[key]:
                wrong.append(f"{a['name']} !< {b['name']}")
            elif a[f"{key}_ci95"][1] >= b[f"{key}_ci95"][0]:
                overlapping.append(f"{a['name']} ~ {b['name']}")
    for r in rows:
        if not floor[key] < r[key]:
            wrong.append(f"real-vs-real !< {r['name']}")
    return {"correct": not wrong, "wrong": wrong, "overlapping_intervals": overlapping}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (a check, < 3 min)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=None, help="cache (default /tmp/lm-ddpm-ladder[-quick])")
    ap.add_argument("--stage", choices=["train", "all"], default="all")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/")
    ap.add_argument(
        "--metric",
        choices=sorted(METRICS),
        default="fid",
        help="the metric the JSON's `value` and `order_correct` report (both are computed)",
    )
    ap.add_argument(
        "--rejudge",
        metavar="JSON",
        default=None,
        help="rewrite the docs and JSON from a recorded bench_ddpm_ladder.json with "
        "--metric as the chosen one (no sampling; the grids already in docs/ are kept)",
    )
    args = ap.parse_args(argv)
    if args.rejudge:
        return rejudge(Path(args.rejudge), args.metric, args.no_docs)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    work = Path(args.work or ("/tmp/lm-ddpm-ladder" + ("-quick" if args.quick else "")))
    work.mkdir(parents=True, exist_ok=True)
    timer = Timer(work / "timings.json")
    log(f"training {MODEL} ({s.steps} steps)")
    ddpm = timer.run("train DDPM", train_ddpm, s, work)
    if args.stage == "train":
        return 0
    clf = timer.run("classifier test accuracy", train_classifier, s, work, args.threads)
    if "train classifier (wall only)" not in timer.data:
        timer.add("train classifier (wall only)", clf["train_seconds"], 0.0)
    log(f"classifier test accuracy {clf['test']['accuracy']:.2f} %")

    from layermerge.diffusion import DiffusionTask
    from layermerge.fid import (
        features_of_images,
        load_classifier_features,
        quality_of_features,
        reference_features,
        split_images,
    )

    ext = load_classifier_features(
        CLASSIFIER,
        work / "classifier-resnet20.pt",
        DATA,
        model_kwargs=CLASSIFIER_KWARGS,
        input_shape=SHAPE,
    )
    splits = DiffusionTask().make_data(DATA, SHAPE, holdout_per_class=10, seed=0)
    ref = timer.run(
        "reference features",
        reference_features,
        ext,
        splits.test,
        cache=work / "ref-test.npz",
        source={"data": DATA, "scale": "[-1, 1]", "input_shape": list(SHAPE)},
    )
    ref.kernel_mean()
    log(f"reference: {ref.n} test images, {ref.features.shape[1]}-d features")

    rows = []
    grids = {}
    figdir = DOCS / "ddpm-metric" if not args.no_docs else work / "grids"
    for r in ladder(s):
        images = timer.run("sampling", rung_samples, r, s, work)
        feats = timer.run("metric", features_of_images, images, ext)
        q = timer.run("metric", quality_of_features, feats, ref, draws=s.draws)
        row = {
            "name": r.name,
            "family": r.family,
            "expected_rank": r.expected_rank,
            "what": r.what,
            "value": q.kid,
            **q.to_dict(),
        }
        rows.append(row)
        grids[r.name] = figdir / f"{r.name}.png"
        save_grid(images[: s.grid], grids[r.name])
        log(
            f"{r.name:10s} FID {q.fid:8.3f} +- {q.fid_sd:.3f}   KID x1e3 {q.kid * 1e3:8.3f} "
            f"+- {q.kid_sd * 1e3:.3f}"
        )
    real = torch.cat(list(split_images(splits.train, 500, s.n)))
    qr = quality_of_features(features_of_images(real, ext), ref, draws=s.draws)
    floor = {
        "name": "real-vs-real",
        "what": f"{s.n} training images vs the test split",
        "value": qr.kid,
        **qr.to_dict(),
    }
    grids["real"] = figdir / "real.png"
    save_grid(real[: s.grid], grids["real"])
    log(
        f"real-vs-real FID {qr.fid:.3f} +- {qr.fid_sd:.3f}   KID x1e3 {qr.kid * 1e3:.3f} "
        f"+- {qr.kid_sd * 1e3:.3f}"
    )
    total_wall = sum(v[0] for v in timer.data.values())
    total_cpu = sum(v[1] for v in timer.data.values())
    command = (
        "python benchmarks/bench_ddpm_ladder.py"
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}")
        + (f" --metric {args.metric}" if args.metric != "fid" else "")
    )
    result = {
        "feature_space": ext.label,
        "rungs": rows,
        "real_vs_real": floor,
        "settings": {k: getattr(s, k) for k in s.__dataclass_fields__},
        "ddpm": {
            k: ddpm[k]
            for k in ("model", "params", "recipe", "steps", "final_loss", "train_seconds_total")
        },
        "ddpm_model_config": _model_config(),
        "classifier": clf,
        "timings_s": timer.data,
        "total_wall_s": round(total_wall, 1),
        "total_cpu_s": round(total_cpu, 1),
        "command": command,
        "work": str(work),
    }
    judge(result, args.metric)
    return finish(result, grids, s, work, args.no_docs)


METRICS = {
    "fid": "FID (Frechet distance of Gaussian fits)",
    "kid": "KID (unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3; value = raw KID, not x1e3)",
}


def judge(result: dict, metric: str) -> None:
    """Set the JSON's chosen ``metric``: every rung's and the floor's ``value``, the
    order checks of both metrics and ``order_correct`` of the chosen one."""
    rows, floor = result["rungs"], result["real_vs_real"]
    for r in [*rows, floor]:
        r["value"] = r[metric]
    result["metric"] = (
        f"{METRICS[metric]} in the features of {CLASSIFIER} trained on {DATA} "
        f"(not comparable to Inception {metric.upper()})"
    )
    result["value_key"] = f"{metric} (lower is better)"
    result["chosen_metric"] = metric
    result["order"] = {k: check_order(rows, floor, k) for k in ("kid", "fid")}
    result["order_correct"] = result["order"][metric]["correct"]


def finish(result: dict, grids: dict, s: Settings, work: Path, no_docs: bool) -> int:
    rows, floor, order = result["rungs"], result["real_vs_real"], result["order"]
    for k in ("kid", "fid"):
        o = order[k]
        print(
            f"{k.upper()} orders every rung correctly: {o['correct']}"
            + (f" (wrong: {', '.join(o['wrong'])})" if o["wrong"] else "")
            + (
                f"; overlapping 95 % intervals: {', '.join(o['overlapping_intervals'])}"
                if o["overlapping_intervals"]
                else ""
            )
        )
    print_table(rows, floor)
    if no_docs:
        out = work / "bench_ddpm_ladder.json"
    else:
        out = DOCS / "bench_ddpm_ladder.json"
        write_doc(result, grids, s)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(out)
    return 0


def rejudge(path: Path, metric: str, no_docs: bool) -> int:
    result = json.loads(path.read_text())
    s = Settings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in result["settings"].items()}
    )
    figdir = DOCS / "ddpm-metric"
    grids = {r["name"]: figdir / f"{r['name']}.png" for r in result["rungs"]}
    grids["real"] = figdir / "real.png"
    missing = [str(p) for p in grids.values() if not p.exists()]
    if missing and not no_docs:
        raise SystemExit(f"--rejudge: the sample grids are missing: {', '.join(missing)}")
    judge(result, metric)
    result.setdefault("rejudged", []).append(
        f"python benchmarks/bench_ddpm_ladder.py --rejudge {_rel(path)} --metric {metric}"
    )
    return finish(result, grids, s, Path(result["work"]), no_docs)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _model_config() -> dict:
    from layermerge.models import DIFFUSERS_CONFIGS

    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in DIFFUSERS_CONFIGS[MODEL.split(":", 1)[1]].items()
    }


def _fmt(r: dict) -> tuple[str, str]:
    kid = f"{r['kid'] * 1e3:.2f} ± {r['kid_sd'] * 1e3:.2f}"
    fid = f"{r['fid']:.2f} ± {r['fid_sd']:.2f}"
    return kid, fid


def print_table(rows, floor) -> None:
    print(f"{'rung':12s} {'family':16s} {'exp':>3s} {'KID x1e3':>18s} {'FID':>16s}")
    for r in [*rows, floor]:
        kid, fid = _fmt(r)
        print(
            f"{r['name']:12s} {r.get('family', '-'):16s} {r.get('expected_rank', '-')!s:>3s} "
            f"{kid:>18s} {fid:>16s}"
        )


NOTES = "## Observations"


def write_doc(res: dict, grids: dict, s: Settings) -> None:
    """docs/ddpm-metric.md; a hand-written ``## Observations`` section already there is
    kept."""
    path = DOCS / "ddpm-metric.md"
    kept = ""
    if path.exists():
        old = path.read_text()
        if NOTES in old:
            rest = old[old.index(NOTES) :]
            nxt = rest.find("\n## ", len(NOTES))
            kept = rest if nxt < 0 else rest[:nxt]
    clf, ddpm, cfg = res["classifier"], res["ddpm"], res["ddpm_model_config"]
    rec = ddpm["recipe"]
    tim = res["timings_s"]
    sys.path.insert(0, str(Path(__file__).parent))
    from _docs import cpu_name

    def img(name: str) -> str:
        rel = grids[name].relative_to(DOCS)
        return f'<img src="{rel}" width="320">'

    lines = [
        "# Ranking DDPMs by sample quality: classifier-feature KID and FID on a ladder",
        "",
        "Is a sample-quality number good enough to compare a compressed DDPM with its base? "
        "This page checks the metric on a *ladder*: versions of one DDPM whose order is "
        "known by construction (less training, noise in the weights, fewer sampling "
        "steps), plus real images (the floor). A metric worth using puts every rung in "
        "order and real images below all of them.",
        "",
        f"Produced by `{res['command']}` (work dir `{res['work']}`, every stage "
        f"cached: rerun to resume): its stages took **{res['total_wall_s'] / 60:.0f} min wall "
        "(summed; stages run side by side count twice), "
        f"{res['total_cpu_s'] / 60:.0f} CPU-minutes** (training included; the CPU time "
        "of the classifier's training, a `layermerge train` subprocess, is not counted) on "
        f"{cpu_name()}, 1 thread, nice 10, beside other jobs on a 2-core machine. "
        "Numbers: `docs/bench_ddpm_ladder.json`."
        + (
            " The recorded numbers were re-judged afterwards (no new samples) by `"
            + "`, `".join(res["rejudged"])
            + "`."
            if res.get("rejudged")
            else ""
        ),
        "",
        "## The metric",
        "",
        f"- **Features**: the 64-d penultimate layer (input of the last `nn.Linear`) of "
        f"`{CLASSIFIER}` (`in_chans: 1`) trained on Fashion-MNIST padded to 32x32 by "
        f"`{clf['command']}`: **{clf['test']['accuracy']:.2f} % test accuracy**. Images in "
        "[-1, 1] go through the classifier's own normalisation "
        "(`layermerge.fid.load_classifier_features`).",
        f"- **Reference**: the {res['rungs'][0]['n_ref']} test images, features kept "
        "whole (`reference_features`, cached as `.npz` without pickles plus a JSON "
        "sidecar with a schema version and the extractor's identity).",
        "- **KID** (`kid`, `quality_of_features`): the unbiased estimate of MMD^2 with the "
        "cubic polynomial kernel `k(a, b) = (a.b / d + 1)^3`: `mean_{i!=j} k(x_i, x_j) + "
        "mean_{i!=j} k(y_i, y_j) - 2 mean k(x_i, y_j)`, here one U-statistic over all "
        "generated images against all reference images (`kid(..., subset_size=None)`; "
        "`kid` also averages over random subsets, as the reference implementation). "
        "Unbiased at any sample count: about 0, and possibly negative, for two samples "
        "of one distribution. Shown x1000.",
        "- **FID** (`frechet_distance` of Gaussian fits): biased upwards at small n, so "
        "only numbers at the same n compare.",
        f"- **Spread**: bootstrap over the generated images ({s.draws} resamples with "
        "replacement; the reference is fixed, its 10,000 images make its share of the "
        "variance small). `±` is the bootstrap SD; the 95 % interval is value ± 1.96 SD "
        "(FID's resamples contain duplicates, which shrink the covariance and shift "
        "FID up, so only their SD is used; KID's within-set term skips pairs of copies "
        "of one image). Every rung is sampled from the same initial noises "
        "(seed 0, image i from its own generator), so differences *between* rungs are "
        "less noisy than the intervals of each.",
        "",
        "**Caveats.** Classifier features rank models trained on *this* dataset; they "
        "are not comparable with the Inception-feature FIDs and KIDs of papers (other "
        "network, other feature space, other scale), and the label of every number says "
        "so. A classifier is blind to what does not help it classify (fine texture, "
        "exact stroke widths), and a 64-d space saturates at the bad end: it ranks "
        "models near the data better than it grades degrees of failure. Compare models "
        "at the same n, sampler, steps and seed.",
        "",
        "## The base DDPM",
        "",
        f"`{ddpm['model']}` ({ddpm['params'] / 1e6:.2f} M parameters; block widths "
        f"{tuple(cfg['block_out_channels'])}, {cfg['layers_per_block']} ResNet blocks per "
        f"level, attention at 16x16, GroupNorm groups {cfg['norm_num_groups']}), trained "
        "by `layermerge.train.fit` with `DiffusionTask` (epsilon prediction, DDPM linear "
        "betas over 1000 steps, horizontal flips) on the 60,000 training images:",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {rec['steps']}, batch {rec['batch_size']} "
        f"({rec['steps'] * rec['batch_size'] / 60000:.1f} epochs) |",
        f"| optimiser | AdamW lr {rec['lr']:g}, weight decay {rec['weight_decay']:g}, "
        f"{rec.get('warmup_steps', 0)} warm-up steps, cosine to {rec['min_lr']:g}, "
        f"gradient clip {rec['grad_clip']:g} |",
        f"| EMA | {rec.get('ema_decay', 0):g} (evaluated and sampled) |",
        f"| time | {tim['train DDPM'][0] / 60:.0f} min wall, "
        f"{tim['train DDPM'][1] / 60:.0f} CPU-minutes (one thread) |",
        f"| final training loss | {ddpm.get('final_loss', float('nan')):.4f} (mean over "
        "its last checkpoint interval) |",
        "",
        "The same recipe as a CLI command (the benchmark draws a fresh shuffle of the "
        "training set every 1/8 of the steps, to save the intermediate rungs, so its data "
        "order differs):",
        "",
        "```",
        f"layermerge train {ddpm['model']} --task diffusion --data {DATA} --steps "
        f"{rec['steps']} --batch-size {rec['batch_size']} \\",
        f"    --optimizer adamw --lr {rec['lr']:g} --weight-decay 0 --warmup-epochs "
        f"{rec.get('warmup_steps', 0) * rec['batch_size'] / 60000:.4g} "
        f"--grad-clip {rec['grad_clip']:g} \\",
        f"    --ema-decay {rec.get('ema_decay', 0):g} --eval-split none --threads 1 --out W.pt",
        "```",
        "",
        "## The ladder",
        "",
        f"{s.n} samples per rung (DDIM, eta 0, seed 0), scored against the test split. "
        "Expected rank: within the rung's family, 1 = the base. Lower is better for "
        "both numbers.",
        "",
        "| rung | what | family (expected rank) | KID x1e3 ± SD | KID 95 % | FID ± SD "
        "| FID 95 % | samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [*res["rungs"], res["real_vs_real"]]:
        kid, fid = _fmt(r)
        ki = f"[{r['kid_ci95'][0] * 1e3:.2f}, {r['kid_ci95'][1] * 1e3:.2f}]"
        fi = f"[{r['fid_ci95'][0]:.2f}, {r['fid_ci95'][1]:.2f}]"
        fam = f"{r['family']} ({r['expected_rank']})" if "family" in r else "floor"
        name = r["name"] if "family" in r else "real"
        lines.append(
            f"| **{r['name']}** | {r['what']} | {fam} | {kid} | {ki} | {fid} | {fi} | {img(name)} |"
        )
    lines += ["", "**Is the order right?**", ""]
    chosen = res.get("chosen_metric", "kid")
    for k in ("kid", "fid"):
        o = res["order"][k]
        verdict = "yes, every rung" if o["correct"] else "no: " + ", ".join(o["wrong"])
        lines.append(
            f"- {k.upper()}{' (the chosen metric: `value` in the JSON)' if k == chosen else ''}"
            f": {verdict}"
            + (
                f"; adjacent rungs whose 95 % intervals overlap: "
                f"{', '.join(o['overlapping_intervals'])}"
                if o["overlapping_intervals"]
                else "; no adjacent pair in the right order has overlapping 95 % intervals"
            )
            + "."
        )
    lines += [
        "",
        "Stage times (wall / CPU seconds): "
        + ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in tim.items())
        + ".",
        "",
    ]
    text = "\n".join(lines)
    if kept:
        text += "\n" + kept.rstrip("\n") + "\n"
    path.write_text(text)
    print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
