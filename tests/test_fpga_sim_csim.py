"""fpga_sim's deploy: hls4ml C simulation of the digits LeNet (int8 per-channel RTN) agrees with its torch fake-quant
model on the held-out digits, the weights hold the method's exact values, the runner records the deployed accuracy
and its source, and models hls4ml is not given keep the torch accuracy with the reason recorded."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from bench.layer_format import LayerFormat
from bench.packed import EXECUTION_FAKE_QUANT, Packed
from bench.plugins import Workload

pytest.importorskip("hls4ml", reason="hls4ml==1.3.0 is a pinned dependency: ./install.sh")
EPOCHS = 5  # the shipped recipe's 30 take ~50 s; 5 give ~87% held-out top-1


def backend(**kw):
    from bench.hardware.fpga_sim import FpgaSimBackend

    return FpgaSimBackend(lpf_limit=2, **kw)


def test_fixed_type_holds_an_int_grid_exactly_and_rounds_beyond_the_cap():
    from bench.hardware.fpga_sim import fixed_type
    from bench.quant import quantize_rtn

    w = torch.randn(16, 150, generator=torch.Generator().manual_seed(0)) * 0.1
    q = quantize_rtn(w, 8, -1, False).dequantize()  # int8 codes x fp16 per-row scales
    t, held = fixed_type(q, 32)
    assert t.exact and t.max_abs_error == 0 and torch.equal(held, q)
    assert t.width <= 8 + 1 + 11 + 8  # codes (+ sign of code - zero) x 11-bit scale mantissas over a few binades
    scaled = held.double() * 2.0 ** (t.width - t.integer)
    assert torch.equal(scaled, scaled.round())  # every value on the type's grid
    small, held = fixed_type(q, 10)
    assert not small.exact and small.width == 10
    assert 0 < small.max_abs_error <= 2.0 ** -(10 - small.integer) / 2 + 1e-12
    assert float((held.double() - q.double()).abs().max()) == pytest.approx(small.max_abs_error)
    assert fixed_type(torch.zeros(3), 32)[0].precision == "ap_fixed<2,1>"
    assert fixed_type(torch.tensor([-3.0, 1.5]), 32)[0].precision == "ap_fixed<4,3>"


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """The digits LeNet (trained for EPOCHS into a temporary results dir), RTN int8 per channel, and its C simulation
    (one hls4ml project compiled by g++ -O3: the slow part, ~20 s of CPU)."""
    from bench.methods.rtn import RTN
    from bench.models import ModelSpec, clone, load

    if shutil.which("g++") is None:
        pytest.skip("hls4ml's C simulation compiles the HLS C++ with g++, which is not on PATH")
    results = tmp_path_factory.mktemp("results")
    model = load(ModelSpec(name="lenet_digits", source="suite_classifier", recipe={"epochs": EPOCHS},
                            results=str(results)))
    packed = RTN(bits=8, group_size=-1, symmetric=False).compress(clone(model), None, None)
    b = backend()
    assert b.supports(packed) is None and b.csim_reason(packed) is None
    deployed = b.deploy(packed)
    return model, packed, deployed, results


def test_csim_agrees_with_fake_quant_on_heldout_digits(lenet):
    from bench.tasks.digits import DigitsTop1

    model, packed, deployed, _ = lenet
    assert deployed is not packed and deployed.execution == "hls4ml-csim-ap_fixed<16,6>"
    x, y = DigitsTop1().heldout(model)
    assert x.shape == (360, 1, 8, 8)
    with torch.no_grad():
        fq, cs = packed.model(x), deployed.model(x)
    agree = float((fq.argmax(1) == cs.argmax(1)).float().mean())
    assert agree >= 0.97, agree
    assert float((fq - cs).abs().max()) < 0.5  # ap_fixed<16,6> activations: 2^-10 steps, truncated
    acc_fq, acc_cs = (float((o.argmax(1) == y).float().mean()) for o in (fq, cs))
    assert acc_fq > 0.8 and abs(acc_cs - acc_fq) <= 0.02
    # int8 x fp16-scale weights held exactly: the chosen types are recorded per layer
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        t = deployed.model.weights[name]["weight"]
        assert t.exact and t.width <= 28
        assert deployed.model.precisions[name]["weight_t"].startswith(f"fixed<{t.width},{t.integer},")
    assert deployed.model.precisions["relu"]["result_t"].startswith("fixed<16,6,")


def test_runner_records_the_deployed_accuracy_and_its_source(lenet, monkeypatch):
    from bench.hardware import fpga_sim
    from bench.runner import Runner
    from conftest import compose

    model, _, deployed, results = lenet
    monkeypatch.setattr(fpga_sim.HlsCSim, "build", classmethod(lambda cls, b, p: deployed.model))  # compiled once
    monkeypatch.setenv("BENCH_RESULTS", str(results))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runner = Runner(compose("model=lenet_digits", "task=digits_top1", "hardware=fpga_sim", "hardware.lpf_limit=2",
                            f"model.recipe.epochs={EPOCHS}", "method=rtn", "method.bits=8", "method.group_size=-1",
                            "compare_baseline=false",
                            "threads=1", f"paths.results={results}"))
    r = runner.run()[1]
    name = "digits8x8.top1.heldout"
    assert r.metrics[name] > 0.8 and r.metrics[f"{name}.deployed"] > 0.8
    assert r.metrics[f"{name}.deployed_minus_fake_quant"] == pytest.approx(
        r.metrics[f"{name}.deployed"] - r.metrics[name])
    assert r.tags["bench.deployed_execution"] == "hls4ml-csim-ap_fixed<16,6>"
    assert r.tags["hardware.csim"].startswith("hls4ml C simulation")
    assert "fixed<" in r.tags["hardware.csim_precisions"]
    assert r.metrics["csim.layer.fc1.weight_max_abs_error"] == 0
    assert r.metrics["energy.j_per_image.sim-zigzag"] > 0


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c1(x)).mean((2, 3)))


@pytest.mark.parametrize("kind,shape,fmt,reason", [
    ("image_sr", None, {}, "covers small image classifiers"),
    (None, None, {}, "covers small image classifiers"),
    ("image_classifier", (3, 8, 8), {"c1": "int8-sym-ch+a8-static-per_tensor"}, "activation quantization"),
])
def test_models_not_given_to_hls4ml_keep_the_torch_accuracy_with_the_reason(kind, shape, fmt, reason):
    model = Tiny()
    if kind:
        model.bench_kind = kind
    if shape:
        model.bench_input_shape = shape
    packed = Packed(model, "m", EXECUTION_FAKE_QUANT, {}, {k: LayerFormat.from_label(v) for k, v in fmt.items()})
    b = backend()
    assert b.supports(packed) is None
    assert b.deploy(packed) is packed  # the runner then records no .deployed metric
    m = b.measure(packed, Workload("image", inputs=torch.rand(1, 3, 8, 8), label="tiny"))
    assert m.unsupported is None and m.tags["csim"].startswith("not run:") and reason in m.tags["csim"]


def test_too_large_and_switched_off():
    model = Tiny()
    model.bench_kind, model.bench_input_shape = "image_classifier", (3, 8, 8)
    packed = Packed(model, "m", EXECUTION_FAKE_QUANT, {}, {})
    assert "csim_max_params" in backend(csim_max_params=10).csim_reason(packed)
    assert backend(csim=False).csim_reason(packed) == "hardware.csim=false"


def test_bad_precision_is_one_line():
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="not an ap_fixed type"):
        backend(hls_precision="float")
