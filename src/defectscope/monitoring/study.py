"""Drift study: how controlled shifts of the inputs affect a detector, and whether drift shows.

For every shift (brightness, contrast, colour, blur, rotation, noise, camera shift) at
increasing strengths, the labelled test images of a dataset are transformed in memory and
scored by the model. Each (shift, strength) row reports the image AUROC, the false-alarm rate on
good images at the model's stored threshold, and the drift detector's verdict and p-values on the
shifted good + defective window (and on the shifted good images alone). Optionally the model is
refitted on shifted *training* images at the strongest level of each shift, to see whether
refitting restores the AUROC; refits use at most ``max_train`` images, and a refit on the same
unshifted images is the fair baseline they are compared with.

Outputs in ``out_dir``: ``study.json``, ``study.md``, ``study.html`` and ``study.png``.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.data import augment as A
from defectscope.data.io import load_image
from defectscope.detector.progress import ProgressFn
from defectscope.errors import DatasetError, DefectscopeError
from defectscope.evaluation.metrics import image_auroc
from defectscope.monitoring.drift import DriftDetector, DriftError, DriftReport

Transform = Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class Level:
    """One strength of a shift: a label for tables and the transform (image, image index)."""

    label: str
    transform: Transform


def _shift_levels() -> dict[str, list[Level]]:
    def brightness(f: float) -> Level:
        return Level(f"x{f:g}", lambda im, i: A.brightness(im, f))

    def contrast(f: float) -> Level:
        return Level(f"x{f:g}", lambda im, i: A.contrast(im, f))

    def colour(sat: float, hue: float) -> Level:
        return Level(
            f"sat x{sat:g}, hue {hue:+g}",
            lambda im, i: A.color_jitter(im, saturation=sat, hue=hue),
        )

    def blur(sigma: float) -> Level:
        # In pixels of the full-size image; the model sees it after resizing.
        return Level(f"sigma {sigma:g}px", lambda im, i: A.gaussian_blur(im, sigma))

    def rotate(deg: float) -> Level:
        return Level(f"{deg:g} deg", lambda im, i: A.rotate(im, deg))

    def noise(sigma: float) -> Level:
        return Level(f"sigma {sigma:g}", lambda im, i: A.gaussian_noise(im, sigma, seed=i))

    def shift(frac: float) -> Level:
        # A fraction of the image size, so the shift means the same at any resolution.
        return Level(
            f"{frac:.0%} of size",
            lambda im, i: A.shift(im, frac * im.shape[1], frac * im.shape[0]),
        )

    return {
        "brightness": [brightness(f) for f in (0.85, 0.7, 0.5)],
        "contrast": [contrast(f) for f in (0.8, 0.6, 0.4)],
        "color": [colour(s, h) for s, h in ((0.7, 0.03), (0.5, 0.08), (0.2, 0.15))],
        "blur": [blur(s) for s in (1.5, 3.0, 6.0)],
        "rotate": [rotate(d) for d in (2.0, 5.0, 15.0)],
        "noise": [noise(s) for s in (5.0, 12.0, 25.0)],
        "shift": [shift(f) for f in (0.02, 0.05, 0.1)],
    }


SHIFT_NAMES = tuple(_shift_levels())


def _subsample(samples: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """At most ``limit`` samples, stratified by label so good and defective keep their share."""
    samples = list(samples)
    if limit is None or len(samples) <= limit:
        return samples
    rng = np.random.default_rng(seed)
    good = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    n_good = min(len(good), max(1, round(limit * len(good) / len(samples))) if good else 0)
    n_bad = min(len(bad), limit - n_good)
    keep = {id(s) for s in (rng.permutation(good)[:n_good] if good else [])}
    keep |= {id(s) for s in (rng.permutation(bad)[:n_bad] if bad else [])}
    return [s for s in samples if id(s) in keep]


def _safe_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    if labels.min() == labels.max():
        return None
    return float(image_auroc(labels, scores))


def _drift_summary(report: DriftReport | None) -> dict[str, Any] | None:
    if report is None:
        return None
    ks, mmd, psi = report.test("score_ks"), report.test("feature_mmd"), report.test("score_psi")
    return {
        "verdict": report.verdict,
        "n": report.n_window,
        "score_ks_d": ks.statistic,
        "score_ks_p": ks.p_value,
        "feature_mmd2": mmd.statistic,
        "feature_mmd_p": mmd.p_value,
        "feature_mean_abs_z": mmd.effect["mean_abs_z"],
        "score_psi": psi.statistic,
    }


def run_drift_study(
    detector: Any,
    dataset: Any,
    out_dir: str | Path,
    *,
    shifts: Sequence[str] | None = None,
    max_images: int | None = None,
    refit: bool = True,
    max_train: int | None = 64,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run the study, write its files to ``out_dir`` and return the ``study.json`` content."""
    from defectscope.detector.detector import Detector

    levels = _shift_levels()
    names = list(shifts) if shifts else list(levels)
    unknown = [n for n in names if n not in levels]
    if unknown:
        raise DefectscopeError(
            f"unknown shift(s) {', '.join(unknown)}; expected any of {', '.join(levels)}"
        )
    if max_images is not None and max_images < 2:
        raise DefectscopeError("--max-images must be at least 2")
    drift = DriftDetector.from_detector(detector, seed=seed)
    samples = _subsample(getattr(dataset, "test", []), max_images, seed)
    if not samples:
        raise DatasetError("the dataset has no labelled test images to study")
    labels = np.array([s.label for s in samples])
    good = labels == 0
    images = [load_image(s.path) for s in samples]
    threshold = float(detector.threshold)
    started = time.perf_counter()

    total = 1 + sum(len(levels[n]) for n in names) + (len(names) + 1 if refit else 0)
    step = 0

    def tick() -> None:
        nonlocal step
        step += 1
        if progress:
            progress("study", step, total)

    def check(scores: np.ndarray, pooled: np.ndarray) -> DriftReport | None:
        try:
            return drift.check(scores, pooled)
        except DriftError:
            return None  # window too small (e.g. few good test images): reported as null

    def measure(model: Any, transform: Transform | None) -> dict[str, Any]:
        shifted = images if transform is None else [transform(im, i) for i, im in enumerate(images)]
        pooled, scores = model.pooled_embeddings(shifted)
        row: dict[str, Any] = {
            "image_auroc": _safe_auroc(labels, scores),
            "false_alarm_rate": float(np.mean(scores[good] >= model.threshold))
            if good.any()
            else None,
            "mean_good_score": float(scores[good].mean()) if good.any() else None,
        }
        if model is detector:
            row["drift_all"] = _drift_summary(check(scores, pooled))
            row["drift_good"] = _drift_summary(check(scores[good], pooled[good]))
        return row

    baseline = {"shift": "none", "level": 0, "label": "unshifted", **measure(detector, None)}
    tick()
    rows: list[dict[str, Any]] = [baseline]
    train_images: list[np.ndarray] = []
    refit_baseline: dict[str, Any] | None = None
    if refit:
        train = _subsample(getattr(dataset, "train", []), max_train, seed)
        if len(train) < 2:
            raise DatasetError("refitting needs at least 2 good training images")
        train_images = [load_image(s.path) for s in train]
        config = detector.config.to_dict()
        model = Detector(config).fit(train_images)
        refit_baseline = {"n_train": len(train_images), **measure(model, None)}
        tick()

    for name in names:
        for number, level in enumerate(levels[name], start=1):
            row = {"shift": name, "level": number, "label": level.label}
            row.update(measure(detector, level.transform))
            if refit and number == len(levels[name]):
                shifted_train = [
                    level.transform(im, 100_000 + i) for i, im in enumerate(train_images)
                ]
                model = Detector(detector.config.to_dict()).fit(shifted_train)
                refitted = measure(model, level.transform)
                row["refit_image_auroc"] = refitted["image_auroc"]
                row["refit_false_alarm_rate"] = refitted["false_alarm_rate"]
                tick()
            rows.append(row)
            tick()

    result = {
        "model": {
            "threshold": threshold,
            "false_alarm_rate": float(detector.calibration.false_alarm_rate),
            "backbone": detector.config.backbone.name,
        },
        "dataset": {
            "root": str(getattr(dataset, "root", "")),
            "n_test": len(samples),
            "n_good": int(good.sum()),
            "n_defective": int((~good).sum()),
        },
        "drift_thresholds": {
            "warning_p": drift.thresholds.warning_p,
            "drift_p": drift.thresholds.drift_p,
            "correction": "Bonferroni over score_ks and feature_mmd",
        },
        "refit": {"enabled": refit, "max_train": max_train, "unshifted": refit_baseline},
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_study(result, out_dir)
    return result


# -------------------------------------------------------------------------------- outputs
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if 0 < abs(value) < 10 ** (-digits):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = (
    "shift",
    "strength",
    "AUROC",
    "false alarms",
    "verdict (all)",
    "KS p",
    "MMD p",
    "PSI",
    "verdict (good)",
    "refit AUROC",
)


def _table_rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for row in result["rows"]:
        drift_all = row.get("drift_all") or {}
        drift_good = row.get("drift_good") or {}
        out.append(
            [
                row["shift"],
                f"{row['level']}: {row['label']}",
                _fmt(row["image_auroc"]),
                _fmt(row["false_alarm_rate"], 2),
                drift_all.get("verdict", "-"),
                _fmt(drift_all.get("score_ks_p")),
                _fmt(drift_all.get("feature_mmd_p"), 4),
                _fmt(drift_all.get("score_psi"), 2),
                drift_good.get("verdict", "-"),
                _fmt(row.get("refit_image_auroc")),
            ]
        )
    return out


def _notes(result: dict[str, Any]) -> list[str]:
    thresholds = result["drift_thresholds"]
    notes = [
        f"Test images: {result['dataset']['n_test']} ({result['dataset']['n_good']} good, "
        f"{result['dataset']['n_defective']} defective). False alarms: share of good test images "
        f"at or above the stored threshold {result['model']['threshold']:.4f}.",
        f"Verdict: drift when a Bonferroni-adjusted p-value (KS on scores, MMD on pooled "
        f"features) is below {thresholds['drift_p']}, warning below {thresholds['warning_p']}. "
        "'all' tests the shifted good + defective images, 'good' the shifted good ones only "
        "('-': too few images).",
    ]
    refit = result["refit"]
    if refit["enabled"] and refit["unshifted"]:
        notes.append(
            f"Refit: a model refitted on {refit['unshifted']['n_train']} shifted training images "
            "at the strongest level of each shift; the same refit on unshifted images gives AUROC "
            f"{_fmt(refit['unshifted']['image_auroc'])}."
        )
    return notes


def write_study(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write study.json, study.md, study.html and study.png; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = _table_rows(result)
    notes = _notes(result)
    md = ["# Drift study", "", *[f"- {n}" for n in notes], ""]
    md.append("| " + " | ".join(COLUMNS) + " |")
    md.append("|" + "---|" * len(COLUMNS))
    md.extend("| " + " | ".join(r) + " |" for r in rows)
    md += ["", "![AUROC and false alarms vs strength](study.png)", ""]
    (out / "study.md").write_text("\n".join(md))
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n" for r in rows
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Drift study</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>"
        "<h1>Drift study</h1><ul>"
        + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        + "</ul><table><tr>"
        + "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
        + "</tr>\n"
        + cells
        + "</table><p><img src='study.png' alt='AUROC and false alarms vs strength'></p>"
        "</body></html>\n"
    )
    (out / "study.html").write_text(page)
    plot_study(result, out / "study.png")
    return out


VERDICT_COLOURS = {"ok": "tab:green", "warning": "tab:orange", "drift": "tab:red"}


def plot_study(result: dict[str, Any], path: Path) -> None:
    """AUROC and false-alarm rate vs strength per shift; marker colour = drift verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = result["rows"][0]
    shifts = list(dict.fromkeys(r["shift"] for r in result["rows"][1:]))
    if not shifts:
        shifts = ["none"]
    fig, axes = plt.subplots(
        2, len(shifts), figsize=(2.6 * len(shifts) + 1, 5.2), squeeze=False, sharey="row"
    )
    for column, name in enumerate(shifts):
        rows = [baseline] + [r for r in result["rows"][1:] if r["shift"] == name]
        x = [r["level"] for r in rows]
        for axis, key in ((axes[0, column], "image_auroc"), (axes[1, column], "false_alarm_rate")):
            y = [np.nan if r[key] is None else r[key] for r in rows]
            axis.plot(x, y, color="0.5", zorder=1)
            colours = [
                VERDICT_COLOURS.get((r.get("drift_all") or {}).get("verdict", ""), "0.5")
                for r in rows
            ]
            axis.scatter(x, y, c=colours, s=40, zorder=2, edgecolors="black", linewidths=0.5)
            axis.set_xticks(x)
            axis.grid(alpha=0.3)
        refit = [r for r in rows if r.get("refit_image_auroc") is not None]
        if refit:
            axes[0, column].scatter(
                [r["level"] for r in refit],
                [r["refit_image_auroc"] for r in refit],
                marker="*",
                s=120,
                color="tab:blue",
                zorder=3,
                label="refit",
            )
        axes[0, column].set_title(name)
        axes[1, column].set_xlabel("strength level")
    axes[0, 0].set_ylabel("image AUROC")
    axes[1, 0].set_ylabel("false-alarm rate")
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=c, label=f"drift verdict: {v}")
        for v, c in VERDICT_COLOURS.items()
    ]
    handles.append(
        plt.Line2D([], [], marker="*", linestyle="", color="tab:blue", label="refit AUROC")
    )
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
