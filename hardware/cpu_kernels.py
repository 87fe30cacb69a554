"""`cpu_kernels`: the compressed block linears of a causal LM exported to real low-bit CPU kernels, then timed
and re-evaluated on them.

What runs. Each compressed linear is replaced by a module that calls a kernel on the method's own stored
integer codes, scales and zero points (read from the artifact's tensors, never re-quantized here):
- the methods' int8 activations (`act_bits=8`, per token or per tensor, on any int2..int8 grid): oneDNN's
  int8 matmul through torch (`onednn::qlinear_pointwise`, `OnednnInt8Linear`; AMX-INT8 tiles on this
  Sapphire-Rapids-class CPU, as oneDNN's verbose log reports): the activations quantized exactly as the
  method's fake-quant does, the codes centred to int8, int32 sums, so the deployed layer is the fake-quant
  layer to float rounding. These W8A8 / W4A8 formats run on it whatever the options below say.
- int8 weights per output channel (`int8_kernel`): by default the same oneDNN kernel with the activations
  quantized per token (`onednn_per_token`); or torch's dynamic quantized linear (`quantized::linear_dynamic`)
  on the fbgemm/x86 engine (`torch_dynamic`, VNNI) or the oneDNN engine (`torch_dynamic_onednn`, AMX,
  symmetric grids only), both quantizing the activations per tensor at run time; or MatMulNBits.
- every other integer grid (`lowbit_kernel`): by default onnxruntime's `MatMulNBits` contrib op (one
  single-node ONNX graph per layer, CPU execution provider; MLAS's AVX512-VNNI kernels here).
  `accuracy_level` is set explicitly and recorded: 1 computes in fp32 on the dequantized weights, the
  fake-quant model's function to float rounding; 4 quantizes the activations to int8 per block (of at most
  256 columns) and runs MLAS's int8 GEMM, the fast path. A per-channel grid is one block of the next power of
  two >= the layer width (zero-padded); GPTQ's act-order runs the input columns in the stored order. Or
  `onednn_per_token`: one oneDNN int8 matmul per group, any width 2..8 (held as int8 at run time).
Everything else (attention, norms, embeddings, head) stays torch, in the run's precision. The task is
evaluated again on this model, so the record carries both accuracies and their difference (see
`HardwareBackend.deploy`); the execution string names each kernel (e.g. torch-int8-onednn-amx-int8-ch-a8-per_token,
ort-matmulnbits-int4-b128-acc4) and `onednn_int8_matmul` records oneDNN's implementation where it runs.

Why these defaults (benchmarks/int8_units.py, default model, 1 thread on a shared core, CPU time): on the
block linears at 2048 tokens, oneDNN int8 per token runs 1.98x torch fp32 (0.56x bf16 autocast: quantizing
the activations and scaling the fp32 output are memory-bound passes the int8 MACs do not shorten), MatMulNBits
int8 acc4 1.00x, torch dynamic x86 1.99x, torch dynamic onednn 4.16x (1.17x bf16). But activations quantized
per tensor ruin this model: WikiText-2 ppl (2 windows) W8 per-channel fake-quant 18.92, oneDNN per token
19.59, MatMulNBits acc4 19.22, torch dynamic onednn 51.08, torch dynamic x86 53.52. So per-channel int8 runs
the fastest kernel that keeps the accuracy, oneDNN per token; 2/4-bit grids stay on MatMulNBits, which holds
4-bit weights in memory (decode) and is as fast as the grouped oneDNN path at prefill.

Capabilities (onnxruntime 1.32, torch 2.13): MatMulNBits accepts bits 2, 4 and 8 only ("additional bits
support is planned"), blocks a power of two >= 16, and 2-bit blocks <= 256; oneDNN's int8 path accepts any
integer grid of 2..8 bits. A packed model needing anything else is `unsupported` with the reason: 3/5/6/7-bit
codes or other group sizes on MatMulNBits, binary or ternary weights, float weight formats, pruned (sparse)
weights, activation quantization other than int8, recovery adapters, convolutions. A dense (uncompressed)
model runs in torch, as on `cpu`.

Protocol: as `cpu` (bench/timing.py): warm-up, repetitions until min_reps and min_seconds, p50/p90/CV of the
prefill and of decode per token; torch and onnxruntime threads both set to `threads` and recorded. Energy:
RAPL when readable, else `model:horowitz_isscc2014_45nm` with each kernel's MACs at its arithmetic (fp32, or
int8 x int8 -> int32) and its stored weight bytes streamed from DRAM once per prefill.
"""

from __future__ import annotations

import copy
import functools
import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from bench import energy, timing
from bench.errors import ConfigError
from bench.layer_format import ActFormat, LayerFormat
from bench.packed import EXECUTION_DENSE, EXECUTION_SPARSE_AS_DENSE, Packed
from bench.plugins import Measurement, Workload
from bench.precision import onednn_matmul_impl
from bench.quant.integer import load_int_layer
from bench.timing import TimedBackend

MATMULNBITS_BITS = (2, 4, 8)  # onnxruntime 1.32 refuses other widths at session creation
MIN_BLOCK, MAX_BLOCK_2BIT = 16, 256
ACCURACY_LEVELS = {1: "fp32", 4: "int8"}  # MatMulNBits compute type on CPU -> the arithmetic of its MACs
INT8_KERNELS = ("torch_dynamic", "torch_dynamic_onednn", "onednn_per_token", "ort_matmulnbits")  # per-channel int8
LOWBIT_KERNELS = ("ort_matmulnbits", "onednn_per_token")  # every other integer grid


def int8_activations(act: ActFormat | None) -> str | None:
    """'per_token' or 'per_tensor' where a method quantizes a layer's inputs as OnednnInt8Linear computes them
    (bench.quant.activation's 8-bit dynamic integers, act_bits=8), else None."""
    if act is None or (act.kind, act.bits, act.scale, act.detail) != ("int", 8, "dynamic", ()):
        return None
    return act.granularity if act.granularity in ("per_token", "per_tensor") else None


_NO_KERNEL = {"binary": "binary weights ({}): no binary (xnor/popcount) kernel on this backend",
              "ternary": "ternary weights ({}): no ternary kernel on this backend",
              "float": "floating-point weight format ({}): no low-bit float kernel on this backend",
              "power": "power-function grid ({}): its levels are not equally spaced, no kernel here computes them"}


def format_reason(fmt: LayerFormat) -> str | None:
    """Why no kernel here runs a layer stored as `fmt`, before its bits and group are looked at (None: it is an
    integer grid with `stored_int_layer`'s tensors, fp32 or the methods' int8 activations, no adapter branch)."""
    if fmt.kind in _NO_KERNEL:
        return _NO_KERNEL[fmt.kind].format(fmt.name)
    if fmt.act is not None and fmt.act.quantized and int8_activations(fmt.act) is None:
        return (f"activation quantization (+{fmt.act.label}): the kernels here compute int8 activations only, per "
                "token or per tensor (the methods' act_bits=8)")
    if fmt.notes:
        return f"layer format '{fmt}': no kernel here computes its '+{fmt.notes[0]}' part"
    if fmt.adapter is not None:
        return f"recovery adapters (+{fmt.adapter.label}): no kernel path for the adapter branch here"
    if fmt.kind != "int" or fmt.mixed or fmt.levels or fmt.granularity not in ("channel", "group"):
        return f"layer format '{fmt}' has no kernel on this backend (it runs int2..int8 integer grids)"
    return None


def block_size(grid: LayerFormat, in_features: int) -> tuple[int | None, str | None]:
    """MatMulNBits' block for this grid, or the reason there is none."""
    if grid.group is None:  # per channel: one block covering the row, zero-padded to a power of two
        b = max(MIN_BLOCK, 1 << math.ceil(math.log2(in_features)))
    else:
        b = grid.group
        if b < MIN_BLOCK or b & (b - 1):
            return None, f"group size {b}: MatMulNBits blocks must be a power of two >= {MIN_BLOCK}"
    if grid.bits == 2 and b > MAX_BLOCK_2BIT:
        what = "per-channel 2-bit on a width-" + str(in_features) if grid.group is None else f"2-bit g{b}"
        return None, f"{what} layer: 2-bit MatMulNBits blocks must not exceed {MAX_BLOCK_2BIT}"
    return b, None


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) codes < 2^bits -> (rows, ceil(n * bits / 8)) bytes, first value in the low bits (MatMulNBits'
    layout for weights and zero points)."""
    rows, n = codes.shape
    planes = np.unpackbits(codes.reshape(rows, n, 1), axis=2, bitorder="little")[:, :, :bits].reshape(rows, -1)
    pad = (-planes.shape[1]) % 8
    if pad:
        planes = np.concatenate([planes, np.zeros((rows, pad), np.uint8)], axis=1)
    return np.packbits(planes, axis=1, bitorder="little")


def matmulnbits_node(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, block: int,
                     accuracy_level: int, a: str = "A", y: str = "Y") -> tuple:
    """One MatMulNBits node y = a W^T on these (n, k) codes: (node, its initializers, their bytes)."""
    from onnx import helper, numpy_helper

    n, k = codes.shape
    nb = math.ceil(k / block)
    padded = np.zeros((n, nb * block), np.uint8)  # the last block's padding is never read (K is given)
    padded[:, :k] = codes.numpy()
    arrays = {f"{y}.B": pack_rows(padded, bits).reshape(n, nb, block * bits // 8),
              f"{y}.scales": scale.to(torch.float32).numpy().reshape(-1)}
    if zero is not None:  # else the op's default zero point 2^(bits-1), the symmetric grid's centre
        arrays[f"{y}.zero_points"] = pack_rows(zero.numpy(), bits).reshape(-1)
    node = helper.make_node("MatMulNBits", [a, *arrays], [y], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    inits = [numpy_helper.from_array(v, name) for name, v in arrays.items()]
    return node, inits, sum(v.nbytes for v in arrays.values())


def ort_session(nodes: list, initializers: list, inputs: dict[str, int], outputs: dict[str, int], threads: int):
    """A CPU onnxruntime session of these nodes: fp32 inputs/outputs of shape (rows, width) by name."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def io(name, width):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, width])

    graph = helper.make_graph(nodes, "linears", [io(*kv) for kv in inputs.items()],
                              [io(*kv) for kv in outputs.items()], initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                         helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    # one session per layer: idle pool threads must sleep, not spin against torch's threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_model.SerializeToString(), so, providers=["CPUExecutionProvider"])


class MatMulNBitsLinear(nn.Module):
    """y = x W^T (+ bias) with W given as integer codes, run by onnxruntime's MatMulNBits."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, block: int,
                 perm: torch.Tensor | None, bias: torch.Tensor | None, accuracy_level: int, threads: int):
        super().__init__()
        n, k = codes.shape
        node, inits, self.weight_bytes = matmulnbits_node(codes, scale, zero, bits, block, accuracy_level)
        self.session = ort_session([node], inits, {"A": k}, {"Y": n}, threads)
        self.in_features, self.out_features = k, n
        self.register_buffer("perm", perm)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        self.label = f"ort-matmulnbits-int{bits}-b{block}-acc{accuracy_level}"
        self.mac_kind = ACCURACY_LEVELS[accuracy_level]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, self.in_features).to(torch.float32)
        if self.perm is not None:  # act-order: groups run along the stored column order
            a = a.index_select(1, self.perm)
        y = torch.from_numpy(self.session.run(None, {"A": a.contiguous().numpy()})[0])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class TorchDynamicInt8Linear(DynamicLinear):
    """torch's dynamic int8 linear with fp32 in and out: the kernel takes fp32 only, and under precision=bf16 its
    inputs arrive in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(torch.float32)).to(x.dtype)


def torch_dynamic_int8(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bias: torch.Tensor | None, engine: str | None = None) -> nn.Module:
    """torch's dynamic int8 linear on the method's per-channel codes: qint8 = code - 128, zero point shifted
    alike (0 for the symmetric grid, whose centre code is 128), prepacked for `engine` (default: torch's current
    quantized engine; 'x86' runs fbgemm's kernels, 'onednn' oneDNN's, which accepts only zero points 0). It
    quantizes the activations per tensor at run time. torch 2.13 warns that creating quantized tensors is
    deprecated (pytorch#184982); the kernel is unchanged and runs."""
    n, k = codes.shape
    zp = torch.zeros(n, dtype=torch.long) if zero is None else zero.reshape(n).to(torch.long) - 128
    q = torch._make_per_channel_quantized_tensor((codes.to(torch.int16) - 128).to(torch.int8),
                                                 scale.reshape(n).to(torch.float64), zp, 0)
    engine = engine or torch.backends.quantized.engine
    previous, torch.backends.quantized.engine = torch.backends.quantized.engine, engine
    try:  # the weight is prepacked for the engine current now; the forward then runs that engine's kernel
        lin = TorchDynamicInt8Linear(k, n, bias_=bias is not None, dtype=torch.qint8)
        lin.set_weight_bias(q, None if bias is None else bias.detach().to(torch.float32))
    finally:
        torch.backends.quantized.engine = previous
    lin.weight_bytes = n * k + scale.numel() * 2 + (0 if zero is None else zero.numel())  # as stored: 8 bits + fp16
    lin.label = f"torch-dynamic-int8-{engine}" + (f"-{isa_word(onednn_int8_isa())}" if engine == "onednn" else "")
    lin.mac_kind = "int8"
    return lin


@functools.cache
def onednn_int8_isa() -> str:
    """The implementation oneDNN runs torch's int8 matmul with here, e.g. 'brg_matmul:avx10_1_512_amx' (AMX-INT8
    tiles) or 'brg_matmul:avx512_core_vnni' (AVX512-VNNI), read from oneDNN's verbose log."""
    w = torch.ops.onednn.qlinear_prepack(torch.ones(32, 64, dtype=torch.int8), None)
    x = torch.ones(16, 64, dtype=torch.int8)
    return onednn_matmul_impl(lambda: _qlinear(x, w, torch.ones(32)))


def isa_word(impl: str) -> str:
    """A short name for the ISA in a oneDNN implementation string: amx, vnni, or its own ISA part."""
    isa = impl.split(":")[-1]
    return "amx" if "amx" in isa else "vnni" if "vnni" in isa else isa


_ONE, _ZERO = torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)


def _qlinear(q: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, accumulate: torch.Tensor | None = None,
             x_scale: torch.Tensor = _ONE):
    """oneDNN's int8 x int8 -> int32 matmul, times the (per-tensor) activation scale and the per-output-channel
    weight scale, in fp32; with `accumulate`, added to it in place (oneDNN's sum post-op). Weight zero points
    must be handled by the caller: oneDNN's qlinear ignores them."""
    zp = torch.zeros(w_scale.numel(), dtype=torch.long)
    if accumulate is None:
        return torch.ops.onednn.qlinear_pointwise.tensor(q, x_scale, _ZERO, packed, w_scale, zp, None, 1.0, 0,
                                                         torch.float32, "none", [], "")
    return torch.ops.onednn.qlinear_pointwise.binary_tensor(q, x_scale, _ZERO, packed, w_scale, zp, accumulate, None,
                                                            1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], "")


def quantize_int8(a: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and fp32 scales of (rows, k) activations, symmetric, per row (token) or per tensor: the function
    of bench.quant.activation's 8-bit fake-quant (absmax / 127, round half to even, clamp to int8)."""
    amax = a.abs().amax(dim=1, keepdim=True) if granularity == "per_token" else a.abs().amax().reshape(1, 1)
    scale = amax.to(torch.float32).div_(127).clamp_(min=1e-8)
    # a bf16 input (precision=bf16) is promoted to fp32 by the division, the fake-quant's float(x) / scale (the
    # scale has dimensions: a 0-dim fp32 tensor would not promote a bf16 one)
    return (a / scale).round_().clamp_(-128, 127).to(torch.int8), scale


class OnednnInt8Linear(nn.Module):
    """y = x W^T (+ bias) on oneDNN's int8 matmul through torch (`onednn::qlinear_pointwise`; AMX-INT8 tiles where
    the CPU has them): activations quantized to int8 per token or per tensor (`quantize_int8`), weights the
    method's own codes centred to int8 (code - 2^(bits-1)), so any grid of <= 8 bits runs as int8 x int8 -> int32.
    A grid in groups runs one matmul per group of columns, each scaled by its group's scales and summed in fp32 in
    place; a stored zero point other than the centre is subtracted exactly as zero x (the token's code sum in the
    group), since oneDNN's qlinear ignores weight zero points. A per-tensor activation scale is applied inside
    the matmul, a per-token one after it (oneDNN's qlinear takes one activation scale). The integer sums are
    exact, so on the method's own int8 activations this is the fake-quant layer's function to float rounding."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 group: int | None, perm: torch.Tensor | None, bias: torch.Tensor | None,
                 granularity: str = "per_token"):
        super().__init__()
        n, k = codes.shape
        g = k if group is None else group
        centre = 1 << (bits - 1)
        w = (codes.to(torch.int16) - centre).to(torch.int8)
        s = scale.to(torch.float32).reshape(n, -1)
        self.granularity = granularity
        self.groups = [(a, min(a + g, k)) for a in range(0, k, g)]
        self.packed = [torch.ops.onednn.qlinear_prepack(w[:, a:b].contiguous(), None) for a, b in self.groups]
        self.w_scale = [s[:, i].contiguous() for i in range(len(self.groups))]
        # (groups, n): the weight of a zero-point shift away from the centre, per output channel
        self.zero_shift = (None if zero is None
                           else ((zero.to(torch.float32).reshape(n, -1) - centre) * s).T.contiguous())
        self.in_features, self.out_features = k, n
        self.register_buffer("perm", perm)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        self.weight_bytes = n * k + scale.numel() * 2 + (0 if zero is None else zero.numel())  # int8 + fp16 scales
        grid = "ch" if group is None else f"g{group}"
        self.label = f"torch-int8-onednn-{isa_word(onednn_int8_isa())}-int{bits}-{grid}-a8-{granularity}"
        self.mac_kind = "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, self.in_features)  # bf16 stays bf16 until the division: one pass less
        if self.perm is not None:  # act-order: groups run along the stored column order
            a = a.index_select(1, self.perm)
        q, sx = quantize_int8(a, self.granularity)
        per_token = self.granularity == "per_token"
        x_scale = _ONE if per_token else sx
        y = None
        for (lo, hi), packed, w_scale in zip(self.groups, self.packed, self.w_scale):
            y = _qlinear(q[:, lo:hi], packed, w_scale, y, x_scale)
        if self.zero_shift is not None:
            code_sums = torch.stack([q[:, lo:hi].sum(1, dtype=torch.int32) for lo, hi in self.groups], 1)
            y.addmm_(code_sums.to(torch.float32), self.zero_shift, alpha=-1 if per_token else -float(sx))
        if per_token:
            y.mul_(sx)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


@dataclass
class CpuKernelsBackend(TimedBackend):
    name: str = "cpu_kernels"
    accuracy_level: int = 4  # MatMulNBits compute: 1 = fp32 (fake-quant's function), 4 = int8 activations
    int8_kernel: str = "onednn_per_token"  # weight-only int8 per channel: see INT8_KERNELS
    lowbit_kernel: str = "ort_matmulnbits"  # the other weight-only integer grids: see LOWBIT_KERNELS
    capabilities: ClassVar[dict] = {
        "weight_formats": ["int2..int8 grids, per channel or in groups: oneDNN int8 matmul (torch), codes as int8",
                           "int2/int4/int8 in groups of 2^k >= 16 (2-bit <= 256) or per channel: onnxruntime "
                           "MatMulNBits", "int8 per channel: torch dynamic quantized linear (fbgemm/x86 or onednn)",
                           "uncompressed (torch, as on cpu)"],
        "activation_formats": ["int8 per token or per tensor, as the method quantizes them (oneDNN int8)",
                               "int8 per token, dynamic (oneDNN int8 on weight-only grids)",
                               "fp32 (MatMulNBits accuracy_level=1)", "int8 per block, dynamic (accuracy_level=4)",
                               "uint8 per tensor, dynamic (torch dynamic int8)"],
        "low_bit_kernels": ["oneDNN int8 matmul via onednn::qlinear_pointwise (AMX-INT8 or VNNI, as oneDNN picks)",
                            "onnxruntime MatMulNBits (2/4/8-bit, MLAS)", "torch quantized::linear_dynamic (int8)"],
        "binary_ops": False, "sparsity": [], "float_formats": [], "method_activation_quantization": ["int8"],
        "layers": ["nn.Linear of causal LMs"],
    }
    def __post_init__(self):
        super().__post_init__()
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ConfigError(f"hardware.accuracy_level={self.accuracy_level} is not a MatMulNBits CPU compute type "
                              "here", "use 1 (fp32 compute) or 4 (int8 compute)")
        if self.int8_kernel not in INT8_KERNELS:
            raise ConfigError(f"hardware.int8_kernel='{self.int8_kernel}' is unknown",
                              f"use one of: {', '.join(INT8_KERNELS)}")
        if self.lowbit_kernel not in LOWBIT_KERNELS:
            raise ConfigError(f"hardware.lowbit_kernel='{self.lowbit_kernel}' is unknown",
                              f"use one of: {', '.join(LOWBIT_KERNELS)}")

    # -- what can run ------------------------------------------------------------------------------------
    def _plan(self, packed: Packed, name: str) -> tuple[str, LayerFormat | None, int | None, str | None]:
        """(kernel, grid, block, reason): which kernel runs layer `name`, or why none can."""
        grid = packed.layer_format.get(name)
        module = packed.model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            return "", None, None, f"layer {name} is a {type(module).__name__}: the kernels here are linear matmuls"
        reason = format_reason(grid) if grid is not None else f"layer {name} has no layer format"
        if reason:
            return "", None, None, reason
        if int8_activations(grid.act):  # the method's own int8 activations: the one kernel computing them as it does
            return "onednn", grid, None, None
        kernel = self.int8_kernel if grid.bits == 8 and grid.group is None else self.lowbit_kernel
        if kernel == "torch_dynamic_onednn" and not grid.symmetric:
            return "", None, None, ("asymmetric int8 weights: torch's oneDNN dynamic linear takes only zero points 0; "
                                    "hardware.int8_kernel=onednn_per_token or torch_dynamic runs them")
        if kernel in ("torch_dynamic", "torch_dynamic_onednn"):
            return kernel, grid, None, None
        if kernel == "onednn_per_token":
            return "onednn", grid, None, None
        if grid.bits not in MATMULNBITS_BITS:
            return "", None, None, (f"{grid.bits}-bit weights: onnxruntime's MatMulNBits runs only "
                                    f"{', '.join(map(str, MATMULNBITS_BITS))}-bit codes")
        block, reason = block_size(grid, module.in_features)
        return "ort", grid, block, reason

    def supports(self, packed: Packed) -> str | None:
        if packed.execution == EXECUTION_SPARSE_AS_DENSE:
            fmt = next(iter(packed.layer_format.values()), packed.method)
            return (f"sparse weights ({fmt}): no sparse kernel in onnxruntime's or torch's CPU kernels; dense "
                    "fp32 on the zeros is what hardware=cpu measures")
        if not packed.layers and packed.execution == EXECUTION_DENSE:
            return None
        for name in packed.layers:
            reason = self._plan(packed, name)[3]
            if reason:
                return reason
        return None

    # -- deploy: the same model with its compressed linears on the kernels --------------------------------
    @torch.no_grad()
    def deploy(self, packed: Packed) -> Packed:
        if not packed.layers:
            return packed  # nothing compressed: torch fp32 runs it, as on `cpu`
        kernels = {}
        for name, stored in packed.layers.items():
            kind, grid, block, _ = self._plan(packed, name)
            lin = packed.model.get_submodule(name)
            n, k = lin.weight.shape
            codes, zero = load_int_layer(stored, grid.bits, (n, k))
            bias = lin.bias
            if kind in ("torch_dynamic", "torch_dynamic_onednn"):
                engine = "onednn" if kind == "torch_dynamic_onednn" else None
                kernels[id(lin)] = torch_dynamic_int8(codes, stored["scale"], zero, bias, engine)
                continue
            perm = stored["perm"].to(torch.long) if "perm" in stored and grid.group is not None else None
            if perm is not None:  # the kernel's groups are consecutive columns: run the columns in stored order
                codes = codes[:, perm]
            if kind == "onednn":  # the method's int8 activations if it has them, else per token
                kernels[id(lin)] = OnednnInt8Linear(codes, stored["scale"], zero, grid.bits, grid.group, perm, bias,
                                                    int8_activations(grid.act) or "per_token")
                continue
            kernels[id(lin)] = MatMulNBitsLinear(codes, stored["scale"], zero, grid.bits, block, perm, bias,
                                                 self.accuracy_level, self.threads)
        # a copy of the model in which each compressed linear *is* its kernel module (deepcopy's memo)
        model = copy.deepcopy(packed.model, memo=dict(kernels))
        labels = Counter(k.label for k in kernels.values())
        execution = "+".join(sorted(labels))
        info = {**packed.info, "kernel_layers": dict(labels)}
        return Packed(model, packed.method, execution, packed.layers, packed.layer_format, packed.per_layer, info)

    # -- measure ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def measure(self, packed: Packed, workload: Workload) -> Measurement:
        if workload.kind != "causal_lm":
            return Measurement(unsupported="cpu_kernels times causal-LM prefill/decode only; use hardware=cpu "
                                           "for image models")
        torch.set_num_threads(self.threads)
        model = packed.model
        rapl = energy.RaplMeter().start()
        lat = timing.causal_lm(model, workload.prompt_ids, workload.decode_tokens, self.timer())
        m = lat.metrics
        memory, n_torch = timing.host_memory(model)
        kernels = [mod for mod in model.modules() if hasattr(mod, "mac_kind")]
        kernel_bytes = sum(k.weight_bytes for k in kernels)
        memory["memory.kernel_weight_bytes"] = float(kernel_bytes)  # held by onnxruntime / fbgemm, not torch
        memory["memory.model_resident_bytes"] += kernel_bytes
        m.update(memory)
        tags = self._tags(packed, kernels)
        # the estimate for one prefill token: 1 MAC per weight at the arithmetic that performs it; every weight
        # byte (kernels: as stored, torch: fp32) streamed from DRAM once per prefill
        macs = Counter({"fp32": float(n_torch)})
        for k in kernels:
            macs[k.mac_kind] += k.in_features * k.out_features
        energy.record(m, tags, "prefill_j_per_token", rapl,
                      measured=lambda joules: joules / max(lat.timed_s, 1e-9) * lat.prefill_p50_s / lat.n_prompt,
                      estimate=lambda: energy.estimate_joules(dict(macs), (kernel_bytes + 4 * n_torch) / lat.n_prompt))
        return Measurement(m, tags)

    def _tags(self, packed: Packed, kernels: list) -> dict[str, str]:
        import onnxruntime

        tags = {"execution": packed.execution, "threads": str(self.threads),
                "low_bit_kernel": packed.execution if kernels else "none (dense fp32)"}
        if any(isinstance(k, MatMulNBitsLinear) for k in kernels):
            tags.update({"onnxruntime_version": onnxruntime.__version__,
                         "matmulnbits_accuracy_level": str(self.accuracy_level),
                         "matmulnbits_compute": ACCURACY_LEVELS[self.accuracy_level]})
        dynamic = sorted({k.label for k in kernels if isinstance(k, TorchDynamicInt8Linear)})
        if dynamic:
            tags["torch_quantized_engine"] = ",".join(label.split("-")[3] for label in dynamic)
        if any(isinstance(k, OnednnInt8Linear) or k.label.startswith("torch-dynamic-int8-onednn") for k in kernels):
            tags["onednn_int8_matmul"] = onednn_int8_isa()  # oneDNN's implementation, e.g. brg_matmul:..._amx
        return tags
