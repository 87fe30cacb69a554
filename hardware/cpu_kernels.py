"""`cpu_kernels`: the compressed block linears of a causal LM exported to real low-bit CPU kernels, then timed
and re-evaluated on them.

What runs. Each compressed linear is replaced by a module that calls a kernel on the method's own stored
integer codes, scales and zero points (read from the artifact's tensors, never re-quantized here):
- int2/int4/int8 weights in groups: onnxruntime's `MatMulNBits` contrib op (one single-node ONNX graph per
  layer, CPU execution provider). `accuracy_level` is set explicitly and recorded: 1 computes in fp32 on the
  dequantized weights, the fake-quant model's function to float rounding; 4 quantizes the activations to
  int8 per block and runs MLAS's int8 GEMM, the fast path. A per-channel grid is one block of the next power
  of two >= the layer width (zero-padded); GPTQ's act-order runs the input columns in the stored order.
- int8 per output channel: torch's dynamic quantized linear (`quantized::linear_dynamic`, fbgemm/x86
  engine), the method's codes as per-channel qint8 with their zero points; it quantizes the activations
  per tensor at run time (uint8, reduce_range), so its accuracy differs slightly from fake-quant.
Everything else (attention, norms, embeddings, head) stays torch fp32. The task is evaluated again on this
model, so the record carries both accuracies and their difference (see `HardwareBackend.deploy`).

Capabilities (onnxruntime 1.32, torch 2.13): MatMulNBits accepts bits 2, 4 and 8 only ("additional bits
support is planned"), blocks a power of two >= 16, and 2-bit blocks <= 256. A packed model needing anything
else is `unsupported` with the reason: 3/5/6/7-bit codes, other group sizes, binary or ternary weights,
float weight formats, pruned (sparse) weights, activation quantization, recovery adapters, convolutions. A
dense (uncompressed) model runs in torch fp32, as on `cpu`.

Protocol: as `cpu` (bench/timing.py): warm-up, repetitions until min_reps and min_seconds, p50/p90/CV of the
prefill and of decode per token; torch and onnxruntime threads both set to `threads` and recorded. Energy:
RAPL when readable, else `model:horowitz_isscc2014_45nm` with each kernel's MACs at its arithmetic (fp32, or
int8 x int8 -> int32) and its stored weight bytes streamed from DRAM once per prefill.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from bench import energy, timing
from bench.errors import ConfigError
from bench.layer_format import LayerFormat
from bench.packed import EXECUTION_DENSE, EXECUTION_SPARSE_AS_DENSE, Packed
from bench.plugins import Measurement, Workload
from bench.quant.integer import load_int_layer
from bench.timing import TimedBackend

MATMULNBITS_BITS = (2, 4, 8)  # onnxruntime 1.32 refuses other widths at session creation
MIN_BLOCK, MAX_BLOCK_2BIT = 16, 256
ACCURACY_LEVELS = {1: "fp32", 4: "int8"}  # MatMulNBits compute type on CPU -> the arithmetic of its MACs
INT8_KERNELS = ("torch_dynamic", "ort_matmulnbits")

_NO_KERNEL = {"binary": "binary weights ({}): no binary (xnor/popcount) kernel on this backend",
              "ternary": "ternary weights ({}): no ternary kernel on this backend",
              "float": "floating-point weight format ({}): no low-bit float kernel on this backend"}


def format_reason(fmt: LayerFormat) -> str | None:
    """Why no kernel here runs a layer stored as `fmt`, before its bits and group are looked at (None: it is an
    integer grid with `stored_int_layer`'s tensors, fp32 activations and no adapter branch)."""
    if fmt.kind in _NO_KERNEL:
        return _NO_KERNEL[fmt.kind].format(fmt.name)
    extras = ([fmt.act.label] if fmt.act is not None and fmt.act.quantized else []) + list(fmt.notes)
    if extras:
        return (f"activation quantization (+{extras[0]}): the kernels here take fp32 activations (MatMulNBits "
                "quantizes them per block, torch int8 per tensor), not as the method does")
    if fmt.adapter is not None:
        return f"recovery adapters (+{fmt.adapter.label}): no kernel path for the adapter branch here"
    if fmt.kind != "int" or fmt.mixed or fmt.levels or fmt.granularity not in ("channel", "group"):
        return f"layer format '{fmt}' has no kernel on this backend (it runs int2/int4/int8 integer grids)"
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


def torch_dynamic_int8(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bias: torch.Tensor | None) -> nn.Module:
    """torch's dynamic int8 linear on the method's per-channel codes: qint8 = code - 128, zero point shifted
    alike (0 for the symmetric grid, whose centre code is 128). torch 2.13 warns that creating quantized
    tensors is deprecated (pytorch#184982); the kernel itself is unchanged and runs."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    n, k = codes.shape
    zp = torch.zeros(n, dtype=torch.long) if zero is None else zero.reshape(n).to(torch.long) - 128
    q = torch._make_per_channel_quantized_tensor((codes.to(torch.int16) - 128).to(torch.int8),
                                                 scale.reshape(n).to(torch.float64), zp, 0)
    lin = DynamicLinear(k, n, bias_=bias is not None, dtype=torch.qint8)
    lin.set_weight_bias(q, None if bias is None else bias.detach().to(torch.float32))
    lin.weight_bytes = n * k + scale.numel() * 2 + (0 if zero is None else zero.numel())  # as stored: 8 bits + fp16
    lin.label = f"torch-dynamic-int8-{torch.backends.quantized.engine}"
    lin.mac_kind = "int8"
    return lin


@dataclass
class CpuKernelsBackend(TimedBackend):
    name: str = "cpu_kernels"
    accuracy_level: int = 4  # MatMulNBits compute: 1 = fp32 (fake-quant's function), 4 = int8 activations
    int8_kernel: str = "torch_dynamic"  # for per-channel int8 grids; grouped int8 always runs MatMulNBits
    capabilities: ClassVar[dict] = {
        "weight_formats": ["int2/int4/int8 in groups of 2^k >= 16 (2-bit <= 256) or per channel: onnxruntime "
                           "MatMulNBits", "int8 per channel: torch dynamic quantized linear (fbgemm/x86)",
                           "fp32 (uncompressed models, torch)"],
        "activation_formats": ["fp32 (MatMulNBits accuracy_level=1)", "int8 per block, dynamic (accuracy_level=4)",
                               "uint8 per tensor, dynamic (torch int8 path)"],
        "low_bit_kernels": ["onnxruntime MatMulNBits (2/4/8-bit)", "torch quantized::linear_dynamic (int8)"],
        "binary_ops": False, "sparsity": [], "float_formats": [], "method_activation_quantization": False,
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
        if grid.bits == 8 and grid.group is None and self.int8_kernel == "torch_dynamic":
            return "torch_dynamic", grid, None, None
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
            if kind == "torch_dynamic":
                kernels[id(lin)] = torch_dynamic_int8(codes, stored["scale"], zero, bias)
                continue
            perm = stored["perm"].to(torch.long) if "perm" in stored and grid.group is not None else None
            if perm is not None:  # the kernel's groups are consecutive columns: run the columns in stored order
                codes = codes[:, perm]
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
        if any(not isinstance(k, MatMulNBitsLinear) for k in kernels):
            tags["torch_quantized_engine"] = torch.backends.quantized.engine
        return tags
