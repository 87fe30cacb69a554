"""tflite: a missing converter venv is one line before anything runs; the capability table refuses what LiteRT
cannot execute (with the reason) and accepts what it can; with the venv present, a tiny conv model converts,
runs on LiteRT like the torch model and is timed with a source-labelled energy value."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.errors import ResourceError
from bench.layer_format import LayerFormat
from bench.packed import EXECUTION_DENSE, EXECUTION_FAKE_QUANT, EXECUTION_SPARSE_AS_DENSE, Packed
from bench.plugins import Workload
from conftest import ROOT, run_cli

VENV = Path(os.environ.get("BENCH_LITERT_VENV", ROOT / ".venv-litert"))


@pytest.fixture
def fake_venv(tmp_path):
    """A venv path whose python exists: enough for the capability logic, which never starts it."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    return str(tmp_path)


def backend(venv: str, **kw):
    from bench.hardware.tflite import TfliteBackend

    return TfliteBackend(threads=1, venv=venv, min_seconds=0.0, min_reps=2, **kw)


def test_missing_venv_is_one_line_before_anything_runs(tmp_path):
    missing = tmp_path / "no-venv"
    r = run_cli("hardware=tflite", "threads=1", results=tmp_path / "results",
                env={"BENCH_LITERT_VENV": str(missing)})
    assert (r.returncode, r.stderr) == (2, f"bench: error: hardware=tflite needs the LiteRT converter venv and "
                                           f"{missing}/bin/python does not exist; create it with: "
                                           f"bash hardware/tflite_setup.sh\n")
    assert not (tmp_path / "results" / "mlflow.db").exists()


def test_missing_venv_raises_resource_error(tmp_path):
    with pytest.raises(ResourceError, match="create it with: bash hardware/tflite_setup.sh"):
        backend(str(tmp_path / "absent"))


@pytest.mark.parametrize("label,recipe,refused", [
    ("int8-sym-ch", "dynamic_int8", None),
    ("int8-sym-ch+a8-per_tensor-static", "full_int8", None),
    ("int8-sym-ch+a8-per_tensor-static", "weight_only_int8", "would run in fp32"),
    ("int4-sym-ch", "weight_only_int4", None),
    ("int4-asym-g128", "weight_only_int4", "re-quantizes int4 weights per output channel"),
    ("int8-asym-ch", "dynamic_int8", "re-quantizes int8 weights per output channel"),
    ("gptq-int4-sym-g128-actorder", "dynamic_int8", None),  # a 4-bit grid held in int8 containers
    ("int8-sym-ch", "weight_only_int4", "do not fit"),
    ("int4-asym-g128", "fp32", "fake-quant"),
    ("int4-asym-g128", "fp16", "fake-quant"),
    ("int3-asym-g128", "dynamic_int8", "3-bit weights"),
    ("int2-asym-g64", "weight_only_int4", "2-bit weights"),
    ("baq-int3avg-layer-rowminmax", "dynamic_int8", "mixed bit-widths"),
    ("sign-1bit-rowscale-fp16", "dynamic_int8", "binary"),
    ("ternary-twn-rowscale-fp16", "fp32", "ternary"),
    ("billm-residual-binary-b128", "fp32", "binary"),
    ("fp4_e2m1-ch", "dynamic_int8", "FP8/FP6/FP4"),
    ("e2m1-ch+a32", "weight_only_int4", "FP8/FP6/FP4"),
    ("int4-sym-ch+a4-per_tensor-static", "full_int8", "int8 only"),
    ("int8-sym-g128+fp4_e2m1-per_token-dynamic", "dynamic_int8", "int8 only"),
    ("int4-asym-g128+lora64", "weight_only_int4", "recovery adapters"),
])
def test_capability_table(label, recipe, refused):
    from bench.hardware.tflite import layer_reason

    reason = layer_reason(LayerFormat.from_label(label), recipe)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def _packed(execution=EXECUTION_FAKE_QUANT, layer_format=None, model=None):
    formats = {k: LayerFormat.from_label(v) for k, v in (layer_format or {}).items()}
    return Packed(model or nn.Conv2d(3, 3, 3), "m", execution, {}, formats)


def test_supports_names_the_layer_and_refuses_sparsity_and_lm_full_int8(fake_venv):
    from transformers import LlamaConfig, LlamaForCausalLM

    b = backend(fake_venv, recipe="dynamic_int8")
    assert b.supports(_packed(EXECUTION_DENSE)) is None
    assert b.supports(_packed(layer_format={"body.0": "int8-sym-ch", "body.1": "int4-asym-g128"})) is None
    reason = b.supports(_packed(layer_format={"body.0": "int8-sym-ch", "body.1": "sign-1bit-rowscale-fp16"}))
    assert reason.startswith("body.1: binary")
    assert "sparse" in b.supports(_packed(EXECUTION_SPARSE_AS_DENSE, {"c": "wanda-2:4-fp16"}))
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    assert "calibration needs token windows" in backend(fake_venv, recipe="full_int8").supports(
        _packed(EXECUTION_DENSE, model=lm))
    assert b.supports(_packed(EXECUTION_DENSE, model=lm)) is None


def test_unknown_recipe_is_a_config_error(fake_venv):
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="hardware.recipe=int2 is unknown"):
        backend(fake_venv, recipe="int2")


class TinySR(nn.Module):
    bench_kind = "super_resolution"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x))) + x


@pytest.mark.slow  # one litert-torch conversion: ~40-100 s on a 2-core machine
@pytest.mark.skipif(not (VENV / "bin" / "python").is_file(),
                    reason=f"the LiteRT converter venv {VENV} is absent (bash hardware/tflite_setup.sh creates it)")
def test_converted_model_runs_like_torch_and_is_timed(tmp_path):
    from bench import energy

    model = TinySR().eval()
    b = backend(str(VENV), recipe="fp32", cache_dir=str(tmp_path / "cache"))
    packed = _packed(EXECUTION_DENSE, model=model)
    deployed = b.deploy(packed)
    assert deployed.execution == "litert-xnnpack-fp32"
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        assert torch.allclose(deployed.model(x), model(x), atol=1e-4)
    m = b.measure(deployed, Workload("image", inputs=x, label="tiny"))
    assert m.unsupported is None and m.metrics["latency.tiny.p50_s"] > 0
    assert m.metrics["memory.tflite_file_bytes"] > 0
    assert m.tags["threads"] == "1" and m.tags["recipe"] == "fp32"
    src = m.tags["energy_source"]
    assert m.metrics[energy.metric_name("j_per_image", src)] > 0
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one shape, converted once for both calls
