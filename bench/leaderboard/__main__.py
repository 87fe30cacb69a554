"""`python -m bench.leaderboard` (or `bench leaderboard`): build the static site from the MLflow store."""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.errors import BenchError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench leaderboard", description=__doc__)
    ap.add_argument("--results", default=os.environ.get("BENCH_RESULTS", "results"),
                    help="results directory holding mlflow.db (default: $BENCH_RESULTS or results)")
    ap.add_argument("--out", default=None, help="output directory (default: <results>/site)")
    ap.add_argument("--mlflow-url", default="http://127.0.0.1:5000", help="base URL of an MLflow UI for run links")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        from bench.leaderboard.site import build_site

        index = build_site(args.results, args.out, args.mlflow_url)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"leaderboard: {index} ({time.perf_counter() - t0:.1f}s); open it in a browser, no server needed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
