"""Latency per image of hybrid_sd on the digits DDPMs as more of the 50 DDIM steps go to the small model
(issue 12, Done 3), timed side by side in one process: every split samples one image once per round,
rounds interleaved, so drift in machine load hits all splits alike. Prints the median latency per image and
per step, its ratio to the all-large model, and the MACs per image counted by hooks over the whole run.
Both models come from the suite's training cache (trained on first use).

Usage: .venv/bin/python benchmarks/hybrid_latency.py [--rounds 15] [--threads 1] [--results results]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from timing import interleaved_medians

import bench.app  # noqa: F401  (registers the config's resolvers, as the CLI does)
from bench import models
from bench.image import count_macs
from bench.sampler import SampleAll, model_schedule, seeded_noise


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--results", default="results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_module("bench.configs", version_base=None):  # the run config, as the CLI composes it
        cfg = compose("config", overrides=["model=ddpm_digits", "method=hybrid_sd", f"paths.results={args.results}"])
    large = models.load(instantiate(cfg.model))
    hybrid = instantiate(cfg.method, _convert_="all")
    sched = model_schedule(large)
    x = seeded_noise(1, large.info["image_side"], 1234)
    samplers, macs = {}, {}
    for k in (args.steps, 40, 25, 10, 0):
        method = dataclasses.replace(hybrid, large_steps=k, total_steps=args.steps)
        s = SampleAll(method.compress(models.clone(large), None, None).model, sched, args.steps)
        samplers[f"large {k:2d} / small {args.steps - k:2d}"] = torch.no_grad()(lambda s=s: s(x))
        macs[f"large {k:2d} / small {args.steps - k:2d}"] = count_macs(s, x)
    med = interleaved_medians(samplers, args.rounds)
    ref = med[f"large {args.steps:2d} / small  0"]
    print(f"{'split (DDIM steps)':24s} {'ms/image':>9s} {'ms/step':>8s} {'vs all-large':>12s} {'MMAC/image':>11s}")
    for k, v in med.items():
        print(f"{k:24s} {v * 1e3:9.1f} {v * 1e3 / args.steps:8.2f} {v / ref:12.3f} {macs[k] / 1e6:11.1f}")


if __name__ == "__main__":
    main()
