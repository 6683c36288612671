"""Moving scored files into ``ok/``, ``ng/`` and ``error/`` folders, keeping relative paths."""

from __future__ import annotations

import shutil
from pathlib import Path

OK, NG, ERROR = "ok", "ng", "error"


def free_name(path: Path) -> Path:
    """``path``, or ``stem_1.ext``, ``stem_2.ext``... the first that does not exist."""
    if not path.exists():
        return path
    for n in range(1, 1_000_000):
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(path)  # pragma: no cover - a million files of one name


class Sorter:
    """Moves ``root/rel`` to ``target/{ok,ng,error}/rel`` (a suffix on a name collision)."""

    def __init__(self, root: Path, target: Path) -> None:
        self.root = root
        self.target = target

    def plan(self, rel: str, category: str) -> Path:
        """Where ``rel`` goes: ``target/category/rel``, or a free name beside it."""
        return free_name(self.target / category / rel)

    def move(self, rel: str, destination: Path, reason: str | None = None) -> str:
        """Move ``root/rel`` to ``destination`` (a free name beside it if that is taken by
        now); returns where it went. An error file gets ``NAME.error.txt`` beside it saying
        why it could not be scored."""
        destination = free_name(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self.root / rel, destination)
        if reason is not None:
            note = destination.with_name(destination.name + ".error.txt")
            note.write_text(reason + "\n", encoding="utf-8")
        return str(destination)
