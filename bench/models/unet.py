"""The noise predictor the suite trains itself for the offline diffusion track (plain torch, no download).

- `TinyUNet`: the DDPM noise predictor eps(x_t, t) of Ho et al. (2020) scaled down for 8x8 / 28x28 digits:
  sinusoidal timestep embedding -> 2-layer MLP, conv_in, per resolution `n_res` residual blocks (GroupNorm,
  SiLU, 3x3 conv, the timestep projected and added per channel, 3x3 conv, 1x1 skip when widths differ),
  strided-conv downsampling, two middle blocks, nearest-upsampling + conv with concatenated skips, and
  GroupNorm-SiLU-conv_out. No attention (at 8x8 it buys little and would be the only non-conv op).
- `DiffusionAdapter`: the conv adapter with every Conv2d/Linear named by its role in the UNet
  (`time_mlp`, `conv_in`, `res.conv1`, `res.temb`, `res.conv2`, `res.skip`, `down`, `up`, `conv_out`) and
  `block` = its order, so methods written against `linears()` (rtn, minifloat, ...) apply unchanged; the
  UNet's resolution levels and its skip-concatenating layers for the methods that need them (binarydm,
  qdiffusion). A `late` submodule (hybrid_sd's second denoiser) is not part of the base model and is not listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.adapter import LinearRef
from bench.models.vision import ConvAdapter


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The Transformer sinusoidal embedding DDPM uses for the timestep."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class TinyUNet(nn.Module):
    def __init__(self, in_ch: int = 1, ch: int = 32, mults: tuple[int, ...] = (1, 2), n_res: int = 1):
        super().__init__()
        self.ch, self.in_ch = ch, in_ch
        tdim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        widths, c = [ch], ch
        for i, m in enumerate(mults):
            level = nn.Module()
            level.res = nn.ModuleList()
            for _ in range(n_res):
                level.res.append(ResBlock(c, ch * m, tdim))
                c = ch * m
                widths.append(c)
            level.down = nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(mults) - 1 else None
            if level.down is not None:
                widths.append(c)
            self.down.append(level)
        self.mid = nn.ModuleList([ResBlock(c, c, tdim), ResBlock(c, c, tdim)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            level = nn.Module()
            level.res = nn.ModuleList()
            for _ in range(n_res + 1):
                level.res.append(ResBlock(c + widths.pop(), ch * m, tdim))
                c = ch * m
            level.up = nn.Conv2d(c, c, 3, padding=1) if i > 0 else None
            self.up.append(level)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0]) if torch.as_tensor(t).numel() == 1 else t
        temb = self.time_mlp(timestep_embedding(t, self.ch))
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block in level.res:
                h = block(h, temb)
                skips.append(h)
            if level.down is not None:
                h = level.down(h)
                skips.append(h)
        for block in self.mid:
            h = block(h, temb)
        for level in self.up:
            for block in level.res:
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if level.up is not None:
                h = level.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))




def _role(name: str, module: nn.Module) -> str:
    parts = name.split(".")
    if parts[0] == "time_mlp":
        return "time_mlp"
    if parts[0] in ("conv_in", "conv_out"):
        return parts[0]
    if parts[-1] in ("conv1", "conv2", "temb", "skip"):
        return f"res.{parts[-1]}"
    return parts[-1]  # down / up resampling convs


@dataclass
class UNetLevel:
    """One resolution level of a UNet: `name` is its module path ("down.0", "mid", "up.1"), `output` the module
    whose output is the level's feature map."""

    name: str
    output: nn.Module


class DiffusionAdapter(ConvAdapter):
    """Every Conv2d/Linear of a denoiser by role, in order (`linears`), and for the suite's TinyUNet its levels
    (`levels`) and the layers that read a skip connection concatenated to the decoder features
    (`skip_concat_layers`), so methods never walk the network's attributes themselves."""

    def __init__(self, model: nn.Module, kind: str = "diffusion"):
        super().__init__(model, kind)

    def linears(self) -> Iterator[LinearRef]:
        index = 0
        for name, m in self.model.named_modules():
            if name.startswith("late.") or name == "late":
                continue  # hybrid_sd's second network: stored whole, not a layer of the base model
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                yield LinearRef(index, _role(name, m), name, m)
                index += 1

    def unet(self) -> TinyUNet | None:
        """The suite's TinyUNet, or None for another denoiser (a diffusers UNet, hybrid_sd's two-model wrapper)."""
        return self.model if isinstance(self.model, TinyUNet) else None

    def levels(self) -> list[UNetLevel]:
        """Down levels (each ends in its last residual block), the middle, up levels: [] for other denoisers."""
        unet = self.unet()
        if unet is None:
            return []
        return ([UNetLevel(f"down.{i}", level.res[-1]) for i, level in enumerate(unet.down)]
                + [UNetLevel("mid", unet.mid[-1])]
                + [UNetLevel(f"up.{i}", level.res[-1]) for i, level in enumerate(unet.up)])

    def skip_concat_layers(self) -> dict[str, int]:
        """Layer name -> channels of the decoder part of its input, for each layer reading [decoder, skip]
        concatenated (an up level's first conv and 1x1 shortcut of a residual block); {} for other denoisers."""
        unet = self.unet()
        if unet is None:
            return {}
        out: dict[str, int] = {}
        names = {id(m): n for n, m in unet.named_modules()}
        prev = unet.mid[-1].conv2.out_channels
        for level in unet.up:
            for block in level.res:
                for layer in (block.conv1, block.skip):
                    if isinstance(layer, nn.Conv2d) and layer.in_channels > prev:
                        out[names[id(layer)]] = prev
                prev = block.conv2.out_channels
        return out
