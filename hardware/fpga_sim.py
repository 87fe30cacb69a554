"""`fpga_sim`: two simulations of a fixed-point deployment. Costs: an accelerator array simulated by ZigZag
(zigzag-dse 3.9.1, KU Leuven) - the shipped one, `tpu_like`, is a TPU-v1-like 32x32 systolic MAC array, not an
FPGA fabric: per-layer latency (cycles), energy (pJ) and MAC utilization of the packed model's Conv/Gemm/MatMul
layers on the array described in `configs/accelerator/<name>.yaml`, fed with the model's ONNX graph and each
layer's real bit-widths (`simulate_accelerator`). Accuracy: the FPGA's fixed-point datapath, by hls4ml C
simulation (`deploy`, below).

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

Minifloat layers (weights or activations in an eXmY format: FP8 E4M3/E5M2, FP6, FP4 as `minifloat`, `fp_rtn`,
`fp_lowbit`, `llm_fp4` store them): ZigZag moves their operands at their bit-width like any other, and counts their
cycles as one MAC per array unit per cycle (a minifloat MAC unit in the integer one's place, an assumption). ZigZag
has no float MAC cost, so the MAC energy of such a layer is an estimate: the array's integer MAC energy (its
unit_energy, for `mac_bits`-bit integers) times the ratio of the layer's MAC to an int`mac_bits` MAC in
`bench.energy.mac_pj` (Horowitz ISSCC 2014 45 nm entries, multiplier energy fitted to significand widths, float
products accumulated in fp32: FP8 E4M3 1.4 pJ between int8's 0.3 and fp16's 2.0). Such a model's total and MAC
energy are labelled `sim:zigzag+model:horowitz_isscc2014_45nm_widthfit` (metric suffix
`sim-zigzag_and_model-horowitz_isscc2014_45nm_widthfit`), its memory energy `sim:zigzag`; per-layer ratios are
`sim.layer.<name>.mac_energy_vs_array_int8`. Integer layers keep ZigZag's own MAC energy.

Capabilities: integer weight grids and integer activations up to the array's width (8 bits on tpu_like; the
simulator moves any narrower width, the array multiplies integers), and eXmY minifloat weights/activations (costed
as above). Binary/ternary layers (they need XNOR/popcount or sign units this array lacks), float formats that are
not a plain eXmY (bitmod's), sparsity (the array does not skip zeros) and language models (not simulated here:
only image workloads are exported) are `unsupported` with the reason.

FPGA accuracy (`deploy`): where hls4ml (1.3.0, PyTorch frontend, Vitis backend, io_parallel) can take the model, the
packed (fake-quant) model is converted to an hls4ml project and its C simulation - the generated HLS C++ with the
bundled ap_fixed headers, compiled by g++ into a shared library, no Vivado/Vitis needed - is the deployed model: the
runner evaluates the task on it (`<metric>.deployed`, `<metric>.deployed_minus_fake_quant`, tag
`bench.deployed_execution = hls4ml-csim-...`). Precisions, per weight layer (recorded in `hardware.csim_precisions`):
- weights and biases: the narrowest signed ap_fixed<W,I> that holds every stored value exactly (an int8/int4 grid
  times its fp16 per-channel or per-group scales is a few dyadic values: W ~ bits + 11 scale mantissa bits + the
  scales' exponent spread, e.g. ~22 for int8 per channel; the fp16 weights of an uncompressed layer likewise). Where
  that needs more than `max_weight_bits` the values are rounded to nearest on ap_fixed<max_weight_bits,I> first and
  the largest error is recorded (`csim.layer.<name>.weight_max_abs_error`); exact layers record 0;
- accumulators and each conv/linear output: hls4ml's `auto` (exact for those operands);
- inputs and every activation/pooling output: `hls_precision` (default ap_fixed<16,6>: TRN/WRAP, hls4ml's default):
  this is where the fixed-point model rounds where torch computes in fp32.
A model that declares its own fixed-point types (`bench_fixed_point`, written by a fixed-point method such as qfx:
the input's type and, per conv/linear layer, its weight, bias and result types) is compiled at exactly those: the
declared weight/bias types must hold the stored values exactly (else the build fails with the layer named), each
layer's result type is also the type of the activation and pooling layers that follow it (they commute with the
cast), accumulators stay `auto`; the execution is then `hls4ml-csim-declared-ap_fixed`, and the method's own
activation grid is what runs, so its activation quantization is not a reason to skip the C simulation.
The ZigZag costs are still computed from the torch model's ONNX graph at the stored bit-widths: the C simulation
says what the fixed-point datapath computes, not what it costs. The hls4ml project lives in a temporary directory
(`hls_dir`, default the system temp dir), removed when the deployed model is freed.
C simulation is not run (the accuracy stays the torch model's, the reason in `hardware.csim`) for: models that are
not image classifiers declaring their input shape (`bench_input_shape`: SR nets at 256x256 LR, diffusion UNets;
language models are not simulated at all), models above `csim_max_params` (every weight is a C++ header array and
every MAC an ap_fixed operation: MobileNetV2 would take hours per pass), activation-quantized formats (`+a8...`: a
per-tensor float scale is not an ap_fixed type, so the method's activation grid would not be what runs), and any
model hls4ml fails to convert or compile (its error recorded).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from bench import energy
from bench.errors import ConfigError
from bench.layer_format import LayerFormat
from bench.packed import EXECUTION_SPARSE_AS_DENSE, Packed
from bench.plugins import HardwareBackend, Measurement, Workload

ACCELERATORS = Path(__file__).resolve().parents[1] / "configs" / "accelerator"
_AP_FIXED = re.compile(r"^ap_fixed<\s*(\d+)\s*,\s*(-?\d+)\s*(,\s*AP_[A-Z_]+\s*){0,2}>$")


_MINIFLOAT = re.compile(r"(?:^|[_-])e(\d)m(\d)(?:b-?\d+)?(?=-|$)")  # e4m3, fp8_e4m3, fp4-e2m1, fp6_e3m2b3


def _float_significand(name: str, bits: int) -> int | None:
    """Significand bits (mantissa + 1) of a minifloat format named `name` (eXmY inside it) of `bits` bits, or None
    when the name states no eXmY format of that width."""
    m = _MINIFLOAT.search(name)
    if m is None or 1 + int(m.group(1)) + int(m.group(2)) != bits:
        return None
    return int(m.group(2)) + 1


def layer_bits(fmt: LayerFormat | None, default_bits: int) -> tuple[int, int] | str:
    """(weight bits, activation bits) of a packed layer format, or the reason it cannot be simulated."""
    if fmt is None:
        return default_bits, default_bits
    if fmt.kind in ("binary", "ternary"):
        return f"binary/ternary weights ({fmt}): the accelerator's MAC array has no XNOR/popcount or sign units"
    if fmt.kind == "float" and _float_significand(fmt.name, int(fmt.bits)) is None:
        return (f"float weights ({fmt}) name no sign + eXmY minifloat format of {fmt.bits} bits: no MAC cost for "
                "them (bitmod's extra special values, for one, are not a plain minifloat)")
    if fmt.kind not in ("int", "float") or not float(fmt.bits).is_integer():
        return f"layer format '{fmt}' is not an integer grid or a minifloat format"
    if fmt.adapter is not None:
        return f"recovery adapters ({fmt}): the adapter branch is not part of the simulated layer"
    act = fmt.act
    if act is None and fmt.notes:
        return f"activation format of {fmt}: the accelerator's MAC array multiplies integers or minifloats"
    if act is not None and act.bits < 32 and (act.kind == "binary" or (
            act.kind == "float" and _float_significand(act.name, act.bits) is None)):
        return f"activation format of {fmt}: the accelerator's MAC array multiplies integers or eXmY minifloats"
    return int(fmt.bits), act.bits if act is not None and act.bits < 32 else default_bits


def float_significands(fmt: LayerFormat | None) -> tuple[int | None, int | None]:
    """Significand bits of a (simulable) layer's float weight and float activation operands; None: integer."""
    if fmt is None:
        return None, None
    w = _float_significand(fmt.name, int(fmt.bits)) if fmt.kind == "float" else None
    act = fmt.act
    a = _float_significand(act.name, act.bits) if act is not None and act.kind == "float" and act.bits < 32 else None
    return w, a


@dataclass
class FpgaSimBackend(HardwareBackend):
    name: str = "fpga_sim"
    accelerator: str = "tpu_like"  # configs/accelerator/<name>.yaml, or a path to such a file
    default_bits: int = 8  # operand width of what the method left unquantized: the array's native width
    optimize: str = "energy"  # ZigZag's mapping criterion: energy | latency | EDP
    lpf_limit: int = 4  # LOMA: loop prime factors considered per layer (higher = wider search, slower)
    spatial_mappings: int = 1  # spatial mappings ZigZag generates per layer
    csim: bool = True  # deploy: hls4ml C simulation of models it can take (the FPGA's fixed-point accuracy)
    hls_precision: str = "ap_fixed<16,6>"  # C-sim inputs and activation/pooling outputs
    max_weight_bits: int = 32  # widest weight/bias ap_fixed; exact below it, rounded to nearest above
    csim_max_params: int = 200_000  # larger models are not C-simulated (reason recorded)
    hls_dir: str | None = None  # parent of the temporary hls4ml projects (None: the system temp dir)
    capabilities: ClassVar[dict] = {
        "weight_formats": ["int1..int8 (data movement at the stored width)", "float layers at default_bits",
                           "eXmY minifloats (MAC energy estimated: model:horowitz_isscc2014_45nm_widthfit)"],
        "activation_formats": ["int (8-bit when the method quantized them, else default_bits)",
                               "eXmY minifloats (as weights)"],
        "low_bit_kernels": ["simulated: ZigZag cost model"], "binary_ops": False, "sparsity": [],
        "workloads": ["image"],
        "accuracy": ["hls4ml C simulation (ap_fixed) of small image classifiers; else the torch model's"],
    }

    def __post_init__(self):
        if self.optimize not in ("energy", "latency", "EDP"):
            raise ConfigError(f"hardware.optimize={self.optimize} is unknown", "use energy, latency or EDP")
        if not 1 <= self.default_bits <= 32 or self.lpf_limit < 1 or self.spatial_mappings < 1:
            raise ConfigError("hardware.default_bits/lpf_limit/spatial_mappings out of range",
                              "e.g. hardware.default_bits=16 hardware.lpf_limit=4")
        if not _AP_FIXED.match(self.hls_precision.strip()):
            raise ConfigError(f"hardware.hls_precision={self.hls_precision} is not an ap_fixed type",
                              "e.g. hardware.hls_precision='ap_fixed<16,6>' or 'ap_fixed<18,8,AP_RND,AP_SAT>'")
        if not 2 <= self.max_weight_bits <= 48 or self.csim_max_params < 1:
            raise ConfigError("hardware.max_weight_bits/csim_max_params out of range",
                              "max_weight_bits in [2, 48] (weights are written as exact decimals), e.g. 32")
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
        for layer, fmt in packed.layer_format.items():
            bits = layer_bits(fmt, self.default_bits)
            if isinstance(bits, str):
                return f"{layer}: {bits}"
        return None

    # -- deploy: hls4ml C simulation -----------------------------------------------------------------------
    def csim_reason(self, packed: Packed) -> str | None:
        """Why the C simulation is not run for this (supported) model, or None."""
        if not self.csim:
            return "hardware.csim=false"
        model = packed.model
        kind = getattr(model, "bench_kind", None)
        if kind != "image_classifier" or getattr(model, "bench_input_shape", None) is None:
            return (f"hls4ml C simulation covers small image classifiers that declare their input shape; this "
                    f"{kind or type(model).__name__} model is not converted (its accuracy is the torch model's)")
        n = sum(p.numel() for p in model.parameters())
        if n > self.csim_max_params:
            return (f"{n} parameters > hardware.csim_max_params={self.csim_max_params}: every weight is a C++ array "
                    "and every MAC an ap_fixed operation, too slow to C-simulate the task")
        declared = getattr(model, "bench_fixed_point", None) is not None  # its activation grid is ap_fixed types
        for layer, fmt in packed.layer_format.items():
            if (fmt.act is not None and fmt.act.bits < 32 and not declared) or fmt.notes or fmt.adapter:
                return (f"{layer}: activation quantization ({fmt}) uses a float per-tensor scale, not an ap_fixed "
                        "type; the C simulation would not run the method's activation grid")
        try:
            import hls4ml  # noqa: F401
        except ImportError:
            return "hls4ml is not installed (pip install hls4ml==1.3.0, or ./install.sh)"
        return None

    def deploy(self, packed: Packed) -> Packed:
        reason = self.csim_reason(packed)
        if reason is None:
            try:
                csim = HlsCSim.build(self, packed)
            except Exception as e:  # hls4ml's conversion/compilation: its error is the reason, the run goes on
                first = (str(e).splitlines() or [""])[0][:300]
                reason = f"hls4ml could not convert/compile the model: {type(e).__name__}: {first}"
        if reason is not None:
            packed.info["csim_not_run"] = reason  # read by measure(); the runner keeps the torch accuracy
            return packed
        return Packed(csim, packed.method, csim.execution, packed.layers, packed.layer_format,
                      info={**packed.info, "csim": csim, "csim_torch_model": packed.model})

    # -- simulation --------------------------------------------------------------------------------------------
    def simulate_accelerator(self, model: torch.nn.Module, x: torch.Tensor, layer_format: dict[str, LayerFormat]
                             ) -> list[dict]:
        """Per weight layer of `model` on input `x` (batch 1): name, bits, cycles, energy_pj, utilization, macs."""
        import onnx
        from onnx import helper

        with tempfile.TemporaryDirectory(prefix="bench-zigzag-") as tmp:
            tmp = Path(tmp)
            onnx_path = tmp / "model.onnx"
            model = model.eval()
            if any(p.dtype != torch.float32 for p in model.parameters()):  # e.g. float64 fixed-point emulation
                model = copy.deepcopy(model).float()
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
                w_sig, a_sig = float_significands(layer_format.get(name))
                layers.append({"layer": name, "onnx_node": node.name, "w_bits": bits[0], "a_bits": bits[1],
                               "w_significand": w_sig, "a_significand": a_sig, "macs": macs, "unique": keys[key]})
            if not layers:
                raise ConfigError("the ONNX graph has no Conv/Gemm/MatMul layer with constant weights",
                                  "fpga_sim simulates conv/linear models")
            results = self._zigzag(unique, tmp)
        for layer in layers:
            layer.update(results[layer["unique"]])
            self._minifloat_mac_energy(layer)
        return layers

    def _minifloat_mac_energy(self, layer: dict) -> None:
        """A layer with a minifloat operand: ZigZag's MAC energy is the array's integer MAC's (its unit_energy);
        scale it by the estimated energy of this layer's MAC over the array's own integer MAC, both from
        energy.WIDTH_FIT_TABLE. Integer layers keep ZigZag's figure; cycles are kept (one MAC per unit per cycle)."""
        if layer["w_significand"] is None and layer["a_significand"] is None:
            return
        mac_bits = self.spec.get("mac_bits")
        if not isinstance(mac_bits, int) or mac_bits < 1:
            raise ConfigError(f"{self.spec['path']} states no 'mac_bits' (its multipliers' integer width)",
                              "add e.g. mac_bits: 8, the width its MAC unit_energy is for")
        w_kind, w_sig = ("float", layer["w_significand"]) if layer["w_significand"] else ("int", layer["w_bits"])
        a_kind, a_sig = ("float", layer["a_significand"]) if layer["a_significand"] else ("int", layer["a_bits"])
        ratio = energy.mac_pj(w_kind, w_sig, a_kind, a_sig) / energy.mac_pj("int", mac_bits, "int", mac_bits)
        scaled = layer["mac_energy_pj"] * ratio
        layer.update(mac_energy_ratio=ratio, energy_pj=layer["energy_pj"] - layer["mac_energy_pj"] + scaled,
                     mac_energy_pj=scaled)

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
        csim: HlsCSim | None = packed.info.get("csim")
        # ZigZag costs the torch graph at the stored widths, also when the deployed model is the C simulation
        layers = self.simulate_accelerator(packed.info.get("csim_torch_model", packed.model), workload.inputs,
                                           packed.layer_format)
        label = workload.label or "forward"
        cycles = sum(layer["cycles"] for layer in layers)
        pj = sum(layer["energy_pj"] for layer in layers)
        macs = sum(layer["macs"] for layer in layers)
        minifloat = [la for la in layers if "mac_energy_ratio" in la]
        # minifloat MACs are an estimate from a table, the rest ZigZag's: sums of both name both sources
        source = f"sim:zigzag+model:{energy.WIDTH_FIT_TABLE}" if minifloat else "sim:zigzag"
        m = {f"latency.{label}.sim_cycles": cycles, f"latency.{label}.sim_s": cycles / float(self.spec["clock_hz"]),
             "sim.mac_utilization": sum(la["utilization"] * la["macs"] for la in layers) / max(macs, 1),
             "sim.macs": float(macs), energy.metric_name("j_per_image", source): pj * 1e-12,
             # the split says where bits matter: memory traffic follows operand widths, integer MAC energy does not
             energy.metric_name("mac_j_per_image", source): sum(la["mac_energy_pj"] for la in layers) * 1e-12,
             energy.metric_name("memory_j_per_image", "sim:zigzag"):
                 sum(la["mem_energy_pj"] for la in layers) * 1e-12}
        for la in layers:
            n = la["layer"]
            m[f"sim.layer.{n}.cycles"] = la["cycles"]
            m[f"sim.layer.{n}.utilization"] = la["utilization"]
            m[f"sim.layer.{n}.w_bits"] = float(la["w_bits"])
            m[f"sim.layer.{n}.a_bits"] = float(la["a_bits"])
            m[energy.metric_name(f"layer_pj.{n}", source)] = la["energy_pj"]
            if "mac_energy_ratio" in la:
                m[f"sim.layer.{n}.mac_energy_vs_array_int{self.spec['mac_bits']}"] = la["mac_energy_ratio"]
        from importlib.metadata import version

        tags = {"execution": f"simulated ({self.spec['name']})", "energy_source": source, "threads": "n/a (simulated)",
                "accelerator": self.spec["name"], "accelerator_file": self.spec["path"],
                "accelerator_clock_hz": str(self.spec["clock_hz"]), "zigzag_version": version("zigzag-dse"),
                "zigzag_search": f"loma lpf_limit={self.lpf_limit} spatial_mappings={self.spatial_mappings} "
                                 f"optimize={self.optimize}",
                "default_bits": f"{self.default_bits} (unquantized weights/activations)",
                "sim_input": "x".join(map(str, workload.inputs[:1].shape)),
                "energy_note": "data movement at each operand's width; MAC energy fixed per operation by the array"}
        if minifloat:
            tags["energy_note"] = (
                "data movement at each operand's width (sim:zigzag); integer MACs at the array's fixed unit energy; "
                f"minifloat MACs ({len(minifloat)} layers) an estimate, model:{energy.WIDTH_FIT_TABLE}: the array's "
                f"int{self.spec['mac_bits']} MAC energy x (estimated pJ of the layer's MAC / of an "
                f"int{self.spec['mac_bits']} MAC), Horowitz ISSCC 2014 45 nm entries with a multiplier energy fitted "
                "to significand widths, float products accumulated in fp32 (bench/energy.py mac_pj); cycles as an "
                "integer MAC's")

            def operand(bits: int, significand: int | None) -> str:
                return f"fp{bits}(significand {significand})" if significand else f"int{bits}"

            tags["minifloat_layers"] = json.dumps({la["layer"]: f"{operand(la['w_bits'], la['w_significand'])} x "
                                                   f"{operand(la['a_bits'], la['a_significand'])}"
                                                   for la in minifloat})[:5000]
        if csim is None:
            tags["csim"] = f"not run: {packed.info.get('csim_not_run') or self.csim_reason(packed) or 'not deployed'}"
        else:
            tags.update({"csim": f"hls4ml C simulation ({csim.execution}; Vitis backend, io_parallel, PyTorch "
                                 "frontend); the task's accuracy was re-measured on it",
                         "csim_precisions": json.dumps(csim.precisions)[:5000],
                         "csim_activation_precision": self.hls_precision,
                         "csim_weight_rule": f"exact ap_fixed up to max_weight_bits={self.max_weight_bits}, else "
                                             "rounded to nearest", "csim_versions": json.dumps(csim.versions)})
            for name, types in csim.weights.items():
                for what, t in types.items():
                    m[f"csim.layer.{name}.{what}_bits"] = float(t.width)
                    m[f"csim.layer.{name}.{what}_max_abs_error"] = t.max_abs_error
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


# -- hls4ml C simulation ---------------------------------------------------------------------------------------
@dataclass
class FixedType:
    width: int
    integer: int
    exact: bool
    max_abs_error: float

    @property
    def precision(self) -> str:
        return f"ap_fixed<{self.width},{self.integer}>"


def fixed_type(values: torch.Tensor, max_bits: int) -> tuple[FixedType, torch.Tensor]:
    """The narrowest signed ap_fixed<W,I> (I >= 1) holding every value exactly, or, when that needs more than
    `max_bits`, ap_fixed<max_bits,I> with the values rounded to nearest on its grid; returns the type and the
    values as that type holds them (what the C++ headers will contain)."""
    v = values.detach().double()
    vmax, vmin = float(v.max()), float(v.min())
    frac = 0  # fractional bits: the smallest F with v * 2^F all integers (dyadic values: fp16/fp32 weights are)
    while frac < 64 and not bool(torch.all(torch.frac(v * 2.0 ** frac) == 0)):
        frac += 1

    def integer_bits(f: int) -> int:
        i = 1
        while vmax > 2.0 ** (i - 1) - 2.0 ** -f or vmin < -(2.0 ** (i - 1)):
            i += 1
        return i

    i = integer_bits(frac)
    frac = max(frac, 2 - i)  # ap_fixed<1,1> holds only -1 and 0; an all-zero tensor gets ap_fixed<2,1>
    if i + frac <= max_bits:
        return FixedType(i + frac, i, True, 0.0), v.to(values.dtype)
    f = max_bits - i
    if f < 0:
        raise ConfigError(f"values up to {max(abs(vmax), abs(vmin)):.3g} need {i} integer bits > "
                          f"hardware.max_weight_bits={max_bits}", "raise hardware.max_weight_bits")
    q = torch.round(v * 2.0 ** f) / 2.0 ** f
    q = q.clamp(-(2.0 ** (i - 1)), 2.0 ** (i - 1) - 2.0 ** -f)
    return FixedType(max_bits, i, False, float((q - v).abs().max())), q.to(values.dtype)


def declared_type(values: torch.Tensor, precision: str, what: str) -> FixedType:
    """A declared ap_fixed<W,I> type of stored values, checked to hold every value exactly."""
    m = _AP_FIXED.match(precision.replace(" ", ""))
    if m is None:
        raise ConfigError(f"{what}: declared type {precision} is not an ap_fixed type", "declare ap_fixed<W,I>")
    width, integer = int(m.group(1)), int(m.group(2))
    codes = values.detach().double() * 2.0 ** (width - integer)
    if not (torch.equal(codes, codes.round()) and codes.min() >= -(2 ** (width - 1))
            and codes.max() <= 2 ** (width - 1) - 1):
        raise ConfigError(f"{what}: the stored values are not all on the declared {precision} grid",
                          "the method must store values its declared types hold")
    return FixedType(width, integer, True, 0.0)


def _declare_activation_types(names: dict, declared: dict, model: nn.Module) -> None:
    """The input's declared type, and each activation/pooling/reshape layer after a conv/linear at that layer's
    result type (hls4ml's layer configs are in graph order)."""
    weight_layers = {n.replace(".", "_") for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    current = declared["input"]
    for i, (hls_name, cfg) in enumerate(names.items()):
        if hls_name in weight_layers:
            current = cfg["Precision"]["result"]
        elif i == 0 or "result" in cfg.get("Precision", {}):
            cfg.setdefault("Precision", {})["result"] = current


class HlsCSim(nn.Module):
    """A packed image classifier as hls4ml's C simulation runs it: forward() feeds the batch to the compiled
    HLS C++ (ap_fixed arithmetic) and returns its outputs as float32."""

    def __init__(self, hls_model, input_shape: tuple, execution: str, precisions: dict, weights: dict, workdir: str,
                 versions: dict):
        super().__init__()
        self.hls_model = hls_model
        self.input_shape = tuple(input_shape)
        self.execution = execution
        self.precisions = precisions  # hls layer -> {weight_t, bias_t, accum_t, result_t}
        self.weights = weights  # torch layer -> FixedType of its weight and bias
        self.workdir = workdir
        self.versions = versions
        self.bench_kind = "image_classifier"
        self.bench_input_shape = self.input_shape
        weakref.finalize(self, shutil.rmtree, workdir, True)

    @classmethod
    def build(cls, backend: FpgaSimBackend, packed: Packed) -> HlsCSim:
        import subprocess
        from importlib.metadata import version

        import hls4ml

        shape = tuple(int(d) for d in packed.model.bench_input_shape)
        model = copy.deepcopy(packed.model).eval()
        # csim_reason refused activation quantization unless the model declares its types; no hook is converted
        _strip_pre_hooks(model)
        declared = getattr(packed.model, "bench_fixed_point", None)
        if declared is not None:
            for mod in model.modules():
                mod._forward_hooks.clear()  # the declared result types are those casts
        config = hls4ml.utils.config_from_pytorch_model(model, shape, granularity="name", backend="Vitis",
                                                        default_precision=backend.hls_precision)
        names = config["LayerName"]
        weights = {}
        with torch.no_grad():
            for name, mod in model.named_modules():
                if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                    continue
                hls_name = name.replace(".", "_")
                if hls_name not in names:
                    raise ConfigError(f"layer {name} has no hls4ml layer {hls_name}", "the model did not convert 1:1")
                if declared is not None:
                    types = declared["layers"][name]
                    weights[name] = {k: declared_type(getattr(mod, k), types[k], f"{name}.{k}")
                                     for k in ("weight", "bias") if getattr(mod, k) is not None}
                    names[hls_name]["Precision"] = {**{k: types[k] for k in weights[name]},
                                                    "result": types["result"], "accum": "auto"}
                    continue
                wt, wq = fixed_type(mod.weight, backend.max_weight_bits)
                mod.weight.copy_(wq)
                prec = {"weight": wt.precision, "result": "auto", "accum": "auto"}
                weights[name] = {"weight": wt}
                if mod.bias is not None:
                    bt, bq = fixed_type(mod.bias, backend.max_weight_bits)
                    mod.bias.copy_(bq)
                    prec["bias"] = bt.precision
                    weights[name]["bias"] = bt
                names[hls_name]["Precision"] = prec
        if declared is not None:
            _declare_activation_types(names, declared, model)
        workdir = tempfile.mkdtemp(prefix="bench-hls4ml-", dir=backend.hls_dir)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # hls4ml prints its topology and progress
                hls_model = hls4ml.converters.convert_from_pytorch_model(
                    model, hls_config=config, output_dir=str(Path(workdir) / "prj"), backend="Vitis",
                    io_type="io_parallel")
                hls_model.compile()
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        precisions = {layer.name: {k: str(t.precision) for k, t in layer.types.items() if k != "index_t"}
                      for layer in hls_model.get_layers()}
        gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()
        versions = {"hls4ml": version("hls4ml"), "g++": gxx[0] if gxx else "?"}
        execution = ("hls4ml-csim-declared-ap_fixed" if declared is not None
                     else f"hls4ml-csim-{backend.hls_precision.replace(' ', '')}")
        return cls(hls_model, shape, execution, precisions, weights, workdir, versions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ConfigError(f"the C-simulated model was built for inputs {self.input_shape}, got "
                              f"{tuple(x.shape[1:])}", "feed the model's declared input shape")
        arr = np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())
        with contextlib.redirect_stdout(io.StringIO()):
            y = self.hls_model.predict(arr)
        return torch.from_numpy(np.asarray(y, dtype=np.float32).reshape(x.shape[0], -1).copy())
