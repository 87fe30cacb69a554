"""Shared fixtures: tiny real-architecture models (random weights, no download), the default model (real
weights, loaded once per session), and an isolated results directory per test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(int(os.environ.get("BENCH_TEST_THREADS", "2")))



def tiny_causal_lm(arch: str = "llama", vocab: int = 256, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = OPTConfig(vocab_size=vocab, hidden_size=128, ffn_dim=256, num_hidden_layers=layers, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=128)
        model = OPTForCausalLM(cfg)
    return model.eval()


def loaded_tiny(arch: str = "llama", vocab: int = 256, layers: int = 2):
    from bench import models

    module = tiny_causal_lm(arch, vocab, layers=layers)
    models.round_to_storage(module, torch.float16)
    spec = models.ModelSpec(name=f"tiny_{arch}", source="hf", name_or_path="(in memory)")
    adapter = models.adapter_for(module)
    n_params = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    info = {"n_params": n_params, "n_block_linear_weights": adapter.n_block_linear_weights()}
    return models.LoadedModel(spec, module, None, adapter, models.weights_sha256(module), info)


def random_calib(n: int = 6, seqlen: int = 48, vocab: int = 256):
    """A seeded calibration set of random token windows (for tiny random-weight models)."""
    from bench.calib import CalibSet, CalibSpec

    g = torch.Generator().manual_seed(0)
    return CalibSet(CalibSpec(name="rand"), torch.randint(0, vocab, (n, seqlen), generator=g), "x")


def logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.module(ids).logits


@pytest.fixture
def tiny_llama():
    return loaded_tiny("llama")


@pytest.fixture
def tiny_opt():
    return loaded_tiny("opt")


@pytest.fixture(scope="session")
def default_model():
    from bench import models

    return models.load(models.default_spec())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model):
    """A tiny LLaMA saved as an ordinary HF directory with the default model's real tokenizer, so CLI
    tests run the whole pipeline in seconds through the `model=hf` path."""
    d = tmp_path_factory.mktemp("tiny_llama")
    model = tiny_causal_lm("llama", vocab=len(default_model.tokenizer))
    model.save_pretrained(d)
    default_model.tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    d = tmp_path / "results"
    monkeypatch.setenv("BENCH_RESULTS", str(d))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return d


def run_cli(*args: str, results: Path, env: dict | None = None, timeout: int = 900):
    # mlflow.set_tracking_uri (called by in-process tests) exports MLFLOW_TRACKING_URI, which would point the
    # child at another test's store: the child's store is chosen by BENCH_RESULTS unless `env` says otherwise
    e = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI")}
    e.update({"BENCH_RESULTS": str(results), **(env or {})})
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "plugins"), e.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def tiny_cli_args(model_dir: Path) -> list[str]:
    return ["model=hf", f"model.name_or_path={model_dir}", "task.limit=1", "task.seqlen=64",
            "hardware.min_seconds=0", "hardware.min_reps=1", "hardware.warmup=0", "task.decode_tokens=2",
            "task.prompt_tokens=16", "budget=tiny"]


def mlflow_runs(results: Path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("bench")
    return client.search_runs([exp.experiment_id]) if exp else []
