"""Does sparsity buy speed on this CPU? (issue 9, Done 2.) The default model's block linears (576x576,
192x576, 1536x576, 576x1536) times a prefill batch of tokens, at 50% unstructured and 2:4 sparsity, run
four ways side by side in interleaved rounds:
  dense         ordinary fp32 matmul on the pruned weight (zeros included): what `bench` runs today;
  csr           torch.sparse CSR weight (MKL sparse-dense matmul), the CPU's real sparse kernel;
  coo           torch.sparse COO weight;
  semi-structured 2:4  torch.sparse.to_sparse_semi_structured, where this build supports it (CUDA only
                in stock PyTorch: reported as unavailable with its reason, never timed as dense).
Prints median seconds and the speed-up over dense (>1 = faster). Then the end-to-end check of what `bench`
records for pruned cells: the default model's prefill with every block linear 2:4-pruned (run as dense
matmuls on zeros, `dense-zeros`) against the unpruned model, interleaved.

Usage: .venv/bin/python benchmarks/sparse_matmul.py [--tokens 512] [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_medians

from bench import models
from bench.compress.sparsity import Pattern, keep_top

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, {args.tokens} tokens, {args.rounds} interleaved rounds, torch {torch.__version__}")
    try:
        torch.sparse.to_sparse_semi_structured(torch.ones(64, 64))
        semi = None
    except Exception as e:  # noqa: BLE001 - the reason is the result
        semi = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    print(f"semi-structured 2:4 kernel: {'available' if semi is None else 'unavailable (' + semi + ')'}")
    print("shape (out x in) | pattern      | dense s  | csr s    | coo s    | csr speed-up | coo speed-up")
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=g)
        x = torch.randn(args.tokens, in_f, generator=g)
        for pattern in ("unstructured", "2:4"):
            p = Pattern.parse(pattern, 0.5)
            wp = w * keep_top(w.abs(), p)
            csr, coo = wp.to_sparse_csr(), wp.to_sparse()
            runs = {"dense": lambda: x @ wp.T, "csr": lambda: torch.sparse.mm(csr, x.T),
                    "coo": lambda: torch.sparse.mm(coo, x.T)}
            assert torch.allclose(runs["csr"]().T, runs["dense"](), atol=1e-3)
            med = interleaved_medians(runs, args.rounds)
            print(f"{out_f:5d} x {in_f:<9d} | {pattern:12s} | {med['dense']:.6f} | {med['csr']:.6f} | "
                  f"{med['coo']:.6f} | {med['dense'] / med['csr']:12.3f} | {med['dense'] / med['coo']:12.3f}")

    base = models.load(models.default_spec())
    pruned = models.clone(base)
    with torch.no_grad():
        for ref in pruned.adapter.linears():
            w = ref.module.weight
            w.mul_(keep_top(w.abs(), Pattern.parse("2:4", 0.5)))
    ids = torch.randint(0, 1000, (1, args.tokens), generator=g)
    variants = {"dense": base.module, "2:4 dense-zeros": pruned.module}
    with torch.no_grad():
        med = interleaved_medians({k: lambda mod=mod: mod(ids, use_cache=False) for k, mod in variants.items()},
                                  args.rounds)
    for k in variants:
        print(f"end-to-end prefill {k:16s}: {med[k]:.4f} s, speed-up {med['dense'] / med[k]:.3f}x")


if __name__ == "__main__":
    main()
