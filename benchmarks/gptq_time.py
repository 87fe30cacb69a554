"""Wall time and peak memory of `gptq` on the default model (default budget: 128 calibration windows of 512
tokens), beside `rtn` on the same model in the same process, one after the other (never concurrently).

Usage: .venv/bin/python benchmarks/gptq_time.py [--bits 4] [--group-size 128] [--act-order] [--threads 2]
Prints threads, calibration size, wall seconds of each method, their ratio, and peak RSS (process maximum
and the increase during gptq).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from bench import calib, models
from bench.budget import Budget
from bench.calib import CalibSpec
from bench.methods.gptq import GPTQ
from bench.methods.rtn import RTN


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = models.load(models.default_spec())
    cal = calib.load(CalibSpec(name="wikitext2_valid"), base.tokenizer, args.samples, args.seqlen)
    budget = Budget(name="default", calib_samples=args.samples, calib_seqlen=args.seqlen)
    print(f"threads={torch.get_num_threads()} calib={cal.describe} bits={args.bits} g={args.group_size} "
          f"act_order={args.act_order}")
    before = peak_rss_mb()
    t0 = time.perf_counter()
    RTN(bits=args.bits, group_size=args.group_size).compress(models.clone(base), None, budget)
    rtn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    GPTQ(bits=args.bits, group_size=args.group_size, act_order=args.act_order).compress(models.clone(base), cal, budget)
    gptq_s = time.perf_counter() - t0
    after = peak_rss_mb()
    print(f"rtn  wall {rtn_s:8.1f} s")
    print(f"gptq wall {gptq_s:8.1f} s   ({gptq_s / rtn_s:.0f}x rtn)")
    print(f"peak RSS {after:.0f} MB (before compressing {before:.0f} MB; +{after - before:.0f} MB)")


if __name__ == "__main__":
    main()
