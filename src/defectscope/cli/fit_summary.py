"""What `defectscope fit` prints about the model it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from defectscope.cli.console import out

if TYPE_CHECKING:
    from defectscope.detector.detector import Detector


def print_fit_summary(detector: Detector, path: Path | str) -> None:
    """The fitted model's file, backbone, bank, thresholds and timings as a table on stdout."""
    from defectscope.detector.calibration import threshold_rule
    from defectscope.detector.edge_profile import edge_profile_summary

    assert detector.features is not None  # fitted: the features are built
    info = detector.info
    timings = info.timings
    table = Table(title="Model", show_header=False)
    table.add_row("file", str(path))
    table.add_row("backbone", detector.features.backbone.name)
    table.add_row("memory bank", f"{info.bank_size:,} of {info.training.n_patches:,} patches")
    if info.scales:
        table.add_row(
            "half-size bank",
            f"{info.scales['half_bank_size']:,} patches, weight {info.scales['half_weight']:g}",
        )
    full = detector.scorer.edge_profile if detector.scorer is not None else None
    half = (info.scales or {}).get("edge_profile")
    if edges := edge_profile_summary(full.to_dict() if full else None, half):
        table.add_row("edge profile", edges)
    calibration = detector.calibration
    assert calibration is not None  # fitted: calibrated
    table.add_row(
        "threshold",
        f"{detector.threshold:.4f} (pixel {detector.pixel_threshold:.4f}; "
        f"{threshold_rule(calibration.to_dict())})",
    )
    table.add_row(
        "fit time",
        f"{timings['total_s']:.1f} s ("
        + (f"choosing {timings['selection_s']:.1f}, " if "selection_s" in timings else "")
        + f"features {timings['features_s']:.1f}, coreset {timings['coreset_s']:.1f}, "
        f"calibration {timings['calibration_s']:.1f}"
        + (f", half-size bank {timings['half_scale_s']:.1f}" if "half_scale_s" in timings else "")
        + ")",
    )
    selection = info.selection or {}
    if selection:
        table.add_row("configuration", selection["reason"])
        if selection.get("geometry", {}).get("reason"):
            table.add_row("geometry", selection["geometry"]["reason"])
    if info.training.skipped:
        table.add_row("skipped", f"{len(info.training.skipped)} unreadable images")
    if dropped := info.training.dropped:
        table.add_row(
            "dropped",
            f"{len(dropped)} training images scored far above the others, like defects "
            f"(fit.drop_suspects): fitted again without {_named(dropped)}",
        )
    if suspects := info.training.suspects:
        table.add_row(
            "suspects",
            f"{len(suspects)} training images score far above the others, like defects; the "
            f"thresholds leave them out. Check them: {_named(suspects)} (inspect lists all)",
        )
    out.print(table)


def _named(records: list[dict[str, Any]]) -> str:
    """The first five suspect records as "file (score)", and how many more."""
    named = ", ".join(f"{Path(r['name']).name} ({r['score']:.3g})" for r in records[:5])
    return named + (f" and {len(records) - 5} more" if len(records) > 5 else "")
