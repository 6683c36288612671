"""Which files are the user's known defects (`auto.known_defects`), checked without PyTorch.

The CLI refuses a missing folder, an empty one or an unreadable image with one line before it
loads the backbone; the fit reads the same list (`defectscope.detector.known_defects`).
"""

from __future__ import annotations

from pathlib import Path

from defectscope.data.io import expand_image_paths
from defectscope.detector.geometry import probe_size
from defectscope.errors import ConfigError, ImageLoadError

# More than enough to rank a few candidates; a folder of thousands is not decoded at once.
MAX_KNOWN_DEFECTS = 64


def known_defect_paths(spec: str | Path) -> list[Path]:
    """The first MAX_KNOWN_DEFECTS image files of ``spec`` (a folder, searched recursively,
    or one image), sorted by name; each checked readable from its header, so that a bad one is
    reported before the fit's backbone pass."""
    try:
        paths = expand_image_paths([spec])
    except ImageLoadError as exc:
        raise ConfigError(f"auto.known_defects: {exc}") from None
    if not paths:
        raise ConfigError(f"auto.known_defects: no images in {spec}")
    paths = paths[:MAX_KNOWN_DEFECTS]
    for path in paths:
        if probe_size(path) is None:
            raise ConfigError(f"auto.known_defects: {path}: not a readable image")
    return paths
