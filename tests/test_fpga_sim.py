"""fpga_sim: ZigZag on a tiny conv model gives positive per-layer cycles and energy labelled sim:zigzag, and
lowering one layer's weight bit-width lowers that layer's simulated energy (and the model's); minifloat layers are
simulated with their MAC energy estimated from a named table; the capability table refuses what the simulated
array cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench import energy
from bench.layer_format import ActFormat, LayerFormat
from bench.packed import EXECUTION_DENSE, EXECUTION_FAKE_QUANT, EXECUTION_SPARSE_AS_DENSE, Packed
from bench.plugins import Workload


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return self.fc(y.mean((2, 3)))


def backend(**kw):
    from bench.hardware.fpga_sim import FpgaSimBackend

    return FpgaSimBackend(lpf_limit=2, **kw)


def formats(labels: dict[str, str]) -> dict[str, LayerFormat]:
    return {k: LayerFormat.from_label(v) for k, v in labels.items()}


def measure(fmt: dict[str, str]):
    packed = Packed(Tiny(), "m", EXECUTION_FAKE_QUANT if fmt else EXECUTION_DENSE, {}, formats(fmt))
    return backend().measure(packed, Workload("image", inputs=torch.rand(1, 3, 8, 8), label="tiny"))


def test_per_layer_cycles_energy_and_bits():
    m8 = measure({"c1": "int8-sym-ch", "c2": "int8-sym-ch", "fc": "int8-sym-ch"})
    assert m8.unsupported is None and m8.tags["energy_source"] == "sim:zigzag"
    for layer in ("c1", "c2", "fc"):
        assert m8.metrics[f"sim.layer.{layer}.cycles"] > 0
        assert m8.metrics[energy.metric_name(f"layer_pj.{layer}", "sim:zigzag")] > 0
        assert 0 < m8.metrics[f"sim.layer.{layer}.utilization"] <= 1
    total = m8.metrics[energy.metric_name("j_per_image", "sim:zigzag")]
    per_layer = sum(m8.metrics[energy.metric_name(f"layer_pj.{n}", "sim:zigzag")] for n in ("c1", "c2", "fc"))
    assert total == pytest.approx(per_layer * 1e-12)
    split = [m8.metrics[energy.metric_name(q, "sim:zigzag")] for q in ("mac_j_per_image", "memory_j_per_image")]
    assert all(v > 0 for v in split) and sum(split) == pytest.approx(total)
    m4 = measure({"c1": "int8-sym-ch", "c2": "int4-sym-ch", "fc": "int8-sym-ch"})
    c2 = energy.metric_name("layer_pj.c2", "sim:zigzag")
    assert m4.metrics["sim.layer.c2.w_bits"] == 4
    assert m4.metrics[c2] < m8.metrics[c2]
    assert m4.metrics[energy.metric_name("j_per_image", "sim:zigzag")] < total


def minifloat_layer(w: str, bits: int, a: str | None = None, a_bits: int = 0) -> LayerFormat:
    """The layer format methods/minifloat.py writes: eXmY weights per channel, eXmY static activations."""
    fmt = LayerFormat.float_grid(w, bits, -1)
    return fmt.with_act(ActFormat(a_bits, "float", "per_tensor", "static", a) if a else ActFormat(32, "float"))


def test_minifloat_layers_are_simulated_with_their_mac_energy_estimated_from_a_named_table():
    source = "sim:zigzag+model:horowitz_isscc2014_45nm_widthfit"
    w8a8 = {"c1": "int8-sym-ch+a8-per_tensor-static", "c2": "int8-sym-ch+a8-per_tensor-static", "fc": "int8-sym-ch"}
    fmt = {**formats(w8a8), "c2": minifloat_layer("e4m3", 8, "e4m3", 8)}
    packed = Packed(Tiny(), "m", EXECUTION_FAKE_QUANT, {}, fmt)
    b = backend()
    assert b.supports(packed) is None  # refused before: "the accelerator's MAC array multiplies integers"
    fp8 = b.measure(packed, Workload("image", inputs=torch.rand(1, 3, 8, 8), label="tiny"))
    int8 = measure(w8a8)
    assert fp8.unsupported is None and fp8.tags["energy_source"] == source
    assert "model:horowitz_isscc2014_45nm_widthfit" in fp8.tags["energy_note"]
    assert fp8.tags["minifloat_layers"] == '{"c2": "fp8(significand 4) x fp8(significand 4)"}'
    # same widths moved, same cycles: only c2's MAC energy changes, by the table's FP8/int8 MAC ratio 1.4 / 0.3
    assert fp8.metrics["latency.tiny.sim_cycles"] == int8.metrics["latency.tiny.sim_cycles"]
    mem = energy.metric_name("memory_j_per_image", "sim:zigzag")
    assert fp8.metrics[mem] == pytest.approx(int8.metrics[mem])
    assert fp8.metrics["sim.layer.c2.mac_energy_vs_array_int8"] == pytest.approx(1.4 / 0.3)
    # c2: 8 x 8 outputs x 8 channels x 8 inputs x 3 x 3 = 36,864 MACs at the array's 0.04 pJ, now x 1.4 / 0.3
    c2_int8, c2_fp8 = (r.metrics[energy.metric_name("layer_pj.c2", src)]
                       for r, src in ((int8, "sim:zigzag"), (fp8, source)))
    assert c2_fp8 - c2_int8 == pytest.approx(36_864 * 0.04 * (1.4 / 0.3 - 1))
    mac = [r.metrics[energy.metric_name("mac_j_per_image", src)] for r, src in ((int8, "sim:zigzag"), (fp8, source))]
    assert mac[1] - mac[0] == pytest.approx((c2_fp8 - c2_int8) * 1e-12)
    c1_name = energy.metric_name("layer_pj.c1", source)
    assert fp8.metrics[c1_name] == pytest.approx(int8.metrics[energy.metric_name("layer_pj.c1", "sim:zigzag")])
    total = fp8.metrics[energy.metric_name("j_per_image", source)]
    assert total > int8.metrics[energy.metric_name("j_per_image", "sim:zigzag")]
    assert total == pytest.approx(sum(fp8.metrics[energy.metric_name(f"layer_pj.{n}", source)]
                                      for n in ("c1", "c2", "fc")) * 1e-12)
    # FP4 weights move half the bytes of FP8 ones
    fp4 = b.measure(Packed(Tiny(), "m", EXECUTION_FAKE_QUANT, {}, {"c2": minifloat_layer("fp4_e2m1", 4)}),
                    Workload("image", inputs=torch.rand(1, 3, 8, 8), label="tiny"))
    assert fp4.metrics["sim.layer.c2.w_bits"] == 4 and fp4.metrics["sim.layer.c2.a_bits"] == 8
    assert fp4.tags["minifloat_layers"] == '{"c2": "fp4(significand 2) x int8"}'


def test_fp8_mac_sits_between_the_tables_int8_and_fp16_macs():
    int8 = energy.mac_pj("int", 8, "int", 8)
    fp16 = energy.mac_pj("float", 11, "float", 11)
    assert int8 == pytest.approx(energy.MAC_PJ["int8"]) == pytest.approx(0.3)  # Horowitz: 0.2 mult + 0.1 add
    assert energy.mac_pj("float", 24, "float", 24) == pytest.approx(energy.MAC_PJ["fp32"])  # 3.7 + 0.9
    assert fp16 == pytest.approx(1.1 + 0.9)  # Horowitz fp16 multiply, fp32 accumulation
    assert energy.mac_pj("int", 32, "int", 32) == pytest.approx(3.2 + 0.1)  # the paper: 3.1 + 0.1
    fp8_e4m3, fp8_e5m2 = energy.mac_pj("float", 4, "float", 4), energy.mac_pj("float", 3, "float", 3)
    fp4_e2m1 = energy.mac_pj("float", 2, "float", 2)
    assert int8 < fp4_e2m1 < fp8_e5m2 < fp8_e4m3 < fp16
    assert fp8_e4m3 == pytest.approx(1.4)
    with pytest.raises(ValueError, match="not an int width or a float significand"):
        energy.mac_pj("posit", 8, "int", 8)


@pytest.mark.parametrize("fmt,execution,reason", [
    ({"c1": "sign-1bit-rowscale-fp16"}, EXECUTION_FAKE_QUANT, "binary/ternary"),
    ({"c1": LayerFormat.float_grid("fp4", 4, 128)}, EXECUTION_FAKE_QUANT, "no sign + eXmY minifloat format"),
    ({"c1": LayerFormat.from_label("int8-sym-ch").with_act(ActFormat(1, "binary"))}, EXECUTION_FAKE_QUANT,
     "activation format"),
    ({"c1": "magnitude-unstructured0.5-fp16"}, EXECUTION_SPARSE_AS_DENSE, "sparse"),
    ({"c1": "int4-asym-ch+lora64"}, EXECUTION_FAKE_QUANT, "recovery adapters"),
])
def test_capability_table_refuses(fmt, execution, reason):
    b = backend()
    fmt = {k: v if isinstance(v, LayerFormat) else LayerFormat.from_label(v) for k, v in fmt.items()}
    got = b.supports(Packed(Tiny(), "m", execution, {}, fmt))
    assert got is not None and reason in got
    assert b.measure(Packed(Tiny(), "m", execution, {}, fmt), Workload("image", inputs=torch.rand(1, 3, 8, 8))
                     ).unsupported == got


def test_layer_bits():
    from bench.hardware.fpga_sim import layer_bits

    assert layer_bits(None, 8) == (8, 8)
    assert layer_bits(LayerFormat.from_label("int4-asym-g128"), 16) == (4, 16)
    assert layer_bits(LayerFormat.from_label("int8-sym-ch+a8-per_tensor-static"), 16) == (8, 8)
    assert layer_bits(LayerFormat.from_label("gptq-int3-sym-g128-actorder"), 16) == (3, 16)
    assert layer_bits(minifloat_layer("e5m2", 8, "e4m3", 8), 16) == (8, 8)
    assert layer_bits(minifloat_layer("fp6_e3m2", 6), 16) == (6, 16)  # weight-only: float activations at 16
    assert layer_bits(LayerFormat.float_grid("fp6_e3m2", 8, -1), 8).startswith("float weights")  # 6 != 8 bits


def test_unknown_accelerator_is_a_config_error():
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="accelerator description 'nope' not found; choices: tpu_like"):
        backend(accelerator="nope")
