"""Prefill and decode latency of the default model quantized by RTN (default W4 g128), as fake-quant (torch
fp32 on the dequantized weights, what hardware=cpu times) and on hardware=cpu_kernels' real kernels
(onnxruntime MatMulNBits at accuracy_level 4 and 1), in one process: the variants are timed in interleaved
rounds, so drift in machine load hits all of them alike. Prints the medians and each ratio to fake-quant.

Usage: .venv/bin/python benchmarks/cpu_kernels_latency.py [--bits 4] [--group 128] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians

from bench import models
from bench.hardware.cpu_kernels import CpuKernelsBackend
from bench.methods.rtn import RTN


def decode(model, ids, tokens: int):
    out = model(ids, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(tokens):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128, help="prompt tokens (the wikitext workload's)")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = models.load(models.default_spec())
    packed = RTN(bits=args.bits, group_size=args.group).compress(models.clone(base), None, None)
    variants = {"fake-quant (torch fp32)": packed.model}
    for level in (4, 1):
        deployed = CpuKernelsBackend(threads=args.threads, accuracy_level=level).deploy(packed)
        variants[deployed.execution] = deployed.model
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        pre = interleaved_medians({k: lambda m=m: m(ids, use_cache=False) for k, m in variants.items()}, args.rounds)
        dec = interleaved_medians({k: lambda m=m: decode(m, ids, args.decode) for k, m in variants.items()},
                                  args.rounds)
    ref = next(iter(variants))
    print(f"RTN W{args.bits} g{args.group}, threads {args.threads}, prefill of {args.tokens} tokens, decode of "
          f"{args.decode} tokens after it (per token = (run - prefill) / tokens), {args.rounds} interleaved rounds")
    print(f"{'variant':40s} {'prefill ms':>11s} {'ratio':>6s} {'decode ms/token':>16s} {'ratio':>6s}")
    for k in variants:
        per_tok = max(dec[k] - pre[k], 0.0) / args.decode
        ref_tok = max(dec[ref] - pre[ref], 0.0) / args.decode
        print(f"{k:40s} {pre[k] * 1e3:11.1f} {pre[k] / pre[ref]:6.2f} {per_tok * 1e3:16.1f} {per_tok / ref_tok:6.2f}")


if __name__ == "__main__":
    main()
