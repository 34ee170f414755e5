"""Timing whole diffusion sampling runs: a denoiser ``model(x, t)`` (a model whose
family takes a timestep) run by a latency backend inside a DDIM sampling loop,
original against merged, interleaved. The per-call latency of a denoiser at one
fixed timestep is what the latency table and :func:`layermerge.latency.benchmark`
measure; this module times what a user of the model waits for."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .families import TracedModel, family_of
from .latency import (
    Backend,
    BenchmarkResult,
    OnnxRuntimeBackend,
    TorchBackend,
    measure_interleaved,
)
from .plan import Plan
from .space import build_space
from .transform import deploy_network

__all__ = ["benchmark_sampling", "eps_function", "sampling_pool", "sampling_runner"]


class _Denoiser(nn.Module):
    """``(x, t) -> model(x, t).sample``: a denoiser as a module of two tensor inputs
    and one tensor output, for export (a model returning a tensor is kept as is)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.model(x, t)
        return y.sample if hasattr(y, "sample") else y


def eps_function(
    backend: Backend, model: nn.Module, input_shape: Sequence[int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The noise prediction ``eps(x, t)`` of the denoiser ``model`` run by ``backend``
    (its device, dtype, threads, providers), at the backend's batch size."""
    m = _Denoiser(copy.deepcopy(model)).eval().to(dtype=backend.torch_dtype)
    for p in m.parameters():
        p.requires_grad_(False)
    if isinstance(backend, TorchBackend):
        m = m.to(backend.device)
        if backend.settings.compile:
            m = torch.compile(m, dynamic=False)
        device, dtype = backend.device, backend.torch_dtype

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return m(x.to(device, dtype), t.to(device))

        return eps
    assert isinstance(backend, OnnxRuntimeBackend)
    x = backend.example(input_shape)
    t = torch.zeros(x.shape[0], dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            prog = torch.onnx.export(m, (x, t), dynamo=True, verbose=False)
    opts = list(backend.settings.provider_options) if backend.settings.provider_options else None
    sess = backend.ort.InferenceSession(
        prog.model_proto.SerializeToString(),
        backend.session_options(),
        providers=list(backend.providers),
        provider_options=opts,
    )
    names = [i.name for i in sess.get_inputs()]
    np_dtype = x.numpy().dtype

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {names[0]: x.cpu().numpy().astype(np_dtype, copy=False)}
        if len(names) > 1:  # an exporter may drop an input the graph does not use
            feeds[names[1]] = t.cpu().numpy().astype(np.int64, copy=False)
        return torch.from_numpy(sess.run(None, feeds)[0])

    return eps


def sampling_runner(
    backend: Backend,
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    steps: int = 100,
    eta: float = 0.0,
    seed: int = 0,
    scheduler_config: Mapping[str, Any] | None = None,
) -> Callable[[], torch.Tensor]:
    """A call that runs DDIM sampling (``steps`` evaluations of the denoiser ``model``
    plus the scheduler's updates) from fixed initial noise, at the backend's batch
    size, and returns the images. The denoiser runs on ``backend``; the scheduler's
    arithmetic on the CPU in PyTorch, as in a diffusers pipeline."""
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got {steps}")
    eps = eps_function(backend, model, input_shape)
    sched = DDIMScheduler(**dict(scheduler_config or {}))
    sched.set_timesteps(steps)
    b = backend.settings.batch_size
    x0 = torch.randn(b, *input_shape, generator=torch.Generator().manual_seed(seed))

    def run() -> torch.Tensor:
        x = x0
        for t in sched.timesteps:
            e = eps(x, t.expand(b)).to(device=x.device, dtype=x.dtype)
            x = sched.step(e, t, x, eta=eta).prev_sample
        return x

    return run


def sampling_pool(
    traced: TracedModel,
    plans: Mapping[str, Plan],
    backend: Backend,
    *,
    steps: int = 100,
    eta: float = 0.0,
    seed: int = 0,
    rounds: int = 3,
    max_time_s: float | None = 600.0,
    scheduler_config: Mapping[str, Any] | None = None,
):
    """Whole DDIM sampling runs of the deploy network of every plan in ``plans`` (by
    name), timed in one interleaved pool: each round runs each network once, the order
    alternating, after one untimed run each. Returns the measurements by name."""
    shape = traced.chain.input_shape
    runs = {
        name: sampling_runner(
            backend,
            deploy_network(traced, plan),
            shape,
            steps=steps,
            eta=eta,
            seed=seed,
            scheduler_config=scheduler_config,
        )
        for name, plan in plans.items()
    }
    with backend.session():
        return measure_interleaved(
            runs,
            rounds=rounds,
            calls_per_round=1,
            max_time_s=max_time_s,
            clock=backend.clock,
            warmup_calls=1,
            settle_calls=0,
        )


def benchmark_sampling(
    traced: TracedModel,
    plan: Plan | None,
    backend: Backend,
    *,
    steps: int = 100,
    eta: float = 0.0,
    rounds: int = 3,
    max_time_s: float | None = 600.0,
    statistic: str = "min",
    scheduler_config: Mapping[str, Any] | None = None,
) -> BenchmarkResult:
    """Time whole DDIM sampling runs of the original denoiser (BatchNorm folded) and,
    given a plan, of its deploy network, interleaved, one run per network and round."""
    family = family_of(traced)
    if not family.takes_timestep:
        raise ValueError(
            "sampling benchmarks need a diffusion denoiser, called as model(x, t) "
            f"(such as a diffusers UNet2DModel); a {family.name} model takes no timestep"
        )
    space = build_space(traced.chain)
    nets = {"baseline": space.identity_plan()}
    if plan is not None:
        space.check_plan(plan)
        nets["compressed"] = plan
    res = sampling_pool(
        traced,
        nets,
        backend,
        steps=steps,
        eta=eta,
        rounds=rounds,
        max_time_s=max_time_s,
        scheduler_config=scheduler_config,
    )
    base = res["baseline"]
    comp = res.get("compressed")
    b = base.value(statistic)
    c = comp.value(statistic) if comp else None
    return BenchmarkResult(
        baseline_ms=b,
        compressed_ms=c,
        speedup=b / c if c else None,
        predicted_ms=None,
        predicted_baseline_ms=None,
        baseline=base,
        compressed=comp,
        settings={**backend.meta(), "statistic": statistic},
        extra={"input_shape": list(traced.chain.input_shape), "sampling_steps": steps, "eta": eta},
    )
