"""CLI: `python -m bench method=binarymos task=wikitext` (Hydra). See README.md.

Before Hydra composes anything, group choices on the command line are checked against the registry so
that a typo gives one line with the choices and the nearest name. Errors the user can fix print one line
(full traceback with HYDRA_FULL_ERROR=1) and exit non-zero; the MLflow run is left FAILED.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from bench import registry
from bench.errors import BenchError, unknown_choice


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


def _fail(err: BaseException) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"bench: error: {err}", file=sys.stderr)
    raise SystemExit(getattr(err, "exit_code", 1))


@hydra.main(config_path="pkg://bench.configs", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig):
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
    print_summary(runner, base, result)
    return result.metrics


def main() -> None:
    try:
        check_choices(sys.argv[1:])
    except BenchError as e:
        _fail(e)
    _hydra_main()


if __name__ == "__main__":
    main()
