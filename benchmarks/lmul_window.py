"""L-Mul's accuracy and emulation cost on the first WikiText-2 window(s) of the default model: token perplexity
(GPTQ protocol, 2048-token windows, as task=wikitext computes it) and the seconds of the evaluation, exact fp32
against `lmul` at each mantissa width, in one process on one model load. Seconds are given as process CPU time
(robust to other processes sharing the core) and wall time. All in fp32 compute, so the only difference between
the rows is the arithmetic of the matmuls L-Mul replaces.

Usage: .venv/bin/python benchmarks/lmul_window.py [--bits 3 4] [--apply-to attention] [--limit 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench import models, precision
from bench.data import data_root
from bench.methods.lmul import LMul
from bench.tasks.wikitext import WikiText2Perplexity


def evaluate(model, task) -> tuple[float, float, float]:
    """(perplexity, CPU seconds, wall seconds) of the task on the model."""
    cpu, wall = time.process_time(), time.perf_counter()
    with precision.compute("fp32"), torch.no_grad():
        ppl = next(m.value for m in task.evaluate(model, data_root()) if m.name == task.metric_name)
    return ppl, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[3])
    ap.add_argument("--apply-to", default="attention")
    ap.add_argument("--limit", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = models.load(models.default_spec())
    task = WikiText2Perplexity(name="wikitext", limit=args.limit, kl_vs_base=False)
    rows = [("exact fp32", *evaluate(base, task))]
    for bits in args.bits:
        model = models.clone(base)
        LMul(mantissa_bits=bits, apply_to=args.apply_to).compress(model, None, None)
        rows.append((f"lmul m={bits} ({args.apply_to})", *evaluate(model, task)))
    print(f"first {args.limit} WikiText-2 window(s) of 2048 tokens, {args.threads} thread(s), fp32 compute")
    for name, ppl, cpu, wall in rows:
        print(f"{name:34s} ppl {ppl:8.4f}   cpu {cpu:8.1f} s ({cpu / rows[0][2]:6.1f}x)   wall {wall:8.1f} s")


if __name__ == "__main__":
    main()
