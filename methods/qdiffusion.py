"""`qdiffusion`: integer post-training quantization of a diffusion UNet with Q-Diffusion's calibration, after
Li, Xu, Dong, Gu, Tang, Keutzer, Zhou, Li, "Q-Diffusion: Quantizing Diffusion Models" (ICCV 2023).

The integer grid is `static_ptq`'s (signed per-channel weights with an MSE clip search, one static
asymmetric range per layer input from an MSE observer); what Q-Diffusion changes is the calibration:
- Time step-aware calibration: the calibration inputs are the full-precision model's own intermediate
  x_t, sampled uniformly over the whole denoising process (every `interval`-th of `calib_steps` DDIM steps
  from each calibration noise, `calib=ddpm_noise8`), instead of data images or a single timestep, since
  activation ranges drift with t. They are taken from the uncompressed model before any weight is rounded.
- Shortcut-splitting: a layer that reads the concatenation of the decoder features and a UNet skip
  connection (the first conv and the 1x1 shortcut of every up-level residual block) gets one activation
  range for each of the two parts, whose value ranges differ by orders of magnitude.
Not reproduced: BRECQ/AdaRound block reconstruction of the weights (rounding to nearest here).
Stored as static_ptq (packed codes, fp16 scales, the activation scale/zero point per part and the split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.static_ptq import SAMPLES_PER_BATCH, StaticPTQBase, act_range, fake_quant_static
from bench.errors import check_range
from bench.sampler import calibration_inputs, model_schedule


@dataclass
class QDiffusion(StaticPTQBase):
    name: str = "qdiffusion"
    calib_steps: int = 50  # DDIM steps of the full-precision calibration trajectories
    interval: int = 5  # keep every interval-th step's x_t: uniform over the denoising process
    shortcut_split: bool = True
    paper: ClassVar[str] = "Li et al., Q-Diffusion: Quantizing Diffusion Models (ICCV 2023)"
    applies_to: ClassVar[tuple[str, ...]] = ("diffusion",)

    def __post_init__(self):
        super().__post_init__()
        check_range("method.calib_steps", self.calib_steps, 1, 1000)
        check_range("method.interval", self.interval, 1, self.calib_steps)

    def compress(self, model, calib, budget):
        xs, ts = calibration_inputs(model, calib, self.calib_steps)  # before any weight is rounded
        keep = torch.tensor([t in set(model_schedule(model).ddim_timesteps(self.calib_steps)[::self.interval])
                             for t in ts.tolist()])
        self._calib = (xs[keep], ts[keep])
        self._splits = model.adapter.skip_concat_layers() if self.shortcut_split else {}
        packed = super().compress(model, calib, budget)
        packed.info["calib_pairs"] = int(keep.sum())
        packed.info["shortcut_split_layers"] = sum(1 for n in self._splits if n in packed.layers)
        return packed

    @torch.no_grad()
    def _activation_samples(self, model, refs, calib):
        g = torch.Generator().manual_seed(calib.spec.seed)
        samples: dict[str, list[list[torch.Tensor]]] = {r.name: [[], []] for r in refs}

        def keep(name):
            split = self._splits.get(name)

            def hook(_m, args):
                x = args[0].detach().float()  # fp32: activation statistics
                parts = [x] if split is None else [x[:, :split], x[:, split:]]
                for i, p in enumerate(parts):
                    p = p.flatten()
                    idx = torch.randint(0, p.numel(), (min(SAMPLES_PER_BATCH, p.numel()),), generator=g)
                    samples[name][i] += [p[idx].float(), torch.stack([p.min(), p.max()]).float()]
            return hook

        handles = [r.module.register_forward_pre_hook(keep(r.name)) for r in refs]
        try:
            xs, ts = self._calib
            for s in range(0, xs.shape[0], 256):
                model.module(xs[s:s + 256], ts[s:s + 256])
        finally:
            for h in handles:
                h.remove()
        self._fit_order = [r.name for r in refs]
        self._fit_parts = {n: [torch.cat(p) for p in parts if p] for n, parts in samples.items()}
        return {n: parts[0] for n, parts in self._fit_parts.items()}

    def fit_activation(self, samples, bits):
        name = self._fit_order.pop(0)  # static_ptq fits the layers in the order it passed them to the observer
        parts = self._fit_parts[name]
        if len(parts) == 1:
            return super().fit_activation(samples, bits)
        fits = [act_range(p, bits) for p in parts]
        return {"act_scale": torch.stack([f[0] for f in fits]).reshape(2), "act_zero": torch.stack(
                [f[1] for f in fits]).reshape(2), "a_bits": torch.tensor([bits], dtype=torch.uint8),
                "act_split": torch.tensor([self._splits[name]], dtype=torch.int32)}

    def activation_quantizer(self, stored):
        if "act_split" not in stored:
            return super().activation_quantizer(stored)
        s, z, b, c = stored["act_scale"], stored["act_zero"], int(stored["a_bits"][0]), int(stored["act_split"][0])
        return lambda x: torch.cat([fake_quant_static(x[:, :c], s[0], z[0], b),
                                    fake_quant_static(x[:, c:], s[1], z[1], b)], dim=1)

    def layer_format(self, w_bits, a_bits):
        fmt = super().layer_format(w_bits, a_bits)
        return fmt.with_notes("qdiff-calib") if a_bits else fmt
