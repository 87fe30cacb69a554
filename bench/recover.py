"""`recover=`: a recovery fine-tuning stage that follows any method (`recover=lora|dora|rora`, default none).

Low-rank adapters are added to every compressed block linear through PEFT and trained by knowledge
distillation from the uncompressed model (KL on logits, the `bench.compress.distill` loop) on the same calibration
windows, steps and lr as every training-based method (`budget=`). The compressed weights stay frozen and
stored as the method stored them; the adapters are kept beside them (not merged, which would undo the
compression) and counted in bits/weight.

- `lora` (Hu et al., ICLR 2022): y = W x + (alpha / r) B A x.
- `rora` (RoRA, rank-stabilised scaling): alpha / sqrt(r) instead of alpha / r (PEFT's use_rslora).
- `dora` (Liu et al., ICML 2024): y = m / ||W + s B A||_row (W x + s B A x), m learned (PEFT's use_dora);
  it needs the layer's weight matrix, so it applies to methods that keep plain linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.compress.distill import distill, kd_logits
from bench.errors import ConfigError, NotApplicable, check_range
from bench.layer_format import AdapterBranch
from bench.training import TrainingRecord

VARIANTS = ("none", "lora", "dora", "rora")
STORED = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
          "lora_magnitude": "lora_magnitude_vector.default.weight"}


@dataclass
class Recovery:
    name: str = "none"
    rank: int = 64
    alpha: float = 16.0
    seed: int = 0

    def __post_init__(self):
        if self.name not in VARIANTS:
            raise ConfigError(f"recover '{self.name}' is unknown", f"use one of: {', '.join(VARIANTS)}")
        check_range("recover.rank", self.rank, 1, 4096)
        if self.alpha <= 0:
            raise ConfigError(f"recover.alpha={self.alpha} must be positive", "set recover.alpha > 0")

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.name == "rora" else self.rank)

    def _inject(self, model) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        refs = list(model.adapter.linears())
        odd = [r for r in refs if type(r.module) is not nn.Linear]
        if odd:
            raise NotApplicable(f"recover={self.name} adds adapters to plain linear layers; "
                                f"{odd[0].name} is a {type(odd[0].module).__name__} here",
                                "use it after a method that keeps nn.Linear layers (e.g. sign, rtn, gptq)")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                            target_modules=[r.name for r in refs], use_rslora=self.name == "rora",
                            use_dora=self.name == "dora")
        torch.manual_seed(self.seed)  # A's initialisation (B starts at zero)
        inject_adapter_in_model(config, model.module)

    def apply(self, teacher, model, packed, calib, budget):
        """Train adapters on the compressed model (in place); the packed record gains them."""
        self._inject(model)
        params = [p for n, p in model.module.named_parameters() if "lora_" in n]
        for n, p in model.module.named_parameters():
            p.requires_grad_("lora_" in n)

        def loss(t_out, s_out):
            kd = kd_logits(s_out.logits, t_out.logits)
            return kd, {}
        history = distill(teacher, model.module, params, calib.windows, budget, self.seed, loss,
                          f"recover={self.name}", heldout=calib.heldout,
                          objective="KL(teacher || student) on logits (batchmean)")
        with torch.no_grad():
            for p in params:  # the evaluated model holds exactly the stored fp16 adapters
                p.copy_(p.half().float())
                p.requires_grad_(False)
        for ref in model.adapter.linears():
            for key, attr in STORED.items():
                t = _get(ref.module, attr)
                if t is not None:
                    packed.layers[ref.name][key] = t.detach().half()
        branch = AdapterBranch(self.name, self.rank)
        packed.layer_format = {k: v.with_adapter(branch) for k, v in packed.layer_format.items()}
        packed.training = TrainingRecord().add(packed.training).add(history)  # after the method's own stages
        return packed

    @torch.no_grad()
    def restore(self, model, packed):
        """Re-attach stored adapters to a model the method has just restored."""
        self._inject(model)
        for ref in model.adapter.linears():
            for key, attr in STORED.items():
                if key in packed.layers.get(ref.name, {}):
                    _get(ref.module, attr).copy_(packed.layers[ref.name][key].float())
        for p in model.module.parameters():
            p.requires_grad_(False)
        return packed


def _get(module: nn.Module, dotted: str):
    try:
        return module.get_parameter(dotted)
    except AttributeError:
        return None
