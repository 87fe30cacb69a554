"""The model adapter for convolutional image models (super-resolution and classifiers).

The same contract as the decoder adapter where it makes sense: `linears()` lists every weight layer
(Conv2d and Linear) as a `LinearRef`, in module order, with a role naming its kind (`conv3x3`, `conv1x1`,
`linear`, ...) and `block` its position; `first_last()` names the input and output layers that binarization
papers keep in full precision. A method that only knows decoder blocks refuses these models by `kind`.
"""

from __future__ import annotations

from typing import Iterator

from torch import nn

from bench.models.adapter import LinearRef

VISION_KINDS = ("image_sr", "image_classifier")


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
                role = "linear"
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

    def blocks(self) -> list:
        return []  # no decoder blocks: block-wise LM methods do not apply (they check `kind`)

    def n_block_linear_weights(self) -> int:
        return sum(r.module.weight.numel() for r in self.linears())
