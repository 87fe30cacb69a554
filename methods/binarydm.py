"""`binarydm`: 1-bit weights for diffusion models, after Zheng, Liu, Qin, Ma, Zhang, Hao, Wang, Zhao, Guo,
Magno, "BinaryDM: Accurate Weight Binarization for Efficient Diffusion Models" (arXiv 2404.05662; v1-v2
"Learnable Multi-basis Binarizer", later versions "Evolvable-Basis Binarizer").

- Learnable multi-basis binarizer (LMB): a layer's weight (a conv as out x in*kh*kw) is
  W_b = s1 sign(W) + s2 sign(W - s1 sign(W)) with learnable per-output-channel scales s1, s2 (initialised to
  the mean |.| of W and of the first residual: the least-squares values). The second basis is spent only
  where the paper spends it, on the highest-resolution parts of the UNet ("head and tail": the first down
  level and the last up level); every other layer is single-basis W_b = s1 sign(W). Latent fp weights are
  trained through sign() with the straight-through estimator (gradient passed where |w| <= 1).
- Low-rank representation mimicking (LRM): the outputs of the UNet's levels (each down level, the middle,
  each up level) are projected onto the top `lrm_rank_ratio` x C principal directions of the
  full-precision model's features (PCA over calibration pixels) and the binarized model's projections are
  pulled to the full-precision ones (MSE), beside the output distillation loss MSE(eps_b, eps_fp).
- Training: distillation from the full-precision model on the (x_t, t) the full-precision sampler meets from
  the calibration noises (`calib=ddpm_noise8`); AdamW, steps / batch / lr / warm-up from `budget=`
  (budget=diffusion is the CPU recipe), cosine decay. First and last layer kept full precision
  (`keep_first_last`, the binarization papers' protocol), recorded.
Stored per binarized layer: packed sign bits of each basis (1 bit per weight per basis), fp16 s1 (and s2)
per output channel, fp16 bias: a multi-basis weight takes exactly the values +-s1 +-s2 of its channel, a
single-basis one +-s1. Execution: fake-quant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ConfigError, check_range
from bench.models import adapter_for
from bench.layer_format import LayerFormat
from bench.packed import Packed, layer_stats
from bench.plugins import Method
from bench.precision import fp32
from bench.quant import pack_bits, unpack_bits
from bench.quant.binary import clipped_sign
from bench.quant.integer import restore_bias, stored_bias, weight_matrix
from bench.sampler import calibration_inputs, heldout_inputs
from bench.training import StageRecord, Trainer, TrainingRecord, budget_adamw, budget_schedule


def bases(w: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor | None):
    """(sign1, sign2 or None, binarized weight) of an (out, in) latent weight."""
    b1 = clipped_sign(w)
    wb = s1 * b1
    if s2 is None:
        return b1, None, wb
    b2 = clipped_sign(w - wb)
    return b1, b2, wb + s2 * b2


class BinarizedLayer(nn.Module):
    """Wraps a Conv2d/Linear: latent weight + learnable scales; its forward uses the binarized weight."""

    def __init__(self, layer: nn.Module, multi: bool):
        super().__init__()
        self.layer = layer
        w = weight_matrix(layer).detach().float()
        self.latent = nn.Parameter(w.clone())
        s1 = w.abs().mean(dim=1, keepdim=True)
        self.s1 = nn.Parameter(s1)
        self.s2 = nn.Parameter((w - s1 * torch.where(w >= 0, 1.0, -1.0)).abs().mean(dim=1, keepdim=True)) if multi \
            else None
        layer.weight.requires_grad_(False)

    def binarized(self) -> torch.Tensor:
        return bases(self.latent, self.s1, self.s2)[2]

    def forward(self, x):
        w = self.binarized().view_as(self.layer.weight)
        if isinstance(self.layer, nn.Conv2d):
            m = self.layer
            return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, self.layer.bias)


def level_modules(unet: nn.Module) -> list[nn.Module]:
    """The modules whose outputs LRM mimics: each down level's last block, the middle, each up level's last."""
    return [level.output for level in adapter_for(unet).levels()]


@dataclass
class BinaryDM(Method):
    name: str = "binarydm"
    multi_basis: str = "head_tail"  # head_tail (the paper's) | all | none
    lrm_rank_ratio: float = 0.25  # PCA rank / channels for LRM
    lrm_weight: float = 1.0
    keep_first_last: bool = True
    calib_steps: int = 20  # DDIM steps of the calibration trajectories
    family: ClassVar[str] = "binarization"
    paper: ClassVar[str] = "Zheng et al., BinaryDM: Accurate Weight Binarization for Efficient Diffusion Models (2024)"
    applies_to: ClassVar[tuple[str, ...]] = ("diffusion",)
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if self.multi_basis not in ("head_tail", "all", "none"):
            raise ConfigError(f"method.multi_basis={self.multi_basis} is unknown", "use head_tail, all or none")
        if not 0 < self.lrm_rank_ratio <= 1:
            raise ConfigError(f"method.lrm_rank_ratio={self.lrm_rank_ratio} must be in (0, 1]", "e.g. 0.25")
        if self.lrm_weight < 0:
            raise ConfigError(f"method.lrm_weight={self.lrm_weight} is negative", "e.g. 1.0 (0 turns LRM off)")
        check_range("method.calib_steps", self.calib_steps, 1, 1000)

    def _targets(self, model) -> list:
        refs = list(model.adapter.linears())
        return refs[1:-1] if self.keep_first_last else refs

    def _multi(self, model, name: str) -> bool:
        if self.multi_basis == "all":
            return True
        if self.multi_basis == "none":
            return False
        levels = model.adapter.levels()  # head: the first down level, tail: the last up level
        return name.startswith((f"{levels[0].name}.", f"{levels[-1].name}."))

    def compress(self, model, calib, budget) -> Packed:
        import copy

        if not model.adapter.levels():
            raise ConfigError(f"binarydm needs the suite's TinyUNet levels, model '{model.spec.name}' has none",
                              "use model=ddpm_digits")
        teacher = copy.deepcopy(model.module).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        xs, ts = calibration_inputs(model, calib, self.calib_steps)
        heldout = heldout_inputs(model, calib, self.calib_steps)  # validation pairs, never trained on
        refs = self._targets(model)
        wrapped = {}
        for ref in refs:
            layer = BinarizedLayer(ref.module, self._multi(model, ref.name))
            model.adapter.replace_linear(ref, layer)
            wrapped[ref.name] = layer
        student = model.module
        projections = self._lrm_projections(teacher, xs, ts)
        record = self._train(teacher, student, projections, xs, ts, heldout, budget, calib.spec.seed)
        # freeze: the binarized weights go back into plain layers, with their stored form
        packed = Packed(student, self.name, self.execution)
        n_bits = 0
        with torch.no_grad():
            for ref in refs:
                layer = wrapped[ref.name]
                w_fp = weight_matrix(layer.layer).clone()
                b1, b2, wb = bases(layer.latent, layer.s1.to(torch.float16).float(),
                                   None if layer.s2 is None else layer.s2.to(torch.float16).float())
                stored = {"sign1": pack_bits((b1 > 0).to(torch.uint8), 1), "s1": layer.s1.detach().to(torch.float16),
                          **stored_bias(layer.layer)}
                if b2 is not None:
                    stored.update({"sign2": pack_bits((b2 > 0).to(torch.uint8), 1),
                                   "s2": layer.s2.detach().to(torch.float16)})
                weight_matrix(layer.layer).copy_(wb)
                layer.layer.weight.requires_grad_(True)
                model.adapter.replace_linear(ref, layer.layer)
                packed.per_layer.append({**layer_stats(ref, w_fp, wb), "bases": 1 if b2 is None else 2})
                packed.layers[ref.name] = stored
                packed.layer_format[ref.name] = LayerFormat.binary("binary-2basis-ch", 2) if b2 is not None \
                    else LayerFormat.binary("binary-1basis-ch")
                n_bits += wb.numel() * (1 if b2 is None else 2)
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()
        n_w = sum(wrapped[r.name].latent.numel() for r in refs)
        packed.training = TrainingRecord([record])
        packed.info["sign_bits_per_binarized_weight"] = n_bits / n_w
        packed.info["multi_basis_layers"] = sum(1 for r in refs if wrapped[r.name].s2 is not None)
        kept = sorted({r.name for r in model.adapter.linears()} - {r.name for r in refs})
        packed.extra_metadata["kept_full_precision"] = ",".join(kept)
        return packed

    @torch.no_grad()
    def _lrm_projections(self, teacher, xs, ts) -> list[torch.Tensor]:
        """Per mimicked level, the top principal directions (C x r) of the full-precision features."""
        feats = self._features(teacher, xs[:512], ts[:512])
        out = []
        for f in feats:
            with fp32():  # fp32: the features' PCA (they may be bf16 under autocast)
                v = f.float().permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                v = v - v.mean(0)
                r = max(1, int(round(self.lrm_rank_ratio * v.shape[1])))
                _, _, vh = torch.linalg.svd(v, full_matrices=False)
                out.append(vh[:r].T.contiguous())
        return out

    @staticmethod
    def _features(unet, x, t) -> list[torch.Tensor]:
        got = []
        handles = [m.register_forward_hook(lambda _m, _a, o: got.append(o)) for m in level_modules(unet)]
        try:
            eps = unet(x, t)
        finally:
            for h in handles:
                h.remove()
        got.append(eps)
        return got

    def _train(self, teacher, student, projections, xs, ts, heldout, budget, seed) -> StageRecord:
        steps = budget.steps()
        g = torch.Generator().manual_seed(seed)
        params = [p for p in student.parameters() if p.requires_grad]
        opt = budget_adamw(params, budget)
        student.train()

        def loss_of(x, t):
            with torch.no_grad():
                ft = self._features(teacher, x, t)
            fs = self._features(student, x, t)
            with fp32():  # fp32: the loss (the LRM projections are einsums) from fp32 features
                fs, ft = [f.float() for f in fs], [f.float() for f in ft]
                loss_out = F.mse_loss(fs[-1], ft[-1])
                lrm = sum(F.mse_loss(torch.einsum("bchw,cr->bhwr", a, p), torch.einsum("bchw,cr->bhwr", b, p))
                          for a, b, p in zip(fs[:-1], ft[:-1], projections)) / len(projections)
                loss = loss_out + self.lrm_weight * lrm
            return loss, {"out_mse": loss_out.item(), "lrm": self.lrm_weight * float(lrm.detach())}

        def step_fn(_step):
            idx = torch.randint(0, xs.shape[0], (budget.batch_size,), generator=g)
            return loss_of(xs[idx], ts[idx])

        def validate():  # chunks of the training batch size, weighted by their sizes
            student.eval()
            total, terms, n = 0.0, {}, heldout[0].shape[0]
            with torch.no_grad():
                for x, t in zip(heldout[0].split(budget.batch_size), heldout[1].split(budget.batch_size)):
                    loss, parts = loss_of(x, t)
                    total += float(loss) * x.shape[0]
                    for k, v in parts.items():
                        terms[k] = terms.get(k, 0.0) + v * x.shape[0]
            student.train()
            return total / n, {k: v / n for k, v in terms.items()}

        trainer = Trainer("binarydm distillation", opt, steps, budget_schedule(budget, steps),
                          samples_per_step=budget.batch_size, train_samples=xs.shape[0], validate=validate,
                          heldout_samples=0 if heldout is None else heldout[0].shape[0], progress=False,
                          objective=f"out_mse = MSE(student, teacher noise prediction) + lrm = {self.lrm_weight:g} x "
                                    "mean over levels of MSE of the PCA-projected level features (LRM); terms weighted")
        record = trainer.run(step_fn)
        student.eval()
        return record

    @torch.no_grad()
    def restore_layer(self, model, ref, stored) -> None:
        w = weight_matrix(ref.module)
        n = w.numel()
        wb = (unpack_bits(stored["sign1"], 1, n, tuple(w.shape)).float() * 2 - 1) * stored["s1"].float()
        if "sign2" in stored:
            wb = wb + (unpack_bits(stored["sign2"], 1, n, tuple(w.shape)).float() * 2 - 1) * stored["s2"].float()
        w.copy_(wb)
        restore_bias(ref.module, stored)
