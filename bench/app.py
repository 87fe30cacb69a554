"""CLI: `python -m bench method=binarymos task=wikitext` (Hydra); `-m` for sweeps. See README.md.

Before Hydra composes anything, group choices on the command line are checked against the registry so
that a typo gives one line with the choices and the nearest name. Errors the user can fix print one line
(full traceback with HYDRA_FULL_ERROR=1) and exit non-zero; the MLflow run is left FAILED. In a sweep each
cell is supervised by bench.sweep and a failed cell never stops the others.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bench import registry, sweep
from bench.errors import BenchError, unknown_choice

# Third-party plug-in packages (entry-point group `bench.plugins`) join Hydra's config search path.
OmegaConf.register_new_resolver(
    "bench_plugin_searchpath", lambda: [f"pkg://{p}" for p in registry.plugin_config_packages()], replace=True)


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
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
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
    print_summary(runner, base, result)
    return result.metrics


def main() -> None:
    argv = sys.argv[1:]
    try:
        check_choices(argv)
    except BenchError as e:
        _fail(e)
    if not sweep.is_multirun(argv):
        _hydra_main()
        return
    # A sweep: one id for all cells, and the MLflow store created/migrated once before any worker starts.
    from bench import tracking

    sid = os.environ.setdefault(sweep.SWEEP_ENV, sweep.new_sweep_id())
    results = sweep.results_dir_from(argv)
    tracking.setup(results)
    _hydra_main()
    sweep.print_summary_and_exit(results, sid)


if __name__ == "__main__":
    main()
