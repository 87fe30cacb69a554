"""The typed layer format: labels derived from the fields are the strings earlier versions wrote, labels of old
artifacts parse to the right fields, and an artifact whose metadata holds old label strings still restores."""

from __future__ import annotations

import json

import pytest
import torch

from bench import models
from bench.budget import Budget
from bench.cache import ArtifactStore
from bench.errors import ArtifactCorrupt
from bench.layer_format import ActFormat, AdapterBranch, LayerFormat
from bench.methods.gptq import GPTQ
from bench.methods.rtn import RTN
from bench.methods.sign import SignBinarization
from bench.packed import read_layer_formats
from conftest import random_calib

# every spelling the methods wrote before formats were typed (one or more per method), with its weight kind, bits
# and activation bits (None: untouched)
OLD_LABELS = {
    "int4-asym-g128": ("int", 4, None),  # rtn, pipeline
    "int4-asym-g128+a8-per_token-dynamic": ("int", 4, 8),
    "int4-asym-g128+fp4_e2m1-per_tensor-dynamic": ("int", 4, 4),
    "gptq-int4-asym-g32-actorder": ("int", 4, None),
    "awq-int4-asym-g128": ("int", 4, None),
    "smooth0.5-int8-sym-ch+a8-per_token-dynamic": ("int", 8, 8),
    "l4q-int4-asym-g128": ("int", 4, None),
    "abq-int4-asym-ch": ("int", 4, None),
    "abq-int2-5level-asym-ch": ("int", 2, None),
    "baq-int3avg-layer-rowminmax": ("int", 3, None),
    "baq-int2.5avg-model-rowminmax": ("int", 2.5, None),
    "edgeqat-w4-per_tensor-sym+a8-per_tensor-static": ("int", 4, 8),
    "int8-sym-ch+a8-per_tensor-static": ("int", 8, 8),  # static_ptq, hawq_v3
    "int4-sym-ch+a32": ("int", 4, 32),
    "int8-sym-ch+a8-per_tensor-static+qdiff-calib": ("int", 8, 8),
    "bitmod-fp4-g128": ("float", 4, None),
    "fp4_e2m1-g128+a8-per_token-dynamic": ("float", 4, 8),  # fp_rtn
    "fp4-e2m1-ch+fp4-e2m1-per_tensor-static-preshifted": ("float", 4, 4),  # llm_fp4
    "fp6_e3m2-ch": ("float", 6, None),  # fp_lowbit
    "e4m3-ch+e4m3-per_tensor-static": ("float", 8, 8),  # minifloat
    "fp8_e4m3-ch+a32": ("float", 8, 32),
    "sign-1bit-rowscale-fp16": ("binary", 1, None),
    "sign-1bit-rowscale-fp16+a1-per_token-meanabs": ("binary", 1, 1),  # xnor
    "billm-residual-binary-b128": ("binary", 1, None),
    "pbllm-binary+int8-0.1salient": ("binary", 1, None),
    "onebit-1bit-svid-fp16+layernorm": ("binary", 1, None),
    "dual-binary-2x1bit-g64-fp16": ("binary", 2, None),
    "binarymos-1bit-4experts-fp16": ("binary", 1, None),
    "binary-1bit-chscale-fp16+a1+shortcut": ("binary", 1, 1),  # birealnet, biper
    "binary-2basis-ch": ("binary", 2, None),  # binarydm
    "ternary-twn-rowscale-fp16": ("ternary", 1.6, None),
    "magnitude-2:4-fp16": ("sparse", 16, None),
    "wanda-unstructured0.5-fp16": ("sparse", 16, None),
    "sign-1bit-rowscale-fp16+rora64": ("binary", 1, None),
    "int4-asym-g128+a8-per_token-dynamic+lora64": ("int", 4, 8),
}


@pytest.mark.parametrize("label", OLD_LABELS)
def test_old_labels_parse_to_their_fields_and_back_to_the_same_label(label):
    fmt = LayerFormat.from_label(label)
    kind, bits, act_bits = OLD_LABELS[label]
    assert (fmt.kind, fmt.bits, fmt.act.bits if fmt.act else None) == (kind, bits, act_bits)
    assert fmt.label == str(fmt) == label
    assert LayerFormat.from_json(json.loads(json.dumps(fmt.to_json()))) == fmt


def test_fields_of_the_grids_backends_read():
    g = LayerFormat.from_label("gptq-int4-asym-g128-actorder+a8-per_token-dynamic+lora64")
    assert (g.granularity, g.group, g.symmetric, g.act_order) == ("group", 128, False, True)
    assert (g.levels, g.mixed) == (None, False)
    assert g.act == ActFormat(8, "int", "per_token", "dynamic") and g.adapter == AdapterBranch("lora", 64)
    assert g.name == "gptq-int4-asym-g128-actorder" and g.packing == "bitstream"
    five = LayerFormat.from_label("abq-int2-5level-asym-g128")
    assert (five.bits, five.levels, five.packing) == (2, 5, "base5")
    assert LayerFormat.from_label("baq-int3avg-layer-rowminmax").mixed
    assert LayerFormat.from_label("edgeqat-w4-per_tensor-sym+a8-per_tensor-static").granularity == "tensor"
    assert not LayerFormat.from_label("int8-sym-ch+a32").act.quantized  # fp32 activations, stated
    assert LayerFormat.from_label("magnitude-2:4-fp16").pattern == "2:4"
    assert LayerFormat.from_label("ternary-absmean-rowscale-fp16").packing == "base3"
    with pytest.raises(ValueError, match="not one this version reads"):
        LayerFormat.from_label("mystery-format")


def test_methods_build_the_labels_they_wrote_before():
    assert str(RTN(bits=3, group_size=32).layer_format()) == "int3-asym-g32"
    assert str(GPTQ(act_order=True).layer_format()) == "gptq-int4-asym-g128-actorder"
    int8 = LayerFormat.int_grid(8, -1, True)
    assert (str(int8), int8.granularity, int8.group) == ("int8-sym-ch", "channel", None)


def _old_metadata(packed) -> dict[str, str]:
    """The metadata the code before typed formats wrote (bench/packed.py at 46bdedd): labels as strings."""
    meta = packed.metadata()
    meta["layer_format"] = json.dumps({k: str(v) for k, v in packed.layer_format.items()})
    return meta


@pytest.mark.parametrize("method", [RTN(bits=4, group_size=32, act_bits=8), GPTQ(group_size=32, act_order=True),
                                    SignBinarization()], ids=["rtn-a8", "gptq-actorder", "sign"])
def test_an_artifact_with_old_label_strings_restores_bit_exactly(tiny_llama, tmp_path, method):
    calib = random_calib() if method.needs_calibration else None
    packed = method.compress(models.clone(tiny_llama), calib, Budget(name="t"))
    store = ArtifactStore(tmp_path)
    store.save("old", packed.tensors(tiny_llama), _old_metadata(packed))
    tensors, meta = store.load("old")
    assert all(isinstance(v, str) for v in json.loads(meta["layer_format"]).values())
    restored = method.restore(models.clone(tiny_llama), tensors, meta)
    assert restored.layer_format == packed.layer_format  # typed again, activation format not doubled
    for (name, a), b in zip(packed.model.state_dict().items(), restored.model.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(packed.model(ids).logits, restored.model(ids).logits)  # activation hooks re-attached


def test_unreadable_layer_formats_are_a_corrupt_artifact():
    with pytest.raises(ArtifactCorrupt, match="layer formats cannot be read"):
        read_layer_formats({"layer_format": json.dumps({"x": "mystery-format"})})
