"""On the line: images that arrive by themselves in a folder, scored as they come
(`watcher`), with a crash-safe journal (`journal`), result files (`results`), sorting into
ok / ng / error folders (`sorting`) and a webhook (`hooks`)."""

from defectscope.line.watcher import DEFAULT_PATTERNS, Watcher, WatchOptions, WatchStats

__all__ = ["DEFAULT_PATTERNS", "WatchOptions", "WatchStats", "Watcher"]
