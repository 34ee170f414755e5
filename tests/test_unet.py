"""The diffusers UNet2DModel adapter: chain, exact merging with the time embedding
folded, the span BatchNorm, latency options and sampling in a diffusers pipeline."""

import random

import pytest
import torch

pytest.importorskip("diffusers")

from layermerge import apply, build_space, conv_weights, load_model, merge, trace, verify
from layermerge.families.diffusers_unet import SpanNorm, TrainResnet, UNetForward, is_unet
from layermerge.latency import deploy_network, option_input_shape, option_module
from layermerge.trace import TraceError
from layermerge.transform import compare, count_layers


def _small(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = load_model("diffusers:ddpm-small", kw).model.to(dtype)
    traced = trace(model, (1, 32, 32))
    return traced, build_space(traced.chain, conv_weights(traced))


def _with(space, option):
    """The identity plan with ``option`` in place of the blocks it covers."""
    blocks = [
        b
        for b in space.identity_plan().blocks
        if not (option.start <= b.start and b.end <= option.end)
    ]
    return space.plan(sorted([*blocks, option], key=lambda b: b.start))


def test_ddpm_cifar10_chain():
    model = load_model("diffusers:ddpm-cifar10").model
    assert is_unet(model)
    traced = trace(model, (3, 32, 32))
    chain = traced.chain
    space = build_space(chain, conv_weights(traced))
    # 22 ResnetBlock2D (8 down, 2 mid, 12 up) with two convs each + 3 up-sampling convs
    resnets = [u for u in traced.units if u.kind == "resnet"]
    ups = [u for u in traced.units if u.kind == "upsample"]
    assert (len(resnets), len(ups), chain.length) == (22, 3, 47)
    assert len(chain.skips) == 22
    # per ResnetBlock2D three blocks; per up-sampling conv one
    assert len(space.blocks) == 22 * 3 + 3
    # options of a resnet's whole span: 3x3 (one conv pruned) and 5x5 (merged); the
    # up-sampling conv: keep it or drop it
    assert len(space.options) == 22 * 2 + 22 * 2 + 3 * 2
    for u in resnets:
        s, m, e = u.start, u.start + 1, u.end
        assert chain.nodes[m].activation == "silu" and not chain.nodes[m].is_break
        assert chain.nodes[s].is_break and chain.nodes[e].is_break
        assert sorted(o.kernel for o in space.options_of(s, e)) == [3, 5]
    for u in ups:
        assert chain.conv(u.convs[0]).allow_empty
        assert sorted(len(o.kept_convs) for o in space.options_of(u.start, u.end)) == [0, 1]
    assert set(chain.frozen_outside) == {
        "conv_in",
        "conv_out",
        "down_blocks.0.downsamplers.0.conv",
        "down_blocks.1.downsamplers.0.conv",
        "down_blocks.2.downsamplers.0.conv",
    }
    # the first resnet of the third up block reads the concatenation 256 + 256
    first_up = traced.units[-10]
    assert chain.nodes[first_up.start].shape[0] == chain.conv(first_up.start + 1).in_channels


@pytest.mark.slow
def test_ddpm_cifar10_random_plans_exact_float64():
    model = load_model("diffusers:ddpm-cifar10").model.double()
    traced = trace(model, (3, 32, 32))
    space = build_space(traced.chain, conv_weights(traced))
    rng = random.Random(0)
    plans = [space.deepest_plan()] + [space.random_plan(rng) for _ in range(2)]
    result = verify(traced, plans)
    assert result["failures"] == []
    assert result["max_rel_err"] <= 1e-10


def test_every_option_merges_exactly_with_time_embedding():
    traced, space = _small()
    # two plans hold every option that changes the network: each span at 3x3 (one conv
    # pruned) with the up-sampling convs dropped, and each span at 5x5 (both merged)
    pruned, merged = [], []
    for u in traced.units:
        opts = sorted(space.options_of(u.start, u.end), key=lambda o: len(o.kept_convs))
        pruned.append(opts[0])
        merged.append(opts[-1])
    assert {len(o.kept_convs) for o in pruned} == {0, 1}
    plans = [space.plan(pruned), space.plan(merged)] + [
        space.random_plan(random.Random(i)) for i in range(5)
    ]
    result = verify(traced, plans, seed=3)
    assert result["failures"] == []
    assert result["max_rel_err"] <= 1e-12
    # the merged UNet has one conv per merged span, and its time projection changed
    deep = space.deepest_plan()
    deploy = merge(apply(traced, deep))
    r = deploy.get_submodule("down_blocks.0.resnets.1")
    assert r.conv.kernel_size == (5, 5) and r.conv.padding == (2, 2)
    orig = traced.model.get_submodule("down_blocks.0.resnets.1")
    assert not torch.equal(r.time_emb_proj.weight, orig.time_emb_proj.weight)
    counts = count_layers(deploy)
    base = count_layers(traced.model)
    n_res = sum(u.kind == "resnet" for u in traced.units)
    dropped = sum(1 for b in deep.blocks if not b.kept_convs)  # up-sampling convs
    assert counts["activations"] == base["activations"] - n_res
    assert counts["convs"] == base["convs"] - n_res - dropped


def test_time_embedding_matters_and_is_folded():
    """Outputs at two timesteps differ, and the merged UNet follows the train-time
    UNet at both (the per-sample time projection is folded, not averaged)."""
    traced, space = _small()
    train_net = apply(traced, space.deepest_plan())
    deploy = merge(train_net)
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a = [train_net(x, torch.tensor([t])).sample for t in (3, 900)]
        b = [deploy(x, torch.tensor([t])).sample for t in (3, 900)]
    assert (a[0] - a[1]).abs().max() > 1e-3
    for ya, yb in zip(a, b):
        assert torch.allclose(ya, yb, rtol=0, atol=1e-12 * ya.abs().max().item())


def test_span_norm_starts_as_identity_and_calibrates():
    traced, space = _small(torch.float32)
    net = apply(traced, space.deepest_plan())
    spans = [m for m in net.modules() if isinstance(m, TrainResnet)]
    assert spans and all(isinstance(m.span_norm, SpanNorm) for m in spans)
    x = torch.randn(8, 1, 32, 32)
    t = torch.randint(0, 1000, (8,))
    norm = spans[0].span_norm
    h = torch.randn(8, norm.num_features, 6, 6) * 3 + 1
    with torch.no_grad():
        assert torch.equal(norm.eval()(h), h)  # identity before calibration
        net.eval()
        before = net(x, t).sample
        net.train()
        during = net(x, t).sample  # calibrates every span norm on this batch
        net.eval()
        after = net(x, t).sample
    assert all(bool(m.span_norm.calibrated) for m in spans)
    # calibrated to the batch: training mode equals the uncalibrated network, and eval
    # mode (running statistics of that batch) equals both
    assert torch.allclose(during, before, atol=1e-4, rtol=1e-4)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    # and it trains: gradients reach the merged span's convs and the span norm
    net.train()
    loss = net(x, t).sample.square().mean()
    loss.backward()
    assert spans[0].conv1.weight.grad is not None and norm.weight.grad is not None


def test_latency_options_and_forward_wrapper():
    traced, space = _small(torch.float32)
    for o in space.options:
        module = option_module(traced, o).eval()
        x = torch.randn(1, *option_input_shape(traced.chain, o))
        with torch.no_grad():
            y = module(x)
        end = traced.chain.nodes[o.end]
        if o.kept_convs:
            assert y.shape[1] == traced.chain.conv(o.end).out_channels
            # an option ending inside a ResnetBlock2D carries its GroupNorm + SiLU
            assert isinstance(module, torch.nn.Sequential) == (not end.is_break)
        else:
            assert y is x
    net = deploy_network(traced, space.deepest_plan())
    assert isinstance(net, UNetForward)
    with torch.no_grad():
        y = net(torch.randn(2, 1, 32, 32))
    assert y.shape == (2, 1, 32, 32)


def test_compressed_unet_samples_in_a_diffusers_pipeline():
    from diffusers import DDIMPipeline, DDIMScheduler

    traced, space = _small()
    train_net = apply(traced, space.deepest_plan())
    deploy = merge(train_net)
    images = []
    for unet in (train_net, deploy):
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            batch_size=2,
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=3,
            output_type="np",
        ).images
        images.append(torch.as_tensor(out))
    assert images[0].shape == (2, 32, 32, 1)
    assert torch.allclose(images[0], images[1], atol=1e-6)


def test_unsupported_blocks_stay_outside_with_a_reason():
    # scale-shift time embeddings multiply the normalised map: they cannot fold
    model = load_model("diffusers:ddpm-small", {"resnet_time_scale_shift": "scale_shift"}).model
    traced = trace(model, (1, 32, 32))
    assert [u.kind for u in traced.units] == ["upsample", "upsample"]
    assert len(traced.outside) == 6 + 2 + 9  # down, mid and up ResnetBlock2Ds
    assert all("time_embedding_norm" in why for why in traced.outside.values())


def test_a_unet_without_compressible_blocks_is_refused():
    model = load_model(
        "diffusers:ddpm-small",
        {
            "resnet_time_scale_shift": "scale_shift",
            "up_block_types": ["UpBlock2D"],
            "block_out_channels": [32],
            "down_block_types": ["DownBlock2D"],
        },
    ).model
    with pytest.raises(TraceError, match="no ResnetBlock2D or Upsample2D convs"):
        trace(model, (1, 32, 32))


def test_freeze_makes_a_conv_irreducible():
    model = load_model("diffusers:ddpm-small").model
    traced = trace(model, (1, 32, 32), freeze=["mid_block.resnets.0.conv2"])
    space = build_space(traced.chain, conv_weights(traced))
    unit = next(x for x in traced.units if x.path == "mid_block.resnets.0")
    opts = space.options_of(unit.start, unit.end)
    assert len(opts) == 2 and all(unit.convs[1] in o.kept_convs for o in opts)
    with pytest.raises(TraceError, match="do not exist"):
        trace(model, (1, 32, 32), freeze=["nope"])


def test_compare_uses_random_timesteps():
    traced, space = _small()
    a = apply(traced, space.identity_plan())
    b = apply(traced, space.deepest_plan())
    assert compare(a, b)["max_rel_err"] > 1e-3


def test_latency_table_and_sampling_on_both_backends(tmp_path):
    from layermerge.latency import TimingConfig, build_latency_table, make_backend
    from layermerge.sampling import benchmark_sampling, sampling_runner

    traced, space = _small(torch.float32)
    timing = TimingConfig(max_time_s=0.01, min_runs=2, warmup_s=0.0)
    table = build_latency_table(
        traced, tmp_path / "lat.csv", make_backend(backend="torch", threads=1), timing=timing
    )
    assert len(table) == len(space.options) and table.meta["complete"]
    assert table.meta["constant_ms"] >= 0
    dropped = [r for r in table.rows if not r["kept_convs"]]
    assert dropped and all(r["latency_ms"] == 0.0 for r in dropped)
    plan = space.deepest_plan()
    images = []
    for name in ("torch", "onnxruntime"):
        backend = make_backend(backend=name, threads=1)
        unet = merge(apply(traced, plan))
        images.append(sampling_runner(backend, unet, (1, 32, 32), steps=3)())
        res = benchmark_sampling(traced, plan, backend, steps=2, rounds=2)
        assert res.baseline_ms > 0 and res.compressed_ms > 0
        assert res.extra["sampling_steps"] == 2
    # the same initial noise and schedule: ONNX Runtime samples what PyTorch samples
    assert torch.allclose(images[0], images[1], atol=1e-4)


def test_a_local_diffusers_directory_loads_with_weights(tmp_path):
    from safetensors.torch import save_file

    from layermerge.models import ModelLoadError

    model = load_model("diffusers:ddpm-small").model
    model.save_pretrained(tmp_path / "unet")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors"
    )
    loaded = load_model(f"diffusers:{tmp_path / 'unet'}", weights=tmp_path / "w.safetensors")
    assert loaded.input_shape == (1, 32, 32)
    assert torch.equal(loaded.model.conv_in.weight, model.conv_in.weight)  # --weights applied
    assert trace(loaded.model, loaded.input_shape).chain.length == 36
    # a pipeline directory with the UNet in unet/ loads too
    assert trace(load_model(f"diffusers:{tmp_path}").model, (1, 32, 32)).chain.length == 36
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers model directory"):
        load_model(f"diffusers:{tmp_path / 'empty'}")
