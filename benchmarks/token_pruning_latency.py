"""CPU latency of token pruning on DeiT-Tiny shapes (random init: timing only; the selector weights do not change
the cost): the unpruned model beside method=token_pruning's spvit and heatvit selectors (keep 0.7 before blocks
3, 6, 9), one 224-pixel image per forward, interleaved rounds in one process so that drift hits every variant
alike; prints the median latency and the counted MACs of each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/token_pruning_latency.py --rounds 30 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from transformers import ViTConfig, ViTForImageClassification

    from bench import models
    from bench.methods.token_pruning import TokenPruning, vit_macs
    from bench.models.hf_vision import HFImageClassifier

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep_ratio", type=float, default=0.7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                    image_size=224, patch_size=16, num_labels=1000)
    module = HFImageClassifier(ViTForImageClassification(cfg).eval(), [0.5] * 3, [0.5] * 3, 1 / 255, 0).eval()
    module.bench_kind = "image_classifier"
    spec = models.ModelSpec(name="deit_tiny_shapes", source="hf_image", name_or_path="(in memory)")
    base = models.LoadedModel(spec, module, None, models.adapter_for(module), "",
                              {"image_size": 224, "preprocess": {"resize": 224, "crop": 224}})
    variants = {"unpruned": base}
    for sel in ("spvit", "heatvit"):
        m = models.clone(base)
        TokenPruning(selector=sel, keep_ratio=args.keep_ratio).install(m)
        variants[sel] = m
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 255
    times = {k: [] for k in variants}
    with torch.no_grad():
        for m in variants.values():
            for _ in range(3):
                m.module(x)
        for _ in range(args.rounds):
            for k, m in variants.items():
                t0 = time.perf_counter()
                m.module(x)
                times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times["unpruned"])
    for k, m in variants.items():
        macs = vit_macs(m.module, m.adapter.vit_encoder(), x)
        med = statistics.median(times[k])
        print(f"{k:9s} p50 {med * 1e3:7.2f} ms  ({ref / med:4.2f}x)  MACs {macs / 1e9:.3f} G")


if __name__ == "__main__":
    main()
