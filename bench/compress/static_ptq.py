"""The static post-training quantization family: per-output-channel symmetric integer weights with a searched
clipping ratio, and one calibrated static range per layer input (an MSE observer on seeded calibration samples),
stored as packed codes + fp16 scales + per-layer bit-widths and the activation scale/zero point. `StaticPTQBase`
runs it; its subclasses change one part: which bits each layer gets (`layer_bits`: hawq_v3's ILP), the grid
(`quantize_layer`/`restore_weight`/`fit_activation`/`activation_quantizer`: minifloat's floats) or the
calibration inputs (`_activation_samples`: qdiffusion's trajectories and split shortcuts). The recipe is
described with the `static_ptq` method (methods/static_ptq.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import check_range
from bench.layer_format import ActFormat, LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import IntQuantized
from bench.quant.integer import load_int_layer, restore_bias, stored_int_layer, weight_matrix
from bench.sampler import calibration_inputs

CLIP_GRID = torch.linspace(1.0, 0.3, 15)  # clipping ratios tried for weights and activations
CALIB_BATCH = 16
SAMPLES_PER_BATCH = 8192  # activation values kept per layer per calibration batch for the range search
DIFFUSION_CALIB_STEPS = 20  # DDIM steps of a diffusion model's calibration trajectories


def static_activations(a_bits: int | None, float_format: str = "") -> ActFormat:
    """The inputs of a static-PTQ layer: `a_bits` integers (or a float format) with one calibrated range per tensor,
    or full-precision float (a32) when the layer's activations are not quantized."""
    if not a_bits:
        return ActFormat(32, "float")
    return ActFormat(a_bits, "float" if float_format else "int", "per_tensor", "static", float_format)


@fp32  # fp32: the per-channel clip search and its squared errors
def quantize_weight(w: torch.Tensor, bits: int) -> IntQuantized:
    """Per-output-channel symmetric codes with the clip ratio minimising each row's squared error."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    best_err, best_scale = None, None
    for r in CLIP_GRID:
        scale = (r * amax / qmax).to(torch.float16).to(torch.float32).clamp(min=1e-8)
        deq = torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale
        err = (deq - w).pow(2).sum(dim=1, keepdim=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    codes = torch.clamp(torch.round(w / best_scale), -qmax - 1, qmax) + qmax + 1
    return IntQuantized(codes.to(torch.uint8), best_scale.to(torch.float16), None, bits, w.shape[1], True)


@fp32  # fp32: the activation range search on fp32 samples
def act_range(samples: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and uint8 zero point of the static asymmetric range minimising the samples' squared error."""
    maxq = 2**bits - 1
    lo0, hi0 = samples.min().clamp(max=0), samples.max().clamp(min=0)
    best = None
    for r in CLIP_GRID:
        scale = ((hi0 - lo0) * r / maxq).clamp(min=1e-8).to(torch.float16)
        zero = torch.clamp(torch.round(-lo0 * r / scale.float()), 0, maxq)
        err = (fake_quant_static(samples, scale, zero, bits) - samples).pow(2).sum()
        if best is None or err < best[0]:
            best = (err, scale, zero.to(torch.uint8))
    return best[1], best[2]


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    s, z = scale.float(), zero.float()
    xf = x.float()  # fp32: under autocast a layer's input may be bf16; the result is returned in its dtype
    return ((torch.clamp(torch.round(xf / s) + z, 0, 2**bits - 1) - z) * s).to(x.dtype)


@dataclass
class StaticPTQBase(Method):
    name: str = "static_ptq"
    w_bits: int = 8
    a_bits: int | None = 8
    keep_first_last: bool = True
    family: ClassVar[str] = "quantization"
    applies_to: ClassVar[tuple[str, ...]] = ("image_sr", "image_classifier", "diffusion")
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        check_range("method.w_bits", self.w_bits, 2, 8)
        if self.a_bits is not None:
            check_range("method.a_bits", self.a_bits, 2, 8)

    def _targets(self, model) -> list:
        refs = list(model.adapter.linears())
        return refs[1:-1] if self.keep_first_last else refs

    def layer_bits(self, model, refs, calib) -> dict[str, tuple[int, int | None]]:
        """(weight bits, activation bits or None) of each quantized layer: uniform here."""
        return {r.name: (self.w_bits, self.a_bits) for r in refs}

    # --- the grid: integers here; a subclass (minifloat) swaps these four -----------------------------
    def quantize_layer(self, w: torch.Tensor, bits: int, bias) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(dequantized weight, stored tensors) of one layer's (out, in) weight."""
        q = quantize_weight(w.float(), bits)
        return q.dequantize(), {**stored_int_layer(q.codes, q.scale, None, bits, bias),
                                "w_bits": torch.tensor([bits], dtype=torch.uint8)}

    def restore_weight(self, shape: tuple[int, int], stored: dict[str, torch.Tensor]) -> torch.Tensor:
        bits = int(stored["w_bits"][0])
        codes, _ = load_int_layer(stored, bits, shape)
        return IntQuantized(codes, stored["scale"], None, bits, shape[1], True).dequantize()

    def fit_activation(self, samples: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        scale, zero = act_range(samples, bits)
        return {"act_scale": scale.reshape(1), "act_zero": zero.reshape(1),
                "a_bits": torch.tensor([bits], dtype=torch.uint8)}

    def activation_quantizer(self, stored: dict[str, torch.Tensor]):
        s, z, b = stored["act_scale"][0], stored["act_zero"][0], int(stored["a_bits"][0])
        return lambda x: fake_quant_static(x, s, z, b)

    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        refs = self._targets(model)
        bits = self.layer_bits(model, refs, calib)
        with torch.no_grad():
            for ref in refs:
                wb, ab = bits[ref.name]
                w = weight_matrix(ref.module)
                wq, stored = self.quantize_layer(w, wb, ref.module.bias)
                packed.per_layer.append({**layer_stats(ref, w, wq), "w_bits": wb, "a_bits": ab})
                w.copy_(wq)
                packed.layers[ref.name] = stored
                packed.layer_format[ref.name] = self.layer_format(wb, ab)
            quantized_inputs = [r for r in refs if bits[r.name][1]]
            samples = self._activation_samples(model, quantized_inputs, calib) if quantized_inputs else {}
            for ref in quantized_inputs:
                packed.layers[ref.name].update(self.fit_activation(samples[ref.name], bits[ref.name][1]))
        n = {r.name: r.module.weight.numel() for r in refs}
        packed.info["avg_weight_bits_quantized_layers"] = sum(
            self.bit_width(bits[k][0]) * v for k, v in n.items()) / sum(n.values())
        kept = sorted({r.name for r in model.adapter.linears()} - {r.name for r in refs})
        packed.info["layers_kept_full_precision"] = len(kept)
        packed.extra_metadata["kept_full_precision"] = ",".join(kept)
        return self.runtime_hooks(model, packed)

    def layer_format(self, w_bits: int, a_bits: int | None) -> LayerFormat:
        return LayerFormat.int_grid(w_bits, -1, True).with_act(static_activations(a_bits))

    def bit_width(self, w_spec) -> int:
        return w_spec

    @torch.no_grad()
    def _activation_samples(self, model, refs, calib) -> dict[str, torch.Tensor]:
        """Per layer: a seeded subsample of its input values over the calibration images, plus each batch's
        exact min and max."""
        g = torch.Generator().manual_seed(calib.spec.seed)
        samples: dict[str, list[torch.Tensor]] = {r.name: [] for r in refs}

        def keep(name):
            def hook(_m, args):
                x = args[0].detach().float().flatten()  # fp32: activation statistics
                idx = torch.randint(0, x.numel(), (min(SAMPLES_PER_BATCH, x.numel()),), generator=g)
                samples[name].append(x[idx].float())
                samples[name].append(torch.stack([x.min(), x.max()]).float())  # the range's true ends
            return hook

        if model.kind == "diffusion":  # a denoiser takes (x_t, t): the (x_t, t) its own sampler meets
            xs, ts = calibration_inputs(model, calib, DIFFUSION_CALIB_STEPS)
            batches = [(xs[s:s + 256], ts[s:s + 256]) for s in range(0, xs.shape[0], 256)]
        else:
            images = calib.windows * (model.info["input_range"] / 255.0)
            batches = [(images[s:s + CALIB_BATCH],) for s in range(0, images.shape[0], CALIB_BATCH)]
        handles = [r.module.register_forward_pre_hook(keep(r.name)) for r in refs]
        try:
            for batch in batches:
                model.module(*batch)
        finally:
            for h in handles:
                h.remove()
        return {name: torch.cat(values) for name, values in samples.items()}

    def runtime_hooks(self, model, packed):
        for ref in model.adapter.linears():
            stored = packed.layers.get(ref.name, {})
            if "act_scale" in stored:
                quant = self.activation_quantizer(stored)
                ref.module.register_forward_pre_hook(lambda _m, args, q=quant: (q(args[0]), *args[1:]))
        return packed

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        w = weight_matrix(ref.module)
        w.copy_(self.restore_weight(tuple(w.shape), stored))
        restore_bias(ref.module, stored)
