"""`imagenet` and `imagenet_sample500`: ImageNet-1k top-1 / top-5 accuracy of an image classifier.

Protocol: each image is decoded to RGB (Pillow), its shorter side resized to `resize` pixels (Pillow bilinear, the
longer side to int(long x resize / short)), centre-cropped to `crop` x `crop` (offset round((size - crop) / 2))
and passed on the 0-255 scale; the model normalises inside (its own input convention, e.g. x / 127.5 - 1).
`resize` / `crop` default to the model's standard preprocessing (`model.info["preprocess"]`), which may also name
another Pillow filter (`interpolation`), a plain square resize (`resize_mode: square`, aspect not kept) and
floor offsets (`crop_offset: floor`): a transformers model (`source: hf_image`) declares its image processor's
geometry this way and normalises with the processor's mean/std inside. Class indices are positions in the sorted
list of the 1000 WordNet ids (the Keras / torchvision order); a model whose head is not ImageNet-1k is refused.

Where the images come from (`layout`, paths relative to the data root or absolute):
- `labels_csv`: the images named by a CSV (`labels`, columns `file` and `class_index`, files relative to
  `root`), e.g. the offline 500-image sample (`task=imagenet_sample500`). Its split is unknown and it is
  much easier than ILSVRC2012 val, so its metric names say `sample500`: compare compressed variants on it,
  never with published val accuracies.
- `imagefolder`: `root/<wnid>/<image>` with all 1000 class folders (the usual prepared val tree).
- `ilsvrc_val`: the flat ILSVRC2012 val folder (`ILSVRC2012_val_00000001.JPEG`, ...) with the devkit
  (`labels` = the ILSVRC2012_devkit_t12 folder: data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt).
Metric names carry the set and the preprocessing, e.g. `imagenet_sample500.top1.r256c224` (`.firstN` with
`limit`; `sq256c224` for a square resize, `_bicubic` etc. for a filter other than bilinear). Per-image
correctness is kept for paired comparisons. Cost: multiply-accumulates of one `crop` x `crop` image
(`cost.macs.i224`) and parameters; the hardware workload is one seeded image.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import data, image
from bench.errors import ConfigError, DataMissing, NotApplicable
from bench.metrics import Metric
from bench.plugins import Task, Workload

LAYOUTS = ("labels_csv", "imagefolder", "ilsvrc_val")
_WNID = re.compile(r"n\d{8}")
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def resize_center_crop(path: Path, resize: int, crop: int, interpolation: str = "bilinear", square: bool = False,
                       floor_offset: bool = False) -> np.ndarray:
    """The evaluation view of one image: uint8 RGB (crop, crop, 3)."""
    from PIL import Image

    img = image.load_rgb(path)
    h, w = img.shape[:2]
    # the shorter side becomes `resize`, the longer one keeps the aspect ratio (truncated, as torchvision)
    size = (resize, resize) if square else (resize, int(h * resize / w)) if w <= h else (int(w * resize / h), resize)
    im = Image.fromarray(img).resize(size, getattr(Image.Resampling, interpolation.upper()))
    if min(im.size) < crop:
        raise ConfigError(f"task resize={resize} is smaller than crop={crop}", "use resize >= crop")
    if floor_offset:  # transformers' image processors
        left, top = (im.width - crop) // 2, (im.height - crop) // 2
    else:  # torchvision's
        left, top = round((im.width - crop) / 2), round((im.height - crop) / 2)
    return np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.uint8).copy()


@dataclass
class ImageNetClassification(Task):
    name: str = "imagenet_sample500"
    layout: str = "labels_csv"
    root: str = "imagenet_sample"  # image folder, under the data root unless absolute
    labels: str | None = "labels.csv"  # labels_csv: the CSV (under root); ilsvrc_val: the devkit folder
    metric_prefix: str = "imagenet_sample500"
    resize: int | None = None  # None: the model's own preprocessing
    crop: int | None = None
    batch_size: int = 25
    limit: int | None = None
    applies_to = ("image_classifier",)
    protocol_version = "imagenet-r-c-1"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ConfigError(f"task.layout='{self.layout}' is unknown", f"use one of: {', '.join(LAYOUTS)}")
        if self.layout != "imagefolder" and not self.labels:
            raise ConfigError(f"task.layout={self.layout} needs task.labels", "set the labels CSV or devkit folder")
        for key in ("resize", "crop", "limit", "batch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"task.{key}={value} must be positive", "or null for the default")

    def check_applicable(self, model) -> None:
        super().check_applicable(model)
        classes = model.info.get("classes", "imagenet1k")
        if classes != "imagenet1k":
            raise NotApplicable(f"task '{self.name}' needs an ImageNet-1k head; model '{model.spec.name}' has "
                                f"{classes}", "use an ImageNet classifier")

    def preprocessing(self, model) -> tuple[int, int]:
        std = model.info.get("preprocess", {})
        resize, crop = self.resize or std.get("resize"), self.crop or std.get("crop")
        if not (resize and crop):
            raise ConfigError(f"model '{model.spec.name}' declares no preprocessing", "set task.resize and task.crop")
        return resize, crop

    @staticmethod
    def view_options(model) -> dict:
        """The model's resampling filter, resize mode and crop offsets (defaults: bilinear, shorter side, round)."""
        std = model.info.get("preprocess", {})
        interpolation = std.get("interpolation", "bilinear")
        if interpolation not in _FILTERS:
            raise ConfigError(f"model '{model.spec.name}' asks for the unknown filter '{interpolation}'",
                              f"use one of: {', '.join(_FILTERS)}")
        return {"interpolation": interpolation, "square": std.get("resize_mode", "shorter_side") == "square",
                "floor_offset": std.get("crop_offset", "round") == "floor"}

    def view_tag(self, model) -> str:
        resize, crop = self.preprocessing(model)
        opts = self.view_options(model)
        filt = "" if opts["interpolation"] == "bilinear" else f"_{opts['interpolation']}"
        return f"{'sq' if opts['square'] else 'r'}{resize}c{crop}{filt}"

    def _dir(self, rel: str, data_root: str | None) -> Path:
        base = data.data_root(data_root)
        path = Path(rel) if Path(rel).is_absolute() or base is None else base / rel
        if not path.exists():
            raise data.missing(rel, data_root)
        return path

    def examples(self, data_root: str | None = None) -> list[tuple[Path, int]]:
        """(image path, class index) of the set, in a fixed order, first `limit` only."""
        root = self._dir(self.root, data_root)
        if self.layout == "labels_csv":
            with open(root / self.labels, newline="") as f:
                rows = [(root / r["file"], int(r["class_index"])) for r in csv.DictReader(f)]
        elif self.layout == "imagefolder":
            wnids = sorted(p.name for p in root.iterdir() if p.is_dir() and _WNID.fullmatch(p.name))
            if len(wnids) != 1000:
                raise DataMissing(f"{root} has {len(wnids)} ImageNet class folders, not 1000",
                                  "the class index is the sorted position of all 1000 wnids: restore the tree")
            rows = [(p, i) for i, w in enumerate(wnids) for p in sorted((root / w).iterdir())
                    if p.suffix.lower() in _IMAGE_SUFFIXES]
        else:
            rows = self._ilsvrc_val(root, self._dir(self.labels, data_root))
        if not rows:
            raise DataMissing(f"no images found for task {self.name} under {root}", "check task.root and the layout")
        return rows[: self.limit]

    @staticmethod
    def _ilsvrc_val(root: Path, devkit: Path) -> list[tuple[Path, int]]:
        from scipy.io import loadmat

        meta, truth = devkit / "data" / "meta.mat", devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
        for f in (meta, truth):
            if not f.is_file():
                raise DataMissing(f"ILSVRC2012 devkit file {f} is missing", "point task.labels at the devkit folder")
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        # the 1000 classes are the leaf synsets; the devkit numbers them by ILSVRC2012_ID, not in wnid order
        leaves = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        index = {w: i for i, w in enumerate(sorted(leaves.values()))}
        ids = [int(line) for line in truth.read_text().split()]
        return [(root / f"ILSVRC2012_val_{n:08d}.JPEG", index[leaves[i]]) for n, i in enumerate(ids, start=1)]

    def views(self, model, data_root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Every example's evaluation view (uint8 NHWC) and label, all at once: for a few hundred images
        (agreement checks); `evaluate` streams batches instead."""
        resize, crop = self.preprocessing(model)
        opts = self.view_options(model)
        rows = self.examples(data_root)
        return (np.stack([resize_center_crop(p, resize, crop, **opts) for p, _ in rows]),
                np.array([c for _, c in rows]))

    @torch.no_grad()
    def evaluate(self, model, data_root: str | None = None) -> list[Metric]:
        resize, crop = self.preprocessing(model)
        opts = self.view_options(model)
        rows = self.examples(data_root)
        top1: list[float] = []
        top5: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            x = torch.from_numpy(np.stack([resize_center_crop(p, resize, crop, **opts) for p, _ in batch]))
            logits = model.module(x.permute(0, 3, 1, 2).float()).float()
            labels = torch.tensor([c for _, c in batch])
            ranked = logits.topk(5, dim=1).indices
            top1 += (ranked[:, 0] == labels).float().tolist()
            top5 += (ranked == labels[:, None]).any(dim=1).float().tolist()
        tag = f"{self.view_tag(model)}{self.limit_tag()}"
        notes = {"images": len(rows), "layout": self.layout, "root": self.root,
                 "crop_offset": "floor" if opts["floor_offset"] else "round"}
        metrics = [Metric(f"{self.metric_prefix}.{k}.{tag}", float(np.mean(v)), "higher", per_sample=v,
                          per_sample_name=f"image_{k}_correct", notes=notes)
                   for k, v in (("top1", top1), ("top5", top5))]
        x = self._cost_input(crop)
        metrics.append(Metric(f"cost.macs.i{crop}", float(image.count_macs(model.module, x)), "lower", "MAC",
                              notes={"counted": "forward hooks on Conv2d/Linear"}))
        metrics.append(Metric("cost.params", float(sum(p.numel() for p in model.module.parameters())), "lower"))
        return metrics

    @staticmethod
    def _cost_input(crop: int) -> torch.Tensor:
        return torch.rand((1, 3, crop, crop), generator=torch.Generator().manual_seed(0)) * 255

    def workload(self, model, data_root: str | None = None) -> Workload:
        crop = self.preprocessing(model)[1]
        return Workload(kind="image", inputs=self._cost_input(crop), label=f"cls_i{crop}")
