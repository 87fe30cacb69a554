"""The leaderboard site, built from a real sweep's MLflow store and opened in headless Chromium."""

import csv
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from conftest import board_column, mlflow_runs, run_cli

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
XSS = "<script>alert(1)</script>"
FAST = ["task.limit=6", "task.prompt_tokens=16", "task.decode_tokens=2", "hardware.min_seconds=0",
        "hardware.min_reps=1", "hardware.warmup=0", "budget=tiny", "compare_baseline=false"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_llama_dir):
    """3 methods x 2 tasks on the CPU backend (every backend available here), plus a run whose method
    name is a script tag, then the site built from that store."""
    results = tmp_path_factory.mktemp("board") / "results"
    model = ["model=hf", f"model.name_or_path={tiny_llama_dir}"]
    r = run_cli("-m", *model, "method=none,rtn,sign", "task=wikitext,piqa", *FAST, results=results)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_cli(*model, "method=sign", f"method.name='{XSS}'", "task=piqa", *FAST, results=results)
    assert r.returncode == 0, r.stderr[-3000:]
    t0 = time.perf_counter()
    r = run_cli("leaderboard", "--results", str(results), "--no-records", results=results)
    build_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    return results, results / "site", build_s


def _pages(site: Path) -> dict[str, Path]:
    """The task pages by task (method pages, method__<name>.html, aside)."""
    return {p.name.split("__")[1]: p for p in site.glob("*__*.html") if not p.name.startswith("method__")}


def test_site_builds_in_seconds_with_one_page_per_task(swept):
    results, site, build_s = swept
    assert build_s < 60, build_s  # process start and imports included
    assert set(_pages(site)) == {"wikitext", "piqa"}
    assert (site / "index.html").exists() and (site / "static" / "site.js").exists()


def test_exports_hold_the_stored_numbers(swept):
    results, site, _ = swept
    stored = {(r.data.tags["bench.method"], r.data.tags["bench.task"]): r for r in mlflow_runs(results)}
    recs = json.loads((site / "data" / "leaderboard.json").read_text())
    with open(site / "data" / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(recs) == len(rows) == 7
    for rec in recs:
        run = stored[(rec["method"], rec["task"])]
        assert rec["value"] == run.data.metrics[rec["metric"]]
        assert rec["bits_per_weight"] == run.data.metrics["storage.bits_per_weight.block_linears"]
        assert rec["run_ids"] == run.info.run_id
        assert rec["ci95_low"] <= rec["value"] <= rec["ci95_high"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(url)
    page.wait_for_load_state("load")
    return page, problems


def test_pages_in_chromium_show_stored_numbers_sort_and_plot(swept, browser, tmp_path):
    results, site, _ = swept
    index, problems = _open(browser, (site / "index.html").as_uri())
    assert index.locator("#pages tbody tr").count() == 2
    index.click("text=wikitext2.ppl_token.gptq_s2048.first6")
    page = index
    page.wait_for_load_state("load")
    stored = {r.data.tags["bench.method"]: r for r in mlflow_runs(results) if r.data.tags["bench.task"] == "wikitext"}
    metric = "wikitext2.ppl_token.gptq_s2048.first6"
    methods = [t.split(" ")[0] for t in page.eval_on_selector_all(
        "#board tbody tr td:nth-child(2)", "tds => tds.map(td => td.textContent.trim())")]
    shown = [float(v) for v in board_column(page, metric)]
    assert sorted(methods) == ["none", "rtn", "sign"]
    for m, v in zip(methods, shown):
        assert v == stored[m].data.metrics[metric]  # the exact stored float, not a rounded copy
    assert shown == sorted(shown)  # ranked best (lowest perplexity) first
    # sorting by a column: click once ascending, again descending
    page.click("#board thead th:text-is('bits/weight')")
    bits = [float(v) for v in board_column(page, "bits/weight")]
    assert bits == sorted(bits) and len(set(bits)) == 3
    page.click("#board thead th:text-is('bits/weight')")
    assert [float(v) for v in board_column(page, "bits/weight")] == sorted(bits, reverse=True)
    # filtering hides rows, clearing shows them again
    page.fill("input.filter", "quantization")
    assert page.locator("#board tbody tr:visible").count() == 1
    page.fill("input.filter", "")
    # the plots load (decoded images with a size)
    sizes = page.eval_on_selector_all(".plots img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
    assert len(sizes) >= 3 and all(s and s > 100 for s in sizes), sizes
    page.screenshot(path=str(tmp_path / "wikitext.png"), full_page=True)
    assert (tmp_path / "wikitext.png").stat().st_size > 20_000
    assert problems == []


def test_confidence_intervals_and_paired_marks_on_the_page(swept, browser):
    _, site, _ = swept
    page, problems = _open(browser, _pages(site)["piqa"].as_uri())
    cells = page.eval_on_selector_all("#board tbody td.headline", "tds => tds.map(td => td.textContent)")
    assert len(cells) == 4 and all("[" in c and "]" in c for c in cells)  # a 95% bootstrap interval per row
    assert sum("\u2605 best" in c for c in cells) == 1
    others = [c for c in cells if "\u2605 best" not in c]
    assert all("\u2248 best" in c or " vs best" in c for c in others)  # each carries its paired test
    assert problems == []


def test_a_script_in_a_method_name_renders_as_text(swept, browser):
    _, site, _ = swept
    html = _pages(site)["piqa"].read_text()
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page, problems = _open(browser, _pages(site)["piqa"].as_uri())
    assert page.locator(f"#board tbody td:nth-child(2):has-text('{XSS}')").count() == 1  # shown literally, as text
    assert page.locator(f"#board tbody td.cmd code:has-text('{XSS}')").count() == 1  # in its command too
    assert problems == []  # no alert dialog, no console error


def test_seed_repeats_are_aggregated_as_mean_and_std(results_dir):
    from bench import tracking
    from bench.leaderboard.collect import build_pages

    tracking.setup(results_dir)
    for seed, value in [(0, 10.0), (1, 12.0), (2, 14.0)]:
        # the method's own seed follows the run's (`seed: ${seed}` in its YAML), as binarymos's and onebit's do
        with tracking.Run("r", {"method": {"name": "m", "bits": 2, "seed": seed}, "seed": seed},
                          {"bench.method": "m", "bench.task": "t", "bench.model": "x", "bench.seed": str(seed),
                           "bench.hardware": "cpu", "metric.t.ppl.direction": "lower",
                           "bench.primary_metric": "t.ppl"}) as run:
            run.metrics({"t.ppl": value})
    [page], orphans = build_pages(results_dir)
    assert orphans == []
    [row] = page.rows
    assert sorted(row.seeds) == ["0", "1", "2"]
    assert row.value == 12.0 and math.isclose(row.std, 2.0)


def test_a_failed_run_without_any_finished_result_is_listed(results_dir):
    from bench import tracking
    from bench.leaderboard.collect import build_pages
    from bench.leaderboard.site import build_site

    tracking.setup(results_dir)
    with pytest.raises(RuntimeError):
        with tracking.Run("r", {"seed": 0}, {"bench.method": "m", "bench.task": "qa", "bench.model": "x",
                                              "bench.hardware": "cpu"}):
            raise RuntimeError("out of memory in block 3")
    pages, orphans = build_pages(results_dir)
    assert pages == [] and [(o["task"], o["status"]) for o in orphans] == [("qa", "FAILED")]
    assert "out of memory in block 3" in build_site(results_dir).read_text()


def test_a_backends_deployed_accuracy_is_shown_beside_the_torch_one(results_dir):
    from bench import tracking
    from bench.leaderboard.collect import build_pages
    from bench.leaderboard.site import build_site, records

    tracking.setup(results_dir)
    for hardware, extra, tags in [("cpu", {}, {}),
                                  ("cpu_kernels", {"t.ppl.deployed": 10.73, "t.ppl.deployed_minus_fake_quant": 0.73},
                                   {"bench.deployed_execution": "ort-matmulnbits-int4-b128-acc4"})]:
        with tracking.Run("r", {"method": {"name": "rtn", "bits": 4}, "seed": 0},
                          {"bench.method": "rtn", "bench.task": "t", "bench.model": "x", "bench.seed": "0",
                           "bench.hardware": hardware, "metric.t.ppl.direction": "lower",
                           "bench.primary_metric": "t.ppl", **tags}) as run:
            run.metrics({"t.ppl": 10.0, **extra})
    [page], _ = build_pages(results_dir)
    [row] = page.rows
    assert row.value == 10.0  # the row's accuracy is the primary (cpu, torch) run's
    assert row.backends["cpu"].deployed_value is None
    assert row.backends["cpu_kernels"].deployed_value == 10.73
    [rec] = records([page])
    assert rec["cpu_kernels.deployed_execution"] == "ort-matmulnbits-int4-b128-acc4"
    html = (build_site(results_dir).parent / f"{page.slug}.html").read_text()
    assert "deployed (ort-matmulnbits-int4-b128-acc4): 10.73" in html


def test_labels_name_the_settings_that_differ_from_defaults_or_across_the_page(results_dir):
    from bench import tracking
    from bench.leaderboard.collect import build_pages

    tracking.setup(results_dir)
    # overrides: what the runner records as the method's differences from configs/method/<name>.yaml; a method
    # recorded without them (a run from before the tag) is labelled from the page alone
    for task, method, params, value, overrides in [
            ("t", "gptq", {"bits": 3, "group_size": 32, "damp": 0.01}, 40.0, {"bits": 3, "group_size": 32}),
            ("t", "awq", {"bits": 4, "group_size": 128}, 25.0, {}),
            ("t", "awq", {"bits": 3, "group_size": 128}, 50.0, {"bits": 3}),
            ("t", "sign", {}, 900.0, {}),
            ("u", "gptq", {"bits": 3, "group_size": 128, "damp": 0.01}, 60.0, {"bits": 3}),
            ("u", "mine", {"bits": 3}, 70.0, None)]:
        tags = {} if overrides is None else {"bench.method_overrides": json.dumps(overrides)}
        with tracking.Run("r", {"method": {"name": method, **params}, "seed": 0},
                          {"bench.method": method, "bench.task": task, "bench.model": "x", "bench.seed": "0",
                           "bench.hardware": "cpu", "metric.ppl.direction": "lower",
                           "bench.primary_metric": "ppl", **tags}) as run:
            run.metrics({"ppl": value})
    pages = {p.task: p for p in build_pages(results_dir)[0]}
    # awq W4g128 is awq's shipped default, named here because the page's other rows differ; damp is gptq's
    # default everywhere; sign has none of these keys
    assert [r.label for r in pages["t"].rows] == ["awq (bits=4, group_size=128)", "gptq (bits=3, group_size=32)",
                                                  "awq (bits=3, group_size=128)", "sign"]
    # alone on its page, gptq still names the setting it changed from configs/method/gptq.yaml (bits 4, as its
    # record says); a method without recorded overrides names only what differs across the page
    assert [r.label for r in pages["u"].rows] == ["gptq (bits=3)", "mine"]


def test_precisions_split_pages_and_a_mixed_calibration_precision_is_named(results_dir):
    """bf16 and fp32 evaluations are separate pages; on one page, a calibrated method's rows computed with another
    calibration precision than the page's are separate rows and say so; a run recorded before compress_precision
    existed counts as calibrated in its evaluation precision, and a data-free method has no calibration to name."""
    from bench import tracking
    from bench.leaderboard.collect import build_pages

    tracking.setup(results_dir)
    for method, prec, compress, calibrated, value in [("gptq", "bf16", "fp32", True, 40.0),
                                                      ("gptq", "bf16", "bf16", True, 41.0),
                                                      ("gptq", "bf16", None, True, 41.5),  # before the key
                                                      ("gptq", "fp32", "fp32", True, 42.0),
                                                      ("rtn", "bf16", "fp32", False, 60.0)]:
        tags = {"bench.method": method, "bench.task": "t", "bench.model": "x", "bench.seed": "0",
                "bench.hardware": "cpu", "metric.ppl.direction": "lower", "bench.primary_metric": "ppl",
                "bench.precision": prec, "bench.calib": "c", "bench.budget": "b"}
        tags.update({"bench.compress_precision": compress} if compress else {})
        tags.update({"bench.calib_sha256": "0" * 64} if calibrated else {})
        with tracking.Run("r", {"method": {"name": method}, "seed": 0}, tags) as run:
            run.metrics({"ppl": value})
    pages = {p.precision: p for p in build_pages(results_dir)[0]}
    assert sorted(pages) == ["bf16", "fp32"]
    # bf16 throughout, recorded with and without the key: one row (one seed; its newest run counts)
    assert [(r.label, r.value) for r in pages["bf16"].rows] == [("gptq (compress_precision=fp32)", 40.0),
                                                                ("gptq", 41.5), ("rtn", 60.0)]
    assert [(r.label, r.value) for r in pages["fp32"].rows] == [("gptq", 42.0)]


def _train_run(method, family, steps, value, converged, commit="a" * 40, tokens_per_step=512):
    """A run as the runner records a training method (train.* metrics, convergence tag) or, with steps=None, a
    PTQ method (no training record)."""
    from bench import tracking

    tags = {"bench.method": method, "bench.method_family": family, "bench.task": "t", "bench.model": "x",
            "bench.seed": "0", "bench.hardware": "cpu", "metric.t.ppl.direction": "lower",
            "bench.primary_metric": "t.ppl", "bench.calib": "c", "bench.budget": "b", "bench.calib_sha256": "0" * 64,
            "bench.git_commit": commit}
    metrics = {"t.ppl": value, "storage.bits_per_weight.block_linears": 1.1 if steps else 2.3}
    if steps:
        tags.update({"train.converged": converged, "train.criterion": "held-out loss fell < 2% over 50-80% lr-time"})
        metrics.update({"train.steps": steps, "train.tokens_seen": steps * tokens_per_step,
                        "train.seconds": steps * 0.5})
    with tracking.Run("r", {"method": {"name": method}, "seed": 0, "budget": {"name": "b", "train_steps": steps or 0}},
                      tags) as run:
        run.metrics(metrics)


def test_quality_vs_training_budget_plot_draws_a_line_per_method_and_ptq_references(results_dir):
    import re

    from bench import tracking
    from bench.leaderboard.collect import build_pages
    from bench.leaderboard.site import build_site

    tracking.setup(results_dir)
    for steps, value, converged in [(64, 900.0, "false"), (256, 300.0, "false"), (1024, 120.0, "true")]:
        _train_run("onebit", "binarization", steps, value, converged)
    _train_run("dbllm", "binarization", 256, 80.0, "true")
    _train_run("billm", "binarization", None, 150.0, "")
    [page], _ = build_pages(results_dir)
    trained = {r.label: (r.train["train.tokens_seen"], r.converged) for r in page.rows if r.train}
    assert trained == {"onebit (budget.train_steps=64)": (32768, "false"),
                       "onebit (budget.train_steps=256)": (131072, "false"),
                       "onebit (budget.train_steps=1024)": (524288, "true"), "dbllm": (131072, "true")}
    assert len({r.line_key for r in page.rows if r.method == "onebit"}) == 1  # one line across the budgets
    site = build_site(results_dir).parent
    ranks = {r.label: i for i, r in enumerate(page.rows, 1)}
    for stem in ("train_tokens", "train_seconds"):
        svg = (site / "plots" / f"{page.slug}__{stem}.svg").read_text()
        assert set(re.findall(r'id="row-(\d+)"', svg)) == {str(ranks[label]) for label in trained}
    html = (site / f"{page.slug}.html").read_text()
    assert "quality vs training budget: training tokens seen (log)" in html
    assert "train.converged=false" in html


def test_a_method_page_shows_the_change_between_git_commits(results_dir):
    from bench import tracking
    from bench.leaderboard.collect import build_method_pages, build_pages, load_runs
    from bench.leaderboard.site import build_site

    tracking.setup(results_dir)
    _train_run("billm", "binarization", None, 150.0, "", commit="a" * 40)
    _train_run("billm", "binarization", None, 150.0, "", commit="a" * 40)  # a rerun at the same commit
    _train_run("billm", "binarization", None, 180.0, "", commit="b" * 40)  # the same config, later code: worse
    runs = load_runs(results_dir)
    pages, _ = build_pages(results_dir, runs=runs)
    [method] = build_method_pages(runs, pages)
    [config] = method.configs
    assert [(e.value, e.change, e.worse) for e in config["entries"]] == [(150.0, None, False), (150.0, None, False),
                                                                        (180.0, 30.0, True)]
    assert pages[0].rows[0].value == 180.0  # the page shows the newest run
    html = (build_site(results_dir).parent / f"{method.slug}.html").read_text()
    assert html.count('+30 <span class="mark worse">worse</span>') == 1
