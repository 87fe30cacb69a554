"""The torch rebuild of the MobileNetV2 int8 TFLite file (model=mobilenetv2_tflite) against the file itself on the
LiteRT interpreter, on the ImageNet sample with the task's preprocessing (issue 10): top-1 / top-5 of each and
the share of images whose top-1 class they agree on (tests/test_imagenet.py checks >= 97% on a subset).

Usage: .venv/bin/python benchmarks/tflite_agreement.py [--images 500] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from bench import models
from bench.models.tflite_import import run_litert
from bench.tasks.imagenet import ImageNetClassification

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads}")
    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "mobilenetv2_tflite.yaml"))
    node.pop("_target_")
    model = models.load(models.ModelSpec(**node))
    images, labels = ImageNetClassification(limit=args.images).views(model)
    with torch.no_grad():
        logits = torch.cat([model.module(torch.from_numpy(images[i:i + 25]).permute(0, 3, 1, 2).float())
                            for i in range(0, len(images), 25)]).numpy()
    scores = run_litert(Path(model.info["file"]), images).astype(np.int32)
    for name, s in (("torch rebuild", logits), ("litert (file)", scores)):
        top5 = np.argsort(-s, axis=1, kind="stable")[:, :5]  # litert's uint8 scores can tie: lowest index first
        top1, top5 = np.mean(top5[:, 0] == labels), np.mean((top5 == labels[:, None]).any(1))
        print(f"{name:14s} top-1 {top1:.3f}  top-5 {top5:.3f}")
    agree = logits.argmax(1) == scores.argmax(1)
    print(f"top-1 agreement on {len(labels)} images: {agree.mean():.3f} ({int(agree.sum())}/{len(labels)})")


if __name__ == "__main__":
    main()
