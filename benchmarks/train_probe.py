"""Seconds per training step and the first steps' curve of the training methods on the default model: what the
convergence search of issue 29 plans its budgets with.

Usage: .venv/bin/python benchmarks/train_probe.py [--methods binarymos,onebit,...] [--steps 8] [--budget default]
           [--precision bf16] [--threads 1] [--val 0] [--set method.x=y ...] [--out probe.json]
Run one method per process where memory is short (edgeqat trains every weight). Each method compresses a fresh
copy of the default model with `--budget` (its `budget_recipe` applied, as the CLI
would) and `budget.train_steps=--steps` under `--precision`; `recover=rora` runs after `method=sign`. Printed per
trained stage: steps, wall and process-CPU seconds per step (median over the steps after the first; CPU time is
what the process itself spent, so a machine shared with other jobs inflates wall time, not CPU time), the loss of
the first and last steps, the held-out checkpoints (with `--val N` held-out windows) and the verdict. ABQ's
"step" is one block's step (a model-equivalent step is 30 of them on the default model). Nothing is evaluated
and nothing is recorded in MLflow.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from bench import calib as calib_mod
from bench import models, precision, training
from bench.runner import build

METHODS = ("binarymos", "onebit", "dbllm", "l4q", "edgeqat", "abq", "foldgpt", "rora")


def compose(method: str, budget: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    import bench.app  # noqa: F401  (the config's resolvers)

    args = [f"method={'sign' if method == 'rora' else method}", f"budget={budget}", *overrides]
    if method == "rora":
        args.append("recover=rora")
    with initialize_config_module("bench.configs", version_base=None):
        return hydra_compose("config", overrides=args)


class StepClock:
    """Wraps Trainer.run: the process-CPU and wall time of every step (validation excluded)."""

    def __init__(self):
        self.stages: list[dict] = []
        self._run = training.Trainer.run
        clock = self

        def run(trainer, step_fn):
            cpu, wall = [], []

            def timed(step):
                if cpu:  # the previous step ended where this one starts (its backward and update included)
                    cpu[-1] = time.process_time() - cpu[-1]
                    wall[-1] = time.perf_counter() - wall[-1]
                cpu.append(time.process_time())
                wall.append(time.perf_counter())
                return step_fn(step)
            record = clock._run(trainer, timed)
            cpu[-1], wall[-1] = time.process_time() - cpu[-1], time.perf_counter() - wall[-1]
            clock.stages.append({"record": record, "cpu": cpu, "wall": wall})
            return record
        training.Trainer.run = run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget", default="default")
    ap.add_argument("--precision", default="bf16", choices=precision.PRECISIONS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--val", type=int, default=0, help="held-out windows (0: no validation, pure step time)")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides, e.g. budget.lr=5e-4")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = models.default_spec()
    base = models.load(spec)
    clock = StepClock()
    out = []
    for name in args.methods.split(","):
        cfg = compose(name, args.budget, [f"budget.train_steps={args.steps}", f"++budget.val_samples={args.val}",
                                          f"precision={args.precision}", *args.set])
        method, budget = build(cfg.method, "method"), build(cfg.budget, "budget")
        calib = calib_mod.load(build(cfg.calib, "calib"), base.tokenizer, budget.calib_samples, budget.calib_seqlen,
                               heldout=budget.val_samples)
        before = len(clock.stages)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with precision.compute(args.precision):
            work = models.clone(base)
            packed = method.compress(work, calib if method.needs_calibration else None, budget)
            if name == "rora":
                packed = build(cfg.recover, "recover").apply(base.module, models.with_module(base, packed.model),
                                                             packed, calib, budget)
        total = time.perf_counter() - t0
        for st in clock.stages[before:]:
            rec = st["record"]
            later = slice(1, None) if rec.steps > 1 else slice(None)
            row = {"method": name, "stage": rec.name, "steps": rec.steps, "batch": budget.batch_size,
                   "seqlen": budget.calib_seqlen, "precision": args.precision, "threads": args.threads,
                   "cpu_s_per_step": statistics.median(st["cpu"][later]),
                   "wall_s_per_step": statistics.median(st["wall"][later]), "losses": rec.losses,
                   "validation": rec.validation, "verdict": rec.verdict.reason, "compress_wall_s": total,
                   "validation_wall_s_per_checkpoint": rec.validation_seconds / max(1, len(rec.validation)),
                   "peak_rss_gb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
            out.append(row)
            head = ", ".join(f"{v:.4g}" for v in rec.losses[:3])
            tail = ", ".join(f"{v:.4g}" for v in rec.losses[-3:])
            print(f"{name:10s} {rec.name[:34]:34s} {rec.steps:5d} steps  cpu {row['cpu_s_per_step']:7.3f} s/step  "
                  f"wall {row['wall_s_per_step']:7.3f} s/step  loss [{head}] .. [{tail}]  "
                  f"peak RSS {row['peak_rss_gb_so_far']:.1f} GB", flush=True)
            if rec.validation:
                print("           held-out: " + "  ".join(f"{c['step']}:{c['loss']:.4g}" for c in rec.validation)
                      + f"  ({row['validation_wall_s_per_checkpoint']:.1f} s wall per checkpoint)")
            print(f"           {rec.verdict.reason}", flush=True)
        del work, packed
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
