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
from bench.methods.smoothquant import SmoothQuant
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


def _assert_kernels_equal_fake_quant(packed, deployed, kernel_type):
    """Every compressed layer runs on a `kernel_type` module whose output is the fake-quant layer's to float
    rounding (relative max error < 1e-5)."""
    x = torch.randn(2, 5, 256)
    with torch.inference_mode():
        for name, fake, kernel in _layer_pairs(packed, deployed):
            assert isinstance(kernel, kernel_type)
            xi = x[..., :fake.in_features]
            assert _rel(kernel(xi), fake(xi)) < 1e-5, name


@pytest.mark.parametrize("method", [RTN(bits=4, group_size=32), RTN(bits=4, group_size=-1, symmetric=True),
                                    RTN(bits=2, group_size=64), RTN(bits=8, group_size=32),
                                    GPTQ(bits=4, group_size=32, act_order=True), ABQ(bits=4, group_size=32)],
                         ids=lambda m: str(m.layer_format()))
def test_matmulnbits_layer_equals_the_fake_quant_layer(tiny_llama, method):
    """accuracy_level=1 (fp32 compute) on the stored codes: the fake-quant layer's output to float rounding. The
    backend takes any integer grid of stored_int_layer's tensors, whichever method wrote it (abq's int4 too)."""
    calib = random_calib() if method.needs_calibration else None
    packed, deployed = _deployed(tiny_llama, method, calib, accuracy_level=1)
    _assert_kernels_equal_fake_quant(packed, deployed, MatMulNBitsLinear)
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
    packed, deployed = _deployed(tiny_llama, RTN(bits=8, group_size=-1), int8_kernel="torch_dynamic")
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
    (RTN(bits=4, group_size=32, act_bits=4), "activation quantization (+a4-per_token-dynamic): the kernels here "
                                             "compute int8 activations only"),
], ids=["sign", "2:4", "w3", "g48", "w4a4"])
def test_what_has_no_kernel_is_unsupported_with_its_reason(tiny_llama, method, reason):
    packed = method.compress(models.clone(tiny_llama), None, Budget(name="t"))
    assert CpuKernelsBackend(threads=1).supports(packed).startswith(reason)


@pytest.mark.parametrize("label,reason", [
    ("pbllm-binary+int8-0.1salient", "binary weights (pbllm-binary+int8-0.1salient)"),
    ("int8-sym-ch+a8-per_tensor-static", "activation quantization (+a8-per_tensor-static)"),  # calibrated scale
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
    kld = "wikitext2.kld_vs_base.gptq_s64.first1"  # the kernels' model against the same base-model reference
    assert r.metrics[f"{kld}.deployed"] > 0 and r.metrics[f"{kld}.deployed"] != r.metrics[kld]
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


# -- oneDNN int8 (AMX-INT8 where the CPU has it): per-token int8 activations, the methods' W8A8 / W4A8 ---------------
ONEDNN = dict(int8_kernel="onednn_per_token", lowbit_kernel="onednn_per_token")


@pytest.mark.parametrize("method", [RTN(bits=8, group_size=-1, symmetric=True, act_bits=8),
                                    RTN(bits=8, group_size=-1, act_bits=8),
                                    RTN(bits=8, group_size=-1, act_bits=8, act_granularity="per_tensor"),
                                    RTN(bits=4, group_size=32, act_bits=8),
                                    RTN(bits=3, group_size=-1, act_bits=8),
                                    GPTQ(bits=4, group_size=32, act_order=True, act_bits=8),
                                    SmoothQuant(bits=8, act_bits=8)],
                         ids=lambda m: f"{m.layer_format()}-a8-{m.act_granularity}")
def test_onednn_int8_layer_equals_the_w8a8_fake_quant_layer(tiny_llama, method):
    """The method's int8 activations (per token or per tensor) and its codes as int8 x int8 -> int32 on oneDNN: the
    fake-quant layer (act-quant hook included) to float rounding, for symmetric and asymmetric grids, groups and
    act-order; by default, whatever kernel the backend picks for weight-only grids."""
    from bench.hardware.cpu_kernels import OnednnInt8Linear

    calib = random_calib() if method.needs_calibration else None
    packed, deployed = _deployed(tiny_llama, method, calib)
    assert all(str(f).endswith(f"+a8-{method.act_granularity}-dynamic") for f in packed.layer_format.values())
    _assert_kernels_equal_fake_quant(packed, deployed, OnednnInt8Linear)
    assert deployed.execution.startswith("torch-int8-onednn-")
    assert deployed.execution.endswith(f"-a8-{method.act_granularity}")


def test_onednn_int8_execution_names_the_kernel_and_isa(tiny_llama):
    from bench import precision
    from bench.hardware.cpu_kernels import isa_word, onednn_int8_isa

    impl = onednn_int8_isa()
    assert impl.startswith("brg_matmul:") or "gemm" in impl  # oneDNN's own implementation name, from its log
    if "amx_int8" in precision.cpu_flags():  # AMX tiles run int8 here, as oneDNN's verbose log says
        assert impl.endswith("amx") and isa_word(impl) == "amx"
    _, deployed = _deployed(tiny_llama, RTN(bits=8, group_size=-1, symmetric=True), **ONEDNN)
    assert deployed.execution == f"torch-int8-onednn-{isa_word(impl)}-int8-ch-a8-per_token"


def test_onednn_int8_on_weight_only_codes_is_the_layer_on_per_token_quantized_inputs(tiny_llama):
    """A weight-only grid on the int8 kernel: the method's weights exactly, the input quantized per token."""
    from bench.quant.activation import ActQuantSpec, fake_quant_activations

    packed, deployed = _deployed(tiny_llama, RTN(bits=4, group_size=32), **ONEDNN)
    x = torch.randn(6, 128)
    with torch.inference_mode():
        name, fake, kernel = next(_layer_pairs(packed, deployed))
        assert _rel(kernel(x), fake(fake_quant_activations(x, ActQuantSpec(8)))) < 1e-5
        assert 0 < _rel(kernel(x), fake(x)) < 2e-2
    assert deployed.execution == f"torch-int8-onednn-{deployed.execution.split('-')[3]}-int4-g32-a8-per_token"


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_onednn_int8_quantizes_bf16_inputs_as_their_fp32_values(tiny_llama, granularity):
    """Under precision=bf16 a linear's input may be bf16: the same int8 codes and scales as for its fp32 values."""
    method = RTN(bits=8, group_size=-1, act_bits=8, act_granularity=granularity)
    packed, deployed = _deployed(tiny_llama, method)
    x = (torch.randn(6, 128) * 3).to(torch.bfloat16)
    with torch.inference_mode():
        _, _, kernel = next(_layer_pairs(packed, deployed))
        y = kernel(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, kernel(x.float()).to(torch.bfloat16))


def test_torch_dynamic_kernels_take_bf16_inputs(tiny_llama):
    """Under precision=bf16 a linear's input may be bf16; the dynamic int8 kernels take fp32 only."""
    from bench import precision

    for kernel in ("torch_dynamic", "torch_dynamic_onednn"):
        packed, deployed = _deployed(tiny_llama, RTN(bits=8, group_size=-1, symmetric=True), int8_kernel=kernel)
        x = torch.randn(6, 128)
        with torch.inference_mode(), precision.compute("bf16"):
            name, fake, lin = next(_layer_pairs(packed, deployed))
            y = lin(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        assert _rel(y.float(), fake(x)) < 6e-2  # per-tensor uint8 activations and a bf16 output


@pytest.mark.parametrize("backend", [{}, dict(int8_kernel="ort_matmulnbits"), dict(int8_kernel="torch_dynamic")])
def test_w8a8_runs_on_the_int8_kernel_whatever_the_weight_only_choice(tiny_llama, backend):
    """The methods' int8 activations have one kernel that computes them as the method does: the choice of kernel
    for weight-only grids does not apply to them."""
    packed = RTN(bits=8, group_size=-1, act_bits=8).compress(models.clone(tiny_llama), None, Budget(name="t"))
    be = CpuKernelsBackend(threads=1, **backend)
    assert be.supports(packed) is None
    assert be.deploy(packed).execution.endswith("-int8-ch-a8-per_token")


def test_onednn_dynamic_refuses_asymmetric_int8(tiny_llama):
    packed = RTN(bits=8, group_size=-1).compress(models.clone(tiny_llama), None, Budget(name="t"))
    assert CpuKernelsBackend(threads=1, int8_kernel="torch_dynamic_onednn").supports(packed).startswith(
        "asymmetric int8 weights: torch's oneDNN dynamic linear takes only zero points 0")


def test_w8a8_record_deployed_accuracy_is_the_fake_quant_accuracy(store_results_dir, tiny_byte_llama_dir,
                                                                   small_wikitext):
    """The methods' W8A8 deployed on the per-token int8 kernel computes the fake-quant model's function: the
    re-measured perplexity equals the fake-quant one to float rounding, and the record names kernel and ISA. At
    precision=fp32: under bf16 the two paths round the rest of the model differently (measured 2e-4 relative)."""
    from bench.hardware.cpu_kernels import onednn_int8_isa

    r = run_tiny(store_results_dir, tiny_byte_llama_dir, small_wikitext, "method=rtn", "method.bits=8",
                 "method.group_size=-1", "method.act_bits=8", "hardware=cpu_kernels", "precision=fp32")
    name = "wikitext2.ppl_token.gptq_s64.first1"
    assert r.metrics[f"{name}.deployed"] == pytest.approx(r.metrics[name], rel=1e-4)
    assert r.tags["hardware.execution"].startswith("torch-int8-onednn-")
    assert r.tags["hardware.execution"].endswith("-int8-ch-a8-per_token")
    assert r.tags["hardware.onednn_int8_matmul"] == onednn_int8_isa()


def test_unknown_kernel_option_is_one_line():
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="hardware.lowbit_kernel='amx' is unknown"):
        CpuKernelsBackend(lowbit_kernel="amx")
