"""Where a calibrated method's fp32-vs-bf16 difference comes from: its calibration or its evaluation.

A run in bf16 throughout changes two things for a calibrated method: the forwards that compute its artifact
(calibration inputs, Hessians' inputs, distillation; `compress_precision=`) and the forwards that evaluate it
(`precision=`). This script crosses them (it is what split the two into separate keys). It restores two
stored artifacts of the same cell, one computed at fp32 and one at bf16 (given as the MLflow run ids that wrote them;
their `bench.artifact_key` tags name the files), and evaluates each at fp32 and at bf16 on the first --windows
2048-token windows of the GPTQ protocol, interleaved, one process, one model load:

    artifact computed at \\ evaluated at    fp32      bf16
    fp32                                     a         b       b - a: the evaluation's share
    bf16                                     c         d       c - a: the calibration's share

Usage: .venv/bin/python benchmarks/precision_split.py --results /work/store --fp32-run ID --bf16-run ID
       [--method gptq] [--windows 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os

import mlflow
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench import models, precision, tracking
from bench.cache import ArtifactStore
from bench.tasks.wikitext import WikiText2Perplexity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.environ.get("BENCH_RESULTS", "results"))
    ap.add_argument("--fp32-run", required=True)
    ap.add_argument("--bf16-run", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri(args.results))
    store = ArtifactStore(os.path.join(args.results, "artifacts"))
    base = models.load(models.default_spec())
    task = WikiText2Perplexity(limit=args.windows)
    restored = {}
    for computed_at, run_id in (("fp32", args.fp32_run), ("bf16", args.bf16_run)):
        run = client.get_run(run_id)
        cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml"))
        method = instantiate(cfg.method, _convert_="all")
        key = run.data.tags["bench.artifact_key"]
        packed = method.restore(models.clone(base), *store.load(key))
        restored[computed_at] = models.with_module(base, packed.model)
        print(f"artifact computed at {computed_at}: run {run_id}, {cfg.method.name}, key {key}, "
              f"full-set ppl {run.data.metrics.get('wikitext2.ppl_token.gptq_s2048')}")
    name = f"wikitext2.ppl_token.gptq_s2048.first{args.windows}"
    ppl = {}
    for evaluated_at in ("fp32", "bf16"):  # each artifact under one precision, then the other
        for computed_at, model in restored.items():
            with precision.compute(evaluated_at):
                m = {x.name: x.value for x in task.evaluate(model)}
            ppl[computed_at, evaluated_at] = m[name]
    a, b = ppl["fp32", "fp32"], ppl["fp32", "bf16"]
    c, d = ppl["bf16", "fp32"], ppl["bf16", "bf16"]
    print(f"\n{name}, {args.threads} thread(s)")
    print("computed at \\ evaluated at".ljust(28) + f" {'fp32':>10s} {'bf16':>10s}")
    print(f"{'fp32':28s} {a:10.4f} {b:10.4f}   evaluation's share (b-a)/a {100 * (b - a) / a:+.3f}%")
    print(f"{'bf16':28s} {c:10.4f} {d:10.4f}   calibration's share (c-a)/a {100 * (c - a) / a:+.3f}%")
    print(f"both (d-a)/a {100 * (d - a) / a:+.3f}%")


if __name__ == "__main__":
    main()
