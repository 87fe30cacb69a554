"""Image classifiers from transformers (`source: hf_image`): `AutoModelForImageClassification` + its
`AutoImageProcessor`, from a hub id or a local directory, without torchvision (the processors' Pillow backend).

The suite's image-classifier contract is kept: the module takes RGB on the 0-255 scale (N, 3, H, W) and returns
ImageNet logits in the sorted-wnid class order. So `HFImageClassifier` wraps the transformers model with the
processor's own rescale and normalisation (mean/std), and the geometric part of the processor (resize, centre
crop, resampling filter) becomes the model's `preprocess` facts that `task=imagenet*` applies with Pillow:
- `size={"height": h, "width": w}` (ViT/DeiT): a plain resize to h x w (aspect not kept), then `crop_size`.
- `size={"shortest_edge": s}` (MobileNetV2, ...): the shorter side to s, the longer int(s x long / short), then
  `crop_size`.
- ConvNeXt-style processors (`crop_pct`, used by microsoft/resnet-50): below 384 the shorter side to
  int(s / crop_pct), then an s x s crop; from 384 a plain s x s resize.
Centre-crop offsets are floor((size - crop) / 2), as transformers computes them.

Class order: a 1000-label head is ImageNet-1k in the standard order (transformers' ImageNet checkpoints list it so);
a 1001-label head whose label 0 is "background" (TF-slim checkpoints, google/mobilenet_v2_*) has that logit
dropped. Any other head is kept as it is and the model is not an ImageNet-1k classifier (`classes` says so).
"""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import NotApplicable

_PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFImageClassifier(nn.Module):
    """0-255 RGB in, logits out: the processor's rescale and normalisation, then the transformers model."""

    def __init__(self, net: nn.Module, mean, std, rescale: float, label_offset: int):
        super().__init__()
        self.net = net
        self.label_offset = label_offset
        # not persistent: constants of the preprocessing, not weights (kept out of artifacts and their fp16 rounding)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.rescale = rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(pixel_values=(x * self.rescale - self.mean) / self.std).logits
        return logits[:, self.label_offset:]


def _field(obj, key):
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def processor_facts(proc) -> tuple[dict, dict]:
    """(preprocess geometry for the task, normalisation for the module) of a transformers image processor."""
    name = type(proc).__name__
    size, crop_size = _field(proc, "size"), _field(proc, "crop_size")
    shortest, height, width = _field(size, "shortest_edge"), _field(size, "height"), _field(size, "width")
    do_crop = bool(_field(proc, "do_center_crop")) and crop_size is not None
    crop = _field(crop_size, "height") if do_crop else None
    if do_crop and _field(crop_size, "width") != crop:
        raise NotApplicable(f"image processor {name} crops to a non-square {crop_size}",
                            "only square crops are mirrored")
    if not _field(proc, "do_resize"):
        raise NotApplicable(f"image processor {name} does not resize", "use a processor with do_resize=true")
    crop_pct = _field(proc, "crop_pct")
    if name.startswith("ConvNext") and shortest:  # ConvNeXt's own resize (transformers' ConvNextImageProcessor)
        if shortest < 384:
            geometry = {"resize": int(shortest / crop_pct), "crop": shortest, "resize_mode": "shorter_side"}
        else:
            geometry = {"resize": shortest, "crop": shortest, "resize_mode": "square"}
    elif crop_pct is not None:
        raise NotApplicable(f"image processor {name} resizes by crop_pct in its own way",
                            "only the standard resize/crop and ConvNeXt's crop_pct are mirrored")
    elif shortest:
        if crop is None:
            raise NotApplicable(f"image processor {name} resizes the shorter side without a centre crop",
                                "the evaluation needs square images: use a processor with do_center_crop")
        geometry = {"resize": shortest, "crop": crop, "resize_mode": "shorter_side"}
    elif height and width:
        if height != width:
            raise NotApplicable(f"image processor {name} resizes to a non-square {height}x{width}",
                                "only square resizes are mirrored")
        geometry = {"resize": height, "crop": crop or height, "resize_mode": "square"}
    else:
        raise NotApplicable(f"image processor {name} has no usable size ({size})", "set size in its config")
    resample = _field(proc, "resample")
    geometry["interpolation"] = _PIL_FILTERS.get(int(resample) if resample is not None else 2, "bilinear")
    geometry["crop_offset"] = "floor"
    normalize = bool(_field(proc, "do_normalize"))
    channels = 3
    norm = {"mean": [float(v) for v in proc.image_mean] if normalize else [0.0] * channels,
            "std": [float(v) for v in proc.image_std] if normalize else [1.0] * channels,
            "rescale": float(proc.rescale_factor) if _field(proc, "do_rescale") else 1.0}
    return geometry, norm


def imagenet_label_offset(config) -> int | None:
    """0 for a 1000-class ImageNet head, 1 for a 1001-class head with "background" first, else None."""
    n = int(config.num_labels)
    if n == 1000:
        return 0
    first = str((config.id2label or {}).get(0, "")).strip().lower()
    return 1 if n == 1001 and first == "background" else None


def load_hf_image(path: str, revision: str | None, dtype: torch.dtype) -> tuple[HFImageClassifier, dict]:
    """The wrapped classifier and its load facts (may raise OSError etc.; the caller turns those into one line)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "falling back to the Pil backend" notice: torchvision is never installed
    proc = AutoImageProcessor.from_pretrained(path, revision=revision)
    net = AutoModelForImageClassification.from_pretrained(path, revision=revision, dtype=dtype)
    net.eval()
    geometry, norm = processor_facts(proc)
    offset = imagenet_label_offset(net.config)
    module = HFImageClassifier(net, norm["mean"], norm["std"], norm["rescale"], offset or 0)
    module.eval()
    image_size = getattr(net.config, "image_size", None)
    facts = {"architecture": net.config.model_type, "image_processor": type(proc).__name__.removesuffix("Pil"),
             "preprocess": geometry, "normalize": norm, "num_labels": int(net.config.num_labels),
             "classes": "imagenet1k" if offset is not None else f"{net.config.num_labels} labels (not ImageNet-1k)",
             "label_offset": offset or 0}
    if isinstance(image_size, int):
        facts["image_size"] = image_size
    return module, facts
