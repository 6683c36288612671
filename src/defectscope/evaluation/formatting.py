"""How the evaluation report writes numbers and image names, shared by its tables and figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: numbers to ``digits`` places, booleans as yes/no, nothing as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def short_name(source: str) -> str:
    """An image's folder and file name."""
    # The parent folder disambiguates MVTec's 000.png, 001.png ... across defect types.
    path = Path(source)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name
