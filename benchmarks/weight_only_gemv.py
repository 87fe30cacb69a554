"""Weight-only GEMV/GEMM speed on the CPU at fp32, int8, 4-bit and 2-bit, on every block linear of the default
model (30 blocks x q/k/v/o/gate/up/down), against the memory-bandwidth limit.

One "pass" multiplies an activation through all 210 weight matrices once, as one decode step (M=1, GEMV) or one
128-token prefill (M=128, GEMM) does; the model's weights (425 MB in fp32) do not fit in cache, so a GEMV pass is
bounded by how fast the weights stream from memory. Kernels: torch fp32 `F.linear`; torch's dynamic int8 linear
(fbgemm); onnxruntime MatMulNBits at 8, 4 and 2 bits (block 128, accuracy_level 4 = int8 compute, and 1 = fp32
compute for 4-bit), exactly the kernels `hardware=cpu_kernels` deploys. Weights are random codes (speed does
not depend on their values). All variants run in interleaved rounds in one process, so load drift hits all of
them alike. The bandwidth is measured here too (numpy sum over a 1 GiB array), and each variant's
"limit" is its weight bytes / that bandwidth: the time a pass would take if it only streamed its weights.

Usage: .venv/bin/python benchmarks/weight_only_gemv.py [--threads 1] [--rounds 7] [--m 1 128]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from timing import interleaved_medians

from bench import models
from bench.hardware.cpu_kernels import MatMulNBitsLinear, torch_dynamic_int8

BLOCK = 128


def shapes_of_default_model() -> list[tuple[int, int]]:
    model = models.load(models.default_spec())
    return [tuple(r.module.weight.shape) for r in model.adapter.linears()]


def bandwidth_bytes_per_s(gib: float = 1.0, rounds: int = 5) -> float:
    a = np.ones(int(gib * 2**30) // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 128], help="rows of the activation (1 = GEMV)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    shapes = shapes_of_default_model()
    g = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes]

    def codes(n, k, bits):
        return torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)

    def scales(n, k, block):
        return torch.rand(n, -(-k // block), generator=g) * 0.01 + 1e-3

    variants: dict[str, list] = {"fp32 torch": fp32}
    variants["int8 torch dynamic (fbgemm)"] = [
        torch_dynamic_int8(codes(n, k, 8), scales(n, k, k).reshape(n), None, None) for n, k in shapes]
    for bits, level in ((8, 4), (4, 4), (4, 1), (2, 4)):
        variants[f"int{bits} ort MatMulNBits b{BLOCK} acc{level}"] = [
            MatMulNBitsLinear(codes(n, k, bits), scales(n, k, BLOCK), None, bits, BLOCK, None, None, level,
                              args.threads) for n, k in shapes]
    weight_bytes = {"fp32 torch": sum(w.numel() * 4 for w in fp32)}
    for name, layers in variants.items():
        if name != "fp32 torch":
            weight_bytes[name] = sum(layer.weight_bytes for layer in layers)
    bw = bandwidth_bytes_per_s()
    print(f"default model block linears: {len(shapes)} matrices, {sum(n * k for n, k in shapes) / 1e6:.1f} M weights; "
          f"threads={args.threads}; measured read bandwidth {bw / 1e9:.2f} GB/s (numpy sum over 1 GiB)")

    def one_pass(name, x_of):
        layers = variants[name]
        if name == "fp32 torch":
            return lambda: [F.linear(x_of[k], w) for w, k in zip(layers, (s[1] for s in shapes))]
        return lambda: [layer(x_of[k]) for layer, k in zip(layers, (s[1] for s in shapes))]

    for m in args.m:
        x_of = {k: torch.randn(m, k, generator=g) for k in {k for _, k in shapes}}
        with torch.inference_mode():
            med = interleaved_medians({name: one_pass(name, x_of) for name in variants}, args.rounds)
        base = med["fp32 torch"]
        print(f"\nM={m} ({'GEMV, one decode step' if m == 1 else f'GEMM, a {m}-token prefill'}): one pass over all "
              f"{len(shapes)} matrices, median of {args.rounds} interleaved rounds")
        print(f"{'kernel':40s} {'weights MB':>10s} {'ms/pass':>9s} {'speed vs fp32':>13s} {'bandwidth limit ms':>18s} "
              f"{'time / limit':>12s}")
        for name, t in med.items():
            limit = weight_bytes[name] / bw
            print(f"{name:40s} {weight_bytes[name] / 1e6:10.1f} {t * 1e3:9.2f} {base / t:12.2f}x {limit * 1e3:18.2f} "
                  f"{t / limit:12.2f}")
    print("\ntargets (issue 11): 4-bit >= 3x fp32, 2-bit >= 5x fp32, for the GEMV")


if __name__ == "__main__":
    main()
