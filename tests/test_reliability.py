"""Trust in what is stored (issue 13): determinism, safe loading, atomic writes, and a run killed while it
writes its cached model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, mlflow_runs, run_tiny, tiny_cli_args

from bench import models
from bench.cache import ArtifactStore, atomic_write, atomic_write_bytes, file_sha256
from bench.errors import ArtifactCorrupt, DataCorrupt


def fresh_results(path: Path, migrated_store: Path) -> Path:
    path.mkdir(parents=True)
    shutil.copy(migrated_store, path / "mlflow.db")
    return path


def only_artifact(results: Path) -> Path:
    (f,) = (results / "artifacts").glob("*.safetensors")
    return f


# -- determinism -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq", "onebit"])  # onebit: trained by distillation (budget=tiny)
def test_same_config_and_seed_give_identical_weights_and_metrics(method, tmp_path, migrated_store, results_dir,
                                                                 tiny_byte_llama_dir, small_wikitext):
    """Two runs of one config and seed in separate stores (so the second cannot read the first's cache)."""
    runs = [run_tiny(fresh_results(tmp_path / name, migrated_store), tiny_byte_llama_dir, small_wikitext,
                     f"method={method}") for name in ("a", "b")]
    a, b = (only_artifact(tmp_path / name) for name in ("a", "b"))
    assert a.name == b.name  # same cache key
    # bit-identical tensors and equal metadata (the file bytes may not be: safetensors writes the metadata
    # map in hash order, which varies between processes)
    (ta, ma), (tb, mb) = (ArtifactStore(f.parent).load(f.stem) for f in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    def untimed(meta):  # the training record travels in the metadata; its wall seconds are the only thing timed
        meta = dict(meta)
        if "training" in meta:
            training = json.loads(meta.pop("training"))
            meta["training"] = [{k: v for k, v in s.items() if not k.endswith("seconds")} for s in training["stages"]]
        return meta
    assert untimed(ma) == untimed(mb)

    def outcome(metrics):  # everything but wall-clock timings and what they feed
        timed = ("time.", "latency.", "throughput.", "memory.", "energy.")
        return {k: v for k, v in metrics.items() if not k.startswith(timed) and not k.endswith("seconds")}

    assert "wikitext2.ppl_token.gptq_s64.first1" in outcome(runs[0].metrics)
    assert outcome(runs[0].metrics) == outcome(runs[1].metrics)


# -- safe loading ------------------------------------------------------------------------------------------
UNPICKLERS = re.compile(r"\bpickle\.loads?\(|\bjoblib\.load\(|\bdill\b|\bcloudpickle\b|read_pickle\(|"
                        r"allow_pickle\s*=\s*True|\bUnpickler\(")


def test_weights_are_loaded_only_through_safetensors_or_weights_only_torch_load():
    """Every code path that reads tensors: no unpickling, and each torch.load says weights_only=True."""
    offenders = []
    for folder in ("bench", "methods", "tasks", "hardware", "benchmarks"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            text = f.read_text()
            offenders += [f"{f.relative_to(ROOT)}: {m.group(0)}" for m in UNPICKLERS.finditer(text)]
            offenders += [f"{f.relative_to(ROOT)}: torch.load({m.group(1)})"
                          for m in re.finditer(r"\btorch\.load\(([^)]*)\)", text)
                          if "weights_only=True" not in m.group(1)]
    assert offenders == []


class RunsCode:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_and_never_run(tmp_path, tiny_byte_llama_dir):
    marker = tmp_path / "code_ran"
    # a user's model directory whose weights are a pickle instead of safetensors
    d = tmp_path / "model"
    shutil.copytree(tiny_byte_llama_dir, d)
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, d / "pytorch_model.bin")
    with pytest.raises(DataCorrupt, match="are a pickle that does not load as plain tensors .* and were refused"):
        models.load(models.ModelSpec(name="hf", name_or_path=str(d)))
    # a cache entry that is a pickle (its hash sidecar matching, so only the format can refuse it)
    store = ArtifactStore(tmp_path / "artifacts")
    f, h = store.paths("k")
    f.parent.mkdir()
    torch.save({"w": RunsCode(marker)}, f)
    h.write_text(file_sha256(f))
    with pytest.raises(ArtifactCorrupt, match="is not a readable safetensors file"):
        store.load("k")
    assert not marker.exists()


# -- atomic writes -----------------------------------------------------------------------------------------
def test_a_write_that_fails_midway_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "status.json"
    atomic_write_bytes(path, b'{"status": "finished"}')

    def half_then_crash(tmp):
        Path(tmp).write_bytes(b'{"stat')
        raise KeyboardInterrupt  # Ctrl-C or any exception mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b'{"status": "finished"}'
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_a_cache_entry_is_trusted_only_complete_and_verified(tmp_path):
    store = ArtifactStore(tmp_path)
    f = store.save("k", {"w": torch.arange(1000, dtype=torch.float32)}, {"method": "x"})
    assert store.has("k") and torch.equal(store.load("k")[0]["w"], torch.arange(1000, dtype=torch.float32))
    sidecar = f.with_suffix(".sha256")
    digest = sidecar.read_text()
    sidecar.unlink()  # killed between the rename of the tensors and the hash: not an entry
    assert not store.has("k")
    sidecar.write_text(digest)
    f.write_bytes(f.read_bytes()[:-100])  # truncated afterwards (disk error, a copy cut short)
    with pytest.raises(ArtifactCorrupt, match="fails its sha256 check"):
        store.load("k")


KILL_WHILE_WRITING = """
import os, signal, sys
import bench.cache as cache
real_save = cache.save_file

def save_then_die(tensors, path, metadata=None):  # half the file is on disk when the process is killed
    real_save(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

cache.save_file = save_then_die
sys.argv = ["bench", *sys.argv[1:]]
from bench.app import main
main()
"""


def test_a_run_killed_while_writing_its_cached_model_is_detected_and_rebuilt(store_results_dir, tiny_byte_llama_dir,
                                                                             small_wikitext):
    results = store_results_dir
    args = [*tiny_cli_args(tiny_byte_llama_dir), "method=rtn", "compare_baseline=false", "threads=1",
            f"paths.data_root={small_wikitext}"]
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, *args], cwd=ROOT, capture_output=True,
                            text=True, env={**env, "BENCH_RESULTS": str(results)}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    art = results / "artifacts"
    (partial,) = art.iterdir()  # only the temporary file: no entry, no hash
    assert partial.name.startswith(".") and partial.name.endswith(".tmp")
    assert [r.info.status for r in mlflow_runs(results)] == ["RUNNING"]  # the process died inside its run

    rebuilt = run_tiny(results, tiny_byte_llama_dir, small_wikitext, "method=rtn")
    status = {r.info.run_id: (r.info.status, r.data.tags) for r in mlflow_runs(results)}
    assert status[rebuilt.run_id][0] == "FINISHED" and status[rebuilt.run_id][1]["bench.cache"] == "miss"
    assert sorted(s for s, _ in status.values()) == ["FINISHED", "KILLED"]  # the killed attempt is closed
    entry = only_artifact(results)
    assert file_sha256(entry) == entry.with_suffix(".sha256").read_text()  # complete and verified
    again = run_tiny(results, tiny_byte_llama_dir, small_wikitext, "method=rtn")
    assert {r.info.run_id: r.data.tags for r in mlflow_runs(results)}[again.run_id]["bench.cache"] == "hit"
    metric = "wikitext2.ppl_token.gptq_s64.first1"
    assert again.metrics[metric] == rebuilt.metrics[metric]
