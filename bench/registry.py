"""Discovery of plug-ins: config groups are the registry.

Choices for a group come from bench's own `configs/`, from third-party packages that declare an entry point
in the `bench.plugins` group (pointing at a package holding their own `<group>/<name>.yaml` files; the
`bench_plugin_searchpath` resolver registered below adds the same packages to Hydra's search path), and from any
`hydra.searchpath=[file://...]` given on the command line. `python -m bench method=nope` prints the real
choices and the nearest name.
"""

from __future__ import annotations

import importlib.metadata
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

GROUPS = ("method", "recover", "task", "model", "hardware", "calib", "budget", "sweep")
ENTRY_POINT_GROUP = "bench.plugins"


def plugin_config_packages() -> list[str]:
    return [ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)]


# Third-party plug-in packages join Hydra's config search path (configs/config.yaml: hydra.searchpath), wherever a
# config is composed: the CLI, a sweep's worker, the reproducing-command check (bench/reproduce.py), the tests.
OmegaConf.register_new_resolver(
    "bench_plugin_searchpath", lambda: [f"pkg://{p}" for p in plugin_config_packages()], replace=True)


def _names(root) -> set[str]:
    if root is None or not root.is_dir():
        return set()
    return {p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")}


def choices(group: str, extra_dirs: list[str] = ()) -> list[str]:
    found = _names(resources.files("bench.configs") / group)
    for pkg in plugin_config_packages():
        try:
            found |= _names(resources.files(pkg) / group)
        except ModuleNotFoundError:
            continue
    for d in extra_dirs:
        found |= _names(Path(d) / group)
    return sorted(found)


def searchpath_dirs(argv: list[str]) -> list[str]:
    """Local directories added with `hydra.searchpath=[file://a,file://b]` on the command line."""
    out = []
    for arg in argv:
        if arg.startswith("hydra.searchpath="):
            for item in arg.split("=", 1)[1].strip("[]").split(","):
                item = item.strip().strip("'\"")
                if item.startswith("file://"):
                    out.append(item[len("file://"):])
    return out
