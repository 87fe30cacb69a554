"""What the KL-vs-base comparison of `task=wikitext` costs and shows, on the default model against an RTN copy.

Usage: .venv/bin/python benchmarks/kl_vs_base.py [--threads 1] [--windows 4] [--bits 3] [--group-size 128]
                                                [--precisions bf16,fp32]
For each precision, the task is evaluated on the first --windows 2048-token windows of the RTN model three ways,
interleaved (A B C A B C) so drift of a shared machine hits all alike:
  A  perplexity only (no reference: what a run cost before),
  B  with the reference computed by a base-model forward per window, checked and written to an empty cache (a
     run whose cache is cold),
  C  with the reference rebuilt from the cache (every later run),
and prints wall and CPU seconds per window, the extra of B and C over A (CPU time is what this process used;
wall time includes other processes sharing the core) and each variant's peak RSS growth during the evaluation.
It then prints the RTN model's perplexity (and the base model's), mean KL, KL p99 and top-1 agreement with their
bootstrap intervals, checks that B and C gave identical values, and recomputes the mean KL and top-1 agreement
independently (torch's kl_div in float64 on both models' logits).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

from bench import models, precision
from bench.budget import Budget
from bench.methods.rtn import RTN
from bench.reference import Reference
from bench.tasks.wikitext import WikiText2Perplexity


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn):
    """(result, wall s, cpu s, peak RSS above the start in MB; sampled every 20 ms)"""
    start, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    done.set()
    sampler.join()
    return out, wall, cpu, max(peak[0], rss_mb()) - start


@torch.inference_mode()
def independent(task: WikiText2Perplexity, base, model) -> tuple[float, float]:
    """Mean KL and top-1 agreement straight from torch, without bench.reference."""
    ids = task.token_ids(model)
    kl, agree = [], []
    for i in range(task.limit):
        batch = ids[:, i * task.seqlen:(i + 1) * task.seqlen]
        pb = F.log_softmax(base.module(batch, use_cache=False).logits[0, :-1].double(), -1)
        pq = F.log_softmax(model.module(batch, use_cache=False).logits[0, :-1].double(), -1)
        kl.append(F.kl_div(pq, pb, reduction="none", log_target=True).sum(-1))
        agree.append(pb.argmax(-1) == pq.argmax(-1))
    return float(torch.cat(kl).mean()), float(torch.cat(agree).double().mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = models.load(models.default_spec())
    method = RTN(bits=args.bits, group_size=args.group_size)
    packed = method.compress(models.clone(base), None, Budget(name="none"))
    rtn = models.with_module(base, packed.model)
    task = WikiText2Perplexity(limit=args.windows)
    print(f"default model vs RTN W{args.bits} g{args.group_size}, first {args.windows} windows of 2048, "
          f"{args.threads} thread(s)")
    scratch = tempfile.mkdtemp(prefix="kl_ref_")
    for prec in args.precisions.split(","):
        warm = Reference(base, tempfile.mkdtemp(dir=scratch))
        with precision.compute(prec):
            task.evaluate(rtn, reference=warm)  # fills the cache (and warms up the kernels)
            variants = {"A ppl only": lambda: task.evaluate(rtn),
                        "B reference by forward": lambda: task.evaluate(
                            rtn, reference=Reference(base, tempfile.mkdtemp(dir=scratch))),
                        "C reference from cache": lambda: task.evaluate(rtn, reference=warm)}
            times = {k: ([], [], []) for k in variants}
            results = {}
            for _ in range(args.reps):
                for name, fn in variants.items():
                    results[name], wall, cpu, rss = timed(fn)
                    times[name][0].append(wall / args.windows)
                    times[name][1].append(cpu / args.windows)
                    times[name][2].append(rss)
            ind_kl, ind_top1 = independent(task, base, rtn)
            base_ppl = task.evaluate(base)[0].value
        med = {k: (statistics.median(w), statistics.median(c), max(r)) for k, (w, c, r) in times.items()}
        a_wall, a_cpu, _ = med["A ppl only"]
        print(f"\n[{prec}] seconds per window (median of {args.reps}), wall / cpu; extra over A; peak RSS growth")
        for name, (w, c, r) in med.items():
            print(f"  {name:24s} {w:7.2f} / {c:7.2f}   +{w - a_wall:6.2f} / +{c - a_cpu:6.2f}   {r:6.0f} MB")
        b, c = results["B reference by forward"], results["C reference from cache"]
        assert [m.value for m in b] == [m.value for m in c], "cached reference differs from the forward"
        for m in c:
            ci = f"[{m.ci[0]:.5g}, {m.ci[1]:.5g}]" if m.ci else ""
            print(f"  {m.name:50s} {m.value:.5g} {ci}")
        print(f"  independent torch (float64 kl_div): mean KL {ind_kl:.5g}, top-1 agreement {ind_top1:.5g}")
        print(f"  base model perplexity on the same windows: {base_ppl:.5g}")
        print(f"  p99.9 / max KL: {c[2].notes['percentiles']['p99.9']:.4g} / {c[2].notes['percentiles']['max']:.4g}")
    shutil.rmtree(scratch)
    print(f"\npeak RSS of the process (incl. the independent float64 check) "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
