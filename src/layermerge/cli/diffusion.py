"""``layermerge sample | fid``: images from a denoiser (a model called as model(x, t))
by DDIM sampling, and their Frechet distance to a data split."""

from __future__ import annotations

import argparse
import time

import torch

from ..diffusion import DiffusionTask, image_grid, sample
from ..fid import (
    FeaturesUnavailableError,
    fid_of_images,
    inception_features,
    load_classifier_features,
    reference_stats,
    split_images,
)
from ..models import ModelLoadError
from .common import (
    UsageError,
    UserError,
    add_data_args,
    add_model_args,
    add_run_args,
    add_schedule_args,
    atomic_output,
    load,
    load_network,
    nonnegative_float,
    positive_int,
    schedule,
    session,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_sample(subparsers)
    _register_fid(subparsers)


def _add_sampler_args(p: argparse.ArgumentParser, n_default: int) -> None:
    g = p.add_argument_group("sampling (DDIM)")
    g.add_argument(
        "--n", type=positive_int, default=n_default, help=f"images (default {n_default})"
    )
    g.add_argument("--steps", type=positive_int, default=100, help="DDIM steps (default 100)")
    g.add_argument("--eta", type=nonnegative_float, default=0.0, help="DDIM eta (0: deterministic)")
    g.add_argument("--seed", type=int, default=0, help="image i uses the seed (SEED, i)")
    g.add_argument("--sample-batch-size", type=positive_int, default=100, metavar="B")
    g.add_argument(
        "--clip-sample",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip the predicted x0 to [-1, 1] at every step (DDIMScheduler default)",
    )
    add_schedule_args(g)


def _network(args) -> torch.nn.Module:
    """MODEL with --weights, or with --plan the deploy network of the fine-tuned plan
    (without --weights the initialisation is seeded, so an untrained model samples the
    same images run to run)."""
    return load_network(args)[1]


def _sample(args, net, device) -> torch.Tensor:
    """--n images of ``net`` by DDIM under the sampling flags."""
    try:
        return sample(
            net,
            args.n,
            steps=args.steps,
            eta=args.eta,
            seed=args.seed,
            batch_size=args.sample_batch_size,
            schedule=schedule(args),
            clip_sample=args.clip_sample,
            device=device,
            progress=not args.no_progress,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


# ------------------------------------------------------------------------------ sample


def _register_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample images from a diffusion model and write them as a PNG grid",
        description=(
            "Sample --n images from MODEL (a denoiser called as model(x, t), e.g. "
            "diffusers:ddpm-small) with --weights, by DDIM (diffusers DDIMPipeline), and "
            "write them as one PNG grid. With --plan, --weights is the train-time state "
            "dict written by finetune and the merged network is sampled."
        ),
    )
    add_model_args(p)
    p.add_argument("--plan", default=None, metavar="plan.json")
    _add_sampler_args(p, 64)
    p.add_argument("--out", required=True, metavar="GRID.png", help="PNG grid of the samples")
    p.add_argument(
        "--nrow", type=positive_int, default=None, help="images per row (default: square)"
    )
    p.add_argument(
        "--save-tensor",
        default=None,
        metavar="S.safetensors",
        help="also save the samples (float, [-1, 1]) as safetensors",
    )
    add_run_args(p)
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    with session(args) as s:
        net = _network(args)
        t0 = time.time()
        images = _sample(args, net, s.device)
        seconds = time.time() - t0
        if s.is_main:
            with atomic_output(args.out) as tmp:
                image_grid(images, args.nrow).save(tmp, format="PNG")
            if args.save_tensor:
                from safetensors.torch import save_file

                with atomic_output(args.save_tensor) as tmp:
                    save_file({"images": images.contiguous()}, str(tmp))
        result = {
            "out": str(args.out),
            "n": args.n,
            "steps": args.steps,
            "eta": args.eta,
            "seconds": round(seconds, 3),
        }
        s.emit(
            result,
            f"{args.n} samples ({args.steps} DDIM steps, {seconds:.1f}s) written to {args.out}",
        )
    return 0


# --------------------------------------------------------------------------------- fid


def _register_fid(sub) -> None:
    p = sub.add_parser(
        "fid",
        help="FID of a diffusion model's samples against a data split (with its feature space)",
        description=(
            "Sample --n images from MODEL with --weights (DDIM, as `layermerge sample`) and "
            "compute their Frechet distance to the images of --ref-split, in the features "
            "of --features: 'classifier' (penultimate layer of a classifier trained on the "
            "same data: --classifier, --classifier-weights; not comparable to Inception "
            "FID) or 'inception' (torch-fidelity or pytorch-fid with their weights already "
            "on disk). Every result carries the name of its feature space. --images scores "
            "samples saved by `layermerge sample --save-tensor`; --real SPLIT scores --n "
            "real images of SPLIT (a sanity anchor; MODEL then only gives the image shape)."
        ),
    )
    add_model_args(p)
    p.add_argument("--plan", default=None, metavar="plan.json")
    add_data_args(p)
    _add_sampler_args(p, 500)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", default=None, metavar="S.safetensors", help="saved samples")
    src.add_argument(
        "--real", choices=["train", "test"], default=None, help="score real images of SPLIT"
    )
    g = p.add_argument_group("features")
    g.add_argument("--features", choices=["classifier", "inception"], default="classifier")
    g.add_argument("--classifier", default="layermerge:resnet20", metavar="MODEL")
    g.add_argument("--classifier-kwargs", default='{"in_chans": 1}', metavar="JSON")
    g.add_argument("--classifier-weights", default=None, metavar="W.pt")
    g.add_argument(
        "--inception-weights", default=None, metavar="PATH", help="torch-fidelity weights file"
    )
    g.add_argument("--ref-split", choices=["test", "train"], default="test")
    g.add_argument(
        "--ref-limit", type=positive_int, default=None, metavar="N", help="first N reference images"
    )
    g.add_argument(
        "--ref-cache",
        default=None,
        metavar="STATS.npz",
        help="cache of the reference statistics (.npz + .npz.json; reused when it matches)",
    )
    add_run_args(p)
    p.set_defaults(func=cmd_fid)


def _extractor(args, device):
    try:
        if args.features == "inception":
            return inception_features(args.inception_weights, device=device)
        if args.classifier_weights is None:
            raise UsageError(
                "classifier features need --classifier-weights (a classifier trained "
                "on the same data, e.g. by `layermerge train layermerge:resnet20 "
                "--model-kwargs '{\"in_chans\": 1}' --input-shape 1,32,32`)"
            )
        return load_classifier_features(
            args.classifier,
            args.classifier_weights,
            args.data,
            model_kwargs=args.classifier_kwargs,
            device=device,
        )
    except (FeaturesUnavailableError, ModelLoadError) as e:
        raise UserError(str(e)) from None


def cmd_fid(args) -> int:
    with session(args) as s:
        extractor = _extractor(args, s.device)
        loaded = load(args, weights=False)  # the image shape
        splits = DiffusionTask().make_data(args.data, loaded.input_shape)
        ref = reference_stats(
            extractor,
            splits.split(args.ref_split),
            cache=args.ref_cache,
            limit=args.ref_limit,
            source={"data": str(splits.dataset.spec), "transform": repr(splits.transform)},
        )
        t0 = time.time()
        if args.real is not None:
            images = torch.cat(list(split_images(splits.split(args.real), limit=args.n)))
            what = f"{len(images)} real {args.real} images"
        elif args.images:
            from safetensors.torch import load_file

            images = load_file(args.images)["images"]
            what = f"{len(images)} samples from {args.images}"
        else:
            images = _sample(args, _network(args), s.device)
            what = f"{len(images)} samples ({args.steps} DDIM steps, eta {args.eta:g})"
        seconds = time.time() - t0
        res = fid_of_images(images, extractor, ref)
        result = {
            **res.to_dict(),
            "images": what,
            "ref_split": args.ref_split,
            "sampling_seconds": round(seconds, 3),
        }
        s.emit(result, f"{res} [{what} vs {args.ref_split} split]")
    return 0
