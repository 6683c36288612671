"""Experiments: Hydra-composed configs, sweeps, and runs that fit, evaluate and report.

Configs are YAML files in ``configs/`` plus ``key=value`` overrides, in Hydra's workflow (config
groups such as ``backbone=...``, ``experiment=...``, dotted overrides, comma sweeps with
``--multirun``), composed through Hydra's API so that the CLI stays a normal Typer program.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from defectscope.config import DetectorConfig
from defectscope.detector.progress import ProgressFn
from defectscope.errors import ConfigError
from defectscope.tracking import NullRun, log_evaluation, log_fit

SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")

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


def compose(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    device: str | None = None,
) -> Experiment:
    """Compose one experiment; bad keys, values or files raise ConfigError with the reason.

    ``device``, when given, wins over the config's ``detector.device``.
    """
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
            cfg = hydra_compose(config_name=name, overrides=[settable(item) for item in overrides])
        raw = OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot compose the configuration: {_first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the configuration must be a mapping")
    detector = DetectorConfig.from_dict(raw.get("detector") or {})
    if device is not None:
        detector.device = device
    return Experiment(
        detector=detector,
        data=raw.get("data"),
        name=str(raw.get("name") or "default"),
        raw=cast(dict[str, Any], raw),  # YAML mappings: string keys
        overrides=overrides,
    )


def settable(override: str) -> str:
    """``detector.<field>=value`` as Hydra's add-or-override (``++``) when the field exists
    in `DetectorConfig`: the YAML files list the common fields, the model is the schema, so
    every field can be set without ``+`` while a misspelt key is still refused."""
    key = override.split("=", 1)[0]
    parts = key.split(".")
    if key.startswith(("+", "~")) or parts[0] != "detector" or len(parts) < 2:
        return override
    model: Any = DetectorConfig
    for part in parts[1:]:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return override
        model = fields[part].annotation
    return "++" + override


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


def plan_runs(config: str | Path | None, overrides: list[str], multirun: bool) -> list[list[str]]:
    """The overrides of each run asked for: every combination of the sweeps with ``multirun``
    (the config's ``sweep:`` included), else the one run, whose overrides may not sweep."""
    if multirun:
        base = compose(config, [o for o in overrides if "," not in o.split("=", 1)[-1]])
        return expand_sweep(overrides, base.raw.get("sweep"))
    # A bracketed list is one value (e.g. input_size=[128,128]), not a sweep.
    if any(
        "," in o.split("=", 1)[-1] and not o.split("=", 1)[-1].startswith("[") for o in overrides
    ):
        raise ConfigError("comma lists in overrides sweep several runs: add --multirun")
    return [overrides]


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_experiment(
    experiment: Experiment,
    run_dir: Path,
    progress: ProgressFn | None = None,
    tracking: NullRun | None = None,
) -> dict[str, Any]:
    """Fit on the train split, evaluate on the test split; write model, report and config.

    ``tracking`` (a run of `defectscope.tracking`) records the config, fit and evaluation.
    """
    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.errors import DefectscopeError
    from defectscope.evaluation.report import write_report
    from defectscope.evaluation.runner import evaluate

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({**experiment.raw, "overrides": experiment.overrides}, sort_keys=False)
    )
    if not experiment.data:
        raise DefectscopeError("no dataset: set data=PATH or use an experiment=... config")
    dataset = open_dataset(experiment.data)
    if not dataset.test:
        raise DefectscopeError(f"{experiment.data}: no labelled test images to evaluate on")
    detector = Detector(experiment.detector)
    detector.fit([s.path for s in dataset.train], progress=progress)
    detector.save(run_dir / "model")
    tracking = tracking or NullRun()
    overrides = " ".join(experiment.overrides) or "(defaults)"
    tracking.set_tags({"defectscope.dataset": experiment.data, "defectscope.overrides": overrides})
    log_fit(tracking, detector, run_dir / "model", config=experiment.raw)
    tracking.log_artifacts(run_dir / "config.yaml")
    result = evaluate(
        detector,
        dataset,
        progress=(lambda d, t: progress("evaluate", d, t)) if progress else None,
    )
    write_report(result, run_dir / "report")
    summary = result.to_dict()
    log_evaluation(tracking, summary, run_dir / "report")
    summary["overrides"] = experiment.overrides
    summary["fit_timings"] = detector.info.timings
    summary["run_dir"] = str(run_dir)
    return summary


def write_sweep_summary(results: list[dict[str, Any]], out_dir: Path) -> Path:
    """A CSV and a Markdown table of every run's overrides, metrics and fit time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for result in results:
        row = {"overrides": " ".join(result["overrides"]) or "(defaults)"}
        row.update({k: result["metrics"].get(k) for k in SUMMARY_METRICS})
        row["fit_s"] = result["fit_timings"]["total_s"]
        row["run_dir"] = result["run_dir"]
        rows.append(row)
    with (out_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    return out_dir / "summary.md"
