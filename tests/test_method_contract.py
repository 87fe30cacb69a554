"""One contract over every registered method (each configs/method/*.yaml, built by Hydra as a run builds it):
it compresses a tiny model of the first kind it applies to at budget=tiny, its artifact (written and read
through the artifact store) restores the compressed model bit for bit - every tensor of its state, its output
on a fixed input (run-time hooks included) and its layer formats - and every backend's `supports()` reads those
formats and decides alike for the compressed and the restored model; which backend runs what is pinned."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from bench import models, registry
from bench.cache import ArtifactStore
from bench.calib import CalibSet, CalibSpec
from bench.calib import load as load_calib
from bench.data import data_root
from bench.hardware.cpu import CpuBackend
from bench.hardware.cpu_kernels import CpuKernelsBackend
from bench.hardware.fpga_sim import FpgaSimBackend
from bench.hardware.tflite import TfliteBackend
from conftest import compose, loaded_tiny, random_calib, tiny_vit

METHODS = registry.choices("method")
# the tiny models, in the order a method's kinds are tried (image_sr: RLFN-S's checkpoint under the data root)
KINDS = ("causal_lm", "image_sr", "diffusion", "image_classifier")
# methods the tiny model of their kind does not fit: qfx casts conv/linear classifiers trained on a recorded split
TINY_MODEL = {"qfx": "lenet_digits"}
TINY_DDPM = {"dataset": "sklearn_digits", "ch": 8, "mults": [1, 2], "n_res": 1, "timesteps": 1000, "train_steps": 30,
             "batch_size": 32, "lr": 2e-3, "ema_decay": 0.9, "seed": 0}
# options that keep a method's searches small on a tiny model (never its format), or give it what it needs there
FAST = {
    "llm_fp4": ["method.grid=8", "method.search_tokens=64"],
    "hawq_v3": ["method.hutchinson_iters=2", "method.hessian_images=4"],
    "fp_lowbit": ["method.calib_steps=3", "method.calib_rows=256", "method.clip_grid=5"],
    "binarydm": ["method.calib_steps=3"],
    "qdiffusion": ["method.calib_steps=4", "method.interval=2"],
    "token_pruning": ["method.prune_blocks=[1,2]"],
    "agile_quant": ["method.prune_blocks=[1]"],  # the tiny LLaMA has 3 blocks
    **{depth: ["method.n_blocks=1"] for depth in ("shortgpt", "sleb")},
    "qfx": ["method.epochs=1"],
    "foldgpt": ["method.n_blocks=1", "budget.train_steps=12", "budget.batch_size=2"],  # its gates must separate
    "hybrid_sd": ["method.large_steps=3", "method.total_steps=10"] + [
        f"method.small_model.recipe.{k}={v}" for k, v in {**TINY_DDPM, "seed": 1}.items()
        if k not in ("mults", "dataset")],
}
# every method runs on each backend but these (tiny models: LLaMA 128/256 wide, RLFN-S, TinyUNet-8, ViT; tflite's
# recipe dynamic_int8)
LM_METHODS = {"abq", "agile_quant", "awq", "baq", "bct", "billm", "binarymos", "bitmod", "dbllm", "edgeqat", "foldgpt",
              "fp_rtn", "gptq", "l4q", "layerwise_bits", "llm_fp4", "lmul", "magnitude", "none", "nupes", "onebit",
              "pbllm", "pipeline", "rtn", "shortgpt", "sign", "sleb", "smoothquant", "sparsegpt", "ternary", "wanda",
              "xnor"}  # tiny LLaMA
BINARY = {"sign", "xnor", "billm", "pbllm", "onebit", "dbllm", "binarymos", "birealnet", "biper", "binarydm", "ternary"}
FLOAT = {"bitmod", "fp_rtn", "llm_fp4", "minifloat", "fp_lowbit"}
NONUNIFORM = {"nupes"}  # power-function grid: codes of a uniform grid over sign(w)|w|^a, not of w
BLOCKWISE_ACTS = {"bct"}  # per-block activation scales, quantized softmax/norm/activation outputs: no kernel has them
SPARSE = {"magnitude", "wanda", "sparsegpt"}
REFUSED = {
    "cpu": set(),
    # + mixed widths, activation quantization, convolutions
    "cpu_kernels": BINARY | FLOAT | NONUNIFORM | SPARSE | BLOCKWISE_ACTS | {"agile_quant", "baq", "edgeqat", "static_ptq",
                                                                          "hawq_v3", "qdiffusion", "qfx"},
    # image models only; integer and eXmY minifloat MACs (bitmod's floats are not plain eXmY: an LM method anyway)
    "fpga_sim": LM_METHODS | BINARY | NONUNIFORM,
    # mixed widths; hawq_v3's int4 activations; layerwise_bits' 2-bit blocks; lmul's and qfx's emulated arithmetic
    # per-block (bct) or per-channel (agile_quant) activation scales: LiteRT's are per tensor or per token
    "tflite": BINARY | FLOAT | NONUNIFORM | SPARSE | BLOCKWISE_ACTS | {"agile_quant", "baq", "hawq_v3", "layerwise_bits",
                                                                      "lmul", "qfx"},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (model, calibration set, paths.results); built once, each method compresses a clone."""
    results = tmp_path_factory.mktemp("contract_results")
    g = torch.Generator().manual_seed(0)
    out = {"causal_lm": (loaded_tiny("llama", layers=3), random_calib(), results)}  # 3: depth pruning keeps 2
    root = data_root()
    if root is not None and (root / "sr_checkpoints/rlfn_bytedance/rlfn_s_x4.pth").is_file():
        patches = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=24, mode="bilinear")
        spec = CalibSpec(name="patches", source="image_patches", images="x")
        out["image_sr"] = (models.load(models.ModelSpec(name="rlfn_s", source="sr_checkpoint", arch="rlfn_s")),
                           CalibSet(spec, (patches * 255).round(), "x"), results)
    ddpm = models.load(models.ModelSpec(name="ddpm_tiny", source="suite_trained", recipe=dict(TINY_DDPM),
                                        results=str(results)))
    noise = load_calib(CalibSpec(name="ddpm_noise8", source="gaussian_noise", patch=8, channels=1), None, 4, 1)
    out["diffusion"] = (ddpm, noise, results)
    images = (torch.rand(8, 3, 32, 32, generator=g) * 255).round()
    out["image_classifier"] = (tiny_vit(), CalibSet(CalibSpec(name="rand"), images, "x"), results)
    out["lenet_digits"] = (models.load(models.ModelSpec(name="lenet_digits", source="suite_classifier",
                                                        recipe={"epochs": 1}, results=str(results))), None, results)
    return out


def _sample_input(model) -> tuple:
    g = torch.Generator().manual_seed(1)
    if model.kind == "causal_lm":
        return (torch.randint(0, 256, (1, 16), generator=g),)
    if model.kind == "diffusion":
        return torch.randn(2, 1, 8, 8, generator=g), torch.tensor([999, 10])
    side = 32 if model.kind == "image_classifier" else 16
    shape = getattr(model.module, "bench_input_shape", None) or (3, side, side)
    if isinstance(model.info["input_range"], str):  # the digits classifiers': "[-1, 1] (raw / 8 - 1)"
        return (torch.rand(1, *shape, generator=g) * 2 - 1,)
    return ((torch.rand(1, *shape, generator=g) * model.info["input_range"]),)


def _output(module, x):
    with torch.no_grad():
        out = module(*x)
    return getattr(out, "logits", out)


def _backends(tmp_path):
    venv = tmp_path / "venv-litert"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # supports() never runs the converter
    return {"cpu": CpuBackend(threads=1), "cpu_kernels": CpuKernelsBackend(threads=1),
            "fpga_sim": FpgaSimBackend(), "tflite": TfliteBackend(threads=1, recipe="dynamic_int8", venv=str(venv))}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_compresses_restores_bit_exactly_and_states_its_format(name, tiny, tmp_path):
    results = next(iter(tiny.values()))[2]
    cfg = compose(f"method={name}", "budget=tiny", "seed=0", f"paths.results={results}", *FAST.get(name, []))
    method, budget = instantiate(cfg.method, _convert_="all"), instantiate(cfg.budget)
    kind = TINY_MODEL.get(name) or next((k for k in KINDS if k in method.applies_to and k in tiny), None)
    if kind is None:
        pytest.skip(f"{name}: no tiny model of a kind it applies to here ({', '.join(method.applies_to)})")
    base, calib, _ = tiny[kind]
    torch.manual_seed(0)
    packed = method.compress(models.clone(base), calib if method.needs_calibration else None, budget)
    store = ArtifactStore(tmp_path)
    store.save("k", packed.tensors(base), packed.metadata())
    restored = method.restore(models.clone(base), *store.load("k"))

    a, b = packed.model.state_dict(), restored.model.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{name}: {key} differs after restore"
    x = _sample_input(base)
    assert torch.equal(_output(packed.model, x), _output(restored.model, x)), f"{name}: outputs differ"
    assert restored.layer_format == packed.layer_format and set(packed.layer_format) == set(packed.layers)
    assert packed.storage(base).bits_per_weight > 0

    for backend_name, backend in _backends(tmp_path).items():
        reason = backend.supports(packed)
        assert reason == backend.supports(restored), f"{backend_name} decides otherwise after restore"
        assert reason is None or (reason and "\n" not in reason)
        assert (reason is not None) == (name in REFUSED[backend_name]), f"{backend_name} on {name}: {reason}"

