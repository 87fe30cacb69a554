"""A quantized TFLite image classifier rebuilt as a float torch module (model `source: tflite`).

The flatbuffer is read with the PyPI `tflite` package (the schema's generated readers, no TensorFlow). Each
CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED op becomes an nn.Conv2d / nn.Linear holding the dequantized
weight, (q - zero_point) x scale with the file's per-output-channel scales, and the dequantized int32 bias
(its stored scale is input scale x weight scale). The other ops keep their real-valued meaning:
- QUANTIZE: identity (it only changes the integer encoding of the same real values);
- PAD: zeros (a quantized PAD fills with the zero point, i.e. real 0);
- ADD, MEAN over the given axes; fused RELU / RELU6 / RELU_N1_TO_1 as clamps;
- padding SAME as TensorFlow defines it: total max((ceil(in / stride) - 1) x stride + dilated kernel - in, 0),
  the odd pixel going after (bottom / right), which torch's symmetric `padding=` cannot express at stride 2;
- a final SOFTMAX is left out: the module returns logits (the ranking is the same).
Activations stay float where the int8 file requantizes every op output, so the rebuild is "int8-derived"
(the file's weights, float arithmetic), not a bit-exact emulation; tests/test_imagenet.py checks its top-1
against the LiteRT interpreter running the file itself.

The module takes RGB on the 0-255 scale (N, 3, H, W) and applies the input tensor's own quantization,
(x - zero_point) x scale, so the normalisation that belongs to the model travels with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import NotApplicable

_WEIGHT_OPS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "dw", "FULLY_CONNECTED": "fc"}
_OTHER_OPS = ("QUANTIZE", "ADD", "PAD", "MEAN", "SOFTMAX (final)")
_ACTIVATIONS = {0: None, 1: (0.0, math.inf), 2: (-1.0, 1.0), 3: (0.0, 6.0)}  # NONE, RELU, RELU_N1_TO_1, RELU6
_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}  # a 4-D NHWC axis of the file -> the torch tensor's axis


@dataclass
class Step:
    """One op of the graph: `op` on the values `inputs` (tensor ids) giving `output`."""

    op: str  # "conv" (conv and depthwise) | "fc" | "add" | "pad" | "mean" | "identity"
    inputs: list[int]
    output: int
    layer: str | None = None  # key in TFLiteNet.layers for weight ops
    same_pad: tuple[int, int, int, int] | None = None  # dilated (kh, kw), (stride_h, stride_w): SAME at run time
    pads: tuple[int, ...] = ()  # F.pad order (left, right, top, bottom) for PAD
    axes: tuple[int, ...] = ()  # torch axes for MEAN
    keep_dims: bool = False
    clamp: tuple[float, float] | None = None  # fused activation
    free: list[int] = field(default_factory=list)  # values no later step reads


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one spatial axis (before, after), for a dilated kernel extent `kernel`."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFLiteNet(nn.Module):
    def __init__(self, layers: dict[str, nn.Module], program: list[Step], input_id: int, output_id: int,
                 input_scale: float, input_zero: int):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.program = program
        self.input_id, self.output_id = input_id, output_id
        self.input_scale, self.input_zero = input_scale, input_zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input_id: (x - self.input_zero) * self.input_scale}
        for step in self.program:
            args = [values[i] for i in step.inputs]
            if step.op == "conv":
                a = args[0]
                if step.same_pad:
                    kh, kw, sh, sw = step.same_pad
                    a = F.pad(a, same_pads(a.shape[3], kw, sw) + same_pads(a.shape[2], kh, sh))
                y = self.layers[step.layer](a)
            elif step.op == "fc":
                y = self.layers[step.layer](args[0].reshape(args[0].shape[0], -1))
            elif step.op == "add":
                y = args[0] + args[1]
            elif step.op == "pad":
                y = F.pad(args[0], step.pads)
            elif step.op == "mean":
                y = args[0].mean(dim=step.axes, keepdim=step.keep_dims)
            else:
                y = args[0]
            if step.clamp:
                y = y.clamp(*step.clamp)
            values[step.output] = y
            for i in step.free:
                del values[i]
        return values[self.output_id]


class _Graph:
    """Typed access to the one subgraph of a .tflite file."""

    def __init__(self, path: Path):
        import tflite
        from tflite.BuiltinOperator import BuiltinOperator

        self.tflite = tflite
        self.buf = path.read_bytes()
        self.model = tflite.Model.GetRootAsModel(self.buf, 0)
        if self.model.SubgraphsLength() != 1:
            raise NotApplicable(f"{path.name} has {self.model.SubgraphsLength()} subgraphs",
                                "only single-subgraph TFLite classifiers are imported")
        self.g = self.model.Subgraphs(0)
        self.op_names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}

    def op_name(self, op) -> str:
        code = self.model.OperatorCodes(op.OpcodeIndex())
        # files from newer converters keep the code in BuiltinCode, older ones in the deprecated byte
        return self.op_names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]

    def options(self, op, cls):
        table = op.BuiltinOptions()
        opts = cls()
        opts.Init(table.Bytes, table.Pos)
        return opts

    def quant(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        q = self.g.Tensors(index).Quantization()
        if q is None or q.ScaleLength() == 0:
            raise NotApplicable(f"tensor {index} of the TFLite graph is not quantized",
                                "only int8-quantized TFLite files are imported")
        return q.ScaleAsNumpy().astype(np.float32), q.ZeroPointAsNumpy().astype(np.float32), q.QuantizedDimension()

    def shape(self, index: int) -> list[int]:
        return [int(d) for d in self.g.Tensors(index).ShapeAsNumpy()]

    def raw(self, index: int) -> np.ndarray:
        t = self.g.Tensors(index)
        dtypes = {self.tflite.TensorType.INT8: np.int8, self.tflite.TensorType.INT32: np.int32}
        if t.Type() not in dtypes:
            raise NotApplicable(f"constant tensor {t.Name().decode()} has TFLite type {t.Type()}",
                                "only int8 weights and int32 biases / indices are imported")
        data = self.model.Buffers(t.Buffer()).DataAsNumpy()
        return np.frombuffer(data.tobytes(), dtype=dtypes[t.Type()]).reshape(self.shape(index))

    def dequantized(self, index: int) -> torch.Tensor:
        q = self.raw(index).astype(np.float32)
        scale, zero, axis = self.quant(index)
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        return torch.from_numpy((q - zero.reshape(shape)) * scale.reshape(shape))


def _weight_layer(graph: _Graph, name: str, op, k: int) -> tuple[nn.Module, Step]:
    tfl = graph.tflite
    x_id, w_id, b_id = (int(i) for i in op.InputsAsNumpy())
    w = graph.dequantized(w_id)
    bias = graph.dequantized(b_id) if b_id >= 0 else None
    step = Step("conv", [x_id], int(op.Outputs(0)), layer=f"{_WEIGHT_OPS[name]}{k:02d}")
    if name == "FULLY_CONNECTED":
        opts = graph.options(op, tfl.FullyConnectedOptions)
        layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        layer.weight.data.copy_(w)
        step.op = "fc"
    else:
        if name == "CONV_2D":
            opts = graph.options(op, tfl.Conv2DOptions)
            w = w.permute(0, 3, 1, 2)  # OHWI -> OIHW
            groups = graph.shape(x_id)[3] // w.shape[1]
        else:
            opts = graph.options(op, tfl.DepthwiseConv2DOptions)
            w = w[0].permute(2, 0, 1).unsqueeze(1)  # 1HW(C*M) -> (C*M)1HW; out channel c*M+m reads channel c
            groups = graph.shape(x_id)[3]
        dil = (opts.DilationHFactor(), opts.DilationWFactor())
        stride = (opts.StrideH(), opts.StrideW())
        kh, kw = w.shape[2], w.shape[3]
        ext = ((kh - 1) * dil[0] + 1, (kw - 1) * dil[1] + 1)
        padding = (0, 0)
        if opts.Padding() == tfl.Padding.SAME:
            if stride == (1, 1) and ext[0] % 2 and ext[1] % 2:  # symmetric whatever the input size
                padding = ((ext[0] - 1) // 2, (ext[1] - 1) // 2)
            else:
                step.same_pad = (ext[0], ext[1], *stride)
        layer = nn.Conv2d(w.shape[1] * groups, w.shape[0], (kh, kw), stride, padding, dil, groups,
                          bias=bias is not None)
        layer.weight.data.copy_(w)
    if bias is not None:
        layer.bias.data.copy_(bias)
    act = opts.FusedActivationFunction()
    if act not in _ACTIVATIONS:
        raise NotApplicable(f"op {k} ({name}) has fused activation {act}", "only NONE/RELU/RELU_N1_TO_1/RELU6")
    step.clamp = _ACTIVATIONS[act]
    return layer, step


def _other_step(graph: _Graph, name: str, op, k: int) -> Step:
    tfl = graph.tflite
    ins = [int(i) for i in op.InputsAsNumpy()]
    out = int(op.Outputs(0))
    if name == "QUANTIZE":
        return Step("identity", ins, out)
    if name == "ADD":
        act = graph.options(op, tfl.AddOptions).FusedActivationFunction()
        if act not in _ACTIVATIONS:
            raise NotApplicable(f"op {k} (ADD) has fused activation {act}", "only NONE/RELU/RELU_N1_TO_1/RELU6")
        return Step("add", ins, out, clamp=_ACTIVATIONS[act])
    if name == "PAD":
        p = graph.raw(ins[1])  # (4, 2) before/after per NHWC axis
        if p[0].any() or p[3].any():
            raise NotApplicable(f"op {k} pads the batch or channel axis", "only spatial PAD is imported")
        return Step("pad", ins[:1], out, pads=(int(p[2, 0]), int(p[2, 1]), int(p[1, 0]), int(p[1, 1])))
    if name == "MEAN":
        rank = len(graph.shape(ins[0]))
        axes = [int(a) % rank for a in graph.raw(ins[1]).reshape(-1)]
        nchw = tuple(_NCHW_AXIS[a] for a in axes) if rank == 4 else tuple(axes)
        return Step("mean", ins[:1], out, axes=nchw, keep_dims=bool(graph.options(op, tfl.ReducerOptions).KeepDims()))
    raise NotApplicable(f"TFLite op {name} (op {k}) is not imported",
                        f"supported: {', '.join(sorted(_WEIGHT_OPS) + sorted(_OTHER_OPS))}")


def load_tflite_classifier(path: Path) -> tuple[TFLiteNet, dict]:
    """The float twin of the int8 TFLite classifier at `path`, and facts about the file for the record."""
    graph = _Graph(path)
    g = graph.g
    if g.InputsLength() != 1 or g.OutputsLength() != 1:
        raise NotApplicable(f"{path.name} has {g.InputsLength()} inputs and {g.OutputsLength()} outputs",
                            "a classifier has one image input and one score output")
    input_id, output_id = int(g.Inputs(0)), int(g.Outputs(0))
    in_shape = graph.shape(input_id)
    if len(in_shape) != 4 or in_shape[3] != 3:
        raise NotApplicable(f"{path.name} takes input of shape {in_shape}", "an NHWC RGB image input is needed")
    scale, zero, _ = graph.quant(input_id)
    layers: dict[str, nn.Module] = {}
    program: list[Step] = []
    names = [graph.op_name(g.Operators(k)) for k in range(g.OperatorsLength())]
    op_counts = {n: names.count(n) for n in sorted(set(names))}
    for k, name in enumerate(names):
        op = g.Operators(k)
        if name == "SOFTMAX":
            # the module returns the logits; only re-encodings of the probabilities may follow
            if any(n != "QUANTIZE" for n in names[k + 1:]):
                raise NotApplicable(f"op {k} of {path.name} is a SOFTMAX inside the graph",
                                    "only a final SOFTMAX is dropped")
            output_id = int(op.Inputs(0))
            break
        if name in _WEIGHT_OPS:
            layer, step = _weight_layer(graph, name, op, k)
            layers[step.layer] = layer
        else:
            step = _other_step(graph, name, op, k)
        program.append(step)
    # a value is freed after the last step reading it, so evaluation batches do not hold every activation
    last_read = {i: n for n, s in enumerate(program) for i in s.inputs}
    for i, n in last_read.items():
        if i != output_id:
            program[n].free.append(i)
    net = TFLiteNet(layers, program, input_id, output_id, float(scale[0]), int(zero[0]))
    info = {"input_size": in_shape[1], "input_quantization": {"scale": float(scale[0]), "zero_point": int(zero[0])},
            "tflite_ops": op_counts, "derived_from": "int8 TFLite (dequantized weights, float activations)"}
    return net.eval(), info


def run_litert(path: Path, images: np.ndarray) -> np.ndarray:
    """The .tflite file itself on the LiteRT interpreter (PyPI `ai-edge-litert`), the reference the rebuild is
    checked against: its output (for this file: uint8 softmax scores) for uint8 NHWC images, one at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=torch.get_num_threads())
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scores = []
    for img in images:
        interp.set_tensor(inp["index"], img[None].astype(inp["dtype"]))
        interp.invoke()
        scores.append(interp.get_tensor(out["index"])[0].copy())
    return np.stack(scores)
