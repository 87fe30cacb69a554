"""Discovery of plug-ins: the config groups under configs/ (and any search-path additions) are the
registry. `python -m bench method=nope` prints the real choices and the nearest name."""

from __future__ import annotations

from importlib import resources

GROUPS = ("method", "task", "model", "hardware", "calib", "budget", "sweep")


def choices(group: str) -> list[str]:
    root = resources.files("bench.configs") / group
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
