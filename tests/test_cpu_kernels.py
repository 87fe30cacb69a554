"""cpu_kernels: the method's own codes on real kernels (onnxruntime MatMulNBits, torch dynamic int8) compute
the fake-quant layer's function; what has no kernel is `unsupported` with its reason; a run records both the
fake-quant and the kernel-path accuracy."""

from __future__ import annotations

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.hardware.cpu_kernels import CpuKernelsBackend, MatMulNBitsLinear
from bench.layer_format import LayerFormat
from bench.methods.abq import ABQ
from bench.methods.gptq import GPTQ
from bench.methods.magnitude import MagnitudePruning
from bench.methods.rtn import RTN
from bench.methods.sign import SignBinarization
from conftest import random_calib, run_tiny


def _deployed(tiny, method, calib=None, **backend):
    packed = method.compress(models.clone(tiny), calib, Budget(name="t"))
    be = CpuKernelsBackend(threads=1, **backend)
    assert be.supports(packed) is None
    return packed, be.deploy(packed)


def _layer_pairs(packed, deployed):
    for name in packed.layers:
        yield name, packed.model.get_submodule(name), deployed.model.get_submodule(name)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", [RTN(bits=4, group_size=32), RTN(bits=4, group_size=-1, symmetric=True),
                                    RTN(bits=2, group_size=64), RTN(bits=8, group_size=32),
                                    GPTQ(bits=4, group_size=32, act_order=True), ABQ(bits=4, group_size=32)],
                         ids=lambda m: str(m.layer_format()))
def test_matmulnbits_layer_equals_the_fake_quant_layer(tiny_llama, method):
    """accuracy_level=1 (fp32 compute) on the stored codes: the fake-quant layer's output to float rounding. The
    backend takes any integer grid of stored_int_layer's tensors, whichever method wrote it (abq's int4 too)."""
    calib = random_calib() if method.needs_calibration else None
    packed, deployed = _deployed(tiny_llama, method, calib, accuracy_level=1)
    x = torch.randn(2, 5, 256)
    with torch.inference_mode():
        for name, fake, kernel in _layer_pairs(packed, deployed):
            assert isinstance(kernel, MatMulNBitsLinear)
            xi = x[..., :fake.in_features]
            assert _rel(kernel(xi), fake(xi)) < 1e-5, name
    assert deployed.execution.startswith("ort-matmulnbits-int")


def test_matmulnbits_int8_compute_is_close(tiny_llama):
    """accuracy_level=4 quantizes activations to int8 per block: close, not equal."""
    packed, deployed = _deployed(tiny_llama, RTN(bits=4, group_size=32), accuracy_level=4)
    x = torch.randn(6, 128)
    with torch.inference_mode():
        name, fake, kernel = next(_layer_pairs(packed, deployed))
        err = _rel(kernel(x), fake(x))
    assert 0 < err < 2e-2
    assert deployed.execution == "ort-matmulnbits-int4-b32-acc4"


def test_torch_dynamic_int8_is_the_fake_quant_layer_on_per_tensor_quantized_inputs(tiny_llama):
    """int8 per channel on fbgemm: the method's weights exactly, the input quantized per tensor to uint8 with
    reduce_range (7 bits) at run time; its error against the fake-quant layer is small."""
    packed, deployed = _deployed(tiny_llama, RTN(bits=8, group_size=-1))
    x = torch.randn(6, 128)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 127
    zp = min(max(round(-lo / scale), 0), 127)
    xq = (torch.clamp(torch.round(x / scale) + zp, 0, 127) - zp) * scale
    with torch.inference_mode():
        name, fake, kernel = next(_layer_pairs(packed, deployed))
        assert _rel(kernel(x), fake(xq)) < 1e-4  # the same weights: only the input's quantization differs
        assert _rel(kernel(x), fake(x)) < 3e-2
    assert deployed.execution.startswith("torch-dynamic-int8")


@pytest.mark.parametrize("method,reason", [
    (SignBinarization(), "binary weights (sign-1bit-rowscale-fp16): no binary (xnor/popcount) kernel"),
    (MagnitudePruning(pattern="2:4"), "sparse weights (magnitude-2:4-fp16): no sparse kernel"),
    (RTN(bits=3, group_size=32), "3-bit weights: onnxruntime's MatMulNBits runs only 2, 4, 8-bit codes"),
    (RTN(bits=4, group_size=48), "group size 48: MatMulNBits blocks must be a power of two >= 16"),
    (RTN(bits=4, group_size=32, act_bits=8), "activation quantization (+a8-per_token-dynamic)"),
], ids=["sign", "2:4", "w3", "g48", "w4a8"])
def test_what_has_no_kernel_is_unsupported_with_its_reason(tiny_llama, method, reason):
    packed = method.compress(models.clone(tiny_llama), None, Budget(name="t"))
    assert CpuKernelsBackend(threads=1).supports(packed).startswith(reason)


@pytest.mark.parametrize("label,reason", [
    ("pbllm-binary+int8-0.1salient", "binary weights (pbllm-binary+int8-0.1salient)"),
    ("smooth0.5-int8-sym-ch+a8-per_token-dynamic", "activation quantization (+a8-per_token-dynamic)"),
    ("int4-asym-g128+lora64", "recovery adapters (+lora64)"),
    ("fp4_e2m1-g128", "floating-point weight format (fp4_e2m1-g128)"),
    ("ternary-twn-rowscale-fp16", "ternary weights"),
    ("abq-int2-5level-asym-g128", "layer format 'abq-int2-5level-asym-g128' has no kernel"),  # 3 codes per 7 bits
    ("baq-int3avg-layer-rowminmax", "layer format 'baq-int3avg-layer-rowminmax' has no kernel"),
    ("int2-asym-ch", "per-channel 2-bit on a width-512 layer: 2-bit MatMulNBits blocks must not exceed 256"),
])
def test_reason_of_each_format_without_a_kernel(label, reason):
    from bench.packed import Packed

    module = torch.nn.Sequential(torch.nn.Linear(512, 8))
    packed = Packed(module, "x", "fake-quant", {"0": {}}, {"0": LayerFormat.from_label(label)})
    assert CpuKernelsBackend(threads=1).supports(packed).startswith(reason)


def test_record_has_both_accuracies_and_a_sourced_energy(store_results_dir, tiny_byte_llama_dir, small_wikitext):
    r = run_tiny(store_results_dir, tiny_byte_llama_dir, small_wikitext, "method=rtn", "method.group_size=32",
                 "hardware=cpu_kernels", "hardware.accuracy_level=4")
    name = "wikitext2.ppl_token.gptq_s64.first1"
    fake, kernel = r.metrics[name], r.metrics[f"{name}.deployed"]
    assert kernel != fake  # re-measured on the kernels (int8 activations), not copied
    assert r.metrics[f"{name}.deployed_minus_fake_quant"] == pytest.approx(kernel - fake)
    assert r.tags["bench.execution"] == "fake-quant"
    assert r.tags["bench.deployed_execution"] == r.tags["hardware.execution"] == "ort-matmulnbits-int4-b32-acc4"
    assert r.tags["hardware.matmulnbits_accuracy_level"] == "4"
    assert "latency.prefill_16.p50_s" in r.metrics and "latency.decode_per_token.p50_s" in r.metrics
    source = r.tags["hardware.energy_source"]
    assert source in ("rapl", "model:horowitz_isscc2014_45nm")
    assert f"energy.prefill_j_per_token.{source.replace(':', '-')}" in r.metrics


def test_unsupported_cell_records_accuracy_and_the_reason(store_results_dir, tiny_byte_llama_dir, small_wikitext):
    r = run_tiny(store_results_dir, tiny_byte_llama_dir, small_wikitext, "method=sign", "hardware=cpu_kernels")
    assert r.tags["bench.hardware_status"] == "unsupported"
    assert r.tags["bench.hardware_unsupported"].startswith("binary weights")
    assert "wikitext2.ppl_token.gptq_s64.first1" in r.metrics
    assert not any(k.startswith(("latency.", "energy.")) or k.endswith(".deployed") for k in r.metrics)
