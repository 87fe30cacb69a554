"""Plug-ins never import each other (bench/plugins.py, DESIGN.md): shared machinery lives in bench/. Every import
statement of every module under methods/, tasks/ and hardware/ (function-local ones included) is parsed with
`ast` and resolved to a module name; none may name another plug-in module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_PACKAGES = ("methods", "tasks", "hardware")  # shipped as bench.methods, bench.tasks, bench.hardware


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the modules a file imports (`from bench.methods import gptq` -> bench.methods.gptq)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y inside bench.<package>
                base = ".".join(["bench", package][: max(0, 2 - node.level + 1)])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)  # a submodule imported by name
    return out


def plugin_of(module: str) -> str | None:
    """'bench.methods.gptq' -> 'methods/gptq' for a plug-in module name (also 'methods.gptq'), else None."""
    parts = module.split(".")
    if parts[0] == "bench":
        parts = parts[1:]
    if len(parts) >= 2 and parts[0] in PLUGIN_PACKAGES and (ROOT / parts[0] / f"{parts[1]}.py").is_file():
        return f"{parts[0]}/{parts[1]}"
    return None


def test_no_plugin_imports_another_plugin():
    found = []
    for package in PLUGIN_PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            me = f"{package}/{path.stem}"
            others = {plugin_of(m) for m in imported_modules(path, package)} - {None, me}
            found += [f"{me}.py imports {other}" for other in sorted(others)]
    assert not found, "plug-ins import plug-ins (move the shared part into bench/):\n" + "\n".join(found)


def test_the_check_sees_every_import_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import bench.methods.rtn\nfrom bench.tasks import wikitext\nfrom .gptq import GPTQ\n"
                     "def f():\n    from bench.hardware.cpu import CpuBackend\n")
    found = {plugin_of(m) for m in imported_modules(probe, "methods")} - {None}
    assert found == {"methods/rtn", "tasks/wikitext", "methods/gptq", "hardware/cpu"}
