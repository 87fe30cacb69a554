"""Image quality metrics and cost counting for the vision tasks, with the conventions of the SR literature.

- Y channel: MATLAB `rgb2ycbcr` (ITU-R BT.601, studio swing): Y = 16 + (65.481 R + 128.553 G + 24.966 B)
  for RGB in [0, 1], so Y lies in [16, 235] on the 0-255 scale.
- PSNR: 10 log10(255^2 / MSE) on images rounded to uint8 (as the saved outputs of every SR paper's code),
  after cropping `border` pixels on each side (the scale factor, by convention).
- SSIM: Wang et al. 2004 with an 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255, mean
  over the valid region of the filtered map (the BasicSR / KAIR implementation), on one channel.
- MACs: multiply-accumulates of every Conv2d and Linear for one forward pass of a given input, counted from
  the layers' real output shapes by forward hooks. NTIRE's efficient-SR reports call these "FLOPs".
- Activations: elements of every Conv2d / ConvTranspose2d output in one forward pass, NTIRE's "#Acts".
- Sample grids: generated images in [-1, 1] as one PNG for the record.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import DataMissing

_Y_WEIGHTS = (65.481, 128.553, 24.966)


def load_rgb(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataMissing(f"image {path} is missing", "check paths.data_root (see ../shared/ASSETS.md)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataMissing(f"image {path} cannot be read ({e})", "restore the file from its source") from None


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr's Y of an RGB image on the 0-255 scale, as float64 (not rounded)."""
    x = img.astype(np.float64) / 255.0
    return 16.0 + x[..., 0] * _Y_WEIGHTS[0] + x[..., 1] * _Y_WEIGHTS[1] + x[..., 2] * _Y_WEIGHTS[2]


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border] if border > 0 else img


def psnr(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """PSNR in dB between two images on the 0-255 scale (any channel count); inf for identical images."""
    if a.shape != b.shape:
        raise ValueError(f"psnr of images of different shapes {a.shape} and {b.shape}")
    diff = crop_border(a.astype(np.float64), border) - crop_border(b.astype(np.float64), border)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]


def ssim(a: np.ndarray, b: np.ndarray, border: int = 0) -> float:
    """SSIM of two single-channel images on the 0-255 scale (mean over the valid filtered region)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"ssim needs two single-channel images of one shape, got {a.shape} and {b.shape}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x = torch.from_numpy(crop_border(a.astype(np.float64), border))[None, None]
    y = torch.from_numpy(crop_border(b.astype(np.float64), border))[None, None]
    w = _gaussian_window()
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx**2 + my**2 + c1) * (sxx + syy + c2)
    return float((num / den).mean())


def _forward_with_hooks(module: nn.Module, example: torch.Tensor, hooks: dict[type, object]) -> None:
    """One forward pass of `example` with `hooks[cls]` as forward hook on every submodule that is a `cls`
    (the first matching class wins); the hooks are removed afterwards."""
    handles = []
    for m in module.modules():
        hook = next((h for cls, h in hooks.items() if isinstance(m, cls)), None)
        if hook is not None:
            handles.append(m.register_forward_hook(hook))
    try:
        module(example)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers in one forward pass of `example`."""
    total = 0

    def conv_hook(m: nn.Conv2d, _args, out):
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _args, out):
        nonlocal total
        total += out.numel() * m.in_features

    _forward_with_hooks(module, example, {nn.Conv2d: conv_hook, nn.Linear: linear_hook})
    return total


@torch.no_grad()
def count_conv_activations(module: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(activations, conv calls) of one forward pass of `example`: activations are the elements of every
    Conv2d / ConvTranspose2d output, the NTIRE efficient-SR challenges' "#Acts" (Radosavovic et al.'s
    activation count, as NTIRE2022_ESR utils/model_summary.py `get_model_activation` defines it: Linear
    outputs are not counted); conv calls are how many such outputs were counted (its "#Conv")."""
    elements = calls = 0

    def conv_hook(_m, _args, out):
        nonlocal elements, calls
        elements += out.numel()
        calls += 1

    _forward_with_hooks(module, example, {nn.Conv2d: conv_hook, nn.ConvTranspose2d: conv_hook})
    return elements, calls


def save_grid(images: torch.Tensor, path: Path, cols: int = 16, upscale: int = 4) -> Path:
    """A PNG grid of images in [-1, 1] (first rows x cols samples), nearest-upscaled for viewing."""
    from PIL import Image

    n = min(images.shape[0], cols * cols)
    rows = math.ceil(n / cols)
    side = images.shape[-1]
    grid = np.ones((rows * (side + 1) + 1, cols * (side + 1) + 1), dtype=np.uint8) * 128
    arr = ((images[:n, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        grid[1 + r * (side + 1):1 + r * (side + 1) + side, 1 + c * (side + 1):1 + c * (side + 1) + side] = arr[i]
    img = Image.fromarray(grid).resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
