"""Prefill latency of the default model with 0, 3 and 6 of its 30 decoder blocks removed (issue 9, Done 2),
measured side by side in one process: the variants are timed in interleaved rounds, so drift in machine
load hits all of them alike. Prints the median latency of each and its ratio to the full model beside the
block-count ratio (what a proportional cut would give).

Usage: .venv/bin/python benchmarks/depth_latency.py [--tokens 512] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

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
    times = {k: [] for k in variants}
    with torch.no_grad():
        for k, mod in variants.items():  # warm-up
            mod(ids, use_cache=False)
        for _ in range(args.rounds):
            for k, mod in variants.items():
                t0 = time.perf_counter()
                mod(ids, use_cache=False)
                times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times[args.remove[0]])
    print(f"threads {args.threads}, prefill of {args.tokens} tokens, {args.rounds} interleaved rounds")
    print("blocks removed | blocks | median prefill s | latency ratio | block ratio")
    for k in variants:
        med = statistics.median(times[k])
        print(f"{k:14d} | {n_blocks - k:6d} | {med:16.4f} | {med / ref:13.3f} | {(n_blocks - k) / n_blocks:11.3f}")


if __name__ == "__main__":
    main()
