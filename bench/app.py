"""CLI: `python -m bench method=binarymos task=wikitext` (Hydra); `-m` for sweeps. See README.md.

Before Hydra composes anything, group choices on the command line are checked against the registry so
that a typo gives one line with the choices and the nearest name. Errors the user can fix print one line
(full traceback with HYDRA_FULL_ERROR=1) and exit non-zero; the MLflow run is left FAILED. In a sweep each
cell is supervised by bench.sweep and a failed cell never stops the others.
"""

from __future__ import annotations

import json
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench import preflight, record, registry
from bench.errors import BenchError, did_you_mean, unknown_choice


# Hydra flags whose value is the next word (`--cfg job`, `-cn config`): that word is not an override.
_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun")
_NO_RUN_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion",
                 "-sc")


def check_syntax(argv: list[str]) -> None:
    """Parse every override with Hydra's own grammar first: a malformed one (sweep values included) gives one
    line instead of Hydra's multi-line report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    after_flag = False
    for arg in argv:
        if after_flag and "=" not in arg:
            after_flag = False
            continue
        after_flag = arg in _VALUE_FLAGS
        if arg.startswith("-"):
            continue
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as e:
            lines = [x for x in str(e).splitlines() if x and not x.startswith(("Error parsing override", "See "))]
            raise BenchError(f"invalid override '{arg}': {lines[0] if lines else 'syntax error'}",
                             "write key=value, a sweep as key=a,b (see --help)") from None


def check_choices(argv: list[str]) -> None:
    extra = registry.searchpath_dirs(argv)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key not in registry.GROUPS or not value:
            continue
        available = registry.choices(key, extra)
        for v in value.split(","):
            v = v.strip()
            if v and available and v not in available:
                raise unknown_choice(key, v, available)


def check_overrides(argv: list[str]) -> None:
    """Compose the config once with the plain (non-sweep) overrides, so that a misspelled key gives one
    line with the nearest option instead of Hydra's multi-line report."""
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    plain = [a for a in argv if "=" in a and not a.startswith(("-", "hydra")) and "," not in a
             and a.split("=", 1)[0].lstrip("+~") not in registry.GROUPS]
    if not plain:
        return
    groups = [a for a in argv if "=" in a and "," not in a and a.split("=", 1)[0].lstrip("+~") in registry.GROUPS]
    groups += [a for a in argv if a.startswith("hydra.searchpath=")]
    with initialize_config_module("bench.configs", version_base=None):
        try:
            compose("config", overrides=groups + plain)
        except ConfigCompositionException as e:
            text = str(e)
            if "Could not override '" not in text:
                raise BenchError(text.splitlines()[0], "check the override syntax (key=value)") from None
            key = text.split("Could not override '", 1)[1].split("'", 1)[0]
            parent, _, leaf = key.rpartition(".")
            cfg = compose("config", overrides=groups)
            node = OmegaConf.select(cfg, parent) if parent else cfg
            options = sorted(node.keys()) if OmegaConf.is_dict(node) else []
            raise BenchError(f"{parent or 'config'} has no option '{leaf}'",
                             f"{did_you_mean(leaf, options)}options: {', '.join(map(str, options))}") from None
        except Exception as e:  # override grammar errors
            if isinstance(e, BenchError):
                raise
            raise BenchError(f"invalid override: {str(e).splitlines()[0]}", "use key=value (see --help)") from None


def incomplete(result) -> list[str]:
    """What a finished run could not do, one line each: task parts without data, a backend that cannot run
    the packed model (its accuracy is recorded, its latency and energy are not)."""
    t = result.tags
    lines = [f"{task}: {err}" for task, err in json.loads(t.get(record.TASK_FAILURES) or "{}").items()]
    if t.get(record.HARDWARE_STATUS) == "unsupported":
        lines.append(f"hardware '{t.get(record.HARDWARE)}' cannot run this model "
                     f"({t.get(record.HARDWARE_UNSUPPORTED)}); accuracy is recorded, latency and energy "
                     "are not: choose another hardware=")
    return lines


def _fail(err: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"bench: error: {err}", file=sys.stderr)
    raise SystemExit(getattr(err, "exit_code", 1))


@hydra.main(config_path="pkg://bench.configs", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig):
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        from bench import sweep

        return sweep.run_cell(cfg, list(hc.overrides.task))

    from bench.runner import Runner
    from bench.summary import print_summary

    try:
        runner = Runner(cfg)
        base, result = runner.run()
    except BenchError as e:
        _fail(e)
    except Exception as e:  # an unexpected failure: the run is FAILED in MLflow; say what happened
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"bench: error: {type(e).__name__}: {e} (rerun with HYDRA_FULL_ERROR=1 for the traceback)",
              file=sys.stderr)
        raise SystemExit(1)
    print_summary(base, result)
    lines = incomplete(result)
    for line in lines:
        print(f"bench: error: {line}", file=sys.stderr)
    if lines:
        raise SystemExit(1)
    return result.metrics


def main() -> None:
    try:
        _main(sys.argv[1:])
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # Run.__exit__ has marked an open run KILLED; atomic writes leave no partial file behind
        print("bench: error: interrupted (Ctrl-C); a run in progress is recorded as KILLED and no partial artifact "
              "is kept", file=sys.stderr)
        raise SystemExit(130)


def _main(argv: list[str]) -> None:
    # subcommands, not runs: a Hydra override always holds '=', so a bare first word is never one
    if argv[:1] == ["leaderboard"]:  # `bench leaderboard [--out DIR]`: the site builder
        from bench.leaderboard.__main__ import main as leaderboard

        sys.exit(leaderboard(argv[1:]))
    if argv[:1] in (["export"], ["import"]):  # published records (bench/published.py)
        from bench import published

        sys.exit(published.run_cli(published.main_export if argv[0] == "export" else published.main_import,
                                   argv[1:]))
    try:
        check_syntax(argv)
        check_choices(argv)
        check_overrides(argv)
        if not any(a in _NO_RUN_FLAGS for a in argv):  # Hydra creates its output folder there before bench runs
            preflight.writable_dir(preflight.results_dir_from(argv))
    except BenchError as e:
        _fail(e)
    # imported after the checks above, so that a typo is reported before torch and MLflow load
    from bench import sweep, tracking

    if not sweep.is_multirun(argv):
        _hydra_main()
        return
    # A sweep: one id for all cells, and the MLflow store created/migrated once before any worker starts.
    sid = os.environ.setdefault(record.SWEEP_ENV, sweep.new_sweep_id())
    results = preflight.results_dir_from(argv)
    tracking.setup(results)
    _hydra_main()
    sweep.print_summary_and_exit(results, sid)


if __name__ == "__main__":
    main()
