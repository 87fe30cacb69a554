"""fpga_sim: ZigZag on a tiny conv model gives positive per-layer cycles and energy labelled sim:zigzag, and
lowering one layer's weight bit-width lowers that layer's simulated energy (and the model's); the capability
table refuses what the simulated array cannot run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench import energy
from bench.layer_format import LayerFormat
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


@pytest.mark.parametrize("fmt,execution,reason", [
    ({"c1": "sign-1bit-rowscale-fp16"}, EXECUTION_FAKE_QUANT, "binary/ternary"),
    ({"c1": "fp4_e2m1-ch"}, EXECUTION_FAKE_QUANT, "floating-point"),
    ({"c1": "int8-sym-ch+fp4_e2m1-per_token-dynamic"}, EXECUTION_FAKE_QUANT, "activation format"),
    ({"c1": "magnitude-unstructured0.5-fp16"}, EXECUTION_SPARSE_AS_DENSE, "sparse"),
    ({"c1": "int4-asym-ch+lora64"}, EXECUTION_FAKE_QUANT, "recovery adapters"),
])
def test_capability_table_refuses(fmt, execution, reason):
    b = backend()
    got = b.supports(Packed(Tiny(), "m", execution, {}, formats(fmt)))
    assert got is not None and reason in got
    assert b.measure(Packed(Tiny(), "m", execution, {}, formats(fmt)), Workload("image", inputs=torch.rand(1, 3, 8, 8))
                     ).unsupported == got


def test_layer_bits():
    from bench.hardware.fpga_sim import layer_bits

    assert layer_bits(None, 8) == (8, 8)
    assert layer_bits(LayerFormat.from_label("int4-asym-g128"), 16) == (4, 16)
    assert layer_bits(LayerFormat.from_label("int8-sym-ch+a8-per_tensor-static"), 16) == (8, 8)
    assert layer_bits(LayerFormat.from_label("gptq-int3-sym-g128-actorder"), 16) == (3, 16)


def test_unknown_accelerator_is_a_config_error():
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="accelerator description 'nope' not found; choices: tpu_like"):
        backend(accelerator="nope")
