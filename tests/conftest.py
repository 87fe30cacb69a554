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


def byte_tokenizer():
    """A byte-level tokenizer (256 tokens, no merges): real text in, ids out, built in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


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


def loaded_vision(net: torch.nn.Module, size: int, name: str = "tiny_vit"):
    """A transformers image classifier wrapped as bench loads one (random weights, no download)."""
    from bench import models
    from bench.models.hf_vision import HFImageClassifier

    module = HFImageClassifier(net.eval(), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 1 / 255, 0).eval()
    module.bench_kind = "image_classifier"
    models.round_to_storage(module, torch.float16)
    adapter = models.adapter_for(module)
    info = {"n_params": sum(p.numel() for p in module.parameters()), "input_range": 255.0, "image_size": size,
            "n_block_linear_weights": adapter.n_block_linear_weights(), "preprocess": {"resize": size, "crop": size}}
    spec = models.ModelSpec(name=name, source="hf_image", name_or_path="(in memory)")
    return models.LoadedModel(spec, module, None, adapter, models.weights_sha256(module), info)


def tiny_vit(deit: bool = False, **kw):
    """A tiny ViT (or DeiT) classifier: 4 blocks of width 64 on 32x32 images in 4x4 patches; `kw` sets its config."""
    from transformers import DeiTConfig, DeiTForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=32,
               patch_size=4, num_labels=1000)
    cfg.update(kw)
    net = DeiTForImageClassification(DeiTConfig(**cfg)) if deit else ViTForImageClassification(ViTConfig(**cfg))
    return loaded_vision(net, cfg["image_size"])


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


@pytest.fixture(scope="session")
def tiny_byte_llama_dir(tmp_path_factory):
    """A tiny LLaMA (vocab 256) with `byte_tokenizer()` as an HF directory: the `model=hf` path without loading
    the default model first (converting its GGUF tokenizer alone takes seconds)."""
    d = tmp_path_factory.mktemp("tiny_byte_llama")
    tiny_causal_lm("llama").save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def small_wikitext(tmp_path_factory) -> Path:
    """A data root holding the first 120 lines of the real WikiText-2 test and validation files: one 64-token
    window and a tiny calibration set, tokenized in milliseconds instead of seconds."""
    from bench import data

    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2-raw-v1").mkdir()
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        lines = data.local_file(f"wikitext-2-raw-v1/{name}").read_text().split("\n")[:120]
        (root / "wikitext-2-raw-v1" / name).write_text("\n".join(lines) + "\n")
    return root


def compose(*overrides: str):
    """The run config the CLI would compose from these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import bench.app  # noqa: F401  (registers the config's resolvers, as the CLI does)

    with initialize_config_module("bench.configs", version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def run_tiny(results: Path, model_dir: Path, data_root: Path, *overrides: str, backend=None):
    """One run in this process (no baseline, one thread): the CellResult of the method's cell."""
    from bench.runner import Runner

    runner = Runner(compose(*tiny_cli_args(model_dir), "compare_baseline=false", "threads=1",
                            f"paths.results={results}", f"paths.data_root={data_root}", *overrides))
    if backend is not None:
        runner.backend = backend
    return runner.run()[1]


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    d = tmp_path / "results"
    monkeypatch.setenv("BENCH_RESULTS", str(d))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return d


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema migrated: creating one takes seconds of MLflow's migrations,
    so tests that record runs start from a copy (`store_results_dir`)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    d = tmp_path_factory.mktemp("store")
    SqlAlchemyStore(f"sqlite:///{d / 'mlflow.db'}", str(d / "artifacts")).engine.dispose()
    return d / "mlflow.db"


@pytest.fixture
def store_results_dir(results_dir, migrated_store):
    """`results_dir` holding a copy of the empty, migrated MLflow store."""
    import shutil

    results_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(migrated_store, results_dir / "mlflow.db")
    return results_dir


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


def board_column(page, header: str) -> list[str]:
    """The cells of one column of a leaderboard page's table in a Playwright page (a cell's sort key where it has
    one), by header text."""
    idx = page.eval_on_selector_all("#board thead th", "(ths, h) => ths.findIndex(t => t.textContent.trim() === h)",
                                    header)
    assert idx >= 0, header
    return page.eval_on_selector_all(f"#board tbody tr td:nth-child({idx + 1})",
                                     "tds => tds.map(td => td.dataset.sort ?? td.textContent.trim())")
