"""Efficient x4 super-resolution networks in plain torch, loading the published checkpoints strictly.

Five architectures from the NTIRE efficient-SR line and DITN, each ported from its reference code (module and
attribute names follow the reference so the published state_dicts load with strict=True):

- RLFN, RLFN-S: Kong et al., "Residual Local Feature Network for Efficient Super-Resolution", CVPRW 2022
  (bytedance/RLFN model/rlfn.py, model/rlfn_s.py, model/block.py).
- RLFN_ntire: the same authors' NTIRE 2022 ESR challenge entry, a channel-pruned 4-block RLFN
  (bytedance/RLFN model/rlfn_ntire.py, class RLFN_Prune).
- IMDN: Hui et al., "Lightweight Image Super-Resolution with Information Multi-distillation Network",
  ACM MM 2019, in the simplified AIM 2019 form used as the NTIRE 2022 ESR baseline
  (ofsoundof/NTIRE2022_ESR models/imdn_baseline.py, models/basicblock.py IMDBlock).
- RFDN: Liu et al., "Residual Feature Distillation Network for Lightweight Image Super-Resolution",
  ECCVW 2020 (ofsoundof/NTIRE2022_ESR models/rfdn_baseline/{RFDN,block}.py).
- DITN: Liu et al., "Unfolding Once is Enough: A Deployment-Friendly Transformer Unit for Super-Resolution",
  ACM MM 2023 (yongliuy/DITN models/DITN_Real.py). No DITN weights are offline: it is for users who have them
  (put them at its checkpoint path under the data root); input range [0, 1] as the reference's test script.

Every model maps (N, 3, h, w) in its own input range (`SRArch.input_range`: 255 or 1) to (N, 3, 4h, 4w) in
the same range. Nothing is rescaled or clamped inside: the caller owns ranges and rounding.

Activations are never in-place (the references use inplace=True): an in-place activation would overwrite
a conv's output after a forward hook captured it, which calibration-based compression methods rely on.
The result is numerically identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ArtifactCorrupt, DataMissing, unknown_choice

_LRELU_SLOPE = 0.05  # every network here uses LeakyReLU(0.05)


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    """A biased conv with 'same' padding for odd k (the references' `conv_layer`)."""
    return nn.Conv2d(cin, cout, k, padding=(k - 1) // 2)


def _upsampler(cin: int, cout: int, scale: int) -> nn.Sequential:
    """3x3 conv to cout * scale^2 channels then pixel shuffle; a Sequential so keys read upsampler.0.*."""
    return nn.Sequential(_conv(cin, cout * scale**2, 3), nn.PixelShuffle(scale))


# --- RLFN family ------------------------------------------------------------------------------------


class _RLFNAttention(nn.Module):
    """RLFN's trimmed Enhanced Spatial Attention (ESA, from RFANet): RFDN's ESA without `conv_max`,
    `conv3_` and their ReLUs (bytedance/RLFN model/block.py ESA)."""

    def __init__(self, esa_channels: int, n_feats: int):
        super().__init__()
        f = esa_channels
        self.conv1 = nn.Conv2d(n_feats, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2)  # no padding: (h-3)//2+1, then a 7/3 max-pool
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv1(x)
        # The pooled map needs conv2's output >= 7, i.e. an input of at least 15 x 15 pixels.
        c3 = self.conv3(F.max_pool2d(self.conv2(c1), kernel_size=7, stride=3))
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(c3 + self.conv_f(c1)))


class RLFB(nn.Module):
    """Residual Local Feature Block: three 3x3 conv + LReLU with a local skip, then 1x1 conv and ESA."""

    def __init__(self, channels: int, mid_channels: int | None = None, esa_channels: int = 16):
        super().__init__()
        mid = mid_channels or channels
        self.c1_r = _conv(channels, mid, 3)
        self.c2_r = _conv(mid, mid, 3)
        self.c3_r = _conv(mid, channels, 3)
        self.c5 = _conv(channels, channels, 1)
        self.esa = _RLFNAttention(esa_channels, channels)
        self.act = nn.LeakyReLU(_LRELU_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.c1_r(x))
        out = self.act(self.c2_r(out))
        out = self.act(self.c3_r(out))
        return self.esa(self.c5(out + x))


class RLFN(nn.Module):
    """RLFN (Kong et al., CVPRW 2022; bytedance/RLFN model/rlfn.py): 52 channels, 6 RLFBs, ESA width 16.

    Blocks are attributes block_1..block_n (the checkpoint's key names), run in sequence; a global skip
    from the first conv goes around them and conv_2.
    """

    def __init__(self, feature_channels: int = 52, mid_channels: int | None = None, n_blocks: int = 6,
                 esa_channels: int = 16, in_channels: int = 3, out_channels: int = 3, upscale: int = 4):
        super().__init__()
        self.n_blocks = n_blocks
        self.conv_1 = _conv(in_channels, feature_channels, 3)
        for i in range(1, n_blocks + 1):
            self.add_module(f"block_{i}", RLFB(feature_channels, mid_channels, esa_channels))
        self.conv_2 = _conv(feature_channels, feature_channels, 3)
        self.upsampler = _upsampler(feature_channels, out_channels, upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_1(x)
        out = feat
        for i in range(1, self.n_blocks + 1):
            out = getattr(self, f"block_{i}")(out)
        return self.upsampler(self.conv_2(out) + feat)


class RLFNS(RLFN):
    """RLFN-S (Kong et al., CVPRW 2022; bytedance/RLFN model/rlfn_s.py): RLFN at 48 channels."""

    def __init__(self, **kw):
        super().__init__(**{"feature_channels": 48, **kw})


class RLFNNtire(RLFN):
    """RLFN's NTIRE 2022 ESR entry (bytedance/RLFN model/rlfn_ntire.py, RLFN_Prune): 46 outer channels,
    48 inside each block, 4 blocks."""

    def __init__(self, **kw):
        super().__init__(**{"feature_channels": 46, "mid_channels": 48, "n_blocks": 4, **kw})


# --- IMDN (AIM 2019 / NTIRE 2022 baseline) ----------------------------------------------------------


def _conv_lrelu(cin: int, cout: int) -> nn.Sequential:
    """KAIR's conv(mode='CL'): a Sequential, so its conv is stored as <name>.0.*."""
    return nn.Sequential(_conv(cin, cout, 3), nn.LeakyReLU(_LRELU_SLOPE))


class IMDBlock(nn.Module):
    """Simplified information multi-distillation block (NTIRE2022_ESR models/basicblock.py IMDBlock):
    each stage splits off a quarter of the channels (distilled) and refines the rest; a 1x1 conv fuses the
    four distilled parts, plus a block skip. The last refine conv and the 1x1 fuse have no activation."""

    def __init__(self, channels: int = 64, d_rate: float = 0.25):
        super().__init__()
        self.d_nc = int(channels * d_rate)
        self.r_nc = channels - self.d_nc
        self.conv1 = _conv_lrelu(channels, channels)
        self.conv2 = _conv_lrelu(self.r_nc, channels)
        self.conv3 = _conv_lrelu(self.r_nc, channels)
        self.conv4 = _conv(self.r_nc, self.d_nc, 3)
        self.conv1x1 = _conv(self.d_nc * 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = (self.d_nc, self.r_nc)
        d1, r1 = torch.split(self.conv1(x), split, dim=1)
        d2, r2 = torch.split(self.conv2(r1), split, dim=1)
        d3, r3 = torch.split(self.conv3(r2), split, dim=1)
        return x + self.conv1x1(torch.cat((d1, d2, d3, self.conv4(r3)), dim=1))


class _Shortcut(nn.Module):
    """x + sub(x); the attribute name `sub` gives the checkpoint's model.1.sub.N keys."""

    def __init__(self, sub: nn.Module):
        super().__init__()
        self.sub = sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sub(x)


class IMDN(nn.Module):
    """IMDN as the NTIRE 2022 ESR baseline (Hui et al., ACM MM 2019, AIM 2019 variant;
    ofsoundof/NTIRE2022_ESR models/imdn_baseline.py): nc=64, 8 IMDBlocks, LeakyReLU 0.05, input in [0, 1].

    One flat Sequential as in KAIR: model.0 head conv, model.1 the skip around blocks + conv
    (model.1.sub.0..7 blocks, model.1.sub.8 conv), model.2 upsampling conv, model.3 pixel shuffle.
    """

    def __init__(self, nc: int = 64, nb: int = 8, in_nc: int = 3, out_nc: int = 3, upscale: int = 4):
        super().__init__()
        body = [IMDBlock(nc) for _ in range(nb)] + [_conv(nc, nc, 3)]
        self.model = nn.Sequential(_conv(in_nc, nc, 3), _Shortcut(nn.Sequential(*body)),
                                   *_upsampler(nc, out_nc, upscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# --- RFDN -------------------------------------------------------------------------------------------


class _RFDNAttention(nn.Module):
    """RFDN's full ESA (NTIRE2022_ESR models/rfdn_baseline/block.py ESA), width n_feats // 4: strided conv,
    7/3 max-pool, conv_max + ReLU, conv3 + ReLU, conv3_, bilinear back up, fused with a 1x1 branch."""

    def __init__(self, n_feats: int):
        super().__init__()
        f = n_feats // 4
        self.conv1 = nn.Conv2d(n_feats, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv_max = nn.Conv2d(f, f, 3, padding=1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2)  # no padding, as the reference (input >= 15 x 15)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv3_ = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, n_feats, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv1(x)
        v = F.max_pool2d(self.conv2(c1), kernel_size=7, stride=3)
        c3 = self.conv3_(F.relu(self.conv3(F.relu(self.conv_max(v)))))
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        return x * torch.sigmoid(self.conv4(c3 + self.conv_f(c1)))


class RFDB(nn.Module):
    """Residual feature distillation block: three stages of (1x1 distill conv, 3x3 conv with shallow
    residual), a last 3x3 conv, concat of the four half-width parts, 1x1 fuse, ESA."""

    def __init__(self, channels: int = 50):
        super().__init__()
        dc = channels // 2
        self.c1_d, self.c1_r = _conv(channels, dc, 1), _conv(channels, channels, 3)
        self.c2_d, self.c2_r = _conv(channels, dc, 1), _conv(channels, channels, 3)
        self.c3_d, self.c3_r = _conv(channels, dc, 1), _conv(channels, channels, 3)
        self.c4 = _conv(channels, dc, 3)
        self.act = nn.LeakyReLU(_LRELU_SLOPE)
        self.c5 = _conv(dc * 4, channels, 1)
        self.esa = _RFDNAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d1, r1 = self.act(self.c1_d(x)), self.act(self.c1_r(x) + x)
        d2, r2 = self.act(self.c2_d(r1)), self.act(self.c2_r(r1) + r1)
        d3, r3 = self.act(self.c3_d(r2)), self.act(self.c3_r(r2) + r2)
        d4 = self.act(self.c4(r3))
        return self.esa(self.c5(torch.cat([d1, d2, d3, d4], dim=1)))


class RFDN(nn.Module):
    """RFDN (Liu et al., ECCVW 2020, AIM 2020 ESR winner; NTIRE2022_ESR models/rfdn_baseline/RFDN.py):
    nf=50, 4 RFDBs whose outputs are all concatenated and fused (c = 1x1 conv + LReLU), global skip."""

    def __init__(self, nf: int = 50, num_modules: int = 4, in_nc: int = 3, out_nc: int = 3, upscale: int = 4):
        super().__init__()
        self.num_modules = num_modules
        self.fea_conv = _conv(in_nc, nf, 3)
        for i in range(1, num_modules + 1):
            self.add_module(f"B{i}", RFDB(nf))
        self.c = nn.Sequential(_conv(nf * num_modules, nf, 1), nn.LeakyReLU(_LRELU_SLOPE))
        self.LR_conv = _conv(nf, nf, 3)
        self.upsampler = _upsampler(nf, out_nc, upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.fea_conv(x)
        outs, out = [], feat
        for i in range(1, self.num_modules + 1):
            out = getattr(self, f"B{i}")(out)
            outs.append(out)
        return self.upsampler(self.LR_conv(self.c(torch.cat(outs, dim=1))) + feat)


# --- DITN ------------------------------------------------------------------------------------------


class _GatedFFN(nn.Module):
    """DITN's feed-forward: 1x1 conv to 2 x hidden, depthwise 3x3, GELU(first half) x second half, 1x1 conv."""

    def __init__(self, dim: int, expansion: float, bias: bool):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class _ISA(nn.Module):
    """Inception-free self-attention of DITN's ITL (reference `ISA`): q, k, v from one Linear over the pixels of
    a patch, attention between channels (C x C, cosine similarity times a learned temperature)."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(1, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = (t.transpose(-1, -2) for t in self.qkv(x.reshape(b, c, -1).transpose(-1, -2)).chunk(3, dim=-1))
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        return self.project_out((attn.softmax(dim=-1) @ v).reshape(b, c, h, w))


class _SDA(nn.Module):
    """Spatial-dilated attention of DITN's SAL (reference `SDA`): a 1x1 split into gate and value, the gate
    through depthwise 5x5 and dilated depthwise 7x7 (dilation 3) and a 1x1, a learned per-channel output scale
    (initialised to 0 in the reference)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.DConvs = nn.Sequential(nn.Conv2d(dim, dim, 5, 1, 2, groups=dim),
                                    nn.Conv2d(dim, dim, 7, 1, 9, groups=dim, dilation=3), nn.Conv2d(dim, dim, 1))
        self.proj_first = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1))
        self.proj_last = nn.Sequential(nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, x = torch.chunk(self.proj_first(x), 2, dim=1)
        return self.proj_last(x * self.DConvs(a)) * self.scale


class _ITL(nn.Module):
    """Inception transformer layer: x + ISA(conv1(tanh x)), then x + FFN(conv2(tanh x))."""

    def __init__(self, dim: int, expansion: float, bias: bool):
        super().__init__()
        self.attn = _ISA(dim, bias)
        self.act = nn.Tanh()
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.ffn = _GatedFFN(dim, expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.conv1(self.act(x)))
        return x + self.ffn(self.conv2(self.act(x)))


class _SAL(nn.Module):
    """Spatial attention layer: as ITL with SDA in place of ISA (reference `SAL`)."""

    def __init__(self, dim: int, expansion: float, bias: bool):
        super().__init__()
        self.SDA = _SDA(dim)
        self.ffn = _GatedFFN(dim, expansion, bias)
        self.act = nn.Tanh()
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.SDA(self.conv1(self.act(x)))
        return x + self.ffn(self.conv2(self.act(x)))


class _UFONE(nn.Module):
    """Unfolding-once block: the ITLs run on non-overlapping patch_size x patch_size patches (folded into the
    batch once), then the SALs on the whole feature map."""

    def __init__(self, dim: int, expansion: float, bias: bool, itl_blocks: int, sal_blocks: int, patch_size: int):
        super().__init__()
        self.ITLs = nn.Sequential(*[_ITL(dim, expansion, bias) for _ in range(itl_blocks)])
        self.SALs = nn.Sequential(*[_SAL(dim, expansion, bias) for _ in range(sal_blocks)])
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)
        patches = self.ITLs(patches).reshape(b, h // p, w // p, c, p, p)
        return self.SALs(patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w))


class DITN(nn.Module):
    """DITN (Liu et al., "Unfolding Once is Enough: A Deployment-Friendly Transformer Unit for Super-Resolution",
    ACM MM 2023; yongliuy/DITN models/DITN_Real.py, the reference's only model file): a 3x3 conv to 60 channels,
    one UFONE (4 ITL on 8 x 8 patches, 4 SAL), a 3x3 conv, a global skip and a one-step pixel-shuffle upsampler.
    The input is reflect-padded to a multiple of the patch size and the output cropped back, as the reference.
    The reference's LayerNorm classes are never called by the network and hold no checkpoint keys: not ported."""

    def __init__(self, in_channels: int = 3, dim: int = 60, itl_blocks: int = 4, sal_blocks: int = 4,
                 ufone_blocks: int = 1, ffn_expansion: float = 2, bias: bool = False, patch_size: int = 8,
                 upscale: int = 4):
        super().__init__()
        self.patch_size, self.scale = patch_size, upscale
        self.sft = nn.Conv2d(in_channels, dim, 3, 1, 1)
        self.UFONE = nn.Sequential(*[_UFONE(dim, ffn_expansion, bias, itl_blocks, sal_blocks, patch_size)
                                     for _ in range(ufone_blocks)])
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1)
        self.upsample = _upsampler(dim, 3, upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        p = self.patch_size
        x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p), "reflect")
        sft = self.sft(x)
        out = self.upsample(self.conv_after_body(self.UFONE(sft)) + sft)
        return out[:, :, : h * self.scale, : w * self.scale]


# --- registry ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SRArch:
    """One published x4 SR model: how to build it, where its checkpoint lives under the data root, and the
    pixel range its input and output are in."""

    name: str
    builder: Callable[[], nn.Module]
    checkpoint: str  # relative to the data root
    input_range: float  # 255.0 or 1.0
    scale: int
    reference: str
    min_lr_size: int = 1  # smallest LR height/width the network accepts (ESA's strided conv + 7/3 max-pool)


_RLFN_REF = "Kong et al., Residual Local Feature Network for Efficient SR, CVPRW 2022; bytedance/RLFN"
_ESA_MIN = 15

SR_ARCHS: dict[str, SRArch] = {
    "rlfn": SRArch("rlfn", RLFN, "sr_checkpoints/rlfn_bytedance/rlfn_x4.pth", 255.0, 4,
                   f"{_RLFN_REF} model/rlfn.py", _ESA_MIN),
    "rlfn_s": SRArch("rlfn_s", RLFNS, "sr_checkpoints/rlfn_bytedance/rlfn_s_x4.pth", 255.0, 4,
                     f"{_RLFN_REF} model/rlfn_s.py", _ESA_MIN),
    "rlfn_ntire": SRArch("rlfn_ntire", RLFNNtire, "sr_checkpoints/rlfn_bytedance/rlfn_ntire_x4.pth", 255.0, 4,
                         f"NTIRE 2022 ESR entry of {_RLFN_REF} model/rlfn_ntire.py (RLFN_Prune)", _ESA_MIN),
    "imdn": SRArch("imdn", IMDN, "sr_checkpoints/ntire2022_esr_model_zoo/imdn_baseline.pth", 1.0, 4,
                   "Hui et al., IMDN, ACM MM 2019 (AIM 2019 variant); ofsoundof/NTIRE2022_ESR models/imdn_baseline.py"),
    "rfdn": SRArch("rfdn", RFDN, "sr_checkpoints/ntire2022_esr_model_zoo/rfdn_baseline.pth", 255.0, 4,
                   "Liu et al., RFDN, ECCVW 2020; ofsoundof/NTIRE2022_ESR models/rfdn_baseline/RFDN.py", _ESA_MIN),
    # For users who have DITN weights: none are offline, so its checkpoint is usually missing (DataMissing).
    "ditn": SRArch("ditn", DITN, "sr_checkpoints/ditn/ditn_x4.pth", 1.0, 4,
                   "Liu et al., Unfolding Once is Enough (DITN), ACM MM 2023; yongliuy/DITN models/DITN_Real.py",
                   8),  # reflect padding to a multiple of 8 needs at least 8 x 8 pixels
}


def load_sr(name: str, data_root: Path) -> nn.Module:
    """Build SR model `name`, load its checkpoint strictly (weights_only) from `data_root`, return it in eval."""
    if name not in SR_ARCHS:
        raise unknown_choice("SR model", name, list(SR_ARCHS))
    arch = SR_ARCHS[name]
    path = Path(data_root) / arch.checkpoint
    if not path.is_file():
        raise DataMissing(f"SR checkpoint '{arch.checkpoint}' not found under {data_root}",
                          "put it there (see sr_checkpoints/SOURCE.md) or set paths.data_root=... / BENCH_DATA_ROOT")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, pickle with non-tensor objects, ...
        raise ArtifactCorrupt(f"SR checkpoint {path} cannot be read ({type(e).__name__})",
                              "restore it from its source (sr_checkpoints/SOURCE.md lists the sha256)") from e
    if isinstance(state, dict) and isinstance(state.get("params"), dict):
        state = state["params"]  # BasicSR-trained checkpoints (DITN's) wrap the state_dict as {"params": ...}
    model = arch.builder()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        # torch lists the offending keys over several lines; fold them into one (shortened) line.
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise ArtifactCorrupt(f"SR checkpoint {path} does not match the {name} architecture: {detail}",
                              "restore it from its source (sr_checkpoints/SOURCE.md lists the sha256)") from e
    return model.eval()
