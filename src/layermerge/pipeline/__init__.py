"""The compress pipeline: one typed config and one stage loop for every task.

- :mod:`~layermerge.pipeline.config`: :class:`CompressConfig` (``task:
  classification | diffusion``), its sections and their validation;
- :mod:`~layermerge.pipeline.loading`: config files, packaged configs,
  ``smoke:``, ``--set`` and ``${VAR}``;
- :mod:`~layermerge.pipeline.stages`: cached stages in a run directory;
- :mod:`~layermerge.pipeline.finetune`: fine-tune one plan (:func:`finetune_plan`);
- :mod:`~layermerge.pipeline.run`: what the stages of a run share;
- :mod:`~layermerge.pipeline.hooks`: what differs per task;
- :mod:`~layermerge.pipeline.compress`: the stage loop (:func:`compress`);
- :mod:`~layermerge.pipeline.objects`: runs over an ``nn.Module`` and torch datasets;
- :mod:`~layermerge.pipeline.ship`: one folder per plan, timing the shipped ONNX file;
- :mod:`~layermerge.pipeline.api`: ``layermerge.compress(model, train=, val=)`` and
  :func:`load_shipped`.
"""

from ..fileio import file_digest
from .api import MetricTask, load_shipped
from .compress import compress, timing_config
from .config import (
    SECTIONS,
    TASK_DEFAULTS,
    TASKS,
    BenchmarkSection,
    CompressConfig,
    ConfigError,
    ExportSection,
    FinetuneSection,
    ImportanceSection,
    LatencySection,
    QualitySection,
    ScheduleSection,
    SolveSection,
    TrainSection,
    parse_config,
    section_defaults,
    section_recipe,
)
from .finetune import FinetuneResult, finetune_plan
from .hooks import DiffusionHooks, TaskHooks, hooks_for
from .loading import (
    CONFIG_DIR,
    apply_overrides,
    apply_smoke,
    deep_merge,
    expand_env,
    is_diffusion_config,
    load_config,
    packaged_configs,
    read_config_data,
    resolve_config,
)
from .objects import ObjectSource, TorchSplits, load_data_factory
from .run import Run, RunResult
from .ship import plan_folder
from .stages import RunDirBusyError, RunDirError, StageRunner, digest

__all__ = [
    "RunDirBusyError",
    "RunDirError",
    "BenchmarkSection",
    "CONFIG_DIR",
    "CompressConfig",
    "ConfigError",
    "DiffusionHooks",
    "ExportSection",
    "FinetuneResult",
    "FinetuneSection",
    "ImportanceSection",
    "LatencySection",
    "MetricTask",
    "ObjectSource",
    "QualitySection",
    "Run",
    "RunResult",
    "SECTIONS",
    "ScheduleSection",
    "SolveSection",
    "StageRunner",
    "TASKS",
    "TASK_DEFAULTS",
    "TaskHooks",
    "TorchSplits",
    "TrainSection",
    "apply_overrides",
    "apply_smoke",
    "compress",
    "deep_merge",
    "digest",
    "expand_env",
    "file_digest",
    "finetune_plan",
    "hooks_for",
    "is_diffusion_config",
    "load_data_factory",
    "load_shipped",
    "load_config",
    "packaged_configs",
    "parse_config",
    "plan_folder",
    "read_config_data",
    "resolve_config",
    "section_defaults",
    "section_recipe",
    "timing_config",
]
