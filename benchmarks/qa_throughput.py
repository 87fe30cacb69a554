"""Time per 1,000 examples of zero-shot commonsense QA (lm-eval) on the default model, per task.

Usage: .venv/bin/python benchmarks/qa_throughput.py [--limit 100] [--threads 2] [--batch-size 8]
Prints, for each task, examples/s and seconds per 1,000 examples measured on its first `limit` documents,
one task at a time in this process (threads set and printed).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench import lmeval, models
from bench.tasks.commonsense_qa import LOCAL, CommonsenseQA


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BENCH_RESULTS", tempfile.mkdtemp())
    model = models.load(models.default_spec())
    lmeval.task_manager()  # index lm-eval's task YAMLs before timing
    print(f"threads={torch.get_num_threads()} batch_size={args.batch_size} limit={args.limit}")
    print(f"{'task':15s} {'examples':>8s} {'seconds':>8s} {'ex/s':>7s} {'s/1000 ex':>10s} {'acc':>6s}")
    for t in LOCAL:
        task = CommonsenseQA(name=t, tasks=[t], limit=args.limit, batch_size=args.batch_size)
        t0 = time.perf_counter()
        metrics = task.evaluate(model)
        dt = time.perf_counter() - t0
        acc = next(m.value for m in metrics if ".acc." in m.name)
        print(f"{t:15s} {args.limit:8d} {dt:8.1f} {args.limit / dt:7.2f} {1000 * dt / args.limit:10.1f} {acc:6.3f}")


if __name__ == "__main__":
    main()
