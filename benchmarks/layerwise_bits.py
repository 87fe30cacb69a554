"""Layer-wise mixed precision (`method=layerwise_bits`) against uniform bits at equal average code bits, over rtn and
gptq, on the default model.

For each quantizer it runs, as ordinary recorded cells (one MLflow run each, artifacts cached, so a QA task reuses
the artifact the first task computed):
  uniform        bits = 3 and 4 (method=rtn / method=gptq, group 128)
  layerwise_bits 2/4 bits at an average of 3.0, 3/5 at 4.0 (equal average code bits to the uniform rows), and 3/4 at 3.5
                 (between them)
on each task of --tasks, and prints one table: average code bits, bits/weight counted from the stored bytes
(scales and zero points included), and each task's protocol-qualified metric. A failed cell prints its one-line
error in its row; the others go on.

Usage: .venv/bin/python benchmarks/layerwise_bits.py [--results results] [--tasks wikitext,piqa,arc_easy]
       [--quantizers rtn,gptq] [--limit N] [--threads 1] [--precision bf16] [--budget default] [override ...]
--limit N evaluates the first N windows / examples of each task only (the metric names say `.firstN`); --budget
sets the calibration size (budget=default: 128 windows of 512 tokens; budget=tiny only to smoke-test the script);
further `key=value` overrides go to every cell (e.g. `hardware.min_reps=1` to shorten the latency measurement).
"""

from __future__ import annotations

import argparse
import os

from hydra import compose, initialize_config_module

import bench.app  # noqa: F401  (registers the config's resolvers, as the CLI does)
from bench import record
from bench.errors import BenchError
from bench.runner import Runner

UNIFORM_BITS = (3, 4)
MIXED = ((2, 4, 3.0), (3, 4, 3.5), (3, 5, 4.0))  # (low_bits, high_bits, avg_bits)
BPW = "storage.bits_per_weight.block_linears"


def cells(quantizer: str) -> list[tuple[str, float, list[str]]]:
    """(row label, average code bits, method overrides) of one quantizer's rows."""
    rows = [(f"{quantizer} W{b} uniform", float(b), [f"method={quantizer}", f"method.bits={b}"]) for b in UNIFORM_BITS]
    rows += [(f"layerwise_bits {quantizer} {lo}/{hi} bits, avg {avg}", avg,
              ["method=layerwise_bits", f"method.quantizer={quantizer}", f"method.low_bits={lo}",
               f"method.high_bits={hi}", f"method.avg_bits={avg}"]) for lo, hi, avg in MIXED]
    return sorted(rows, key=lambda r: (r[1], "layerwise" in r[0]))


def primary_metric(task: str, metrics: dict[str, float]) -> tuple[str, float] | None:
    """The task's headline metric: WikiText-2 token perplexity, a QA task's accuracy."""
    want = "wikitext2.ppl_token." if task == "wikitext" else f"{task}.acc"
    names = sorted(k for k in metrics if k.startswith(want) and "norm" not in k and "stderr" not in k)
    return (names[0], metrics[names[0]]) if names else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.environ.get("BENCH_RESULTS", "results"))
    ap.add_argument("--tasks", default="wikitext,piqa,arc_easy")
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--budget", default="default")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every cell")
    args = ap.parse_args()
    tasks = args.tasks.split(",")
    common = [f"paths.results={args.results}", f"threads={args.threads}", f"precision={args.precision}",
              f"budget={args.budget}", "compare_baseline=false", "method.group_size=128",
              *args.overrides]
    table: dict[str, dict] = {}
    names: dict[str, str] = {}
    for quantizer in args.quantizers.split(","):
        for label, avg, overrides in cells(quantizer):
            row = table.setdefault(label, {"avg": avg})
            for task in tasks:
                limit = [f"task.limit={args.limit}"] if args.limit else []
                with initialize_config_module("bench.configs", version_base=None):
                    cfg = compose("config", overrides=[*overrides, f"task={task}", *limit, *common])
                try:
                    result = Runner(cfg).run()[1]
                except BenchError as e:
                    row[task] = f"FAILED: {e}"
                    print(f"{label} / {task}: FAILED: {e}", flush=True)
                    continue
                row["bpw"] = result.metrics[BPW]
                row["code"] = result.metrics.get(f"{record.METHOD_INFO}.average_code_bits", avg)
                found = primary_metric(task, result.metrics)
                if found:
                    names[task], row[task] = found
                print(f"{label} / {task}: {found} run {result.run_id}", flush=True)
    print(f"\ndefault model, precision={args.precision}, {args.threads} thread(s), group 128, calib=wikitext2_valid, "
          f"budget={args.budget}")
    header = ["cell", "avg code bits", "bits/weight (stored)"] + [names.get(t, t) for t in tasks]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label, row in table.items():
        values = [f"{row.get('code', row['avg']):.3f}", f"{row['bpw']:.3f}" if "bpw" in row else "—"]
        values += [f"{row[t]:.4f}" if isinstance(row.get(t), float) else str(row.get(t, "—")) for t in tasks]
        print(f"| {label} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
