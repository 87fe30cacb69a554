"""fp32 against bf16 (autocast) on the default model, side by side in one process: the ratios of issue 28.

Usage: .venv/bin/python benchmarks/precision_speed.py [--threads 2] [--windows 3] [--parts all]
Parts (comma-separated): matmul, eval, decode, distill, gptq, qa. Each part runs fp32 and bf16 alternately
(A B A B ...), so drift of a shared machine hits both alike, and prints seconds and the fp32/bf16 ratio:
- matmul: F.linear of the model's shapes (2048 tokens): GFLOP/s, the peak used for the limit fractions below;
- eval: one 2048-token WikiText-2 window (GPTQ protocol), extrapolated to the full 148 windows; a profiled
  forward gives the share of time in matmuls (mm/addmm/bmm), attention (SDPA) and everything else; the FLOPs
  of the full evaluation (linears + head + causal attention) over the measured peak give the achieved fraction;
- decode: greedy decode per token after a 128-token prompt; weight bytes read per token against the measured
  read bandwidth (the decode limit);
- distill: BinaryMoS distillation steps (student + teacher forwards, backward, AdamW) on 1 x 512 tokens;
- gptq: gptq W4 g128 compression of the first --gptq-blocks decoder blocks (Hessians and sweep stay fp32);
- qa: lm-eval zero-shot piqa and hellaswag on their first --qa-limit documents, seconds per 1,000 examples.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from bench import data, models, precision

PRECS = ("fp32", "bf16")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """fns: precision -> callable; each run once untimed, then `reps` alternating timed rounds."""
    for p, fn in fns.items():
        with precision.compute(p):
            fn()
    out = {p: [] for p in fns}
    for _ in range(reps):
        for p, fn in fns.items():
            with precision.compute(p):
                out[p].append(timed(fn))
    return out


def report(name: str, times: dict[str, list[float]], unit: str = "s", scale: float = 1.0) -> float:
    med = {p: statistics.median(v) * scale for p, v in times.items()}
    ratio = med["fp32"] / med["bf16"]
    print(f"{name:44s} fp32 {med['fp32']:9.3f} {unit}  bf16 {med['bf16']:9.3f} {unit}  fp32/bf16 {ratio:5.2f}x"
          f"  (median of {len(times['fp32'])})")
    return ratio


def part_matmul(model) -> dict[str, float]:
    cfg = model.module.config
    shapes = [(cfg.hidden_size, cfg.intermediate_size), (cfg.intermediate_size, cfg.hidden_size),
              (cfg.hidden_size, cfg.vocab_size)]
    peak = {}
    for k, n in shapes:
        x, w = torch.randn(2048, k), torch.randn(n, k)
        t = interleaved({p: (lambda: F.linear(x, w)) for p in PRECS}, 5)
        flops = 2 * 2048 * k * n
        report(f"matmul 2048x{k} by {n}x{k}", t, "ms", 1e3)
        for p in PRECS:
            peak[p] = max(peak.get(p, 0.0), flops / statistics.median(t[p]) / 1e9)
    print(f"measured matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    return peak


def eval_flops(model, seqlen: int = 2048) -> float:
    """FLOPs of one window: 2 x tokens x (block linears + head) + causal attention (QK^T and PV, half the
    square), per layer and head."""
    cfg = model.module.config
    lin = model.adapter.n_block_linear_weights()
    head = model.module.lm_head.weight.numel()
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * 2 * 2 * (seqlen * seqlen / 2) * head_dim
    return 2 * seqlen * (lin + head) + attn


def part_eval(model, windows: int, peak: dict | None) -> None:
    ids = data.token_ids(model.tokenizer, "\n\n".join(data.wikitext2_rows("test", None)))
    n_total = ids.shape[1] // 2048
    batches = [ids[:, i * 2048:(i + 1) * 2048] for i in range(windows)]
    nll = {p: [] for p in PRECS}

    def window(p, i):
        def run():
            with torch.inference_mode():
                b = batches[i]
                logits = model.module(b, use_cache=False).logits.float()
                nll[p].append(float(F.cross_entropy(logits[0, :-1], b[0, 1:])))
        return run

    times = {p: [] for p in PRECS}
    for i in range(windows):
        for p in PRECS:
            with precision.compute(p):
                times[p].append(timed(window(p, i)))
    times = {p: v[1:] if len(v) > 1 else v for p, v in times.items()}  # the first window warms up
    r = report("wikitext2 eval, s per 2048-token window", times)
    for p in PRECS:
        print(f"  {p}: full test set ({n_total} windows) ~ {statistics.median(times[p]) * n_total / 60:.1f} min;"
              f" ppl of the first {windows} windows {math.exp(sum(nll[p]) / len(nll[p])):.4f}")
    print(f"  eval speed-up {r:.2f}x (target >= 4x)")
    flops = eval_flops(model)
    for p in PRECS:
        achieved = flops / statistics.median(times[p]) / 1e9
        frac = f", {achieved / peak[p]:.0%} of this CPU's measured {p} matmul peak" if peak else ""
        print(f"  {p}: {flops / 1e9:.0f} GFLOP per window -> {achieved:.0f} GFLOP/s achieved{frac}")
    profile_share(model, batches[0])


def profile_share(model, batch) -> None:
    from torch.profiler import ProfilerActivity, profile

    for p in PRECS:
        with precision.compute(p), torch.inference_mode():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.module(batch, use_cache=False)
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        share = {"matmul": 0.0, "attention": 0.0, "dtype casts": 0.0}
        for e in prof.key_averages():
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
                share["matmul"] += e.self_cpu_time_total
            elif "scaled_dot_product" in e.key or "flash_attention" in e.key:
                share["attention"] += e.self_cpu_time_total
            elif e.key in ("aten::copy_", "aten::_to_copy"):
                share["dtype casts"] += e.self_cpu_time_total
        rest = total - sum(share.values())
        parts = ", ".join(f"{k} {v / total:.0%}" for k, v in share.items())
        print(f"  {p} forward profile: {parts}, everything else (norms, rotary, SiLU, Python) {rest / total:.0%}")


def read_bandwidth() -> float:
    x = torch.empty(256 * 2**20 // 4)
    x.fill_(1.0)
    x.sum()
    t = min(timed(x.sum) for _ in range(5))
    return x.numel() * 4 / t


def part_decode(model) -> None:
    prompt = torch.arange(1000, 1128)[None]
    n = 16

    def decode():
        with torch.inference_mode():
            out = model.module(prompt, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(n):
                out = model.module(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def prefill():
        with torch.inference_mode():
            model.module(prompt, use_cache=True)

    tp = interleaved({p: prefill for p in PRECS}, 3)
    td = interleaved({p: decode for p in PRECS}, 3)
    per_tok = {p: [(d - statistics.median(tp[p])) / n for d in td[p]] for p in PRECS}
    report("decode, ms per token (after a 128-token prompt)", per_tok, "ms", 1e3)
    bw = read_bandwidth()
    params = sum(p.numel() for p in {id(q): q for q in model.module.parameters()}.values())
    head = model.module.lm_head.weight.numel()
    for p in PRECS:
        # fp32 reads every weight once (4 B); autocast casts each weight per call: read 4 B, write + read 2 B
        bytes_tok = params * 4 if p == "fp32" else params * 8
        limit = bytes_tok / bw
        print(f"  {p}: ~{bytes_tok / 2**20:.0f} MiB of weight traffic per token (head {head / 1e6:.1f} M params "
              f"included); read bandwidth {bw / 2**30:.1f} GiB/s -> limit {limit * 1e3:.1f} ms/token, achieved "
              f"{statistics.median(per_tok[p]) * 1e3:.1f} ms ({limit / statistics.median(per_tok[p]):.0%} of it)")


def part_distill(model, steps: int) -> None:
    from bench import calib
    from bench.budget import Budget
    from bench.methods.binarymos import BinaryMoS

    spec = calib.CalibSpec(name="wikitext2_valid", source="wikitext2", split="validation", seed=0)
    cs = calib.load(spec, model.tokenizer, 8, 512)
    budget = Budget(name="bench", calib_samples=8, calib_seqlen=512, train_steps=steps, lr=2e-4)
    per_step = {p: [] for p in PRECS}
    for _ in range(2):
        for p in PRECS:
            with precision.compute(p):
                packed = BinaryMoS(seed=0).compress(models.clone(model), cs, budget)
            train = packed.training.summary()
            per_step[p].append(train["seconds"] / train["steps"])
    report(f"binarymos distill step (1 x 512 tokens, {steps} steps)", per_step)


def part_gptq(model, blocks: int) -> None:
    from bench import calib
    from bench.budget import Budget
    from bench.methods.gptq import GPTQ

    module = copy.deepcopy(model.module)
    module.model.layers = module.model.layers[:blocks]
    module.config.num_hidden_layers = blocks
    small = models.with_module(model, module)
    spec = calib.CalibSpec(name="wikitext2_valid", source="wikitext2", split="validation", seed=0)
    cs = calib.load(spec, model.tokenizer, 128, 512)
    budget = Budget(name="default", calib_samples=128, calib_seqlen=512)
    t = {p: [] for p in PRECS}
    for p in PRECS:
        with precision.compute(p):
            t[p].append(timed(lambda: GPTQ(bits=4, group_size=128).compress(models.clone(small), cs, budget)))
    r = report(f"gptq W4 g128 compress, first {blocks} of 30 blocks", t)
    print(f"  gptq speed-up {r:.2f}x (target >= 2x)")


def part_qa(model, limit: int) -> None:
    from bench import lmeval
    from bench.tasks.commonsense_qa import CommonsenseQA

    lmeval.task_manager()
    for name in ("piqa", "hellaswag"):
        t, acc = {p: [] for p in PRECS}, {}
        for p in PRECS:
            task = CommonsenseQA(name=name, tasks=[name], limit=limit, batch_size=8)
            with precision.compute(p):
                t0 = time.perf_counter()
                metrics = task.evaluate(model)
                t[p].append((time.perf_counter() - t0) * 1000 / limit)
            acc[p] = next(m.value for m in metrics if ".acc." in m.name)
        r = report(f"lm-eval {name}, s per 1,000 examples", t)
        print(f"  {name} acc on {limit} docs: fp32 {acc['fp32']:.3f}, bf16 {acc['bf16']:.3f}; speed-up {r:.2f}x "
              f"(target >= 3x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--parts", default="all")
    ap.add_argument("--distill-steps", type=int, default=4)
    ap.add_argument("--gptq-blocks", type=int, default=4)
    ap.add_argument("--qa-limit", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("BENCH_RESULTS", tempfile.mkdtemp())
    parts = {"matmul", "eval", "decode", "distill", "gptq", "qa"} if args.parts == "all" else set(args.parts.split(","))
    print(f"threads={torch.get_num_threads()} torch {torch.__version__} kernels {precision.kernels('bf16')}")
    model = models.load(models.default_spec())
    peak = part_matmul(model) if "matmul" in parts else None
    if "eval" in parts:
        part_eval(model, args.windows, peak)
    if "decode" in parts:
        part_decode(model)
    if "distill" in parts:
        part_distill(model, args.distill_steps)
    if "gptq" in parts:
        part_gptq(model, args.gptq_blocks)
    if "qa" in parts:
        part_qa(model, args.qa_limit)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
