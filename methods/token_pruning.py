"""`token_pruning`: learned token selectors drop patch tokens from a vision transformer's sequence (SPViT /
HeatViT); the pruned tokens really leave the sequence, so the CPU latency gain is measured, not simulated.

Papers: Kong, Dong, Ma, Meng, Niu, Sun, Shen, Yuan, Ren, Tang, Qin, Wang, "SPViT: Enabling Faster Vision
Transformers via Latency-aware Soft Token Pruning" (ECCV 2022), and Dong, Sun, Li, Kong, Ma, Shen, Tang, Qin, Wang,
"HeatViT: Hardware-Efficient Adaptive Token Pruning for Vision Transformers" (HPCA 2023). Written from the papers
and the predictor modules of the group's public code (PeiyanFlying/SPViT: PredictorLG, MultiheadPredictorLG and its
head-weighted "senet" variant), not copied.

Before each block of `prune_blocks` a token selector scores the patch tokens that are still in the sequence
(class/distillation tokens are never candidates) and keeps the top k = ceil(`keep_ratio` x n) of the n candidates
(at most n - 1), in their original order. Soft pruning: the pruned tokens are not discarded but packaged into one
"package token" appended after the kept ones, their features averaged with their keep scores as weights; from the
second pruned block on, the incoming package token is a candidate that is scored, never kept on its own, and folded
into the new package with its score (HeatViT's accumulation). So a pruned block sees prefix + k + 1 tokens.
- `selector: spvit`: the SPViT/DynamicViT selector on the whole embedding: LayerNorm -> Linear -> GELU, half of
  the features kept per token (local), the other half averaged over the candidates (global), concatenated, then an
  MLP C -> C/2 -> C/4 -> 2 and a softmax: the keep probability.
- `selector: heatvit`: HeatViT's attention-head-aware selector: the same local/global classifier run per head on
  that head's C/h channels, and per-token head importances (each head's channel mean -> MLP h -> h/2 -> h ->
  sigmoid) weighting the heads' keep probabilities into one score.
Training: the papers train selectors with Gumbel-softmax masks and a keep-ratio loss, then finetune the whole
network for 30 epochs on ImageNet. Here the keep count is fixed (top-k, as at the papers' inference), so no ratio
loss is needed: the selectors (and the backbone if `finetune_backbone`) are trained by logit distillation
(KL(teacher || student)) from the unpruned model on the calibration images (`calib=sr_hr_224` for 224-pixel
models; resized to the model's input if another size), steps / batch / warm-up from `budget=` and the learning
rate `selector_lr` (fresh selectors need more than a finetune's). The top-k choice has no gradient; the selector
learns through the package weights and a straight-through factor on the kept tokens (x (1 + s - sg(s)): exactly
x in the forward pass, d/ds = x . grad in the backward one), so training runs the same dropped sequence as
inference.
Recorded: the achieved keep ratio per pruned block and overall, tokens per block, multiply-accumulates of one
image before and after (counted: every Conv2d/Linear by forward hooks, selectors included, plus the attention
matmuls QK^T and AV from the real sequence lengths; the papers' "FLOPs" are these MACs, DeiT-Tiny 1.3 G), the
selectors' parameters. Stored: the model's weights (fp16 storage, as the base) plus the selectors (fp16).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.compress.distill import distill, kd_logits
from bench.errors import ArtifactCorrupt, ConfigError, NotApplicable
from bench.image import count_macs
from bench.models import round_to_storage
from bench.packed import EXECUTION_DENSE, Packed
from bench.plugins import Method
from bench.training import TrainingRecord

SELECTORS = ("spvit", "heatvit")
LATENCY_NOTE = "measured: pruned tokens are dropped from the sequence (no masks), so the CPU latency gain is real"


def kept_count(n: int, keep_ratio: float) -> int:
    """Tokens kept of n candidates: ceil(keep_ratio x n), at least 1 and at most n - 1 (one goes to the package)."""
    return max(1, min(n - 1, math.ceil(keep_ratio * n - 1e-9)))


def _local_global(h: torch.Tensor) -> torch.Tensor:
    """Half the features per token, the other half averaged over the tokens (SPViT/DynamicViT's predictor)."""
    half = h.shape[-1] // 2
    glob = h[..., half:].mean(dim=1, keepdim=True).expand(-1, h.shape[1], -1)
    return torch.cat([h[..., :half], glob], dim=-1)


def _classifier(dim: int) -> tuple[nn.Module, nn.Module]:
    return (nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()),
            nn.Sequential(nn.Linear(dim, max(1, dim // 2)), nn.GELU(), nn.Linear(max(1, dim // 2), max(1, dim // 4)),
                          nn.GELU(), nn.Linear(max(1, dim // 4), 2)))


class SPViTSelector(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.inp, self.out = _classifier(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M, C) candidates -> (B, M) keep probabilities (fp32: they rank the tokens, bf16 would tie them)."""
        return self.out(_local_global(self.inp(x))).float().softmax(-1)[..., 0]


class HeatViTSelector(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        pairs = [_classifier(self.head_dim) for _ in range(heads)]
        self.inp = nn.ModuleList(p[0] for p in pairs)  # one classifier per head (the reference shared one by mistake)
        self.out = nn.ModuleList(p[1] for p in pairs)
        mid = max(1, heads // 2)
        self.head_weight = nn.Sequential(nn.Linear(heads, mid), nn.GELU(), nn.Linear(mid, heads), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m, _ = x.shape
        xh = x.reshape(b, m, self.heads, self.head_dim)
        weights = self.head_weight(xh.mean(dim=-1)).float()  # (B, M, heads): how much each head's verdict counts
        probs = torch.stack([self.out[h](_local_global(self.inp[h](xh[:, :, h]))).float().softmax(-1)[..., 0]
                             for h in range(self.heads)], dim=-1)  # fp32 scores, as SPViTSelector's
        return (probs * weights).sum(-1) / weights.sum(-1).clamp(min=1e-6)


class TokenSelection(nn.Module):
    """The token selection in front of one ViT encoder layer, attached to it as `token_selector` (so the layer's own
    weights keep their names) and run as its forward pre-hook: (B, prefix + n [+ package], C) in, the layer runs on
    (B, prefix + k + package, C)."""

    def __init__(self, scorer: nn.Module, n_prefix: int, keep_ratio: float, package_in: bool):
        super().__init__()
        self.scorer = scorer
        self.n_prefix, self.keep_ratio, self.package_in = n_prefix, keep_ratio, package_in
        self.last_counts: tuple[int, int] | None = None  # (candidates, kept) of the last forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        prefix = x[:, :self.n_prefix]
        cand = x[:, self.n_prefix:-1] if self.package_in else x[:, self.n_prefix:]
        n = cand.shape[1]
        k = kept_count(n, self.keep_ratio)
        scores = self.scorer(x[:, self.n_prefix:])  # the incoming package is scored too (never kept alone)
        s = scores[:, :n]
        order = s.argsort(dim=1, descending=True)
        keep_idx = order[:, :k].sort(dim=1).values  # original order: the kept tokens keep their positions' order
        drop_idx = order[:, k:]
        s_keep = s.gather(1, keep_idx)[..., None]
        kept = cand.gather(1, keep_idx[..., None].expand(-1, -1, c))
        kept = kept + kept * (s_keep - s_keep.detach())  # straight-through: +0 forward, d/ds = x backward
        dropped = cand.gather(1, drop_idx[..., None].expand(-1, -1, c))
        s_drop = s.gather(1, drop_idx)
        if self.package_in:
            dropped = torch.cat([dropped, x[:, -1:]], dim=1)
            s_drop = torch.cat([s_drop, scores[:, n:]], dim=1)
        w = s_drop[..., None]
        package = (dropped * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp(min=1e-6)
        self.last_counts = (n, k)
        return torch.cat([prefix, kept, package], dim=1)

    def pre_hook(self, _layer, args, kwargs):
        # a bound method: deepcopy of the model copies the hook with its (copied) selection module
        if len(args) > 1 and args[1] is not None or kwargs.get("attention_mask") is not None:
            raise NotApplicable("token_pruning met an attention mask in the ViT encoder",
                                "it runs unmasked image transformers only")
        return (self(args[0]), *args[1:]), kwargs


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """Calibration images at the model's input size (e.g. 224-pixel crops for a smaller model)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 255)


class _Images(nn.Module):
    """The classifier called as distill() calls a model (ids, **LM kwargs): the kwargs do not apply to images."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x, **_):
        return self.module(x)


@torch.no_grad()
def vit_macs(module: nn.Module, encoder, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass: Conv2d/Linear by hooks (selectors included) plus the attention
    matmuls QK^T and AV (2 x N^2 x C per layer, N the sequence length the layer really gets)."""
    attn = 0

    def hook(_m, args):
        nonlocal attn
        b, n, c = args[0].shape
        attn += 2 * b * n * n * c

    handles = [layer.attention.register_forward_pre_hook(hook) for layer in encoder.layers]
    try:
        linear = count_macs(module, x)
    finally:
        for h in handles:
            h.remove()
    return linear + attn


@dataclass
class TokenPruning(Method):
    name: str = "token_pruning"
    selector: str = "spvit"  # spvit | heatvit
    keep_ratio: float = 0.7  # fraction of the remaining patch tokens each pruned block keeps
    prune_blocks: list[int] = field(default_factory=lambda: [3, 6, 9])  # blocks preceded by a selector
    selector_lr: float = 1e-3
    finetune_backbone: bool = False  # also train the ViT's own weights (at budget.lr), as the papers do
    seed: int = 0
    family: ClassVar[str] = "pruning"
    paper: ClassVar[str] = ("Kong et al., SPViT (ECCV 2022); Dong et al., HeatViT (HPCA 2023): learned token selectors "
                            "with a package token")
    applies_to: ClassVar[tuple[str, ...]] = ("image_classifier",)
    needs_calibration: ClassVar[bool] = True
    execution: ClassVar[str] = EXECUTION_DENSE

    def __post_init__(self):
        if self.selector not in SELECTORS:
            raise ConfigError(f"method.selector='{self.selector}' is unknown", f"use one of: {', '.join(SELECTORS)}")
        if not (isinstance(self.keep_ratio, (int, float)) and 0 < self.keep_ratio < 1):
            raise ConfigError(f"method.keep_ratio={self.keep_ratio} must lie strictly between 0 and 1",
                              "e.g. method.keep_ratio=0.7")
        blocks = list(self.prune_blocks or [])
        if not blocks or any(not isinstance(b, int) or b < 0 for b in blocks) or sorted(set(blocks)) != blocks:
            raise ConfigError(f"method.prune_blocks={self.prune_blocks} must be increasing block indices >= 0",
                              "e.g. method.prune_blocks=[3,6,9]")
        if self.selector_lr <= 0:
            raise ConfigError(f"method.selector_lr={self.selector_lr} must be positive", "e.g. method.selector_lr=1e-3")

    def check_applicable(self, model) -> None:
        encoder = model.adapter.vit_encoder() if model.kind == "image_classifier" else None
        if encoder is None:
            what = "CNN image classifier" if model.kind == "image_classifier" else f"{model.kind} model"
            raise NotApplicable(f"method 'token_pruning' applies only to vision transformers; '{model.spec.name}' is "
                                f"a {what}", "use a ViT/DeiT classifier, e.g. model=deit_tiny")
        n = len(encoder.layers)
        if self.prune_blocks[-1] >= n:
            raise ConfigError(f"method.prune_blocks={self.prune_blocks} reaches past the {n} blocks of "
                              f"'{model.spec.name}'", f"use block indices 0..{n - 1}")

    # --- structure -------------------------------------------------------------------------------------
    def make_selector(self, encoder) -> nn.Module:
        return SPViTSelector(encoder.dim) if self.selector == "spvit" else HeatViTSelector(encoder.dim, encoder.heads)

    def install(self, model) -> list[TokenSelection]:
        """Put a fresh selector before each of `prune_blocks` (seeded), in place."""
        self.check_applicable(model)
        encoder = model.adapter.vit_encoder()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(self.seed)
            pruned = []
            for j, b in enumerate(self.prune_blocks):
                selection = TokenSelection(self.make_selector(encoder), encoder.n_prefix, self.keep_ratio, j > 0)
                encoder.layers[b].token_selector = selection
                encoder.layers[b].register_forward_pre_hook(selection.pre_hook, with_kwargs=True)
                pruned.append(selection)
        return pruned

    def _input_size(self, model) -> int:
        return int(model.info.get("image_size") or model.info["preprocess"]["crop"])

    # --- facts -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def facts(self, model, teacher: nn.Module, pruned: list[TokenSelection]) -> tuple[dict, list[dict]]:
        from bench.models import adapter_for

        size = self._input_size(model)
        x = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0)) * 255
        before = vit_macs(teacher, adapter_for(teacher).vit_encoder(), x)
        encoder = model.adapter.vit_encoder()
        after = vit_macs(model.module, encoder, x)
        rows, ratios = [], []
        for b, layer in zip(self.prune_blocks, pruned):
            n, k = layer.last_counts
            ratios.append(k / n)
            rows.append({"block": b, "candidates": n, "kept": k, "package_tokens": 1,
                         "tokens_into_block": encoder.n_prefix + k + 1, "keep_ratio_achieved": k / n})
        n_sel = sum(p.numel() for layer in pruned for p in layer.scorer.parameters())
        info = {"keep_ratio_achieved": sum(ratios) / len(ratios),
                "patch_tokens_kept_final": pruned[-1].last_counts[1] / encoder.n_patches,
                "tokens_final": encoder.n_prefix + pruned[-1].last_counts[1] + 1,
                "tokens_initial": encoder.n_prefix + encoder.n_patches,
                "macs_before": float(before), "macs_after": float(after), "macs_ratio": after / before,
                "selector_params": n_sel}
        return info, rows

    # --- compress / restore ------------------------------------------------------------------------------
    def compress(self, model, calib, budget) -> Packed:
        teacher = copy.deepcopy(model.module).eval()
        for p in model.module.parameters():
            p.requires_grad_(self.finetune_backbone)
        pruned = self.install(model)
        selector_params = [p for layer in pruned for p in layer.scorer.parameters()]
        groups = [{"params": selector_params, "lr": self.selector_lr}]
        if self.finetune_backbone:
            ids = {id(p) for p in selector_params}
            groups.append({"params": [p for p in model.module.parameters() if id(p) not in ids], "lr": budget.lr})
        size = self._input_size(model)
        images, heldout = (None if x is None else _resized(x.float(), size) for x in (calib.windows, calib.heldout))

        def loss_fn(t_logits, s_logits):
            kd = kd_logits(s_logits, t_logits)
            return kd, {"kd": kd.item()}

        encoder = model.adapter.vit_encoder()
        history = distill(_Images(teacher), _Images(model.module), groups, images,
                          dataclasses.replace(budget, lr=self.selector_lr), self.seed, loss_fn,
                          f"token_pruning {self.selector} selectors", heldout=heldout,
                          objective="KL(teacher || student) on the class logits (batchmean)",
                          tokens_per_sample=encoder.n_prefix + encoder.n_patches)
        for p in model.module.parameters():
            p.requires_grad_(False)
        round_to_storage(model.module, getattr(torch, model.spec.storage_dtype))  # what runs is what is stored
        model.module.eval()
        info, rows = self.facts(model, teacher, pruned)
        packed = Packed(model.module, self.name, self.execution)
        packed.info.update(info)
        packed.training = TrainingRecord([history])
        packed.per_layer = [*rows, {"selector": self.selector, "latency": LATENCY_NOTE,
                                    "trained": "selectors and backbone" if self.finetune_backbone else "selectors only",
                                    "calib_images": int(images.shape[0]), "calib_resized_to": size}]
        packed.extra_metadata.update(self._structure())
        return packed

    def _structure(self) -> dict[str, str]:
        return {"selector": self.selector, "keep_ratio": repr(self.keep_ratio),
                "prune_blocks": json.dumps(self.prune_blocks), "latency": LATENCY_NOTE}

    def restore(self, model, tensors, metadata) -> Packed:
        if (metadata.get("selector"), json.loads(metadata.get("prune_blocks", "null"))) != \
                (self.selector, self.prune_blocks):
            raise ArtifactCorrupt("the stored token_pruning artifact has another selector structure",
                                  "delete it to rebuild")
        teacher = copy.deepcopy(model.module).eval()
        pruned = self.install(model)
        packed = super().restore(model, tensors, metadata)  # loads the trained selectors with the weights
        model.module.eval()
        info, rows = self.facts(model, teacher, pruned)
        packed.info.update(info)
        packed.per_layer = rows
        packed.extra_metadata.update(self._structure())
        return packed
