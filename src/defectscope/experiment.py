"""Hydra-composed experiment configs: YAML files in ``configs/`` plus ``key=value`` overrides.

The predecessor ran Hydra; we keep that workflow (config groups such as ``backbone=...``,
``experiment=...``, dotted overrides, comma sweeps with ``--multirun``) but compose through
Hydra's API so that the CLI stays a normal Typer program.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from defectscope.config import DetectorConfig
from defectscope.errors import ConfigError

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


@dataclass
class Experiment:
    detector: DetectorConfig
    data: str | None
    name: str
    raw: dict[str, Any]
    overrides: list[str]


def config_dir(path: str | Path | None) -> tuple[Path, str]:
    """(directory, config name) from a config file, a directory, or the packaged default."""
    if path is None:
        return PACKAGED_CONFIGS, "config"
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path}: no config.yaml in this folder")
        return path, "config"
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: config files are YAML (.yaml)")
    return path.parent, path.stem


def compose(config: str | Path | None = None, overrides: list[str] | None = None) -> Experiment:
    """Compose one experiment; bad keys, values or files raise ConfigError with the reason."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    directory, name = config_dir(config)
    overrides = list(overrides or [])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None):
            cfg = hydra_compose(config_name=name, overrides=overrides)
        raw = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot compose the configuration: {_first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a mapping")
    detector = DetectorConfig.from_dict(raw.get("detector") or {})
    return Experiment(
        detector=detector,
        data=raw.get("data"),
        name=str(raw.get("name") or "default"),
        raw=cast(dict[str, Any], raw),  # YAML mappings: string keys
        overrides=overrides,
    )


def expand_sweep(overrides: list[str], sweep: dict[str, list] | None = None) -> list[list[str]]:
    """Cartesian product of comma/range/choice sweeps (Hydra syntax) and a config's ``sweep:``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot parse overrides: {_first_line(exc)}") from None
    axes: list[list[str]] = []
    swept_keys = set()
    for override in parsed:
        key = override.get_key_element()
        swept_keys.add(override.key_or_group)
        if override.is_sweep_override():
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            assert override.input_line is not None  # parsed from a string: always set
            axes.append([override.input_line])
    for key, values in (sweep or {}).items():
        if key in swept_keys:
            continue  # the command line wins over the config's sweep
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{key} must be a non-empty list")
        axes.append([f"{key}={_yaml_value(v)}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
