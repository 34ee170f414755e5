"""Reading compress configs: files or packaged configs by name, the ``smoke:``
section (``--smoke``), ``--set KEY=VALUE`` overrides and ``${VAR}`` expansion.
Validation is :func:`layermerge.pipeline.config.parse_config`."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

from .config import CompressConfig, ConfigError, check_smoke, config_task, parse_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _yaml():
    import yaml

    return yaml


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s values; mappings are merged key by key, the rest replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_smoke(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """The raw config ``data`` shrunk by its own ``smoke:`` section, marked as a smoke run.

    Everything the smoke section does not name (the model, methods, budgets, the
    fine-tuning recipe's optimiser, label smoothing, epochs, ...) stays as it is.
    """
    smoke = data.get("smoke")
    if not smoke:
        raise ConfigError(f"{where}: --smoke needs a smoke: section in the config, and it has none")
    check_smoke(smoke, f"{where}.smoke", config_task(data, where))
    return {**deep_merge(data, smoke), "is_smoke": True}


def apply_overrides(data: dict[str, Any], overrides, where: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` or ``SECTION.KEY=VALUE`` strings (values are YAML: ``[0.5, 0.4]``,
    ``null``, ``true``) applied to the raw config ``data``."""
    yaml = _yaml()
    out = copy.deepcopy(data)
    for text in overrides:
        key, sep, raw = text.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"{where} {text!r}: use KEY=VALUE or SECTION.KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} {text!r}: the value is not valid YAML ({e})") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}  # e.g. train: null, then --set train.steps=10
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{where} {text!r}: {'.'.join(parts[: i + 1])} is not a section")
        node[parts[-1]] = value
    return out


def expand_env(value: Any, where: str) -> Any:
    """``${NAME}`` in the config's strings -> the environment variable's value."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            key = where.rpartition(": ")[2]
            raise ConfigError(
                f"{where}: uses ${{{name}}}, which is not set; export {name}=... or pass "
                f"--set {key}=VALUE"
            )
        return os.environ[name]

    return _ENV.sub(sub, value)


def packaged_configs() -> list[str]:
    """Names of the configs shipped with layermerge (``layermerge compress NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name: str | Path) -> Path:
    """A config file: ``name`` itself when it exists, else the packaged config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path(".") and (CONFIG_DIR / f"{stem}.yaml").is_file():
        return CONFIG_DIR / f"{stem}.yaml"
    raise ConfigError(
        f"config file {name} does not exist (packaged configs: {', '.join(packaged_configs())})"
    )


def read_config_data(
    path: str | Path, *, smoke: bool = False, overrides=()
) -> tuple[Path, dict[str, Any]]:
    """The raw config of ``path`` (a file or a packaged config's name) after ``--smoke``
    and ``--set``, before ``${VAR}`` expansion and validation."""
    yaml = _yaml()
    path = resolve_config(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    data = data if data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    if "is_smoke" in data:
        raise ConfigError(f"{path}.is_smoke: set by `layermerge compress --smoke`, not in a config")
    if smoke:
        data = apply_smoke(data, str(path))
    # relative weight paths written in a config are relative to the config file
    w = data.get("weights")
    if isinstance(w, str) and not _ENV.search(w) and not Path(w).expanduser().is_absolute():
        data["weights"] = str((path.parent / w).resolve())
    return path, apply_overrides(data, overrides)


def load_config(path: str | Path, *, smoke: bool = False, overrides=()) -> CompressConfig:
    """Read, shrink (``smoke``: the config's ``smoke:`` section), override (``overrides``:
    ``SECTION.KEY=VALUE`` strings), expand ``${VAR}`` and validate a config of either
    task (``task: classification``, the default, or ``task: diffusion``).

    ``path`` is a YAML file or the name of a packaged config (:func:`packaged_configs`).
    """
    path, data = read_config_data(path, smoke=smoke, overrides=overrides)
    is_smoke = bool(data.pop("is_smoke", False))
    where = str(path)
    data = {k: v if k == "smoke" else expand_env(v, f"{where}: {k}") for k, v in data.items()}
    if isinstance(data.get("weights"), str):
        data["weights"] = os.path.expanduser(data["weights"])
    cfg = parse_config(data, where=where)
    cfg.is_smoke = is_smoke
    return cfg


def is_diffusion_config(path: str | Path) -> bool:
    """Whether the config file (or packaged config name) says ``task: diffusion``."""
    try:
        data = _yaml().safe_load(resolve_config(path).read_text())
    except Exception:
        return False  # load_config reports what is wrong
    return isinstance(data, dict) and data.get("task") == "diffusion"
