"""The `python -m bench ...` line that reproduces one cell, and the method's differences from its shipped YAML.

A cell is launched many ways: one command, a `-m` sweep, a named sweep (`sweep=ptq_weight_only`), the Python API.
What reproduces it is none of those lines but the cell's own overrides: its group choices (`method=`, `task=`, ...)
and every value that differs from what those choices compose to. `reproduce` composes the config of the cell's
group choices with Hydra (with the cell's top-level values first, so that `seed: ${seed}` in a method YAML follows
them), compares it leaf by leaf with the cell's resolved config, writes each difference as an override, and
composes the result once more to check that it gives the cell's identity (`record.cell_hash`). The record keeps
the line (`bench.command`), the check's outcome (`bench.command_check`) and the method's own differences
(`bench.method_overrides`, so the leaderboard labels rows without reading configs/method/*.yaml).

`method=` and `task=` are always named; the other group choices, and top-level values such as seed, threads and
precision, only where they differ from configs/config.yaml or were given on the command line. Where files live
(`paths.*`) is not part of a cell and never on the line.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources

from omegaconf import OmegaConf

from bench import record, registry

ALWAYS_NAMED = ("method", "task")
CHOICE_GROUPS = tuple(g for g in registry.GROUPS if g != "sweep")  # a named sweep is a launch, not a cell
_NOT_ON_THE_LINE = ("paths", "compare_baseline", "hydra", "sweep")
_PLAIN = re.compile(r"[A-Za-z_/][\w\-./]*")
_NOT_STRINGS = {"null", "true", "false", "inf", "nan", "none"}


@dataclass
class Launch:
    """How the cell was asked for: its group choices, the keys given on the command line, and any
    `hydra.searchpath=` override (a local plug-in directory) the composition needs."""

    choices: dict[str, str]
    given: list[str] = field(default_factory=list)
    searchpath: list[str] = field(default_factory=list)

    @classmethod
    def from_hydra(cls) -> Launch | None:
        """The running Hydra job's choices and overrides; None outside a Hydra job."""
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        choices = {g: hc.runtime.choices[g] for g in CHOICE_GROUPS if hc.runtime.choices.get(g)}
        task = list(hc.overrides.task)
        return cls(choices, [o.split("=", 1)[0].lstrip("+~") for o in task if "=" in o],
                   [o for o in [*hc.overrides.hydra, *task] if o.startswith("hydra.searchpath=")])

    @classmethod
    def infer(cls, cfg) -> Launch:
        """Outside Hydra (the Python API, the tests): every shipped plug-in YAML is named after its `name`."""
        return cls({g: str(cfg[g]["name"]) for g in CHOICE_GROUPS if g in cfg and "name" in cfg[g]})

    def for_baseline(self) -> Launch:
        """The uncompressed baseline cell of this launch: method=none, no recovery."""
        return Launch({**self.choices, "method": "none", "recover": "none"},
                      [k for k in self.given if not k.startswith(("method", "recover"))], self.searchpath)


@dataclass
class Reproduction:
    command: str  # the shell line
    overrides: list[str]  # its arguments after `python -m bench`
    method_overrides: dict  # the method's settings that differ from its shipped YAML: {key: value}
    check: str  # "reproduces", or what composing the command gave instead


def value_text(v) -> str:
    """A value in Hydra's override grammar: null, true/false, numbers, plain or quoted strings, lists, dicts."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{value_text(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if _PLAIN.fullmatch(s) and s.lower() not in _NOT_STRINGS:
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${") + "'"


def _same(a, b) -> bool:
    """Equal as the cell hash sees them (1 and 1.0 differ there)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _diff(run, composed, key: str) -> list[str]:
    """Overrides that turn `composed` into `run` below `key`."""
    if isinstance(run, dict) and isinstance(composed, dict):
        out = []
        for k, v in run.items():
            out += _diff(v, composed[k], f"{key}.{k}") if k in composed else [f"+{key}.{k}={value_text(v)}"]
        return out + [f"~{key}.{k}" for k in composed if k not in run]
    if isinstance(run, list) and isinstance(composed, list) and len(run) == len(composed):
        return [o for i, (a, b) in enumerate(zip(run, composed)) for o in _diff(a, b, f"{key}.{i}")]
    return [] if _same(run, composed) else [f"{key}={value_text(run)}"]


def _value_at(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(dotted)
    return node


def default_choices() -> dict[str, str]:
    """The group choices configs/config.yaml makes when the command line names none."""
    primary = OmegaConf.to_container(OmegaConf.load(resources.files("bench.configs") / "config.yaml"))
    return {k: str(v) for d in primary["defaults"] if isinstance(d, dict) for k, v in d.items() if k in CHOICE_GROUPS}


@contextlib.contextmanager
def _hydra():
    """Hydra's compose API, inside a running Hydra app (its search path) or outside one (bench's configs)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_module("bench.configs", version_base=None):
            yield


def _compose(overrides: list[str]) -> dict:
    from hydra import compose

    return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def _spelled(identity: dict) -> dict:
    """`identity` with the keys `record.cell_identity` leaves out for being implied put back: a cell computed in one
    precision throughout has no `compress_precision` in its identity, but its command must set it (deleting the key
    with `~compress_precision` composes the same identity and then fails in the runner)."""
    if "precision" in identity and "compress_precision" not in identity:
        return {**identity, "compress_precision": identity["precision"]}
    return identity


def reproduce(cell: dict, launch: Launch) -> Reproduction:
    """The reproducing line of the cell whose resolved config (paths included) is `cell`. Never raises: a line
    that does not reproduce the cell says so in `check`."""
    identity = record.cell_identity(cell)
    # composition only: where files live (interpolated into e.g. a suite-trained model's cache path)
    where = [f"paths.{k}={value_text(v)}" for k, v in (cell.get("paths") or {}).items()]
    defaults = default_choices()
    given = set(launch.given)
    choices = [f"{g}={launch.choices[g]}" for g in CHOICE_GROUPS if g in launch.choices]
    named = [o for o in choices if (g := o.split("=", 1)[0]) in ALWAYS_NAMED or g in given
             or launch.choices[g] != defaults.get(g)]
    top, nested, check = [], [], "reproduces"
    try:
        with _hydra():
            base = _spelled(record.cell_identity(_compose(choices + where + launch.searchpath)))
            spelled = _spelled(identity)
            for k, v in spelled.items():
                if not isinstance(v, dict) and (k not in base or not _same(v, base[k]) or k in given):
                    top.append(f"{k}={value_text(v)}" if k in base else f"+{k}={value_text(v)}")
            top += [f"~{k}" for k, v in base.items() if k not in spelled and not isinstance(v, dict)]
            composed = record.cell_identity(_compose(choices + where + launch.searchpath + top))
            for k, v in identity.items():
                if isinstance(v, dict):
                    nested += _diff(v, composed.get(k, {}), k) if k in composed else [f"+{k}={value_text(v)}"]
            for key in sorted(given - set(CHOICE_GROUPS)):  # given on the command line: named even if default
                if "." in key and not key.startswith(_NOT_ON_THE_LINE) and not any(
                        o.lstrip("+~").split("=", 1)[0] == key for o in nested):
                    with contextlib.suppress(KeyError):
                        nested.append(f"{key}={value_text(_value_at(identity, key))}")
            again = _compose(choices + where + launch.searchpath + top + nested)
            if record.cell_hash(again) != record.cell_hash(identity):
                first = next((o for o in _diff(identity, record.cell_identity(again), "cfg")), "?")
                check = f"differs: composing the command gives another cell (needs {first[len('cfg.'):]})"
    except Exception as e:  # noqa: BLE001 - the run goes on; its record says the line is not checked
        check = f"not composable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    overrides = sorted(named + nested, key=_override_order) + top
    method_overrides = {}
    for o in nested:
        key, _, text = o.lstrip("+").partition("=")
        if key.startswith("method.") and text:
            method_overrides[key[len("method."):]] = _value_at(identity, key)
    return Reproduction(" ".join(["python", "-m", "bench", *map(shell_word, overrides)]), overrides, method_overrides,
                        check)


def shell_word(arg: str) -> str:
    """`arg` as one POSIX shell word, readably: `key='a b'` becomes "key='a b'" rather than shlex's nested quotes."""
    if shlex.quote(arg) == arg or "'" not in arg or any(c in arg for c in '"$`\\!'):
        return shlex.quote(arg)
    return f'"{arg}"'


def _override_order(o: str) -> tuple[int, bool, str]:
    """Group by group (model, method, recover, task, ...): its choice, then its keys in order."""
    key = o.lstrip("+~").split("=", 1)[0]
    group = key.split(".", 1)[0]
    return (CHOICE_GROUPS.index(group) if group in CHOICE_GROUPS else len(CHOICE_GROUPS), "." in key, key)
