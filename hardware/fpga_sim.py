"""`fpga_sim`: an accelerator simulated by ZigZag (zigzag-dse 3.9.1, KU Leuven): per-layer latency (cycles), energy
(pJ) and MAC utilization of the packed model's Conv/Gemm/MatMul layers on an accelerator described in
`configs/accelerator/<name>.yaml`, fed with the model's ONNX graph and each layer's real bit-widths.

Protocol: the packed model is exported to ONNX (torch.onnx, TorchScript exporter, opset 13) at one image of the
workload's input; each weight layer's operand precisions are set from the packed layer format (`int4-...` -> 4-bit
weights; `+a8...` -> 8-bit activations; what the method left unquantized - every layer of method=none, activations
of weight-only methods - at `default_bits`, the array's native width: 8 for tpu_like, whose 16-bit output registers
hold no wider products; an assumption recorded in every record), written as ZigZag's `weight_size`/`act_size` node
attributes and read by ZigZag's own ONNX layer parsers. Identical layers (same loop sizes, strides, padding and
precisions) are simulated once. ZigZag searches the spatial/temporal mapping per layer (LOMA, `lpf_limit`,
optimising `optimize`) and reports the best; layers run one after another, so the model's cycles and energy are the
sums. Seconds are cycles at the accelerator file's `clock_hz` (stated). Energy is labelled `sim:zigzag`: data
movement through the memory hierarchy follows each operand's bit-width; the MAC energy per operation is the array's
fixed unit energy.

Capabilities: integer weight grids and integer activations up to the array's width (8 bits on tpu_like; the
simulator moves any narrower width, the array multiplies integers). Binary/ternary layers (they need XNOR/popcount
or sign units this array lacks), floating-point low-bit formats, sparsity (the array does not skip zeros) and
language models (not simulated here: only image workloads are exported) are `unsupported` with the reason.

Not done: bit-accurate fixed-point inference with hls4ml C simulation (the FPGA accuracy of a small vision model);
the accuracy recorded beside these simulated costs is the torch model's (fake-quant where the method quantized).
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from bench import energy
from bench.errors import ConfigError
from bench.packed import EXECUTION_SPARSE_AS_DENSE, Packed
from bench.plugins import Backend, Measurement, Workload

ACCELERATORS = Path(__file__).resolve().parents[1] / "configs" / "accelerator"
_INT = re.compile(r"(?:^|-)int(\d+)(?:avg)?(?:-|$)")
_ACT = re.compile(r"\+a(\d+)")


def layer_bits(label: str | None, default_bits: int) -> tuple[int, int] | str:
    """(weight bits, activation bits) of a packed layer format, or the reason it cannot be simulated."""
    if label is None:
        return default_bits, default_bits
    low = label.lower()
    if any(w in low for w in ("sign", "xnor", "binary", "1bit", "onebit", "billm", "pbllm", "ternary")):
        return f"binary/ternary weights ({label}): the accelerator's MAC array has no XNOR/popcount or sign units"
    w = low.split("+")[0]
    if re.search(r"(^|[-_])(fp\d|e\dm\d|minifloat|nf\d|bitmod)", w):
        return f"floating-point low-bit weights ({label}): the accelerator's MAC array multiplies integers"
    m = _INT.search(w)
    if not m:
        return f"layer format '{label}' is not an integer grid"
    if re.search(r"\+(lora|dora|rora)", low):
        return f"recovery adapters ({label}): the adapter branch is not part of the simulated layer"
    a = _ACT.search(low)
    act = int(a.group(1)) if a and int(a.group(1)) < 32 else default_bits
    if "+" in low and not a:
        return f"activation format of {label}: the accelerator's MAC array multiplies integers"
    return int(m.group(1)), act


@dataclass
class FpgaSimBackend(Backend):
    name: str = "fpga_sim"
    accelerator: str = "tpu_like"  # configs/accelerator/<name>.yaml, or a path to such a file
    default_bits: int = 8  # operand width of what the method left unquantized: the array's native width
    optimize: str = "energy"  # ZigZag's mapping criterion: energy | latency | EDP
    lpf_limit: int = 4  # LOMA: loop prime factors considered per layer (higher = wider search, slower)
    spatial_mappings: int = 1  # spatial mappings ZigZag generates per layer
    capabilities: ClassVar[dict] = {
        "weight_formats": ["int1..int8 (data movement at the stored width)", "float layers at default_bits"],
        "activation_formats": ["int (8-bit when the method quantized them, else default_bits)"],
        "low_bit_kernels": ["simulated: ZigZag cost model"], "binary_ops": False, "sparsity": [],
        "workloads": ["image"],
    }

    def __post_init__(self):
        if self.optimize not in ("energy", "latency", "EDP"):
            raise ConfigError(f"hardware.optimize={self.optimize} is unknown", "use energy, latency or EDP")
        if not 1 <= self.default_bits <= 32 or self.lpf_limit < 1 or self.spatial_mappings < 1:
            raise ConfigError("hardware.default_bits/lpf_limit/spatial_mappings out of range",
                              "e.g. hardware.default_bits=16 hardware.lpf_limit=4")
        self.spec = self._load_accelerator()

    def _load_accelerator(self) -> dict:
        import yaml

        name = self.accelerator
        path = Path(name) if name.endswith(".yaml") else ACCELERATORS / f"{name}.yaml"
        if not path.is_file():
            choices = sorted(p.stem for p in ACCELERATORS.glob("*.yaml"))
            raise ConfigError(f"accelerator description '{self.accelerator}' not found",
                              f"choices: {', '.join(choices)} (configs/accelerator/), or a path to a .yaml")
        spec = yaml.safe_load(path.read_text())
        for key in ("accelerator", "mapping", "clock_hz"):
            if key not in spec:
                raise ConfigError(f"{path} has no '{key}'", "see configs/accelerator/tpu_like.yaml")
        spec["path"] = str(path)
        return spec

    def supports(self, packed: Packed) -> str | None:
        if packed.execution == EXECUTION_SPARSE_AS_DENSE:
            return "sparse weights: the simulated array computes every zero (no zero skipping)"
        if getattr(packed.model, "config", None) is not None:
            return "fpga_sim simulates image models (their Conv/Gemm ONNX graph); language models are not exported"
        for layer, label in packed.layer_format.items():
            bits = layer_bits(label, self.default_bits)
            if isinstance(bits, str):
                return f"{layer}: {bits}"
        return None

    # -- simulation --------------------------------------------------------------------------------------------
    def simulate(self, model: torch.nn.Module, x: torch.Tensor, layer_format: dict[str, str]) -> list[dict]:
        """Per weight layer of `model` on input `x` (batch 1): name, bits, cycles, energy_pj, utilization, macs."""
        import onnx
        from onnx import helper

        with tempfile.TemporaryDirectory(prefix="bench-zigzag-") as tmp:
            tmp = Path(tmp)
            onnx_path = tmp / "model.onnx"
            model = model.eval()
            hooks = _strip_pre_hooks(model)  # activation fake-quant is the precision attribute here, not ops
            try:
                with torch.no_grad():
                    torch.onnx.export(model, (x[:1],), str(onnx_path), dynamo=False, opset_version=13,
                                      do_constant_folding=True)
            finally:
                for mod, saved in hooks:
                    mod._forward_pre_hooks.update(saved)
            graph = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
            inits = {i.name for i in graph.graph.initializer}
            layers, unique, keys = [], [], {}
            for node_id, node in enumerate(graph.graph.node):
                if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
                    continue
                name = _module_name(node)
                bits = layer_bits(layer_format.get(name), self.default_bits)
                if isinstance(bits, str):
                    raise ConfigError(f"{name}: {bits}", "supports() should have refused this model")
                node.attribute.extend([helper.make_attribute("weight_size", bits[0]),
                                       helper.make_attribute("act_size", bits[1])])
                data = _user_format(node_id, node, graph)
                data["operand_source"] = {"W": 0, "I": 0}  # layer by layer: inputs come from the memory hierarchy
                key = json.dumps({k: v for k, v in data.items() if k not in ("id", "name", "operand_source")},
                                 sort_keys=True)
                if key not in keys:
                    keys[key] = len(unique)
                    unique.append({**data, "id": len(unique), "name": f"u{len(unique)}",
                                   "operand_source": {"W": len(unique), "I": len(unique)}})
                macs = math.prod(data["loop_sizes"][data["loop_dims"].index(d)] for d in data["loop_dims"])
                layers.append({"layer": name, "onnx_node": node.name, "w_bits": bits[0], "a_bits": bits[1],
                               "macs": macs, "unique": keys[key]})
            if not layers:
                raise ConfigError("the ONNX graph has no Conv/Gemm/MatMul layer with constant weights",
                                  "fpga_sim simulates conv/linear models")
            results = self._zigzag(unique, tmp)
        for layer in layers:
            layer.update(results[layer["unique"]])
        return layers

    def _zigzag(self, workload: list[dict], tmp: Path) -> list:
        """ZigZag's API pipeline (zigzag.api.get_hardware_performance_zigzag) without its result files and
        mapping printouts (they fail on a fully unrolled layer and only cost time here)."""
        import yaml
        from zigzag.mapping.temporal_mapping import TemporalMappingType
        from zigzag.stages.evaluation.cost_model_evaluation import CostModelStage
        from zigzag.stages.main import MainStage
        from zigzag.stages.mapping.spatial_mapping_generation import SpatialMappingGeneratorStage
        from zigzag.stages.mapping.temporal_mapping_generator_stage import TemporalMappingGeneratorStage
        from zigzag.stages.parser.accelerator_parser import AcceleratorParserStage
        from zigzag.stages.parser.workload_parser import WorkloadParserStage
        from zigzag.stages.results.reduce_stages import (MinimalEDPStage, MinimalEnergyStage, MinimalLatencyStage,
                                                         SumStage)
        from zigzag.stages.workload_iterator import WorkloadStage

        acc, mapping = tmp / "accelerator.yaml", tmp / "mapping.yaml"
        acc.write_text(yaml.safe_dump(self.spec["accelerator"], sort_keys=False))
        mapping.write_text(yaml.safe_dump(self.spec["mapping"], sort_keys=False))
        best = {"energy": MinimalEnergyStage, "latency": MinimalLatencyStage, "EDP": MinimalEDPStage}[self.optimize]
        stages = [WorkloadParserStage, AcceleratorParserStage, SumStage, WorkloadStage, best,
                  SpatialMappingGeneratorStage, best, TemporalMappingGeneratorStage, CostModelStage]
        cmes = MainStage(stages, accelerator=str(acc), workload=workload, mapping=str(mapping),
                         dump_folder=str(tmp / "out"), loma_lpf_limit=self.lpf_limit, loma_show_progress_bar=False,
                         nb_mappings_generated=self.spatial_mappings, enable_mix_spatial_mapping_generation=False,
                         access_same_data_considered_as_no_access=True,
                         temporal_mapping_type=TemporalMappingType("uneven")).run()
        out = {}
        for cme, _ in cmes[0][1]:
            out[int(cme.layer.id)] = {"cycles": float(cme.latency_total2), "energy_pj": float(cme.energy_total),
                                      "mac_energy_pj": float(cme.mac_energy), "mem_energy_pj": float(cme.mem_energy),
                                      "utilization": float(cme.mac_utilization2)}
        return out

    def measure(self, packed: Packed, workload: Workload) -> Measurement:
        reason = self.supports(packed)
        if reason:
            return Measurement(unsupported=reason)
        if workload.kind != "image":
            return Measurement(unsupported=f"fpga_sim simulates image workloads, not '{workload.kind}'")
        _quiet_zigzag()
        layers = self.simulate(packed.model, workload.inputs, packed.layer_format)
        label = workload.label or "forward"
        cycles = sum(layer["cycles"] for layer in layers)
        pj = sum(layer["energy_pj"] for layer in layers)
        macs = sum(layer["macs"] for layer in layers)
        source = "sim:zigzag"
        m = {f"latency.{label}.sim_cycles": cycles, f"latency.{label}.sim_s": cycles / float(self.spec["clock_hz"]),
             "sim.mac_utilization": sum(la["utilization"] * la["macs"] for la in layers) / max(macs, 1),
             "sim.macs": float(macs), energy.metric_name("j_per_image", source): pj * 1e-12,
             # the split says where bits matter: memory traffic follows operand widths, MAC energy does not
             energy.metric_name("mac_j_per_image", source): sum(la["mac_energy_pj"] for la in layers) * 1e-12,
             energy.metric_name("memory_j_per_image", source): sum(la["mem_energy_pj"] for la in layers) * 1e-12}
        for la in layers:
            n = la["layer"]
            m[f"sim.layer.{n}.cycles"] = la["cycles"]
            m[f"sim.layer.{n}.utilization"] = la["utilization"]
            m[f"sim.layer.{n}.w_bits"] = float(la["w_bits"])
            m[energy.metric_name(f"layer_pj.{n}", source)] = la["energy_pj"]
        from importlib.metadata import version

        tags = {"execution": f"simulated ({self.spec['name']})", "energy_source": source, "threads": "n/a (simulated)",
                "accelerator": self.spec["name"], "accelerator_file": self.spec["path"],
                "accelerator_clock_hz": str(self.spec["clock_hz"]), "zigzag_version": version("zigzag-dse"),
                "zigzag_search": f"loma lpf_limit={self.lpf_limit} spatial_mappings={self.spatial_mappings} "
                                 f"optimize={self.optimize}",
                "default_bits": f"{self.default_bits} (unquantized weights/activations)",
                "sim_input": "x".join(map(str, workload.inputs[:1].shape)),
                "energy_note": "data movement at each operand's width; MAC energy fixed per operation by the array"}
        return Measurement(m, tags)


def _module_name(node) -> str:
    """The torch module a Conv/Gemm node came from: its weight's name minus `.weight`, else the node's scope."""
    w = node.input[1]
    if w.endswith(".weight"):
        return w[: -len(".weight")]
    parts = [p for p in node.name.split("/") if p]
    return ".".join(parts[:-1]) or node.name


def _user_format(node_id: int, node, graph) -> dict:
    """ZigZag's own user-format layer dict for a Conv or Gemm/MatMul node (its parsers' code path)."""
    from zigzag.parser.onnx.conv_parser import ConvParser
    from zigzag.parser.onnx.gemm_parser import GemmParser
    from zigzag.parser.onnx.utils import get_attribute_ints_with_name, get_node_input_output_dimension_shapes

    if node.op_type == "Conv":
        p = ConvParser(node_id, node, {}, mapping_data=[], onnx_model=graph)
        a = node.attribute
        ia, oa = get_node_input_output_dimension_shapes(node, graph)
        return p.get_layer_node_user_format(
            get_attribute_ints_with_name("kernel_shape", a, default=None),
            get_attribute_ints_with_name("strides", a, default=[1, 1]),
            get_attribute_ints_with_name("dilations", a, default=[1, 1]),
            get_attribute_ints_with_name("group", a, default=1),
            get_attribute_ints_with_name("pads", a, default=[0, 0, 0, 0]), ia, oa)
    p = GemmParser(node_id=node_id, node=node, nodes_outputs={}, onnx_model=graph, mapping_data=[])
    ia, oa = get_node_input_output_dimension_shapes(node, graph)
    return p.get_layer_node_user_format(ia, oa)


def _strip_pre_hooks(model: torch.nn.Module) -> list:
    saved = []
    for mod in model.modules():
        if mod._forward_pre_hooks:
            saved.append((mod, dict(mod._forward_pre_hooks)))
            mod._forward_pre_hooks.clear()
    return saved


def _quiet_zigzag() -> None:
    for name in ("zigzag",):
        logging.getLogger(name).setLevel(logging.WARNING)
