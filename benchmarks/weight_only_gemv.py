"""Weight-only GEMV/GEMM speed on the CPU at fp32, int8, 4-bit and 2-bit, on every block linear of the default
model (30 blocks x q/k/v/o/gate/up/down), against the memory-bandwidth limit.

One "pass" multiplies an activation through all 210 weight matrices once, as one decode step (M=1, GEMV) or one
128-token prefill (M=128, GEMM) does; the model's weights (425 MB in fp32) do not fit in cache, so a GEMV pass is
bounded by how fast the weights stream from memory. Kernels:
- torch: fp32 `F.linear` and the dynamic int8 linear (fbgemm), one Python call per matrix, as eager torch runs.
- onnxruntime: fp32 `MatMul` and `MatMulNBits` at 8, 4 and 2 bits (block 128, accuracy_level 4 = int8 compute,
  and 1 = fp32 compute for 4-bit), the kernels `hardware=cpu_kernels` deploys. Each runs as one ONNX graph of
  all 210 nodes per pass, so the time is the kernels'. One more row runs int4 as `cpu_kernels` deploys it today,
  one session per linear called from torch: the gap to the one-graph row is per-call overhead, not kernel time.
- ggml (llama.cpp's kernels; optional: `pip install -e .[ggml]`, ggml-python builds ggml from source): F32, Q8_0, Q4_0
  (blocks of 32, 4.5 bits/weight) and Q2_K (super-blocks of 256, 2.625 bits/weight), one ggml graph per pass.
Weights are random (speed does not depend on their values): codes for onnxruntime and torch int8, normal
floats quantized by ggml's own quantizer for ggml. All variants run in interleaved rounds in one process, so
load drift hits all of them alike. The bandwidth is measured here too (a sum over a 1 GiB tensor on the same
threads), and each variant's "limit" is its weight bytes / that bandwidth: the time a pass would take if it
only streamed its weights. Speed-ups are given against torch fp32 and against the fastest fp32 kernel measured.

Usage: .venv/bin/python benchmarks/weight_only_gemv.py [--threads 1] [--rounds 7] [--m 1 128]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from timing import interleaved_medians

from bench import models
from bench.hardware.cpu_kernels import MatMulNBitsLinear, matmulnbits_node, ort_session, torch_dynamic_int8

BLOCK = 128


def shapes_of_default_model() -> list[tuple[int, int]]:
    model = models.load(models.default_spec())
    return [tuple(r.module.weight.shape) for r in model.adapter.linears()]


def bandwidth_bytes_per_s(gib: float = 1.0, rounds: int = 5) -> float:
    """Read bandwidth: the best of `rounds` sums over a 1 GiB tensor, on torch's threads (set to --threads)."""
    a = torch.ones(int(gib * 2**30) // 8, dtype=torch.float64)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 8 / best


class OrtPass:
    """All matrices as one onnxruntime graph: input A<k> (M, k) per width k, output Y<i> per matrix."""

    def __init__(self, shapes, threads, make_node):
        nodes, inits, self.weight_bytes = [], [], 0
        for i, (n, k) in enumerate(shapes):
            node, node_inits, nbytes = make_node(i, n, k)
            nodes.append(node)
            inits += node_inits
            self.weight_bytes += nbytes
        widths = {k for _, k in shapes}
        self.session = ort_session(nodes, inits, {f"A{k}": k for k in widths},
                                   {f"Y{i}": n for i, (n, _) in enumerate(shapes)}, threads)

    def run(self, x_of):
        return self.session.run(None, {f"A{k}": x.numpy() for k, x in x_of.items()})


class GgmlPass:
    """All matrices as one ggml graph of mul_mat nodes on weights quantized to `gtype` by ggml."""

    def __init__(self, ggml, gtype, shapes, threads, m, rng):
        self.ggml = ggml
        self.weight_bytes = sum(ggml.ggml_row_size(gtype, k) * n for n, k in shapes)
        widths = sorted({k for _, k in shapes})
        nodes = 4 * len(shapes)
        mem = (self.weight_bytes + 4 * m * (sum(widths) + sum(n for n, _ in shapes))
               + nodes * ggml.ggml_tensor_overhead() + ggml.ggml_graph_overhead_custom(nodes, False))
        self.ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=mem + 2**20, mem_buffer=None, no_alloc=False))
        self.x = {}
        for k in widths:
            self.x[k] = ggml.ggml_new_tensor_2d(self.ctx, ggml.GGML_TYPE_F32, k, m)
            self._fill(self.x[k], rng.standard_normal((m, k)).astype(np.float32))
        self.graph = ggml.ggml_new_graph_custom(self.ctx, nodes, False)
        for n, k in shapes:
            w = ggml.ggml_new_tensor_2d(self.ctx, gtype, k, n)
            rows = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
            if gtype == ggml.GGML_TYPE_F32:
                self._fill(w, rows)
            else:
                ggml.ggml_quantize_chunk(gtype, rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                         ggml.ggml_get_data(w), 0, n, k, None)
            ggml.ggml_build_forward_expand(self.graph, ggml.ggml_mul_mat(self.ctx, w, self.x[k]))
        # one plan and work buffer, reused: compute_with_ctx would allocate a new work buffer per call
        self.plan = ggml.ggml_graph_plan(self.graph, threads, None)
        self.work = (ctypes.c_uint8 * max(self.plan.work_size, 1))()
        self.plan.work_data = ctypes.cast(self.work, ctypes.POINTER(ctypes.c_uint8))

    def _fill(self, tensor, array):
        ctypes.memmove(self.ggml.ggml_get_data(tensor), array.ctypes.data, array.nbytes)

    def run(self):
        self.ggml.ggml_graph_compute(self.graph, ctypes.byref(self.plan))


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
    rng = np.random.default_rng(0)
    fp32 = [torch.randn(n, k, generator=g) * 0.02 for n, k in shapes]

    def codes(n, k, bits):
        return torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)

    def scales(n, k, block):
        return torch.rand(n, -(-k // block), generator=g) * 0.01 + 1e-3

    def ort_fp32_node(i, n, k):
        from onnx import helper, numpy_helper
        w = fp32[i].T.contiguous().numpy()
        node = helper.make_node("MatMul", [f"A{k}", f"W{i}"], [f"Y{i}"])
        return node, [numpy_helper.from_array(w, f"W{i}")], w.nbytes

    def ort_nbits_node(bits, level):
        return lambda i, n, k: matmulnbits_node(codes(n, k, bits), scales(n, k, BLOCK), None, bits, BLOCK, level,
                                                a=f"A{k}", y=f"Y{i}")

    torch_int8 = [torch_dynamic_int8(codes(n, k, 8), scales(n, k, k).reshape(n), None, None) for n, k in shapes]
    ort = {"fp32 ort MatMul": OrtPass(shapes, args.threads, ort_fp32_node)}
    for bits, level in ((8, 4), (4, 4), (4, 1), (2, 4)):
        name = f"int{bits} ort MatMulNBits b{BLOCK} acc{level}"
        ort[name] = OrtPass(shapes, args.threads, ort_nbits_node(bits, level))
    per_layer_int4 = [MatMulNBitsLinear(codes(n, k, 4), scales(n, k, BLOCK), None, 4, BLOCK, None, None, 4,
                                        args.threads) for n, k in shapes]
    per_layer_name = "int4 acc4, a session per linear (deployed)"
    weight_bytes = {"fp32 torch F.linear": sum(w.numel() * 4 for w in fp32),
                    "int8 torch dynamic (fbgemm)": sum(lin.weight_bytes for lin in torch_int8),
                    per_layer_name: sum(lin.weight_bytes for lin in per_layer_int4)}
    weight_bytes.update({name: p.weight_bytes for name, p in ort.items()})
    try:
        import ggml
    except ImportError:
        ggml = None
        print("ggml rows skipped: `pip install -e .[ggml]` (builds llama.cpp's ggml from source, ~10 min) adds them")
    ggml_types = {} if ggml is None else {"fp32 ggml F32": ggml.GGML_TYPE_F32, "int8 ggml Q8_0": ggml.GGML_TYPE_Q8_0,
                                          "int4 ggml Q4_0": ggml.GGML_TYPE_Q4_0, "int2 ggml Q2_K": ggml.GGML_TYPE_Q2_K}
    bw = bandwidth_bytes_per_s()
    print(f"default model block linears: {len(shapes)} matrices, {sum(n * k for n, k in shapes) / 1e6:.1f} M weights; "
          f"threads={args.threads}; measured read bandwidth {bw / 1e9:.2f} GB/s (torch sum over 1 GiB)")
    widths = {k for _, k in shapes}

    for m in args.m:
        x_of = {k: torch.randn(m, k, generator=g) for k in widths}
        runs = {"fp32 torch F.linear": lambda: [F.linear(x_of[k], w) for w, (_, k) in zip(fp32, shapes)],
                "int8 torch dynamic (fbgemm)": lambda: [lin(x_of[k]) for lin, (_, k) in zip(torch_int8, shapes)],
                per_layer_name: lambda: [lin(x_of[k]) for lin, (_, k) in zip(per_layer_int4, shapes)]}
        runs.update({name: (lambda p=p: p.run(x_of)) for name, p in ort.items()})
        ggml_passes = {name: GgmlPass(ggml, t, shapes, args.threads, m, rng) for name, t in ggml_types.items()}
        runs.update({name: p.run for name, p in ggml_passes.items()})
        sizes = {**weight_bytes, **{name: p.weight_bytes for name, p in ggml_passes.items()}}
        with torch.inference_mode():
            med = interleaved_medians(runs, args.rounds)
        base = med["fp32 torch F.linear"]
        best_fp32 = min(t for name, t in med.items() if name.startswith("fp32"))
        print(f"\nM={m} ({'GEMV, one decode step' if m == 1 else f'GEMM, a {m}-token prefill'}): one pass over all "
              f"{len(shapes)} matrices, median of {args.rounds} interleaved rounds")
        print(f"{'kernel':44s} {'weights MB':>10s} {'ms/pass':>9s} {'vs torch fp32':>13s} {'vs best fp32':>12s} "
              f"{'limit ms':>9s} {'time / limit':>12s}")
        for name, t in sorted(med.items(), key=lambda kv: (kv[0][:4], kv[1])):
            limit = sizes[name] / bw
            print(f"{name:44s} {sizes[name] / 1e6:10.1f} {t * 1e3:9.2f} {base / t:12.2f}x {best_fp32 / t:11.2f}x "
                  f"{limit * 1e3:9.2f} {t / limit:12.2f}")
        for bits, target in ((4, 3), (2, 5)) if m == 1 else ():  # issue 11's targets are for the GEMV
            name, t = min(((n, t) for n, t in med.items() if n.startswith(f"int{bits} ")), key=lambda kv: kv[1])
            print(f"target {bits}-bit >= {target}x fp32: fastest is {name}, {best_fp32 / t:.2f}x the fastest fp32 "
                  f"kernel, {base / t:.2f}x torch fp32")
        for p in ggml_passes.values():
            ggml.ggml_free(p.ctx)


if __name__ == "__main__":
    main()
