"""Published records (bench/published.py), the reproducing command (bench/reproduce.py) and the leaderboard built
from records alone (tests/fixtures/records/, real small runs of the default model: tests/fixtures/make_records.py),
opened in headless Chromium."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, board_column, compose, mlflow_runs, run_cli, run_tiny

FIXTURES = ROOT / "tests" / "fixtures" / "records"


# --- the reproducing command ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, line, method_overrides", [
    (["method=rtn", "method.bits=3", "method.group_size=32", "task.limit=2", "threads=1"],
     "python -m bench method=rtn method.bits=3 method.group_size=32 task=wikitext task.limit=2 threads=1",
     {"bits": 3, "group_size": 32}),
    # the method's seed follows the top-level one (seed: ${seed}): named once, not as a method override
    (["method=binarymos", "seed=1"], "python -m bench method=binarymos task=wikitext seed=1", {}),
    # one precision throughout: the identity leaves compress_precision out; the line sets it (never '~compress_precision')
    (["method=binarymos", "precision=bf16", "compress_precision=bf16"],
     "python -m bench method=binarymos task=wikitext compress_precision=bf16", {}),
    (["method=gptq", "precision=fp32", "compress_precision=fp32"], "python -m bench method=gptq task=wikitext precision=fp32",
     {}),
    (["method=pipeline", "method.stages.1.bits=3", "budget=tiny"],
     "python -m bench method=pipeline method.stages.1.bits=3 task=wikitext budget=tiny", {"stages.1.bits": 3}),
    (["method=sign", "task=piqa", "model=hf", "model.name_or_path=/models/my model"],
     "python -m bench method=sign task=piqa model=hf \"model.name_or_path='/models/my model'\"", {}),
])
def test_the_command_names_what_differs_and_composes_back_to_the_same_cell(overrides, line, method_overrides):
    from omegaconf import OmegaConf

    from bench import record
    from bench.reproduce import Launch, reproduce

    cfg = OmegaConf.to_container(compose(*overrides), resolve=True)
    again = reproduce(cfg, Launch.infer(cfg))
    assert again.command == line
    assert again.check == "reproduces" and again.method_overrides == method_overrides
    # the line itself, parsed as a shell would and composed by Hydra, is the same cell
    import shlex

    composed = compose(*shlex.split(line)[3:])
    assert record.cell_hash(composed) == record.cell_hash(cfg)
    assert composed.compress_precision == cfg["compress_precision"]  # the runner reads the key: it must be there


def test_a_run_records_its_command_and_its_baseline_gets_its_own(store_results_dir, tiny_byte_llama_dir,
                                                                 small_wikitext):
    result = run_tiny(store_results_dir, tiny_byte_llama_dir, small_wikitext, "method=rtn", "method.bits=3",
                      "compare_baseline=true")
    runs = {r.data.tags["bench.method"]: r.data.tags for r in mlflow_runs(store_results_dir)}
    assert set(runs) == {"none", "rtn"}
    for method, tags in runs.items():
        assert tags["bench.command_check"] == "reproduces"
        assert tags["bench.command"].startswith(f"python -m bench method={method} ")
        assert ("method.bits=3" in tags["bench.command"]) == (method == "rtn")
        assert f"model.name_or_path={tiny_byte_llama_dir}" in tags["bench.command"]
        assert "paths." not in tags["bench.command"]  # where files live is no part of a cell
    assert json.loads(runs["rtn"]["bench.method_overrides"]) == {"bits": 3}
    assert result.tags["bench.command"] == runs["rtn"]["bench.command"]


# --- export, import ---------------------------------------------------------------------------------------------------
def _artifact(results: Path, run, name: str):
    from urllib.parse import unquote, urlparse

    return json.loads((Path(unquote(urlparse(run.info.artifact_uri).path)) / name).read_text())


def test_export_then_import_into_an_empty_store_gives_back_the_run(store_results_dir, migrated_store, tmp_path,
                                                                   tiny_byte_llama_dir, small_wikitext, monkeypatch):
    from bench import published, record, tracking

    run_tiny(store_results_dir, tiny_byte_llama_dir, small_wikitext, "method=rtn", "method.bits=3", "task.limit=2")
    [source] = mlflow_runs(store_results_dir)
    # the working tree may hold uncommitted changes while tests run: the record says so (and the site marks it)
    [path] = published.export(str(store_results_dir), tmp_path / "records", run_ids=[source.info.run_id],
                              allow_dirty=True)
    rec = published.read(path)
    assert path.name == published.file_name(rec) and path.name.startswith("rtn__wikitext__")
    assert rec["command"] == source.data.tags["bench.command"] and rec["schema_version"] == published.SCHEMA_VERSION

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(migrated_store, other / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by the first store's setup in this process
    assert published.import_records([path], str(other)) == ([rec["record_id"]], [])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert published.import_records([tmp_path / "records"], str(other)) == ([], [rec["record_id"]])  # idempotent
    [copy] = mlflow_runs(other)

    assert copy.info.status == "FINISHED" and copy.info.start_time == source.info.start_time
    assert copy.data.metrics == source.data.metrics
    kept = {k: v for k, v in source.data.tags.items()
            if k not in published.UNPUBLISHED_TAGS and not k.startswith("mlflow.")}
    assert {k: v for k, v in copy.data.tags.items() if not k.startswith("mlflow.")} == {
        **kept, record.RECORD_ID: rec["record_id"], record.RECORD_FILE: path.name}
    assert all(source.data.params[k] == v for k, v in copy.data.params.items())
    assert set(copy.data.params) == set(tracking.flatten(rec["config"]))
    before = _artifact(store_results_dir, source, record.TASK_METRICS_FILE)
    after = _artifact(other, copy, record.TASK_METRICS_FILE)
    assert after == before and len(after[0]["per_sample"]) == 2  # per-window NLLs, exactly
    assert all(isinstance(x, float) for x in after[0]["per_sample"])

    # the leaderboard of the source store plus the record shows one run, published
    from bench.leaderboard.collect import load_runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    [run] = load_runs(store_results_dir, tmp_path / "records")
    assert run.run_id == source.info.run_id and run.source == "published" and run.record_file == path.name


def test_export_refuses_a_run_made_from_a_dirty_tree_unless_allowed(store_results_dir, tmp_path, tiny_byte_llama_dir,
                                                                    small_wikitext):
    from mlflow.tracking import MlflowClient

    from bench import published

    run_tiny(store_results_dir, tiny_byte_llama_dir, small_wikitext, "method=sign")
    [run] = mlflow_runs(store_results_dir)
    commit = run.data.tags["bench.git_commit"].removesuffix("-dirty")
    MlflowClient().set_tag(run.info.run_id, "bench.git_commit", f"{commit}-dirty")
    out = tmp_path / "records"
    with pytest.raises(published.RecordError, match=r"field 'tags.bench.git_commit' is '[0-9a-f]{40}-dirty'"):
        published.export(str(store_results_dir), out, run_ids=[run.info.run_id])
    assert not out.exists()  # nothing written
    with pytest.raises(published.BenchError, match="no runs chosen"):
        published.export(str(store_results_dir), out)
    [path] = published.export(str(store_results_dir), out, run_ids=[run.info.run_id], allow_dirty=True)
    assert published.read(path)["tags"]["bench.git_commit"].endswith("-dirty")


# --- broken records are refused, one line each ----------------------------------------------------------------------
def _resealed(rec: dict) -> dict:
    from bench import published

    rec["sha256"] = published.checksum(rec)
    return rec


def _drop_git_commit(rec):
    del rec["tags"]["bench.git_commit"]
    return _resealed(rec)


def _tamper_value(rec):
    head = rec["tags"]["bench.primary_metric"]
    rec["metrics"][head] *= 0.9  # a better number, checksum left as it was
    return rec


def _edit_config(rec):
    rec["config"]["method"]["name"] = "other"
    return _resealed(rec)


def _unchecked_command(rec):
    rec["tags"]["bench.command_check"] = "not composable: MissingConfigException"
    return _resealed(rec)


def _truncate_samples(rec):
    rec["task_metrics"][0]["per_sample"]["n"] += 1
    return _resealed(rec)


@pytest.mark.parametrize("break_it, field", [
    (lambda r: _resealed({**r, "schema_version": 2}), "schema_version"),
    (lambda r: _resealed({k: v for k, v in r.items() if k != "metrics"}), "metrics"),
    (_drop_git_commit, "tags.bench.git_commit"),
    (_tamper_value, "sha256"),
    (_edit_config, "config"),
    (_unchecked_command, "tags.bench.command_check"),
    (_truncate_samples, "task_metrics[0].per_sample"),
], ids=["schema_version", "missing_field", "missing_tag", "tampered_value", "edited_config", "unchecked_command",
        "broken_per_sample"])
def test_a_broken_record_is_refused_naming_its_file_and_field(break_it, field, tmp_path):
    from bench import published

    good = sorted(FIXTURES.glob("*.json"))[0]
    rec = break_it(json.loads(good.read_text()))
    bad = tmp_path / good.name
    bad.write_text(json.dumps(rec))
    with pytest.raises(published.RecordError) as e:
        published.read(bad)
    assert str(e.value).startswith(f"record {bad}: field '{field}' ") and "\n" not in str(e.value)


def test_a_renamed_record_and_the_cli_line(tmp_path):
    from bench import published

    good = sorted(FIXTURES.glob("*.json"))[0]
    renamed = tmp_path / "mine.json"
    shutil.copy(good, renamed)
    with pytest.raises(published.RecordError, match=f"field 'record_id' does not match the file name .*rename the "
                                                    f"file to {re.escape(good.name)}"):
        published.read(renamed)
    r = run_cli("import", str(renamed), "--results", str(tmp_path / "results"), results=tmp_path / "results")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"bench: error: record {renamed}: field 'record_id' does not match the "
                                             f"file name (expected {good.name}); rename the file to {good.name}"]
    assert not (tmp_path / "results" / "mlflow.db").exists()  # refused before any store is touched


def test_the_fixture_records_are_sound_and_come_from_real_runs():
    from bench import published, record

    found = published.read_all([FIXTURES])
    assert len(found) >= 10
    for _, rec in found:
        t = rec["tags"]
        assert t[record.MODEL] == "smollm2_135m_instruct_q4_1" and t[record.COMMAND_CHECK] == "reproduces"
        assert re.fullmatch(r"[0-9a-f]{40}", t[record.GIT_COMMIT])  # made from a clean checkout
        head = t[record.PRIMARY_METRIC]
        [m] = [m for m in rec["task_metrics"] if m["name"] == head]
        per_sample = published.decode_values(m["per_sample"])
        assert len(per_sample) == 2  # task.limit=2
        if m["per_sample_name"] == "window_mean_nll":  # the perplexity is exp(mean window NLL), to float precision
            assert math.isclose(math.exp(sum(per_sample) / 2), rec["metrics"][head], rel_tol=1e-9)


# --- the site from records alone, in Chromium -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def published_site(tmp_path_factory):
    """`bench leaderboard` in a fresh directory: no local store, only the committed fixture records."""
    fresh = tmp_path_factory.mktemp("fresh_clone")
    results = fresh / "results"
    r = run_cli("leaderboard", "--results", str(results), "--records", str(FIXTURES), "--out", str(fresh / "site"),
                results=results)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not results.exists()  # reading the (absent) local store created nothing
    return fresh / "site"


def _records() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in FIXTURES.glob("*.json")}


def test_every_row_of_the_site_is_a_published_record_with_its_command(published_site):
    recs = _records()
    newest = {}  # a row shows the newest run of its configuration; older ones are on the method page
    for name, rec in sorted(recs.items(), key=lambda kv: kv[1]["run"]["start_time"]):
        newest[rec["tags"]["bench.config_hash"]] = name
    rows = json.loads((published_site / "data" / "leaderboard.json").read_text())
    assert {f for r in rows for f in r["record_files"].split(";")} == set(newest.values())
    for name, rec in recs.items():
        assert name in (published_site / f"method__{rec['tags']['bench.method']}.html").read_text()
    for row in rows:
        assert row["source"] == "published"
        rec = recs[row["record_files"].split(";")[0]]
        assert row["command"] == rec["command"] and row["git_commit"] == rec["tags"]["bench.git_commit"]
        assert row["value"] == rec["metrics"][row["metric"]]
    assert sorted(p.name for p in (published_site / "records").iterdir()) == sorted(recs)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    from bench.leaderboard.screenshot import CHROMIUM_ARGS

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(context, url: str):
    page = context.new_page()
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    page.wait_for_load_state("load")
    return page, problems


def test_every_page_renders_without_errors_and_every_plot_draws_every_row(published_site, browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    pages = sorted(published_site.glob("*.html"))
    assert {p.name for p in pages} >= {"index.html", "method__rtn.html", "method__onebit.html"}
    board_pages = [p for p in pages if "__" in p.name and not p.name.startswith("method__")]
    assert len(board_pages) == 2  # wikitext and piqa
    for html in pages:
        page, problems = _open(context, html.as_uri())
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete && i.naturalWidth)")
        assert all(s and s > 100 for s in sizes), (html.name, sizes)
        assert problems == [], (html.name, problems)
        if html in board_pages:
            ranks = page.eval_on_selector_all("#board tbody tr", "trs => trs.map(tr => tr.cells[0].textContent.trim())")
            values = page.eval_on_selector_all("#board tbody td.headline", "tds => tds.map(td => td.dataset.sort)")
            bits = board_column(page, "bits/weight")
            plotted = [p.get_attribute("src") for p in page.query_selector_all(".plots img")]
            assert any(src.endswith("__bits.svg") for src in plotted)
            for src in plotted:
                svg = (published_site / src).read_text()
                drawn = set(re.findall(r'id="row-(\d+)"', svg))
                if src.endswith("__bits.svg"):  # the figure papers draw: every row with a value and a bit width
                    assert drawn == {r for r, v, b in zip(ranks, values, bits) if v and b}, src
                else:
                    assert drawn and drawn <= set(ranks)
    context.close()


def test_sorting_filtering_and_the_copy_button_on_the_wikitext_page(published_site, browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    [html] = [p for p in published_site.glob("*__wikitext__*.html")]
    page, problems = _open(context, html.as_uri())
    rows = page.locator("#board tbody tr")
    n = rows.count()
    assert n >= 7
    assert page.locator("#board tbody tr td.source:has-text('published')").count() == n
    page.click("#board thead th:text-is('bits/weight')")
    bits = [float(v) for v in board_column(page, "bits/weight")]
    assert bits == sorted(bits)
    page.click("#board thead th:text-is('bits/weight')")
    assert [float(v) for v in board_column(page, "bits/weight")] == sorted(bits, reverse=True)
    page.fill("input.filter", "pruning")  # the family of magnitude, the page's only pruning row
    assert page.locator("#board tbody tr:visible").count() == 1
    page.fill("input.filter", "")
    assert page.locator("#board tbody tr:visible").count() == n
    # the copy button puts the row's exact command on the clipboard
    first = page.locator("#board tbody tr").first
    command = first.locator("td.cmd code.command").text_content()
    assert command.startswith("python -m bench method=") and "task=wikitext" in command
    first.locator("td.cmd button.copy").click()
    page.wait_for_function("() => document.querySelector('#board tbody tr td.cmd button.copy').textContent === "
                           "'copied'")
    assert page.evaluate("navigator.clipboard.readText()") == command
    recs = {r["command"] for r in _records().values()}
    assert command in recs
    assert problems == []
    context.close()


def test_a_method_page_lists_its_records_over_time(published_site, browser):
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page, problems = _open(context, (published_site / "method__onebit.html").as_uri())
    rows = page.locator("#history tbody tr")
    onebit = [r for r in _records().values() if r["tags"]["bench.method"] == "onebit"]
    assert rows.count() == len(onebit) == 2  # the two training budgets, each its own configuration
    texts = rows.all_text_contents()
    assert all("published" in t and "budget.train_steps=" in t for t in texts)
    assert problems == []
    context.close()


def test_a_method_page_shows_one_config_at_two_commits(published_site, browser):
    """The fixtures hold rtn W4 run at two commits (make_records.py --rerun): same cell, same perplexity."""
    reruns = [r for r in _records().values() if r["tags"]["bench.method"] == "rtn" and r["tags"]["bench.task"] ==
              "wikitext" and "method.bits" not in r["command"]]
    assert len(reruns) == 2 and len({r["tags"]["bench.git_commit"] for r in reruns}) == 2
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    page, problems = _open(context, (published_site / "method__rtn.html").as_uri())
    rows = [r for r in page.locator("#history tbody tr").all_text_contents() if "rtn (bits=4" in r and "wikitext" in r]
    first, second = sorted(reruns, key=lambda r: r["run"]["start_time"])
    assert len(rows) == 2
    assert first["tags"]["bench.git_commit"][:10] in rows[0] and second["tags"]["bench.git_commit"][:10] in rows[1]
    assert "+0" in rows[1] and "worse" not in rows[1]  # the change between the commits: none
    assert problems == []
    context.close()
