"""Sign binarization with one scale per output row: W ~ alpha_r * sign(W), alpha_r = mean |W_r|, sign(0) = +1,
stored as 1 packed bit per weight + an fp16 scale per row (a conv as its out x (in kh kw) matrix). On image
models the first and the last layer stay in full precision (`keep_first_last`, the BiBench protocol), and the
record says which. `SignBinarizationBase` is the `sign` method; xnor adds binary activations to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.quant import pack_bits, unpack_bits
from bench.quant.integer import weight_matrix


def sign_bits(w: torch.Tensor) -> torch.Tensor:
    """1 where w >= 0 (sign +1), 0 where w < 0."""
    return (w >= 0).to(torch.uint8)


def signs_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.float32) * 2 - 1


@dataclass
class SignBinarizationBase(Method):
    name: str = "sign"
    keep_first_last: bool = True  # image models only: first and last layer full precision
    family: ClassVar[str] = "binarization"
    applies_to: ClassVar[tuple[str, ...]] = ("causal_lm", "image_sr")

    def targets(self, model) -> list:
        refs = list(model.adapter.linears())
        if model.kind != "causal_lm" and self.keep_first_last:
            return refs[1:-1]
        return refs

    @torch.no_grad()
    def compress(self, model, calib, budget) -> Packed:
        packed = Packed(model.module, self.name, self.execution)
        refs = self.targets(model)
        for ref in refs:
            w = weight_matrix(ref.module)
            scale = w.abs().mean(dim=1, keepdim=True).to(torch.float16)
            b = sign_bits(w)
            wq = signs_from_bits(b) * scale.float()
            stored = {"qweight": pack_bits(b, 1), "scale": scale}
            if ref.module.bias is not None:
                stored["bias"] = ref.module.bias.data.to(torch.float16)
            packed.per_layer.append(layer_stats(ref, w, wq))
            w.copy_(wq)
            packed.layers[ref.name] = stored
            packed.layer_format[ref.name] = LayerFormat.binary("sign-1bit-rowscale-fp16")
        kept = [r.name for r in model.adapter.linears() if r.name not in packed.layers]
        if model.kind != "causal_lm":
            packed.info["layers_kept_full_precision"] = len(kept)
            packed.extra_metadata["kept_full_precision"] = ",".join(kept)
        return self.runtime_hooks(model, packed)

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        w = weight_matrix(ref.module)
        out_f, in_f = w.shape
        b = unpack_bits(stored["qweight"], 1, out_f * in_f, (out_f, in_f))
        w.copy_(signs_from_bits(b) * stored["scale"].float())
        if "bias" in stored:
            ref.module.bias.data.copy_(stored["bias"].float())
