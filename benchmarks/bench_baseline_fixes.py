"""What the two baseline fixes change on ONNX Runtime (CPU, 1 thread, batch 1), each
measured in one interleaved pool:

- repeated activations: torchvision MobileNetV2 at 3x160x160 with every conv layer
  pruning may drop dropped, its deploy network with and without the repeated ReLU6s
  a dropped depthwise conv leaves (``drop_repeated_activations``), against the
  unmodified network;
- channel widths: ``layermerge:mobilenetv2_mini`` (width 2.0, 1x28x28) pruned by 30 %,
  50 % and 70 % with widths of any size, multiples of 8 and multiples of 16.

Random weights (latency does not depend on them). Writes docs/bench_baseline_fixes.json
and prints its path last.

    .venv/bin/python benchmarks/bench_baseline_fixes.py      # about 1 min
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    import layermerge as lm
    from layermerge.channelprune import count_params, prune_channels
    from layermerge.families import fx_transform
    from layermerge.latency import make_backend
    from layermerge.latency.entries import dropped_block
    from layermerge.latency.table import deploy_network
    from layermerge.latency.timing import measure_interleaved
    from layermerge.pipeline.networks import fold
    from layermerge.plan import Plan

    torch.set_num_threads(1)
    be = make_backend(backend="onnxruntime")
    out: dict = {"backend": "onnxruntime, 1 thread, batch 1, min over the pool's calls"}

    # 1. repeated activations
    shape = (3, 160, 160)
    traced = lm.trace(lm.load_model("torchvision:mobilenet_v2").model.eval(), shape)
    chain, space = traced.chain, lm.build_space(traced.chain)
    identity = space.identity_plan()
    blocks = [
        dropped_block(chain, b.end) if not chain.conv(b.end).irreducible else b
        for b in identity.blocks
    ]
    dropped = Plan(space.fingerprint, chain.length, blocks, method="layerprune")
    runs = {
        "unmodified": be.prepare(deploy_network(traced, identity), shape),
        "dropped": be.prepare(deploy_network(traced, dropped), shape),
    }
    # the same plan as deployed before the fix: the repeats left in
    with mock.patch.object(fx_transform, "drop_repeated_activations", lambda gm: 0):
        runs["dropped, repeats kept"] = be.prepare(deploy_network(traced, dropped), shape)
    with be.session():
        res = measure_interleaved(runs, rounds=10, calls_per_round=5, clock=be.clock)
    out["repeats"] = {
        "model": "torchvision:mobilenet_v2@3x160x160",
        "dropped_convs": sum(1 for b in blocks if not b.kept_convs),
        "ms": {k: m.value("min") for k, m in res.items()},
    }

    # 2. channel widths
    shape = (1, 28, 28)
    base = lm.load_model("layermerge:mobilenetv2_mini", {"in_chans": 1, "width_mult": 2.0})
    model = base.model.eval()
    x = torch.zeros(1, *shape)
    runs, params = {"base": be.prepare(fold(model, shape), shape)}, {}
    for ratio in (0.3, 0.5, 0.7):
        for rt in (None, 8, 16):
            name = f"ratio {ratio}, widths {'any' if rt is None else f'x{rt}'}"
            net = prune_channels(model, ratio, x, round_to=rt)
            params[name] = count_params(net)
            runs[name] = be.prepare(fold(net, shape), shape)
    with be.session():
        res = measure_interleaved(runs, rounds=10, calls_per_round=5, clock=be.clock)
    out["widths"] = {
        "model": "layermerge:mobilenetv2_mini width 2.0 @1x28x28",
        "ms": {k: m.value("min") for k, m in res.items()},
        "params": params,
    }

    for part in ("repeats", "widths"):
        print(part)
        for k, v in out[part]["ms"].items():
            print(f"  {k:28s} {v:.4f} ms")
    path = ROOT / "docs" / "bench_baseline_fixes.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
