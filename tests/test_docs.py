"""The README and docs/ say what the code does: the two commands CI runs, one method-table row per registered method
with the class's own paper and family, every config choice, links that resolve, commands whose config names exist,
and the plug-in guide's example package working as shown."""

from __future__ import annotations

import importlib
import itertools
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import loaded_tiny, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KINDS = {"causal_lm": "LLM", "image_sr": "SR", "image_classifier": "classifier", "diffusion": "diffusion"}


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _rows(section: str) -> list[list[str]]:
    """Table rows of a markdown section, cells split on unescaped '|', header and rule skipped."""
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows[1:]]


def _choices(group: str) -> set[str]:
    return {p.stem for p in (CONFIGS / group).glob("*.yaml")}


def test_readme_opens_with_the_two_commands_ci_runs():
    head = (ROOT / "README.md").read_text().splitlines()[:6]
    assert head[3].startswith("./install.sh && .venv/bin/python -m bench ")
    assert head[4].startswith(".venv/bin/python -m pytest -q ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "./install.sh" in ci and ".venv/bin/python -m pytest -q" in ci


def test_readme_method_table_is_one_row_per_registered_method():
    rows = _rows(_section((ROOT / "README.md").read_text(), "Methods"))
    assert [r[0].strip("`") for r in rows] == sorted(_choices("method"))
    for name, family, applies_to, paper, stored in rows:
        target = yaml.safe_load((CONFIGS / "method" / f"{name.strip('`')}.yaml").read_text())["_target_"]
        module, cls = target.rsplit(".", 1)
        method = getattr(importlib.import_module(module), cls)
        assert family == method.family, name
        assert applies_to == ", ".join(KINDS[k] for k in method.applies_to), name
        assert paper == (method.paper or "—"), name
        assert stored, name


def test_readme_lists_every_choice_of_the_other_groups():
    rows = _rows(_section((ROOT / "README.md").read_text(), "The other choices"))
    listed = {r[0].strip("`"): set(re.findall(r"`(\w+)`", r[1])) for r in rows}
    assert set(listed) == {"task", "model", "hardware", "calib", "budget", "recover", "sweep"}
    for group, names in listed.items():
        assert names == _choices(group), group


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_readme_and_docs_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.name}: {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{doc.name}: {target}"


def _commands(doc: Path) -> list[list[str]]:
    """Every `python -m bench` line of the doc's code blocks, as its arguments."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "python -m bench" in line:
                out.append(shlex.split(line.split("python -m bench", 1)[1], comments=True))
    return out


def test_every_documented_command_names_existing_configs():
    """Each run command composes (config names and keys exist), each cell of a sweep too; the leaderboard, export
    and import subcommands are not runs, and the plug-in package's names are checked below."""
    from hydra import compose, initialize_config_dir

    import bench.app  # noqa: F401  (registers the config's resolvers, as the CLI does)

    plugin_names = {"row_rtn", "sentence_nll", "int_cpu"}  # tests below, with the package installed
    checked = 0
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        for doc in DOCS:
            for args in _commands(doc):
                if not args or args[0] in ("leaderboard", "export", "import") or \
                        any(a.split("=")[-1] in plugin_names for a in args):
                    continue
                overrides = [a for a in args if "=" in a and not a.startswith("hydra")]
                if "-m" in args:  # a sweep: every cell
                    cells = itertools.product(*[[f"{o.split('=')[0]}={v}" for v in o.split("=", 1)[1].split(",")]
                                                for o in overrides])
                else:
                    cells = [overrides]
                for cell in cells:
                    compose(config_name="config", overrides=list(cell))
                checked += 1
    assert checked >= 20


def _example_package(site: Path) -> None:
    """The plug-in guide's example package, written from the guide's own code blocks, installed into `site`."""
    text = (ROOT / "docs" / "adding-a-plugin.md").read_text()
    layout = re.search(r"```\nmybench_plugins/\n(.*?)```", text, re.S).group(1)
    files = re.findall(r"mybench_plugins/\S+\.(?:py|yaml)", layout)
    pkg = site / "mybench_plugins"
    for block in re.findall(r"```(?:python|yaml)\n(.*?)```", text, re.S):
        name = re.search(r"^\"\"\"`(\w+)`|^_target_: mybench_plugins\.(\w+)\.", block, re.M)
        if name is None:
            continue  # an excerpt of bench's own code
        stem = name.group(1) or name.group(2)
        suffix = ".py" if block.startswith('"""') else ".yaml"
        path = next(f for f in files if f.endswith(f"/{stem}{suffix}") and (suffix == ".py") == (f.count("/") == 1))
        (pkg / path.split("/", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        (pkg / path.split("/", 1)[1]).write_text(block)
    (pkg / "__init__.py").write_text("")
    entry = re.search(r'\[project\.entry-points\."bench\.plugins"\]\n(\w+) = "(\w+)"', text)
    dist = site / "mybench_plugins-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mybench-plugins\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[bench.plugins]\n{entry.group(1)} = {entry.group(2)}\n")


def test_plugin_guide_example_package_works_as_shown(results_dir, tmp_path):
    site = tmp_path / "site"
    _example_package(site)
    r = run_cli("method=row_rtn", "method.bits=8", "task=sentence_nll", "hardware=int_cpu", "--cfg", "job",
                results=results_dir, env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    for target in ("mybench_plugins.row_rtn.RowRTN", "mybench_plugins.sentence_nll.SentenceNLL",
                   "mybench_plugins.int_cpu.IntCpuBackend"):
        assert f"_target_: {target}" in r.stdout
    r = run_cli("method=row_rtnn", results=results_dir, env={"PYTHONPATH": str(site)})
    assert "did you mean 'row_rtn'?" in r.stderr

    sys.path.insert(0, str(site))
    try:
        from mybench_plugins.int_cpu import IntCpuBackend
        from mybench_plugins.row_rtn import RowRTN

        from bench import models
        from bench.cache import ArtifactStore
        from bench.errors import ConfigError

        base = loaded_tiny("llama")
        backend = IntCpuBackend(threads=1)
        for bits, refused in ((4, False), (3, True)):
            method = RowRTN(bits=bits)
            packed = method.compress(models.clone(base), None, None)
            store = ArtifactStore(tmp_path / f"store{bits}")
            store.save("k", packed.tensors(base), packed.metadata())
            restored = method.restore(models.clone(base), *store.load("k"))
            a, b = packed.model.state_dict(), restored.model.state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a)
            assert {str(f) for f in restored.layer_format.values()} == {f"int{bits}-sym-ch"}
            assert all(set(t) == {"qweight", "scale"} for t in packed.layers.values())
            assert (backend.supports(packed) is not None) == refused
        assert abs(RowRTN(bits=4).compress(models.clone(base), None, None).storage(base).bits_per_weight
                   - 4.1111) < 1e-4  # as the guide says: 4 bits + the fp16 row scales
        with pytest.raises(ConfigError, match=r"method.bits=9 is out of range"):
            RowRTN(bits=9)
    finally:
        sys.path.remove(str(site))
        for mod in [m for m in sys.modules if m.startswith("mybench_plugins")]:
            del sys.modules[mod]
