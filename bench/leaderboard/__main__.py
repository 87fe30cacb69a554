"""`python -m bench leaderboard` (or `python -m bench.leaderboard`): build the static site from the local MLflow
store plus the published records (`leaderboard/records/`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench.errors import BenchError
from bench.published import RECORDS_DIR


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench leaderboard", description=__doc__)
    ap.add_argument("--results", default=os.environ.get("BENCH_RESULTS", "results"),
                    help="results directory holding mlflow.db (default: $BENCH_RESULTS or results)")
    ap.add_argument("--out", default=None, help="output directory (default: <results>/site)")
    ap.add_argument("--mlflow-url", default="http://127.0.0.1:5000", help="base URL of an MLflow UI for run links")
    ap.add_argument("--records", default=RECORDS_DIR, help=f"folder of published records (default: {RECORDS_DIR})")
    ap.add_argument("--no-records", action="store_true", help="the local store only")
    ap.add_argument("--screenshot", metavar="PNG", help="also save a full-page screenshot of the index (and of each "
                    "page whose slug is given with --screenshot-page) taken in headless Chromium")
    ap.add_argument("--screenshot-page", action="append", default=[], metavar="SLUG=PNG",
                    help="a page of the site (its file name without .html) and where to save its screenshot")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        from bench.leaderboard.site import build_site

        index = build_site(args.results, args.out, args.mlflow_url, None if args.no_records else args.records)
        shots = [(index, args.screenshot)] if args.screenshot else []
        for spec in args.screenshot_page:
            slug, sep, png = spec.partition("=")
            if not sep or not (index.parent / f"{slug}.html").is_file():
                raise BenchError(f"--screenshot-page {spec!r}: no page {slug}.html in the site",
                                 f"use SLUG=PNG with a page of {index.parent}")
            shots.append((index.parent / f"{slug}.html", png))
        if shots:
            from bench.leaderboard.screenshot import screenshot

            screenshot(shots)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"leaderboard: {index} ({time.perf_counter() - t0:.1f}s); open it in a browser, no server needed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
