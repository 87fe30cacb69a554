"""Full-page screenshots of built site pages in headless Chromium (Debian's /usr/bin/chromium driven by playwright, as
tests/test_leaderboard.py does), for the images in docs/: `python -m bench leaderboard --screenshot docs/x.png`."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.errors import BenchError

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        raise BenchError("no Chromium to take screenshots with", "apt-get install -y chromium")
    return path


def screenshot(shots: list[tuple[Path, str]], width: int = 1500) -> None:
    """Save each (html file, png path) as a full-page PNG."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BenchError("playwright is not installed", "pip install -e '.[dev]' (it drives the system Chromium)") \
            from None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            for html, png in shots:
                page.goto(Path(html).resolve().as_uri())
                page.wait_for_load_state("load")
                Path(png).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(png), full_page=True)
                print(f"screenshot: {png}")
        finally:
            browser.close()
