"""`tflite` (mobile): the packed model converted to a .tflite file with litert-torch, quantized by an
ai-edge-quantizer recipe, and run by the LiteRT interpreter (ai-edge-litert, XNNPACK delegate, threads set and
recorded). The task's accuracy is measured again on the .tflite file itself (the runner's deploy step) beside the
torch model's, and the latency is that of timed `invoke()` calls.

Recipes (`hardware.recipe`, recorded with the exact ai-edge-quantizer recipe JSON):
  fp32              the conversion as is
  fp16              fp16 weights (float casting), fp32 compute
  dynamic_int8      int8 per-channel symmetric weights, activations quantized to int8 on the fly (integer MACs)
  weight_only_int8  int8 per-channel weights dequantized before fp32 compute
  weight_only_int4  int4 per-channel weights dequantized before fp32 compute
  full_int8         int8 weights and static int8 activations, calibrated on `calib_samples` images of the run's
                    calibration set (resized to the input shape of the signature), integer MACs

The converter stack (litert-torch 0.10, ai-edge-quantizer 0.10, litert-converter 0.5) pins its own versions, so it
lives in its own venv (`.venv-litert`, `bash hardware/tflite_setup.sh`) and runs as a subprocess
(hardware/tflite_convert.py; protocol in its docstring). The main process exports the packed model with
torch.export at one static input shape, the subprocess converts and quantizes, the main process runs the file.
A .tflite has static shapes (RLFN's dynamic-shape conversion fixed its output shape), so a model is converted
once per input shape it meets (each image size of an SR set, the evaluation batch, the timed workload); files are
cached under `cache_dir` by a hash of the weights, shape, recipe, calibration inputs and converter code. A full_int8
file takes and gives int8 tensors: inputs are quantized and outputs dequantized with the file's own parameters.

What it executes, and what it refuses (`supports`): dense float models under any recipe; integer weight grids of
4..8 bits under a recipe whose weight grid holds them (an int4 model needs weight_only_int4, an int5..8 model an
int8 recipe); 8-bit activation quantization under dynamic_int8/full_int8 (the recipe's own activation
quantizer replaces the method's fake-quant hook). Binary/ternary weights, sub-4-bit or mixed per-column widths,
floating-point low-bit formats, sparsity (no sparse kernel) and sub-8-bit activations are `unsupported` with the
reason; an integer model under a float recipe is refused too, since it would run dequantized in float
(fake-quant). Language models run prefill only (the exported graph has no KV cache: decode is not measured) and
full_int8 is refused for them (the calibration would need token windows; a backend gets no tokenizer).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import energy, timing
from bench.calib import CalibSpec
from bench.errors import BenchError, ConfigError, ResourceError
from bench.layer_format import LayerFormat
from bench.packed import EXECUTION_EMULATED_PREFIX, EXECUTION_SPARSE_AS_DENSE, Packed
from bench.plugins import Measurement, Workload
from bench.timing import TimedBackend

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("tflite_convert.py")
SETUP = "bash hardware/tflite_setup.sh"
EXPORT_VERSION = "1"  # part of the cache key with the worker's code: bump when the export below changes
# recipe -> (weight grid bits it stores, activation handling, arithmetic of its MACs for the energy estimate)
RECIPES = {
    "fp32": (32, "fp32", "fp32"), "fp16": (16, "fp32", "fp32"),
    "dynamic_int8": (8, "int8-dynamic", "int8"), "weight_only_int8": (8, "fp32", "fp32"),
    "weight_only_int4": (4, "fp32", "fp32"), "full_int8": (8, "int8-static", "int8"),
}


class LiteRTMissing(ResourceError):
    """The converter venv is not there."""


def layer_reason(fmt: LayerFormat, recipe: str) -> str | None:
    """Why `recipe` on LiteRT cannot execute a layer stored as `fmt` (None: it can)."""
    if fmt.kind in ("binary", "ternary"):
        return f"binary/ternary weights ({fmt}): LiteRT has no binary or ternary kernel"
    if fmt.kind == "float":
        return f"floating-point low-bit weights ({fmt}): LiteRT has no FP8/FP6/FP4 kernel"
    if fmt.kind != "int" or not float(fmt.bits).is_integer():
        return f"layer format '{fmt}' is not an integer grid LiteRT executes"
    bits = int(fmt.bits)
    w_bits, acts, _ = RECIPES[recipe]
    if fmt.mixed:
        return f"per-column mixed bit-widths ({fmt}): a LiteRT tensor has one integer width"
    if bits < 4:
        return f"{bits}-bit weights ({fmt}): LiteRT's integer kernels take int4 and int8 weights"
    if w_bits >= 16:
        return (f"{bits}-bit weights ({fmt}) under recipe {recipe} would run dequantized in float (fake-quant); "
                f"use hardware.recipe={'weight_only_int4' if bits == 4 else 'dynamic_int8'}")
    if bits > w_bits:
        return f"{bits}-bit weights ({fmt}) do not fit recipe {recipe}'s int{w_bits} grid; use an int8 recipe"
    if fmt.adapter is not None:
        return f"recovery adapters ({fmt}): the recipe would quantize the adapter branch, unlike the method"
    act = fmt.act
    if act is not None and act.bits < 16:
        if act.kind != "int" or act.bits != 8:
            return f"activations {act.name or f'a{act.bits}'} ({fmt}): LiteRT quantizes activations to int8 only"
        if act.granularity not in ("", "per_token", "per_tensor"):
            return (f"{act.granularity} activations ({fmt}): LiteRT's int8 activations have one scale per tensor "
                    f"(or per token), not {act.granularity.replace('_', ' ')}")
        if acts == "fp32":
            return f"8-bit activations ({fmt}) under recipe {recipe} would run in fp32; use dynamic_int8 or full_int8"
    elif act is None and fmt.notes:
        return f"activations {fmt.notes[0]} ({fmt}): LiteRT quantizes activations to int8 only"
    if bits == w_bits and (not fmt.symmetric or fmt.granularity == "group"):
        # ai-edge-quantizer's recipes quantize weights CHANNELWISE symmetric from the float weights they are given:
        # at the method's own width a grouped or asymmetric grid is replaced by a coarser one, not executed
        # (measured: rtn int4-asym-g128 on the default LM, ppl 42.6 fake-quant, 212.4 on the .tflite file)
        return (f"{fmt} under recipe {recipe}: LiteRT re-quantizes int{w_bits} weights per output channel, "
                "symmetric, so the method's grouped/asymmetric codes would not be what runs; use a per-channel "
                "symmetric grid (e.g. method.group_size=-1 method.symmetric=true) or an int8 recipe for 4-bit grids")
    return None


def is_causal_lm(model: nn.Module) -> bool:
    return getattr(model, "config", None) is not None and hasattr(model, "generate")


class _Logits(nn.Module):
    """A Hugging Face causal LM as ids -> logits (no cache), the function that is exported and converted."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids, use_cache=False).logits


@dataclass
class TfliteBackend(TimedBackend):
    name: str = "tflite"
    recipe: str = "fp32"
    venv: str | None = None  # the converter venv; default <repo>/.venv-litert
    cache_dir: str | None = None  # converted files; default a temporary directory
    calib: CalibSpec | None = None  # full_int8 calibration images (the run's calib set)
    calib_samples: int = 32
    data_root: str | None = None
    convert_timeout_s: int = 3600
    capabilities: ClassVar[dict] = {
        "weight_formats": ["fp32", "fp16", "int8 per-channel", "int4 per-channel (weight-only)"],
        "activation_formats": ["fp32", "int8 dynamic", "int8 static (calibrated)"],
        "low_bit_kernels": ["XNNPACK/LiteRT int8 (dynamic and static)", "int4 weight-only"],
        "binary_ops": False, "sparsity": [],
        "refuses": "binary/ternary, <4-bit or mixed-width weights, FP8/FP6/FP4, sparsity, <8-bit activations",
    }

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ConfigError(f"hardware.recipe={self.recipe} is unknown", f"choices: {', '.join(RECIPES)}")
        super().__post_init__()
        if self.calib_samples < 1:
            raise ConfigError(f"hardware.calib_samples={self.calib_samples} must be positive", "e.g. 32")
        self.check_venv()  # before any model is loaded or run recorded

    # -- the converter venv ----------------------------------------------------------------------------
    @property
    def python(self) -> Path:
        return Path(self.venv or REPO / ".venv-litert") / "bin" / "python"

    def check_venv(self) -> None:
        if not self.python.is_file():
            raise LiteRTMissing(f"hardware=tflite needs the LiteRT converter venv and {self.python} does not exist",
                                f"create it with: {SETUP}")

    # -- capability table ------------------------------------------------------------------------------
    def supports(self, packed: Packed) -> str | None:
        if packed.execution == EXECUTION_SPARSE_AS_DENSE:
            return "sparse weights: LiteRT's CPU kernels have no sparse matmul (they would run as dense zeros)"
        if packed.execution.startswith(EXECUTION_EMULATED_PREFIX):
            return (f"{packed.execution}: an arithmetic emulated in torch code, which LiteRT's kernels do not have "
                    "(the converted model would multiply exactly); hardware=cpu runs the emulation")
        if self.recipe == "full_int8" and is_causal_lm(packed.model):
            return ("full_int8 on a language model: calibration needs token windows and a backend gets no "
                    "tokenizer; use dynamic_int8")
        for layer, fmt in packed.layer_format.items():
            reason = layer_reason(fmt, self.recipe)
            if reason:
                return f"{layer}: {reason}"
        return None

    # -- deploy: the task runs on the .tflite file -------------------------------------------------------
    def deploy(self, packed: Packed) -> Packed:
        self.check_venv()
        runner = LiteRTModel(self, packed)
        # converted lazily, once per input shape the task or the workload feeds it
        module: nn.Module = (LiteRTCausalLM(runner, packed.model.config) if is_causal_lm(packed.model)
                             else LiteRTImage(runner))
        return Packed(module, packed.method, f"litert-xnnpack-{self.recipe}", packed.layers, packed.layer_format,
                      info={**packed.info, "tflite": runner})

    # -- measure -----------------------------------------------------------------------------------------
    def measure(self, packed: Packed, workload: Workload) -> Measurement:
        if workload.kind not in ("image", "causal_lm"):
            return Measurement(unsupported=f"workload kind '{workload.kind}' is not timed on LiteRT")
        runner: LiteRTModel | None = packed.info.get("tflite")
        if runner is None:  # measure called without deploy (e.g. directly from a test): deploy now
            reason = self.supports(packed)
            if reason:
                return Measurement(unsupported=reason)
            packed = self.deploy(packed)
            runner = packed.info["tflite"]
        timer = self.timer()
        x = workload.inputs if workload.kind == "image" else workload.prompt_ids
        interp = runner.set_input(x)
        rapl = energy.RaplMeter().start()
        times = timer.times(interp.invoke)
        conv = runner.converted[runner.key(x)]
        if workload.kind == "image":
            prefix, quantity, per = f"latency.{workload.label or 'forward'}", "j_per_image", x.shape[0]
            from bench.image import count_macs

            macs = count_macs(runner.packed.model, x[:1])
        else:
            prefix, quantity, per = f"latency.prefill_{x.shape[1]}", "prefill_j_per_token", x.shape[1]
            macs = sum(p.numel() for p in runner.packed.model.parameters())  # ~1 MAC per weight per token
        m = timing.stats(prefix, times)
        p50 = m[f"{prefix}.p50_s"]
        if workload.kind != "image":
            m["throughput.prefill_tokens_per_s"] = x.shape[1] / p50
        m["memory.tflite_file_bytes"] = float(conv["bytes"])
        m["memory.peak_rss_bytes"] = timing.host_memory(runner.packed.model)[0]["memory.peak_rss_bytes"]
        m["time.tflite_convert_s"] = float(conv.get("convert_s", 0.0)) + float(conv.get("quantize_s", 0.0))
        tags = {"execution": packed.execution, "threads": str(self.threads), "recipe": self.recipe,
                "recipe_json": json.dumps(conv.get("recipe"))[:5000], "delegate": runner.delegate,
                "converter_versions": json.dumps(conv.get("versions", {})),
                "tflite_sha256": conv.get("sha256", ""), "tflite_cache": conv.get("cache", "")}
        if workload.kind != "image":
            tags["decode"] = "not measured: the converted graph is a full-sequence prefill without a KV cache"
        # the estimate per image: the counted MACs by the recipe's arithmetic + the .tflite weights read once;
        # per prefill token: ~1 MAC per weight, the weights read once per prefill
        mac_kind = RECIPES[self.recipe][2]
        energy.record(m, tags, quantity, rapl, measured=lambda joules: joules / max(sum(times), 1e-9) * p50 / per,
                      estimate=lambda: energy.estimate_joules({mac_kind: macs},
                                                              conv["bytes"] / (1 if workload.kind == "image" else per)))
        if not rapl.readable:
            tags["energy_macs_as"] = mac_kind
        return Measurement(m, tags)


class ConversionFailed(BenchError):
    exit_code = 1


class LiteRTModel:
    """The packed model as .tflite files, one per input shape, converted on first use and cached."""

    def __init__(self, backend: TfliteBackend, packed: Packed):
        self.backend, self.packed = backend, packed
        self.converted: dict[str, dict] = {}
        self._interp: dict[str, object] = {}
        self.delegate = "XNNPACK (LiteRT's default CPU delegate)"
        self._weights_sha = self._hash_weights(packed.model)
        self._input_scale: float | None = None

    @staticmethod
    def _hash_weights(model: nn.Module) -> str:
        h = hashlib.sha256(type(model).__qualname__.encode())
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    @staticmethod
    def key(x: torch.Tensor) -> str:
        return f"{tuple(x.shape)}:{x.dtype}"

    def interpreter(self, x: torch.Tensor):
        k = self.key(x)
        if k not in self._interp:
            from ai_edge_litert.interpreter import Interpreter

            path = self._convert(x)
            interp = Interpreter(model_path=str(path), num_threads=self.backend.threads)
            interp.allocate_tensors()
            self._interp[k] = interp
        return self._interp[k]

    def set_input(self, x: torch.Tensor):
        """The interpreter for x's shape with x in its input tensor; a full-int8 file takes int8 input, quantized
        here with the file's own scale and zero point."""
        interp = self.interpreter(x)
        inp = interp.get_input_details()[0]
        a = x.detach().cpu().numpy()
        scale, zero = inp["quantization"]
        if scale and np.issubdtype(inp["dtype"], np.integer):
            info = np.iinfo(inp["dtype"])
            a = np.clip(np.round(a / scale + zero), info.min, info.max)
        interp.set_tensor(inp["index"], a.astype(inp["dtype"]))
        return interp

    def run(self, x: torch.Tensor) -> torch.Tensor:
        interp = self.set_input(x)
        interp.invoke()
        out = interp.get_output_details()[0]
        y = interp.get_tensor(out["index"]).copy()
        scale, zero = out["quantization"]
        if scale and np.issubdtype(out["dtype"], np.integer):  # int8 output: dequantized as the file says
            y = (y.astype(np.float32) - zero) * scale
        return torch.from_numpy(y)

    # -- conversion ------------------------------------------------------------------------------------------
    def _export_module(self) -> nn.Module:
        return _Logits(self.packed.model) if is_causal_lm(self.packed.model) else self.packed.model

    def _calibration(self, x: torch.Tensor) -> np.ndarray:
        """full_int8: the run's calibration images, resized to this signature's (H, W) and put on the scale of
        the inputs the model receives (0-255, or 0-1 when the first input it met was on that scale)."""
        from bench import calib as calib_mod

        b = self.backend
        if b.calib is None or b.calib.source not in ("image_patches", "gaussian_noise"):
            raise ConfigError("hardware.recipe=full_int8 needs an image calibration set",
                              "e.g. calib=imagenet_sample_lr (SR) or calib=sr_hr_224 (classifiers)")
        cs = calib_mod.load(b.calib, None, b.calib_samples, 1, b.data_root)
        imgs = F.interpolate(cs.windows.float(), size=tuple(x.shape[2:]), mode="bilinear", align_corners=False)
        if self._input_scale is None:
            self._input_scale = 1.0 if float(x.max()) > 1.5 else 1.0 / 255.0
        self._calib_describe = f"{cs.describe} sha256={cs.sha256[:16]} resized to {tuple(x.shape[2:])}"
        return (imgs * self._input_scale).numpy().astype(np.float32)

    def _convert(self, x: torch.Tensor) -> Path:
        b = self.backend
        b.check_venv()
        recipe = b.recipe
        calib_desc = ""
        h = hashlib.sha256()
        for part in (self._weights_sha, self.key(x), recipe, WORKER.read_bytes(), EXPORT_VERSION):
            h.update(part if isinstance(part, bytes) else part.encode())
        calib_rows = None
        if recipe == "full_int8":
            calib_rows = self._calibration(x)
            calib_desc = self._calib_describe
            h.update(calib_rows.tobytes())
        key = h.hexdigest()[:24]
        root = Path(b.cache_dir) if b.cache_dir else Path(tempfile.gettempdir()) / "bench-tflite"
        job = root / key
        done = job / "result.json"
        if done.is_file() and json.loads(done.read_text()).get("ok") and (job / "model.tflite").is_file():
            result = json.loads(done.read_text())
            result["cache"] = "hit"
        else:
            job.mkdir(parents=True, exist_ok=True)
            result = self._run_worker(job, x, calib_rows)
            result["cache"] = "miss"
        result["sha256"] = hashlib.sha256((job / "model.tflite").read_bytes()).hexdigest()
        result["calibration"] = calib_desc
        self.converted[self.key(x)] = result
        return job / "model.tflite"

    def _run_worker(self, job: Path, x: torch.Tensor, calib_rows: np.ndarray | None) -> dict:
        b = self.backend
        module = self._export_module().eval()
        saved = self._strip_activation_hooks()  # the recipe quantizes activations itself (or they stay fp32)
        try:
            with torch.no_grad():
                ep = torch.export.export(module, (x,))
        finally:
            for mod, hooks in saved:
                mod._forward_pre_hooks.update(hooks)
        torch.export.save(ep, str(job / "model.pt2"))
        np.save(job / "example.npy", x.detach().cpu().numpy())
        spec = {"recipe": b.recipe, "signature": "serving_default", "threads": b.threads, "calibration": None}
        if calib_rows is not None:
            np.save(job / "calib.npy", calib_rows)
            spec["calibration"] = "calib.npy"
        (job / "job.json").write_text(json.dumps(spec))
        (job / "result.json").unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(b.threads), "TF_CPP_MIN_LOG_LEVEL": "2"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([str(b.python), str(WORKER), str(job)], capture_output=True, text=True,
                                  timeout=b.convert_timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise ConversionFailed(f"litert-torch conversion exceeded {b.convert_timeout_s} s",
                                   "raise hardware.convert_timeout_s") from None
        result_file = job / "result.json"
        if not result_file.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise ConversionFailed(f"the LiteRT converter process died: {tail[0][:300]}",
                                   f"see {job}; recreate the venv with {SETUP}")
        result = json.loads(result_file.read_text())
        if not result.get("ok"):
            print(result.get("traceback", ""), file=sys.stderr)
            raise ConversionFailed(result.get("error", "unknown error"), f"job files in {job}")
        result["worker_s"] = time.perf_counter() - t0
        for done in ("model.pt2", "float.tflite"):  # the quantized .tflite is what is kept
            (job / done).unlink(missing_ok=True)
        result_file.write_text(json.dumps(result, indent=1))
        return result

    def _strip_activation_hooks(self) -> list:
        saved = []
        names = {n for n, fmt in self.packed.layer_format.items() if fmt.act is not None or fmt.notes or fmt.adapter}
        for name, mod in self.packed.model.named_modules():
            if name in names and mod._forward_pre_hooks:
                saved.append((mod, dict(mod._forward_pre_hooks)))
                mod._forward_pre_hooks.clear()
        return saved


class LiteRTImage(nn.Module):
    """An image model whose forward runs the .tflite file (float in, float out, NCHW as the torch model)."""

    def __init__(self, runner: LiteRTModel):
        super().__init__()
        self.runner = runner
        self.reference = runner.packed.model  # never run here: its parameters are the weights the file holds
        self.bench_kind = getattr(runner.packed.model, "bench_kind", None)  # the adapter's model kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner.run(x)


class LiteRTCausalLM(nn.Module):
    """A causal LM whose full-sequence forward runs the .tflite file; returns an object with `.logits`."""

    def __init__(self, runner: LiteRTModel, config):
        super().__init__()
        self.runner, self.config = runner, config

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **kwargs):
        if use_cache or kwargs.get("past_key_values") is not None:
            raise NotImplementedError("the converted graph has no KV cache")
        return SimpleNamespace(logits=self.runner.run(input_ids))
