"""Efficient-SR ports (bench.models.sr_archs): every shipped checkpoint loads strictly with the published
parameter count, outputs are 4x the input size, and a checkpoint that does not match fails loudly."""

from pathlib import Path

import pytest
import torch

from bench.data import data_root
from bench.errors import ArtifactCorrupt, ConfigError, DataMissing
from bench.models.sr_archs import SR_ARCHS, load_sr

# Parameter counts from sr_checkpoints/SOURCE.md (independent of the registry).
PARAMS = {"rlfn": 543_740, "rlfn_s": 470_208, "rlfn_ntire": 317_218, "imdn": 893_936, "rfdn": 433_448}

ROOT = data_root()
needs_data = pytest.mark.skipif(
    ROOT is None or not all((ROOT / a.checkpoint).is_file() for a in SR_ARCHS.values()),
    reason="SR checkpoints not under the data root",
)


def test_registry_covers_the_five_models():
    assert set(SR_ARCHS) == set(PARAMS)
    for name, arch in SR_ARCHS.items():
        assert arch.name == name and arch.scale == 4 and arch.input_range in (1.0, 255.0)
    assert SR_ARCHS["imdn"].input_range == 1.0  # the one model trained on [0, 1]


@needs_data
@pytest.mark.parametrize("name", list(PARAMS))
def test_strict_load_param_count_and_shape(name):
    model = load_sr(name, ROOT)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    # 12 x 12 where the architecture allows; the ESA models (RLFN*, RFDN) need >= 15 x 15 (strided conv + 7/3
    # max-pool), so they are checked at their minimum.
    h = max(12, SR_ARCHS[name].min_lr_size)
    x = torch.rand(2, 3, h, h) * SR_ARCHS[name].input_range
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, 4 * h, 4 * h) and torch.isfinite(y).all()


def test_esa_models_reject_inputs_below_their_minimum():
    model = SR_ARCHS["rlfn_ntire"].builder().eval()
    with torch.no_grad():
        model(torch.rand(1, 3, 15, 15))
        with pytest.raises(RuntimeError):
            model(torch.rand(1, 3, 14, 14))


@needs_data
def test_checkpoint_with_a_missing_key_fails(tmp_path: Path):
    arch = SR_ARCHS["rlfn_ntire"]
    state = torch.load(ROOT / arch.checkpoint, map_location="cpu", weights_only=True)
    dropped = state.pop("block_2.esa.conv3.weight")
    with pytest.raises(RuntimeError, match="Missing key"):
        arch.builder().load_state_dict(state, strict=True)
    # through load_sr: a readable one-line error naming the key
    (tmp_path / arch.checkpoint).parent.mkdir(parents=True)
    torch.save(state, tmp_path / arch.checkpoint)
    with pytest.raises(ArtifactCorrupt, match="block_2.esa.conv3.weight") as e:
        load_sr("rlfn_ntire", tmp_path)
    assert "\n" not in str(e.value)
    # a wrong shape fails as well
    state["block_2.esa.conv3.weight"] = dropped[:, :8]
    torch.save(state, tmp_path / arch.checkpoint)
    with pytest.raises(ArtifactCorrupt, match="size mismatch"):
        load_sr("rlfn_ntire", tmp_path)


def test_missing_checkpoint_and_unknown_name(tmp_path: Path):
    with pytest.raises(DataMissing, match="rlfn_x4.pth") as e:
        load_sr("rlfn", tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'rfdn'"):
        load_sr("rfdnn", tmp_path)
