"""The bad-input matrix (issue 13): one case per input a user can get wrong, named after it. What the user
sees is one line, `bench: error: <problem>; <fix>` (a traceback only with HYDRA_FULL_ERROR=1), the exit
status is non-zero, and nothing is half-written: no run left RUNNING, no unverified cache entry, no temporary
file. docs/errors.md lists every case with its line.

Most cases call the code that detects the problem and pass its BenchError through the CLI's own printer
(`app._fail`); the command line runs in a subprocess where the exit status and the single stderr line are
the point (choices, syntax, results directory, Ctrl-C, a method raising mid-run)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (ROOT, byte_tokenizer, compose, loaded_tiny, mlflow_runs, run_cli, run_tiny, tiny_causal_lm,
                      tiny_cli_args)

from bench import app, registry
from bench.cache import file_sha256
from bench.errors import BenchError

PLUGINS = Path(__file__).parent / "plugins"


def choices(group: str) -> str:
    return ", ".join(registry.choices(group))


def build(group: str, *overrides: str):
    from bench.runner import build as build_plugin

    return build_plugin(compose(*overrides)[group], group)


def assert_nothing_half_written(results: Path) -> None:
    if (results / "mlflow.db").exists():
        assert [r.info.status for r in mlflow_runs(results) if r.info.status == "RUNNING"] == []
    art = results / "artifacts"
    if art.is_dir():
        assert [p.name for p in art.iterdir() if p.name.endswith(".tmp")] == []
        for f in art.glob("*.safetensors"):
            assert file_sha256(f) == f.with_suffix(".sha256").read_text()


def bench_lines(stderr: str) -> list[str]:
    """What bench itself wrote to stderr, without the progress bars that model loading and evaluation draw."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("bench:")]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@dataclass
class Ctx:
    tmp: Path
    results: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def model_dir(self, name: str, module) -> Path:
        d = self.tmp / name
        module.save_pretrained(d)
        byte_tokenizer().save_pretrained(d)
        return d


@pytest.fixture
def ctx(tmp_path, results_dir, monkeypatch, request):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("BENCH_DATA_ROOT", raising=False)
    return Ctx(tmp_path, results_dir, monkeypatch, request)


def user_sees(fn, capsys) -> tuple[int, str]:
    """What the CLI shows for the BenchError `fn` raises: its exit status and stderr, through `app._fail`."""
    with pytest.raises(BenchError) as raised:
        fn()
    capsys.readouterr()  # progress bars drawn before the failure (model loading) are not part of the message
    with pytest.raises(SystemExit) as exited:
        app._fail(raised.value)
    return exited.value.code, capsys.readouterr().err


# -- in-process cases: each returns (what the user does, the line after "bench: error: ") -----------------
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


@case
def unknown_model(c):
    return (lambda: app.check_choices(["model=smollm3"]),
            f"unknown model 'smollm3'; did you mean 'smollm2_135m'? choices: {choices('model')}")


@case
def unknown_calib(c):
    return (lambda: app.check_choices(["calib=c5"]),
            f"unknown calib 'c5'; did you mean 'c4'? choices: {choices('calib')}")


@case
def unknown_recover(c):
    return (lambda: app.check_choices(["recover=loraa"]),
            f"unknown recover 'loraa'; did you mean 'lora'? choices: {choices('recover')}")


@case
def override_without_value(c):
    return (lambda: app.check_syntax(["method=rtn", "method.bits"]),
            "invalid override 'method.bits': missing EQUAL at '<EOF>'; write key=value, a sweep as key=a,b "
            "(see --help)")


@case
def act_bits_on_a_weight_only_method(c):
    return (lambda: app.check_overrides(["method=sign", "method.act_bits=8"]),
            f"method has no option 'act_bits'; options: {', '.join(sorted(compose('method=sign').method.keys()))}")


@case
def group_size_larger_than_the_layer(c):
    method = build("method", "method=rtn", "method.group_size=200")
    return (lambda: method.compress(loaded_tiny("llama"), None, None),
            "group_size=200 does not fit in_features=128 of model.layers.0.self_attn.q_proj; use a positive group "
            "size up to the layer width, or -1 for per-channel")


@case
def depth_pruning_a_two_block_model(c):
    method = build("method", "method=shortgpt")
    return (lambda: method.check_applicable(loaded_tiny("llama")),
            "method 'shortgpt' needs a model with at least 3 decoder blocks (it keeps 2 and removes 1 or more); "
            "'tiny_llama' has 2; use a deeper model")


@case
def depth_ratio_that_removes_no_block(c):
    method = build("method", "method=sleb", "method.ratio=0.1")
    return (lambda: method.check_applicable(loaded_tiny("llama", layers=4)),
            "removing 0 of 4 blocks is not possible; remove at least 1 and keep at least 2 (set method.ratio or "
            "method.n_blocks)")


@case
def language_method_on_an_image_model(c):
    from bench import models

    method, spec = build("method", "method=sleb"), build("model", "model=rlfn")
    return (lambda: method.check_applicable(models.load(spec)),
            "method 'sleb' does not apply to image_sr model 'rlfn'; it applies to: causal_lm")


@case
def image_task_on_a_language_model(c):
    task = build("task", "task=sr_set5")
    return (lambda: task.check_applicable(loaded_tiny("llama")),
            "task 'sr_set5' does not apply to causal_lm model 'tiny_llama'; it applies to: image_sr")


@case
def unadapted_architecture(c):
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench import models

    d = c.model_dir("gpt2", GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)))
    return (lambda: models.load(models.ModelSpec(name="hf", name_or_path=str(d))),
            "no model adapter for architecture 'gpt2'; supported: llama, mistral, opt, qwen2, qwen3 (add one in "
            "bench/models/)")


@case
def missing_model_directory(c):
    from bench import models

    return (lambda: models.load(models.ModelSpec(name="hf", name_or_path=str(c.tmp / "no_model"))),
            f"model directory '{c.tmp / 'no_model'}' does not exist; check model.name_or_path")


@case
def corrupted_model_weights(c):
    from bench import models

    d = c.tmp / "truncated"
    shutil.copytree(c.fixture("tiny_byte_llama_dir"), d)
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    return (lambda: models.load(models.ModelSpec(name="hf", name_or_path=str(d))),
            f"the weights of model '{d}' are not a readable safetensors file (Error while deserializing header: "
            "incomplete metadata, file not fully covered); re-download or re-save the model")


@case
def tokenizer_of_another_model(c):
    from bench import models

    d = c.model_dir("mismatch", tiny_causal_lm("llama", vocab=64))
    return (lambda: models.load(models.ModelSpec(name="hf", name_or_path=str(d))),
            f"the tokenizer of model '{d}' has 256 tokens but its embedding has only 64 rows; use the tokenizer "
            "saved with this model")


@case
def model_larger_than_free_memory(c):
    from bench import models, preflight

    c.monkeypatch.setattr(preflight, "available_bytes", lambda: 2**20)
    d = c.fixture("tiny_byte_llama_dir")
    n = preflight.safetensors_params(d)
    return (lambda: preflight.check_fits(models.ModelSpec(name="hf", name_or_path=str(d))),
            f"model '{d}' needs at least {n * 8 / 2**30:.2f} GiB ({n / 1e6:.1f}M parameters x 4 bytes (float32) x 2 "
            "copies), only 0.00 GiB is available; free memory, raise cell_memory_gb, or use a smaller model")


@case
def missing_data_root(c):
    from bench import data

    return (lambda: data.wikitext2_rows("test", str(c.tmp / "nowhere")),
            f"data root '{c.tmp / 'nowhere'}' (paths.data_root) is not a directory; fix paths.data_root, or unset it "
            "to use ../shared/data")


@case
def missing_data_file(c):
    from bench import data

    (c.tmp / "empty").mkdir()
    return (lambda: data.wikitext2_rows("test", str(c.tmp / "empty")),
            f"data file 'wikitext-2-raw-v1/wiki.test.raw' not found under {c.tmp / 'empty'}; put it there or set "
            "paths.data_root=... / BENCH_DATA_ROOT, or go online so `datasets` can load wikitext/wikitext-2-raw-v1")


@case
def data_file_that_is_not_text(c):
    from bench import data

    f = write(c.tmp / "wikitext-2-raw-v1" / "wiki.test.raw", b" = Title = \n\xff\xfe\x00\x01")
    return (lambda: data.wikitext2_rows("test", str(c.tmp)),
            f"data file '{f}' is not UTF-8 text (byte 12); restore it from its source (see SOURCE.md beside it)")


@case
def truncated_data_file(c):
    from bench.tasks.wikitext import WikiText2Perplexity

    write(c.tmp / "wikitext-2-raw-v1" / "wiki.test.raw", " = Robert Boulter = \n \n Robert Boulter is an English\n")
    lm = SimpleNamespace(tokenizer=byte_tokenizer(), module=None)  # fails before any forward pass
    task = WikiText2Perplexity()
    n = task.token_ids(lm, str(c.tmp)).shape[1]
    return (lambda: task.evaluate(lm, str(c.tmp)),
            f"WikiText-2 test text has {n} tokens, fewer than one window of task.seqlen=2048; restore the data "
            "file (see SOURCE.md) or lower task.seqlen")


@case
def corrupted_qa_file(c):
    from bench.tasks.commonsense_qa import CommonsenseQA

    write(c.tmp / "qa" / "piqa" / "valid-labels.lst", "0\n1\n")
    f = write(c.tmp / "qa" / "piqa" / "valid.jsonl", '{"goal": "g", "sol1": "a", "sol2": "b"}\n{broken\n')
    return (lambda: CommonsenseQA(tasks=["piqa"]).task_config("piqa", str(c.tmp)),
            f"data file '{f}' is not a readable piqa file (JSONDecodeError: Expecting property name enclosed in "
            "double quotes: line 1 column 2 (char 1)); restore it from its source (see SOURCE.md beside it)")


@case
def empty_calibration_set(c):
    from bench import calib

    write(c.tmp / "wikitext-2-raw-v1" / "wiki.valid.raw", "")
    spec = build("calib", "calib=wikitext2_valid")
    return (lambda: calib.load(spec, byte_tokenizer(), 4, 64, str(c.tmp)),
            "calibration set 'wikitext2_valid' has 0 tokens, fewer than seqlen=64; use a larger split or a smaller "
            "budget.calib_seqlen")


def _runner(*overrides):
    from bench.runner import Runner

    return lambda: Runner(compose(*overrides))


@case
def misspelled_option_added_with_plus(c):
    from bench.methods.rtn import RTN

    return (_runner("method=rtn", "+method.group_sise=64"),
            "method has no option 'group_sise'; did you mean 'group_size'? options: "
            f"{', '.join(f.name for f in fields(RTN))}")


@case
def zero_calibration_samples(c):
    return (_runner("budget=tiny", "budget.calib_samples=0"),
            "budget.calib_samples=0 must be positive; set budget.calib_samples>0")


@case
def negative_training_steps(c):
    return (_runner("budget=tiny", "budget.train_steps=-5"),
            "budget.train_steps=-5 is negative; set budget.train_steps>=0")


@case
def zero_learning_rate(c):
    return _runner("budget=tiny", "budget.lr=0"), "budget.lr=0 must be positive; e.g. budget.lr=2e-4"


@case
def model_path_not_given(c):
    return (_runner("model=hf"), "model.name_or_path is not set; set model.name_or_path=... on the command line")


@case
def seed_not_an_integer(c):
    return _runner("seed=abc"), "seed=abc is not an integer >= 0; e.g. seed=0"


@case
def zero_threads(c):
    return _runner("threads=0"), "threads=0 is not an integer >= 1; e.g. threads=2"


@case
def disk_full_while_writing_an_artifact(c):
    from bench import cache

    def save_until_the_disk_fills(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    c.monkeypatch.setattr(cache, "save_file", save_until_the_disk_fills)
    store = cache.ArtifactStore(c.results / "artifacts")
    return (lambda: store.save("k", {"w": torch.zeros(4)}, {}),
            f"cannot write artifact under {c.results / 'artifacts'}: No space left on device; free disk space or "
            "set paths.results to a writable directory")


@case
def mlflow_store_locked(c):
    import mlflow
    from mlflow.exceptions import MlflowException

    from bench import tracking

    def locked(*args, **kwargs):  # what MLflow raises once sqlite's 20 s busy timeout has run out
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    c.monkeypatch.setattr(mlflow, "get_experiment_by_name", locked)
    c.monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    return (lambda: tracking.setup(c.results),
            f"the MLflow store sqlite:///{c.results / 'mlflow.db'} stayed locked by another process for 0 s (30 "
            "attempts); let the other writer finish, or point paths.results (or MLFLOW_TRACKING_URI) at another store")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, ctx, capsys):
    fn, expected = CASES[name](ctx)
    status, err = user_sees(fn, capsys)
    assert status != 0
    assert err == f"bench: error: {expected}\n"
    assert_nothing_half_written(ctx.results)


# -- the command line ------------------------------------------------------------------------------------
def _rtn_options() -> str:
    return ", ".join(sorted(compose("method=rtn").method.keys()))


CLI_CASES = {
    "unknown_method": (["method=binarymoss"],
                       lambda: f"unknown method 'binarymoss'; did you mean 'binarymos'? choices: {choices('method')}"),
    "unknown_task": (["task=wikitxt"], lambda: f"unknown task 'wikitxt'; did you mean 'wikitext'? choices: "
                                               f"{choices('task')}"),
    "unknown_hardware": (["hardware=gpu9"], lambda: f"unknown hardware 'gpu9'; did you mean 'cpu'? choices: "
                                                    f"{choices('hardware')}"),
    "misspelled_option": (["method=rtn", "method.group_sise=64"],
                          lambda: f"method has no option 'group_sise'; did you mean 'group_size'? options: "
                                  f"{_rtn_options()}"),
    "bits_out_of_range": (["method=rtn", "method.bits=1"],
                          lambda: "method.bits=1 is out of range; use a value in [2, 8]"),
    "invalid_override_syntax": (["method=rtn", "method.bits=[1,"],
                                lambda: "invalid override 'method.bits=[1,': no viable alternative at input '[1,'; "
                                        "write key=value, a sweep as key=a,b (see --help)"),
    "results_directory_not_writable": (["paths.results={file}/results"],
                                       lambda: "results directory '{file}/results' is not writable (Not a directory);"
                                               " set paths.results=... (or BENCH_RESULTS) to a writable directory"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_bad_input_on_the_command_line(name, results_dir, tmp_path):
    args, expected = CLI_CASES[name]
    a_file = write(tmp_path / "a_file", "not a directory")
    r = run_cli(*[a.format(file=a_file) for a in args], "threads=1", results=results_dir)
    assert r.returncode == 2
    assert r.stderr == f"bench: error: {expected().format(file=a_file)}\n"
    assert not (results_dir / "mlflow.db").exists()  # nothing recorded, nothing half-written


def test_full_error_shows_the_traceback(results_dir):
    r = run_cli("method=binarymoss", results=results_dir, env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr and "ConfigError: unknown method 'binarymoss'" in r.stderr


def test_method_raising_mid_run(store_results_dir, tiny_byte_llama_dir):
    results_dir = store_results_dir
    r = run_cli(*tiny_cli_args(tiny_byte_llama_dir), "method=explode", f"hydra.searchpath=[file://{PLUGINS}]",
                "compare_baseline=false", "threads=1", results=results_dir)
    assert r.returncode == 1
    assert bench_lines(r.stderr) == ["bench: error: RuntimeError: boom: simulated failure inside compress (rerun "
                                     "with HYDRA_FULL_ERROR=1 for the traceback)"]
    runs = mlflow_runs(results_dir)
    assert [x.info.status for x in runs] == ["FAILED"]
    assert runs[0].data.tags["error"] == "RuntimeError: boom: simulated failure inside compress"
    assert_nothing_half_written(results_dir)


def test_interrupted_run_ctrl_c(store_results_dir, tiny_byte_llama_dir, tmp_path):
    results_dir = store_results_dir
    started = tmp_path / "compress_started"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}
    # PYTHONFAULTHANDLER: if the child does not exit after Ctrl-C, SIGABRT makes it print every thread's stack
    env.update(BENCH_RESULTS=str(results_dir), BENCH_TEST_STARTED=str(started), PYTHONPATH=str(PLUGINS),
               PYTHONFAULTHANDLER="1")
    # A test run started as a background job (`cmd &` in a script, as a CI wrapper may do) has SIGINT ignored, and a
    # child inherits that: Python then installs no KeyboardInterrupt handler and Ctrl-C never arrives (the hang seen
    # in earlier CI checks). A terminal's Ctrl-C reaches a foreground process with the default disposition: restore it.
    proc = subprocess.Popen([sys.executable, "-m", "bench", *tiny_cli_args(tiny_byte_llama_dir), "method=slow",
                             f"hydra.searchpath=[file://{PLUGINS}]", "compare_baseline=false", "threads=1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not started.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert started.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # keep the evidence: SIGABRT under PYTHONFAULTHANDLER prints every thread's stack
        proc.send_signal(signal.SIGABRT)
        _, stderr = proc.communicate(timeout=60)
        pytest.fail(f"the run did not exit within 120 s of Ctrl-C; its threads' stacks:\n{stderr[-6000:]}")
    assert proc.returncode == 130
    assert bench_lines(stderr) == ["bench: error: interrupted (Ctrl-C); a run in progress is recorded as KILLED and "
                                   "no partial artifact is kept"]
    runs = mlflow_runs(results_dir)
    assert [x.info.status for x in runs] == ["KILLED"] and "KeyboardInterrupt" in runs[0].data.tags["error"]
    assert not list((results_dir / "artifacts").glob("*"))  # the cache is untouched


# -- in-process runs on the tiny model ---------------------------------------------------------------------

def test_nan_weights_from_a_method(ctx, store_results_dir, capsys, tiny_byte_llama_dir, small_wikitext):
    ctx.monkeypatch.syspath_prepend(str(PLUGINS))
    status, err = user_sees(lambda: run_tiny(ctx.results, tiny_byte_llama_dir, small_wikitext, "method=nan_weights",
                                             f"hydra.searchpath=[file://{PLUGINS}]"), capsys)
    assert status == 1
    assert err == ("bench: error: method 'nan_weights' produced NaN/inf in 1 stored tensor(s), first "
                   "model.layers.0.self_attn.q_proj.weight; nothing was cached and the run is recorded as failed; "
                   "try more bits, a lower budget.lr or another method\n")
    (run,) = mlflow_runs(ctx.results)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("NumericalFailure: method 'nan_weights'")
    assert run.data.metrics == {}  # never shown as a number
    assert not list((ctx.results / "artifacts").glob("*"))


def test_corrupted_cached_model_is_detected_and_rebuilt(ctx, store_results_dir, capsys, tiny_byte_llama_dir,
                                                       small_wikitext):
    first = run_tiny(ctx.results, tiny_byte_llama_dir, small_wikitext, "method=rtn")
    (artifact,) = (ctx.results / "artifacts").glob("*.safetensors")
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the tensors
    artifact.write_bytes(bytes(blob))
    capsys.readouterr()
    second = run_tiny(ctx.results, tiny_byte_llama_dir, small_wikitext, "method=rtn")
    assert bench_lines(capsys.readouterr().err) == [
        f"bench: warning: artifact {artifact} fails its sha256 check; rebuilding it"]
    tags = {r.info.run_id: r.data.tags for r in mlflow_runs(ctx.results)}[second.run_id]
    assert tags["bench.cache"] == "miss" and "fails its sha256 check" in tags["bench.cache_discarded"]
    assert second.metrics["wikitext2.ppl_token.gptq_s64.first1"] == first.metrics["wikitext2.ppl_token.gptq_s64.first1"]
    assert_nothing_half_written(ctx.results)


def test_backend_that_cannot_run_the_model(ctx, store_results_dir, tiny_byte_llama_dir, small_wikitext):
    """Only `cpu` exists, and it runs everything (as fake-quant); a backend without a kernel for a format says
    so through `supports`: the accuracy is recorded, latency is not, and the CLI prints one line, exit 1."""
    from bench.hardware.cpu import CpuBackend

    class NoSignKernel(CpuBackend):
        def supports(self, packed):
            return "no binary (sign) kernel" if packed.method == "sign" else None

    result = run_tiny(ctx.results, tiny_byte_llama_dir, small_wikitext, "method=sign", backend=NoSignKernel(threads=1))
    assert app.incomplete(result) == [
        "hardware 'cpu' cannot run this model (no binary (sign) kernel); accuracy is recorded, latency and energy "
        "are not: choose another hardware="]
    assert "wikitext2.ppl_token.gptq_s64.first1" in result.metrics
    assert not any(k.startswith(("latency.", "energy.")) for k in result.metrics)
    assert_nothing_half_written(ctx.results)
