"""What the stages of one compress run share (:class:`Run`), and what a run returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DataSplits
from ..distributed import DistInfo
from ..families import TracedModel
from ..models import load_model
from ..space import SearchSpace
from ..tables import Table
from ..tasks import Task
from .config import CompressConfig
from .stages import StageRunner


@dataclass
class RunResult:
    run_dir: Path
    report: Path
    ran: list[str]
    cached: list[str]


@dataclass
class Run:
    """What the stages of one run share."""

    cfg: CompressConfig
    hooks: Any  # the task's TaskHooks (layermerge.pipeline.hooks)
    runner: StageRunner
    device: torch.device
    dist: DistInfo
    log: Callable[[str], None]
    input_shape: tuple[int, ...]
    task: Task
    splits: DataSplits
    # set by the stages, in order
    base: dict[str, Any] = field(default_factory=dict)
    base_model: nn.Module | None = None
    traced: TracedModel | None = None
    space: SearchSpace | None = None
    backends: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, Table | None] = field(default_factory=dict)
    importance: Table | None = None
    conv_importance: Table | None = None
    pool: dict[str, dict[str, Any]] = field(default_factory=dict)  # per backend
    normalization: dict[str, Any] | None = None  # None: the dataset's statistics

    @property
    def rd(self) -> Path:
        return self.runner.run_dir

    @property
    def main(self) -> bool:
        return self.dist.is_main

    @property
    def primary(self) -> str:
        return self.cfg.latency.backends[0]

    def fresh_model(self, weights=None) -> nn.Module:
        cfg = self.cfg
        shape = tuple(cfg.input_shape) if cfg.input_shape else None
        return load_model(cfg.model, dict(cfg.model_kwargs), weights, shape).model
