"""How numbers and names look on every page: one function per kind of value.

Scores always get four significant digits (so 1.428 never shows as 1.4280 on another page),
p-values three, and image names keep the folder that tells two ``000.png`` apart.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any

# One line for every page that shows both numbers.
SCORES_EXPLAINED = (
    "Raw score: the distance of the image's most unusual patch to the nearest good patch "
    "(anomalous when ≥ the threshold). Normalised score: raw score ÷ threshold, so 1.0 is the "
    "threshold and 2.0 twice as far."
)
# The overlay's colours (jet) on the fixed scale of defectscope.visualize: 0 to 2× threshold.
HEATMAP_LEGEND = (
    '<div style="display:flex;align-items:center;gap:0.5em;font-size:0.85em">'
    "<span>0</span>"
    '<span style="flex:1;height:0.8em;border-radius:3px;background:linear-gradient(90deg,'
    '#00007f,#0000ff,#007fff,#00ffff,#7fff7f,#ffff00,#ff7f00,#ff0000,#7f0000)"></span>'
    "<span>2 × threshold</span></div>"
    '<div style="font-size:0.8em;opacity:0.7">Heatmap colour: blue = like the good parts, '
    "yellow-green ≈ the threshold, red = far from anything seen in training. The green outline "
    "is the defect mask.</div>"
)


def fmt_score(value: Any) -> str:
    """A score or threshold with 4 significant digits (``1.428``, ``0.01234``, ``12.35``),
    trailing zeros dropped as the tables' ``%.4g`` columns do (``1.4``, not ``1.400``)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{float(value):.4g}"


def fmt_p(value: Any) -> str:
    """A p-value with 3 significant digits, ``<0.001`` below that."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    value = float(value)
    return "<0.001" if value < 0.001 else f"{value:.3g}"


def fmt_rate(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{float(value):.1%}"


def fmt_time(value: Any) -> str:
    """An ISO timestamp from the API as ``YYYY-MM-DD HH:MM:SS`` (UTC), or the text as given."""
    text = str(value or "")
    return text.replace("T", " ")[:19] if len(text) >= 19 else text


def display_name(name: str, keep_parts: int = 3) -> str:
    """An image name with enough of its folders to tell ``a/000.png`` from ``b/000.png``."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return "/".join(parts[-keep_parts:]) if parts else name


def unique_names(names: list[str]) -> list[str]:
    """Names made distinct: a second ``000.png`` becomes ``000.png (2)``."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out
