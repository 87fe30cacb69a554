"""qfx: learned binary points give valid ap_fixed types whose grids hold the stored values; the torch fixed-point
emulation equals hls4ml's C simulation at those types element for element on held-out digits (the 360-image count
is benchmarks/qfx_csim_agreement.py); an artifact reload and bf16 evaluation change no output bit; a bad width is
one line."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from bench.errors import ConfigError

LENET_EPOCHS = 5  # the shipped recipe's 30 take ~50 s; 5 give ~87% held-out top-1
QAT_EPOCHS = 2
AP_FIXED_8 = re.compile(r"^ap_fixed<8,(-?\d+)(,AP_RND_CONV,AP_SAT)?>$")


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_bad_width_is_one_line(bits):
    from bench.methods.qfx import QFX

    with pytest.raises(ConfigError, match=rf"^method\.bits={bits} is out of range") as e:
        QFX(bits=bits)
    assert "\n" not in str(e.value) and "[2, 8]" in str(e.value)


def test_fixed_cast_rounds_half_to_even_and_saturates():
    from bench.methods.qfx import fixed_cast

    x = torch.tensor([0.125, 0.375, -0.125, 3.0, -5.0, 1.2], dtype=torch.float64)
    # ap_fixed<4,2>: step 0.25, range [-2, 1.75]
    assert fixed_cast(x, 2, 4).tolist() == [0.0, 0.5, -0.0, 1.75, -2.0, 1.25]


@pytest.fixture(scope="module")
def qfx_lenet(tmp_path_factory):
    from bench.methods.qfx import QFX
    from bench.models import ModelSpec, clone, load

    results = tmp_path_factory.mktemp("results")
    model = load(ModelSpec(name="lenet_digits", source="suite_classifier", recipe={"epochs": LENET_EPOCHS},
                            results=str(results)))
    method = QFX(bits=8, epochs=QAT_EPOCHS)
    packed = method.compress(clone(model), None, None)
    return model, method, packed


def test_learned_types_are_valid_ap_fixed_holding_the_stored_values(qfx_lenet):
    model, method, packed = qfx_lenet
    declared = packed.model.bench_fixed_point
    assert AP_FIXED_8.match(declared["input"]).group(2)  # the input is cast (rounded, saturated)
    assert set(declared["layers"]) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    for name, types in declared["layers"].items():
        module = packed.model.get_submodule(name)
        for what in ("weight", "bias"):
            m = AP_FIXED_8.match(types[what])
            assert m and m.group(2) is None, types[what]
            frac = 8 - int(m.group(1))
            codes = getattr(module, what).detach() * 2.0**frac
            assert torch.equal(codes, codes.round()) and codes.min() >= -128 and codes.max() <= 127
            assert int(codes.abs().max()) >= 32  # the learned point uses the width (not 2+ idle top bits)
        assert AP_FIXED_8.match(types["result"]).group(2) == ",AP_RND_CONV,AP_SAT"
    assert packed.layer_format["fc1"].bits == 8 and packed.layer_format["fc1"].act.bits == 8
    assert packed.training.stages[0].losses[-1] < packed.training.stages[0].losses[0]
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        y = packed.model(x)
    out_frac = 8 - int(AP_FIXED_8.match(declared["layers"]["fc3"]["result"]).group(1))
    assert y.dtype == torch.float64 and torch.equal(y * 2.0**out_frac, (y * 2.0**out_frac).round())


def test_reload_and_bf16_evaluation_change_no_output_bit(qfx_lenet):
    from bench import precision
    from bench.models import clone
    from bench.tasks.digits import DigitsTop1

    model, method, packed = qfx_lenet
    x, _ = DigitsTop1().heldout(model)
    restored = method.restore(clone(model), packed.tensors(model), packed.metadata())
    with torch.no_grad():
        y = packed.model(x)
        assert torch.equal(restored.model(x), y)
        with precision.compute("bf16"):
            assert torch.equal(packed.model(x), y)


def test_torch_fixed_point_equals_the_csim_element_for_element(qfx_lenet):
    pytest.importorskip("hls4ml", reason="hls4ml==1.3.0 is a pinned dependency: ./install.sh")
    if shutil.which("g++") is None:
        pytest.skip("hls4ml's C simulation compiles the HLS C++ with g++, which is not on PATH")
    from bench.hardware.fpga_sim import FpgaSimBackend
    from bench.tasks.digits import DigitsTop1

    model, _, packed = qfx_lenet
    backend = FpgaSimBackend(lpf_limit=2)
    assert backend.supports(packed) is None and backend.csim_reason(packed) is None
    deployed = backend.deploy(packed)
    assert deployed.execution == "hls4ml-csim-declared-ap_fixed"
    for name, types in packed.model.bench_fixed_point["layers"].items():
        width, integer = re.match(r"ap_fixed<(\d+),(-?\d+)>", types["weight"]).groups()
        assert deployed.model.precisions[name]["weight_t"].startswith(f"fixed<{width},{integer},")
    x, y = DigitsTop1().heldout(model)
    x = x[:16]  # the 360 held-out images: benchmarks/qfx_csim_agreement.py
    with torch.no_grad():
        fq, cs = packed.model(x).float(), deployed.model(x)
    assert torch.equal(fq, cs), float((fq - cs).abs().max())
    assert float((fq.argmax(1) == y[:16]).float().mean()) > 0.75
