"""Prefill latency of the default model with 0, 3 and 6 of its 30 decoder blocks removed (issue 9, Done 2),
measured side by side in one process: the variants are timed in interleaved rounds, so drift in machine
load hits all of them alike. Prints the median latency of each and its ratio to the full model beside the
block-count ratio (what a proportional cut would give).

Usage: .venv/bin/python benchmarks/depth_latency.py [--tokens 512] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians

from bench import models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--remove", type=int, nargs="+", default=[0, 3, 6])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = models.load(models.default_spec())
    n_blocks = len(base.adapter.blocks())
    variants = {}
    for k in args.remove:
        m = models.clone(base)
        if k:  # which blocks does not matter for latency: every block has the same shape
            m.adapter.remove_blocks(list(range(n_blocks - 1 - k, n_blocks - 1)))
        variants[k] = m.module
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        med = interleaved_medians({k: lambda mod=mod: mod(ids, use_cache=False) for k, mod in variants.items()},
                                  args.rounds)
    ref = med[args.remove[0]]
    print(f"threads {args.threads}, prefill of {args.tokens} tokens, {args.rounds} interleaved rounds")
    print("blocks removed | blocks | median prefill s | latency ratio | block ratio")
    for k in variants:
        ratio = (n_blocks - k) / n_blocks
        print(f"{k:14d} | {n_blocks - k:6d} | {med[k]:16.4f} | {med[k] / ref:13.3f} | {ratio:11.3f}")


if __name__ == "__main__":
    main()
