"""The CPU's int8 matrix units for deployment (issue 28, item 6): which ISA each int8 kernel really runs here, and
what W8A8 / W4A8 prefill costs on it against torch fp32 and bf16 (autocast), side by side in one process.

Parts (`--parts`, comma-separated):
- isa: for each kernel, (1) the implementation oneDNN reports in its verbose log where oneDNN runs it, and (2) the
  instructions the kernel spends its time in, sampled: `perf record` on this process while the kernel runs in a
  loop, then the code at each sampled address (read from /proc/self/mem, so JIT code of oneDNN and fbgemm counts
  too) is disassembled by objdump from that address on (96 bytes) and the sample is classed by the first matrix
  instruction found there, in this order: AMX-INT8 (tdpb[su][su]d), AMX-BF16 (tdpbf16ps), AMX tile loads and
  stores, VNNI (vpdpbusd, vpdpbssd), int8 without VNNI (vpmaddubsw), AVX512-BF16 (vdpbf16ps), fp32 FMA
  (vfmadd*ps). "other" is code with none of these (quantizing activations, packing, Python, copies, and the
  parts of a matmul loop more than 96 bytes before its next matrix instruction), "kernel" the OS (page faults).
  Needs `perf` and `objdump`; without them only (1) is printed.
- layers: every linear shape of the default model (576->1536 gate/up, 1536->576 down, 576->576 q/o, 576->192
  k/v) at each --tokens (rows), each kernel on random codes (speed does not depend on values); ms, ratio to
  torch fp32 and to bf16 autocast, and G(FL)OP/s (1 MAC = 2 ops); then one decoder block's linears (2x q/o,
  2x k/v, 2x gate/up, 1x down) summed.
- prefill: the default model's forward on the first --tokens of the WikiText-2 test text (the GPTQ-protocol
  stream), dense fp32 and bf16 (autocast), and RTN W8 per channel (symmetric) and RTN W4 g128 deployed by
  `hardware=cpu_kernels` on each kernel it offers, the torch rest (attention, norms, head) in fp32 and, with
  --rest bf16, under bf16 autocast (`precision=bf16`). With --ppl-windows N, the GPTQ-protocol perplexity of
  the first N 2048-token windows on each variant (the accuracy `cpu_kernels` re-measures as `.deployed`).
All variants of a table run in interleaved rounds (A B C A B C ...), so drift in machine load hits all alike.

Kernels (int8 activations unless said):
- `torch-int8-onednn` (hardware/cpu_kernels.py `OnednnInt8Linear`): oneDNN's int8 matmul through torch's
  `onednn::qlinear_pointwise`, activations int8 per token (as the methods' `act_bits=8` fake-quant), weights
  the method's codes centred to int8, one matmul per group for grouped grids;
- `torch dynamic x86/fbgemm` and `torch dynamic onednn`: `quantized::linear_dynamic` (activations uint8 per tensor;
  the onednn engine refuses asymmetric weights);
- `torch._int_mm` (int8 x int8 -> int32, oneDNN's gemm API: weights re-packed every call) with per-token scales;
- `ort MatMulNBits int8/int4 acc4`: onnxruntime's MLAS int8 kernels (activations int8 per block);
  `ort DynamicQuantizeMatMul`: MLAS's u8s8 QGEMM (activations uint8 per tensor), for the ISA question only;
- weight-only, for reference: `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu` (bf16 activations).
Peak per core and cycle of each instruction class (Intel's published throughputs, two 512-bit FMA ports):
fp32 FMA 64 FLOP, int8 without VNNI (vpmaddubsw + vpmaddwd + vpaddd) ~170 OP, VNNI 256 OP, AMX-INT8 2048 OP,
AMX-BF16 1024 FLOP: an int8 kernel above ~2.7x the measured fp32 GFLOP/s cannot be running without VNNI.

Usage: .venv/bin/python benchmarks/int8_units.py [--threads 1] [--rounds 5] [--tokens 128 2048]
       [--parts isa,layers,prefill] [--rest fp32 bf16] [--ppl-windows 0]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import gc
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from timing import interleaved_medians

from bench import models, precision
from bench.hardware.cpu_kernels import (CpuKernelsBackend, MatMulNBitsLinear, OnednnInt8Linear, ort_session,
                                        torch_dynamic_int8)
from bench.methods.rtn import RTN
from bench.precision import onednn_matmul_impl

SHAPES = {"q/o 576->576": (576, 576), "k/v 576->192": (192, 576), "gate/up 576->1536": (1536, 576),
          "down 1536->576": (576, 1536)}
PER_BLOCK = {"q/o 576->576": 2, "k/v 576->192": 2, "gate/up 576->1536": 2, "down 1536->576": 1}
GROUP = 128
CLASSES = [("amx-int8", r"\btdpb[su][su]d\b"), ("amx-bf16", r"\btdpbf16ps\b"),
           ("amx-tile-move", r"\b(tileloaddt?1?|tilestored|tilezero)\b"), ("vnni", r"\bvpdpb[su][su]ds?\b"),
           ("int8-no-vnni", r"\bvpmaddubsw\b"), ("avx512-bf16", r"\bvdpbf16ps\b"),
           ("fp32-fma", r"\bvfn?m(add|sub)\w*ps\b")]


# -- the kernels on one (n, k) weight ------------------------------------------------------------------------------
def kernels(n: int, k: int, threads: int, g: torch.Generator) -> dict:
    """name -> callable(x) for one weight shape; codes and scales random (speed does not depend on values)."""
    w = torch.randn(n, k, generator=g) * 0.02
    codes8 = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8)
    codes4 = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    s_ch = torch.rand(n, 1, generator=g) * 0.01 + 1e-3
    s_g = torch.rand(n, -(-k // GROUP), generator=g) * 0.01 + 1e-3
    z_g = torch.randint(0, 16, s_g.shape, generator=g, dtype=torch.uint8)
    per_ch_block = max(16, 1 << (k - 1).bit_length())
    int8_sym = (codes8.to(torch.int16) - 128).to(torch.int8)

    def bf16(x):
        with precision.compute("bf16"):
            return F.linear(x, w)

    def int_mm(wt=int8_sym.T.contiguous(), sw=s_ch.reshape(1, n)):
        def run(x):
            sx = x.abs().amax(1, keepdim=True) / 127
            q = (x / sx).round_().clamp_(-128, 127).to(torch.int8)
            return torch._int_mm(q, wt).to(torch.float32).mul_(sx * sw)
        return run

    def dqm_session():  # onnxruntime's DynamicQuantizeMatMul: MLAS u8s8 QGEMM, activations uint8 per tensor
        from onnx import helper, numpy_helper
        inits = [numpy_helper.from_array(int8_sym.T.contiguous().numpy(), "B"),
                 numpy_helper.from_array(s_ch.reshape(n).numpy(), "S"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "Z")]
        node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft")
        sess = ort_session([node], inits, {"A": k}, {"Y": n}, threads)
        return lambda x: sess.run(None, {"A": x.numpy()})[0]

    w8pack = (int8_sym, s_ch.reshape(n).to(torch.bfloat16))
    # torch's int4 pack needs groups dividing the width: 64 here (576 = 9 x 64); w = (q - 8) s + z per group
    s64 = torch.rand(k // 64, n, generator=g) * 0.01 + 1e-3
    w4pack = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4.to(torch.int32), 1),
              torch.stack([s64, torch.zeros_like(s64)], -1).to(torch.bfloat16).contiguous())
    return {
        "fp32 torch F.linear": lambda x: F.linear(x, w),
        "bf16 torch autocast": bf16,
        "W8A8 torch-int8-onednn (per token)": OnednnInt8Linear(codes8, s_ch, None, 8, None, None, None),
        "W8A8 torch dynamic x86/fbgemm (per tensor)": torch_dynamic_int8(codes8, s_ch, None, None, "x86"),
        "W8A8 torch dynamic onednn (per tensor)": torch_dynamic_int8(codes8, s_ch, None, None, "onednn"),
        "W8A8 torch._int_mm (per token)": int_mm(),
        "W8A8 ort MatMulNBits int8 acc4": MatMulNBitsLinear(codes8, s_ch, None, 8, per_ch_block, None, None, 4,
                                                            threads),
        "W8A8 ort DynamicQuantizeMatMul": dqm_session(),
        f"W4A8 torch-int8-onednn g{GROUP} (per token)": OnednnInt8Linear(codes4, s_g, z_g, 4, GROUP, None, None),
        f"W4A8 ort MatMulNBits int4 g{GROUP} acc4": MatMulNBitsLinear(codes4, s_g, z_g, 4, GROUP, None, None, 4,
                                                                      threads),
        "W8A16 torch _weight_int8pack_mm (bf16)": lambda x: torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16), *w8pack),
        "W4A16 torch _weight_int4pack_mm_for_cpu g64 (bf16)": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), w4pack[0], 64, w4pack[1]),
    }


# -- ISA evidence -----------------------------------------------------------------------------------------------
def sampled_ips(run, seconds: float) -> collections.Counter:
    """Instruction addresses of this process sampled by perf (cpu-clock, 2 kHz) while run() loops."""
    run()
    with tempfile.TemporaryDirectory() as d:
        data = os.path.join(d, "perf.data")
        perf = subprocess.Popen(["perf", "record", "-q", "-F", "2000", "-e", "cpu-clock", "-p", str(os.getpid()),
                                 "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # perf attaches
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run()
        perf.send_signal(2)
        perf.wait()
        out = subprocess.run(["perf", "script", "-i", data, "-F", "ip"], capture_output=True, text=True).stdout
    return collections.Counter(int(tok, 16) for tok in out.split())


def instruction_classes(ips: collections.Counter, window: int = 96) -> dict[str, float]:
    """Share of samples by the first matrix instruction in the code at each sampled address."""
    shares, total = collections.Counter(), sum(ips.values())
    disasm = {}
    mem = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        with tempfile.NamedTemporaryFile(suffix=".bin") as f:
            for ip, count in ips.items():
                if ip >= 1 << 47:
                    shares["kernel"] += count
                    continue
                try:
                    code = os.pread(mem, window, ip)
                except OSError:
                    shares["unreadable"] += count
                    continue
                if code not in disasm:
                    f.seek(0)
                    f.truncate()
                    f.write(code)
                    f.flush()
                    text = subprocess.run(["objdump", "-D", "-b", "binary", "-mi386:x86-64", f.name],
                                          capture_output=True, text=True).stdout
                    disasm[code] = next((c for c, pattern in CLASSES if re.search(pattern, text)), "other")
                shares[disasm[code]] += count
    finally:
        os.close(mem)
    return {c: n / max(total, 1) for c, n in shares.most_common()}


def part_isa(threads: int, seconds: float) -> None:
    flags = precision.cpu_flags()
    units = [f for f in ("amx_tile", "amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni", "avx512_bf16") if f in flags]
    import onnxruntime
    print(f"CPU matrix flags: {' '.join(units) or 'none'}; torch {torch.__version__} (capability "
          f"{torch.backends.cpu.get_cpu_capability()}, quantized engines "
          f"{torch.backends.quantized.supported_engines}); "
          f"onnxruntime {onnxruntime.__version__}; threads {threads}")
    can_sample = shutil.which("perf") and shutil.which("objdump")
    if not can_sample:
        print("perf/objdump not found: instruction sampling skipped (install linux-tools and binutils)")
    n, k = SHAPES["gate/up 576->1536"]
    x = torch.randn(512, k)
    runs = kernels(n, k, threads, torch.Generator().manual_seed(0))
    print(f"\nISA evidence, {n}x{k} weight, 512 rows; sampled shares over {seconds:.1f} s per kernel")
    print(f"{'kernel':58s} {'oneDNN implementation':30s} instruction classes of the sampled time")
    for name, run in runs.items():
        impl = onednn_matmul_impl(lambda: run(x))
        if not can_sample:
            print(f"{name:58s} {impl:30s}")
            continue
        ips = sampled_ips(lambda: run(x), seconds)
        shares = instruction_classes(ips)
        text = ", ".join(f"{c} {s:.0%}" for c, s in shares.items() if s >= 0.01)
        print(f"{name:58s} {impl:30s} {text}  ({sum(ips.values())} samples)")


# -- layer shapes --------------------------------------------------------------------------------------------------
def part_layers(threads: int, rounds: int, tokens: list[int], stat, clock) -> None:
    g = torch.Generator().manual_seed(0)
    per_shape = {label: kernels(n, k, threads, g) for label, (n, k) in SHAPES.items()}
    for m in tokens:
        block = collections.Counter()
        for label, (n, k) in SHAPES.items():
            x = torch.randn(m, k, generator=g)
            runs = {name: (lambda f=f: f(x)) for name, f in per_shape[label].items()}
            with torch.inference_mode():
                med = interleaved_medians(runs, rounds, statistic=stat, clock=clock)
            for name, t in med.items():
                block[name] += PER_BLOCK[label] * t
            print(f"\n{m} rows x {label} (weight {n}x{k}): {stat.__name__} of {rounds} interleaved rounds "
                  f"({clock.__name__})")
            table(med, 2 * m * n * k)
        print(f"\n{m} rows, one decoder block's linears (2x q/o, 2x k/v, 2x gate/up, 1x down), summed")
        table(dict(block), 2 * m * sum(PER_BLOCK[lb] * n * k for lb, (n, k) in SHAPES.items()))


def table(med: dict[str, float], ops: int) -> None:
    fp32, bf16 = med["fp32 torch F.linear"], med["bf16 torch autocast"]
    print(f"{'kernel':58s} {'ms':>9s} {'fp32/this':>10s} {'bf16/this':>10s} {'G(FL)OP/s':>10s}")
    for name, t in med.items():
        print(f"{name:58s} {t * 1e3:9.3f} {fp32 / t:9.2f}x {bf16 / t:9.2f}x {ops / t / 1e9:10.1f}")


# -- full prefill of the default model ----------------------------------------------------------------------------
FORMATS = {  # name -> (RTN settings, the cpu_kernels options to deploy it with)
    "W8 ch sym": (dict(bits=8, group_size=-1, symmetric=True),
                  [dict(int8_kernel=k) for k in ("onednn_per_token", "torch_dynamic_onednn", "torch_dynamic",
                                                 "ort_matmulnbits")]),
    f"W4 g{GROUP}": (dict(bits=4, group_size=GROUP), [dict(lowbit_kernel=k) for k in ("onednn_per_token",
                                                                                      "ort_matmulnbits")]),
}
ACT_FORMATS = {  # the methods' own W8A8 / W4A8 (per-token int8 activations): accuracy only, the kernel is timed above
    "W8A8 ch sym (act_bits=8)": (dict(bits=8, group_size=-1, symmetric=True, act_bits=8),
                                 [dict(int8_kernel="onednn_per_token")]),
    f"W4A8 g{GROUP} (act_bits=8)": (dict(bits=4, group_size=GROUP, act_bits=8),
                                    [dict(lowbit_kernel="onednn_per_token")]),
}


def deployed_variants(base, threads: int, fmt: str, rtn: dict, options: list[dict], fake_quant: bool) -> dict:
    """name -> the nn.Module that runs: RTN's packed model deployed by cpu_kernels with each option (and, with
    fake_quant, the packed torch model itself)."""
    packed = RTN(**rtn).compress(models.clone(base), None, None)
    out = {f"{fmt} fake-quant": packed.model} if fake_quant else {}
    for opt in options:
        deployed = CpuKernelsBackend(threads=threads, accuracy_level=4, **opt).deploy(packed)
        out[f"{fmt} {deployed.execution}"] = deployed.model
    del packed, deployed
    release_memory()
    return out


def release_memory() -> None:
    """Give freed memory back to the OS (the packed fp32 copies): on a shared machine a run holding ~8 GB of
    freed heap was OOM-killed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def part_ppl(base, threads: int, windows: int) -> None:
    """One format at a time (each packed model is a full fp32 copy of the default model)."""
    from bench.tasks.wikitext import WikiText2Perplexity

    task = WikiText2Perplexity(limit=windows)
    print(f"\nGPTQ-protocol perplexity of the first {windows} WikiText-2 test window(s) (2048 tokens), torch rest "
          "in fp32 (dense: also bf16); the accuracy cpu_kernels re-measures as `.deployed`")

    def ppl(name: str, module, rest: str = "fp32") -> None:
        with precision.compute(rest):
            value = task.evaluate(models.with_module(base, module))[0].value
        print(f"{name + ', ' + rest:80s} {value:9.4f}", flush=True)

    ppl("dense", base.module)
    ppl("dense", base.module, "bf16")
    for fmt, (rtn, options) in {**FORMATS, **ACT_FORMATS}.items():
        for name, module in deployed_variants(base, threads, fmt, rtn, options, True).items():
            ppl(name, module)


def part_prefill(base, threads: int, rounds: int, tokens: list[int], rests: list[str], decode: int, stat,
                 clock) -> None:
    from cpu_kernels_latency import decode as greedy_decode

    from bench.tasks.wikitext import WikiText2Perplexity

    ids = WikiText2Perplexity().token_ids(base)
    runs_of = {"dense fp32 torch": (base.module, "fp32"), "dense bf16 torch": (base.module, "bf16")}
    for fmt, (rtn, options) in FORMATS.items():
        for name, module in deployed_variants(base, threads, fmt, rtn, options, False).items():
            runs_of.update({f"{name}, rest {rest}": (module, rest) for rest in rests})

    def report(title: str, med: dict, unit: str, scale: float) -> None:
        fp32, bf16 = med["dense fp32 torch"], med["dense bf16 torch"]
        print(f"\n{title}, default model, {stat.__name__} of {rounds} interleaved rounds ({clock.__name__})")
        print(f"{'variant':80s} {unit:>8s} {'fp32/this':>10s} {'bf16/this':>10s}")
        for name, t in med.items():
            print(f"{name:80s} {t * scale:8.3f} {fp32 / t:9.2f}x {bf16 / t:9.2f}x")

    def in_precision(rest, fn):
        with precision.compute(rest):
            fn()

    for m in tokens:
        batch = ids[:, :m]
        runs = {name: (lambda mod=mod, rest=rest: in_precision(rest, lambda: mod(batch, use_cache=False)))
                for name, (mod, rest) in runs_of.items()}
        with torch.inference_mode():
            med = interleaved_medians(runs, rounds, statistic=stat, clock=clock)
        report(f"prefill of {m} WikiText-2 tokens", med, "s", 1.0)
    if decode:  # greedy decode after a 128-token prompt; per token = (prompt + decode - prompt) / tokens
        batch = ids[:, :128]
        with torch.inference_mode():
            both = interleaved_medians(
                {name: (lambda mod=mod, rest=rest: in_precision(rest, lambda: greedy_decode(mod, batch, decode)))
                 for name, (mod, rest) in runs_of.items()}, rounds, statistic=stat, clock=clock)
            pre = interleaved_medians(
                {name: (lambda mod=mod, rest=rest: in_precision(rest, lambda: mod(batch, use_cache=True)))
                 for name, (mod, rest) in runs_of.items()}, rounds, statistic=stat, clock=clock)
        report(f"decode per token after a 128-token prompt ({decode} tokens)",
               {k: max(both[k] - pre[k], 1e-9) / decode for k in both}, "ms", 1e3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 2048], help="rows (prefill tokens)")
    ap.add_argument("--parts", default="isa,layers,prefill")
    ap.add_argument("--rest", nargs="+", default=["fp32", "bf16"], choices=precision.PRECISIONS,
                    help="precision of the torch rest (attention, norms, head) around the deployed kernels")
    ap.add_argument("--ppl-windows", type=int, default=0, help="the ppl part's windows (0: no ppl part)")
    ap.add_argument("--decode", type=int, default=0, help="decode tokens timed after the prefills (0: none)")
    ap.add_argument("--isa-seconds", type=float, default=1.5)
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="per-variant statistic over the rounds: median (idle machine) or min (a shared core)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (only meaningful at --threads 1 on a shared core)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
    parts = set(args.parts.split(","))
    stat = statistics.median if args.stat == "median" else min
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu sums the CPU time of all threads: use it with --threads 1 only")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if "isa" in parts:
        part_isa(args.threads, args.isa_seconds)
    if "layers" in parts:
        part_layers(args.threads, args.rounds, args.tokens, stat, clock)
    if args.ppl_windows or "prefill" in parts:
        base = models.load(models.default_spec())
        if args.ppl_windows:
            part_ppl(base, args.threads, args.ppl_windows)
        if "prefill" in parts:
            part_prefill(base, args.threads, args.rounds, args.tokens, args.rest, args.decode, stat, clock)


if __name__ == "__main__":
    main()
