"""`xnor`: XNOR-Net (Rastegari, Ordonez, Redmon, Farhadi; ECCV 2016) on the block linears: binary weights
AND binary inputs. Weights as the suite's `sign` (sign x per-row mean |W|); each linear's input vector is
replaced by beta_t * sign(x_t) with beta_t = mean |x_t| per token (XNOR-Net's K scaling; for a conv, per
pixel over its channels, without K's spatial averaging), so the matmul is an XNOR-popcount times two
scales. The activation binarization is a run-time hook (dynamic, nothing stored) and is re-attached after
restore. Execution: fake-quant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.compress.sign import SignBinarizationBase
from bench.layer_format import ActFormat


def binarize_tokens(x: torch.Tensor) -> torch.Tensor:
    token_dim = 1 if x.dim() == 4 else -1  # a conv input (N, C, H, W): each pixel's channel vector
    xf = x.float()  # fp32: beta from an input that may be bf16 under autocast; returned in x's dtype
    beta = xf.abs().mean(dim=token_dim, keepdim=True)
    return torch.where(xf >= 0, beta, -beta).to(x.dtype)


@dataclass
class XNOR(SignBinarizationBase):
    name: str = "xnor"
    paper: ClassVar[str] = "Rastegari et al., XNOR-Net (ECCV 2016): binary weights and binary inputs"

    def runtime_hooks(self, model, packed):
        for ref in self.targets(model):
            ref.module.register_forward_pre_hook(lambda _m, args: (binarize_tokens(args[0]), *args[1:]))
        signs = ActFormat(1, "binary", "per_token", "meanabs")
        packed.layer_format = {k: v.with_act(signs) for k, v in packed.layer_format.items()}
        packed.info["activations"] = "binary (sign x per-token mean |x|)"
        return packed
