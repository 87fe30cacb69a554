"""Calibration data: a named, seeded component shared by every method of a comparison.

`calib=wikitext2_valid` (default offline): random windows of the WikiText-2 *validation* text (the train
split is not available offline; the test split is never used for calibration). Online users can pick the
hub's WikiText-2 train split or C4. Sampling follows GPTQ: `n_samples` windows of `seqlen` tokens at
uniformly random offsets from a seeded RNG. The set's identity (name, split, n, seqlen, seed, token hash)
goes into every record and into the compressed-model cache key.

Image models calibrate on `source: image_patches`: `n_samples` low-resolution patches, each a seeded random
(patch x scale)-pixel crop of an image under `images` (a folder relative to the data root, or a glob of
folders) downscaled by `scale` with Pillow's bicubic filter, as (n, 3, patch, patch) floats on the 0-255
scale. The offline set for SR models is the ImageNet sample, which no SR test set overlaps; for ImageNet
classifiers it is the other way round (`sr_hr_224`: 224-pixel crops of the Set5/Set14 HR images).

Diffusion models calibrate on `source: gaussian_noise`: `n_samples` seeded initial noises x_T of
(channels, patch, patch); a method runs the uncompressed model's sampler from them and calibrates on the
(x_t, t) it meets (data-free and spanning every timestep, as Q-Diffusion does).
"""

from __future__ import annotations

import glob
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import data
from bench.errors import BenchError, ConfigError

HELDOUT_TRIES = 100  # draws per wanted held-out sample before a small source gives up on it


@dataclass
class CalibSpec:
    name: str
    source: str = "wikitext2"  # "wikitext2" | "hub" (any datasets id) | "image_patches" | "gaussian_noise"
    split: str = "validation"
    hub_path: str | None = None
    hub_name: str | None = None
    text_field: str = "text"
    images: str | None = None  # image folder under the data root, or a glob of folders (image_patches)
    patch: int = 64  # LR patch side (image_patches)
    scale: int = 4  # HR crop = patch x scale, downscaled by it (image_patches)
    channels: int = 1  # of the noise images (gaussian_noise; their side is `patch`)
    seed: int = 0
    description: str = ""

    def __post_init__(self):
        if self.source not in ("wikitext2", "hub", "image_patches", "gaussian_noise"):
            raise ConfigError(f"calib.source='{self.source}' is unknown",
                              "use 'wikitext2', 'hub', 'image_patches' or 'gaussian_noise'")
        if self.source == "image_patches" and not self.images:
            raise ConfigError(f"calib '{self.name}' has source=image_patches but no images folder", "set calib.images")
        if self.source == "wikitext2" and self.split == "test":
            raise ConfigError("calib.split=test would calibrate on the evaluation text",
                              "use split=validation (offline) or split=train (online)")
        if self.source == "hub" and not self.hub_path:
            raise ConfigError(f"calib '{self.name}' has source=hub but no hub_path", "set calib.hub_path")


@dataclass
class CalibSet:
    spec: CalibSpec
    windows: torch.Tensor  # (n_samples, seqlen) token ids, or (n_samples, 3, patch, patch) LR images
    sha256: str  # of `windows`, the training samples (what keys the artifact cache)
    heldout: torch.Tensor | None = None  # held-out samples of the same source, disjoint from `windows` (validation)

    @property
    def describe(self) -> str:
        """The training samples (a training record states how many held-out samples its validation used)."""
        if self.spec.source == "gaussian_noise":
            n, c, h, w = self.windows.shape
            return f"{self.spec.name} {n}x{c}x{h}x{w} N(0,1) seed={self.spec.seed}"
        if self.spec.source == "image_patches":
            n, _, h, w = self.windows.shape
            return f"{self.spec.name}[{self.spec.images}] {n}x{h}x{w} x1/{self.spec.scale} seed={self.spec.seed}"
        n, s = self.windows.shape
        return f"{self.spec.name}[{self.spec.split}] {n}x{s} seed={self.spec.seed}"


def load(spec: CalibSpec, tokenizer, n_samples: int, seqlen: int, data_root: str | None = None,
         heldout: int = 0) -> CalibSet:
    """`n_samples` training samples, then `heldout` held-out ones drawn by the same seeded generator after them (so
    the training samples are those drawn without any held-out ones) and disjoint from them: text windows and image
    crops that overlap a training one are redrawn (a source too small to yield them all gives fewer, possibly none);
    noises are distinct draws. Training never sees the held-out samples; the test split is never either."""
    if n_samples <= 0 or seqlen <= 0:
        raise ConfigError(f"calibration needs n_samples>0 and seqlen>0 (got {n_samples}, {seqlen})",
                          "set budget.calib_samples and budget.calib_seqlen to positive values")
    if heldout < 0:
        raise ConfigError(f"{heldout} held-out calibration samples is negative", "set budget.val_samples>=0")
    if spec.source == "image_patches":
        return _image_patches(spec, n_samples, data_root, heldout)
    if spec.source == "gaussian_noise":
        g = torch.Generator().manual_seed(spec.seed)
        noise = torch.randn((n_samples, spec.channels, spec.patch, spec.patch), generator=g)
        held = torch.randn((heldout, spec.channels, spec.patch, spec.patch), generator=g) if heldout else None
        return CalibSet(spec, noise, hashlib.sha256(noise.numpy().tobytes()).hexdigest(), held)
    if tokenizer is None:
        raise ConfigError(f"calib={spec.name} is text and this model has no tokenizer",
                          "image models calibrate on images: calib=imagenet_sample_lr")
    if spec.source == "wikitext2":
        rows = data.wikitext2_rows(spec.split, data_root)
        text = "\n\n".join(rows)
    else:
        rows = data.hub_rows(spec.hub_path, spec.hub_name, spec.split, spec.text_field)
        text = "\n\n".join(rows)
    ids = data.token_ids(tokenizer, text)[0]
    if ids.numel() <= seqlen:
        raise BenchError(f"calibration set '{spec.name}' has {ids.numel()} tokens, fewer than seqlen={seqlen}",
                         "use a larger split or a smaller budget.calib_seqlen")
    rng = random.Random(spec.seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n_samples)]
    windows = torch.stack([ids[s:s + seqlen] for s in starts])
    sha = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    held = []
    for _ in range(HELDOUT_TRIES * heldout):  # bounded: a small source may hold fewer disjoint windows
        if len(held) == heldout:
            break
        s = rng.randint(0, ids.numel() - seqlen - 1)
        if all(abs(s - t) >= seqlen for t in starts + held):
            held.append(s)
    return CalibSet(spec, windows, sha, torch.stack([ids[s:s + seqlen] for s in held]) if held else None)


def _image_patches(spec: CalibSpec, n_samples: int, data_root: str | None, heldout: int = 0) -> CalibSet:
    from PIL import Image

    root = data.data_root(data_root)
    pattern = Path(glob.escape(str(root))) / spec.images if root else None  # relative to the root unless absolute
    folders = sorted(Path(d) for d in glob.glob(str(pattern)) if Path(d).is_dir()) if pattern else []
    files = sorted(p for d in folders for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise data.missing(spec.images, data_root)
    rng = random.Random(spec.seed)
    hr = spec.patch * spec.scale
    patches, boxes, held, tries = [], [], [], 0
    while len(patches) < n_samples or (len(held) < heldout and tries < HELDOUT_TRIES * heldout):
        training = len(patches) < n_samples
        tries += not training
        f = rng.choice(files)
        with Image.open(f) as im:
            im = im.convert("RGB")
            if im.width < hr or im.height < hr:
                continue
            x, y = rng.randint(0, im.width - hr), rng.randint(0, im.height - hr)
            if not training and any(g == f and abs(x - bx) < hr and abs(y - by) < hr for g, bx, by in boxes):
                continue  # a held-out crop shares no pixel with a training crop
            lr = im.crop((x, y, x + hr, y + hr)).resize((spec.patch, spec.patch), Image.BICUBIC)
            crop = torch.from_numpy(np.asarray(lr, dtype=np.uint8).copy()).permute(2, 0, 1)
            if training:
                patches.append(crop)
                boxes.append((f, x, y))
            else:
                held.append(crop)
    images = torch.stack(patches).to(torch.float32)
    sha = hashlib.sha256(images.to(torch.uint8).numpy().tobytes()).hexdigest()
    return CalibSet(spec, images, sha, torch.stack(held).to(torch.float32) if held else None)
