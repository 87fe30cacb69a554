"""The model adapter for convolutional image models (super-resolution and classifiers).

The same contract as the decoder adapter where it makes sense: `linears()` lists every weight layer
(Conv2d and Linear) as a `LinearRef`, in module order, with a role naming its kind (`conv3x3`, `conv1x1`,
`linear`, ...) and `block` its position; `first_last()` names the input and output layers that binarization
papers keep in full precision. A method that only knows decoder blocks refuses these models by `kind`.

Vision transformers (transformers' ViT/DeiT) are image models too: their patch embedding is a conv
(`conv16x16`), the linears of each encoder layer take the decoder adapter's roles (`q`, `k`, `v`, `o` of the
attention, `up`/`down` of the MLP), the classifier head stays `linear`, and a token selector a method inserted
(token_pruning) is `token_selector`. `vit_encoder()` exposes the encoder itself (layers, prefix tokens, heads)
to methods that work on the token sequence; it is None for a CNN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from bench.models.adapter import LinearRef

VISION_KINDS = ("image_sr", "image_classifier")

# transformers' ViT-family module names (v5 names and the v4 ones) -> the decoder adapter's roles
_VIT_ROLES = {"attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v", "attention.o_proj": "o",
              "mlp.fc1": "up", "mlp.fc2": "down", "attention.query": "q", "attention.key": "k",
              "attention.value": "v", "output.dense": "o", "intermediate.dense": "up"}


@dataclass
class ViTEncoder:
    """The token-sequence view of a vision transformer: `layers[i]` maps (B, N, C) to (B, N, C) for any N, the
    first `n_prefix` tokens are the class (and distillation) tokens, the rest `n_patches` patch tokens."""

    layers: nn.ModuleList
    n_prefix: int
    n_patches: int
    dim: int
    heads: int
    name: str  # module name of the layers


def _vit_role(name: str) -> str:
    if ".token_selector." in f".{name}.":
        return "token_selector"
    parts = name.split(".")
    tail = ".".join(parts[-2:])
    if tail == "output.dense" and len(parts) >= 3 and parts[-3] != "attention":
        return "down"  # v4 naming: layer.output.dense is the MLP's second linear, attention.output.dense is `o`
    return _VIT_ROLES.get(tail, "linear")


class ConvAdapter:
    def __init__(self, model: nn.Module, kind: str):
        self.model = model
        self.kind = kind

    def linears(self) -> Iterator[LinearRef]:
        index = 0
        for name, m in self.model.named_modules():
            if isinstance(m, nn.Conv2d):
                kh, kw = m.kernel_size
                role = f"conv{kh}x{kw}" + ("_dw" if m.groups > 1 and m.groups == m.in_channels else "")
            elif isinstance(m, nn.Linear):
                role = _vit_role(name)
            else:
                continue
            yield LinearRef(index, role, name, m)
            index += 1

    def first_last(self) -> tuple[str, str]:
        refs = list(self.linears())
        return refs[0].name, refs[-1].name

    def replace_linear(self, ref: LinearRef, new: nn.Module) -> None:
        parent_name, _, attr = ref.name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, attr, new)
        ref.module = new

    def vit_encoder(self) -> ViTEncoder | None:
        """The encoder of a transformers ViT/DeiT inside the model (None for CNNs)."""
        for name, m in self.model.named_modules():
            emb, cfg = getattr(m, "embeddings", None), getattr(m, "config", None)
            if emb is None or cfg is None or getattr(emb, "cls_token", None) is None:
                continue
            layers = getattr(m, "layers", None)
            if not isinstance(layers, nn.ModuleList):
                layers = getattr(getattr(m, "encoder", None), "layer", None)
            if not isinstance(layers, nn.ModuleList) or not hasattr(emb, "patch_embeddings"):
                continue
            n_prefix = 1 + (getattr(emb, "distillation_token", None) is not None)
            layers_name = next(n for n, x in self.model.named_modules() if x is layers)
            return ViTEncoder(layers, n_prefix, int(emb.patch_embeddings.num_patches), int(cfg.hidden_size),
                              int(cfg.num_attention_heads), layers_name)
        return None

    def blocks(self) -> list:
        return []  # no decoder blocks: block-wise LM methods do not apply (they check `kind`)

    def n_block_linear_weights(self) -> int:
        return sum(r.module.weight.numel() for r in self.linears())
