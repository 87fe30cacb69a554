"""ImageNet track: the TFLite -> torch rebuild of the int8 MobileNetV2 (structure, TF SAME padding, the
file's input normalisation), the evaluation preprocessing, the three dataset layouts, and the rebuild's
top-1 agreeing with the .tflite file itself run by LiteRT on the first 100 sample images (>= 97%; the
full 500: benchmarks/tflite_agreement.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bench import data, models
from bench.errors import DataMissing, NotApplicable
from bench.models.tflite_import import run_litert, same_pads
from bench.tasks.imagenet import ImageNetClassification, resize_center_crop

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
N_AGREE = 100


def _spec(name: str) -> models.ModelSpec:
    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))
    node.pop("_target_")
    return models.ModelSpec(**node)


@pytest.fixture(scope="module")
def mobilenet():
    return models.load(_spec("mobilenetv2_tflite"))


def test_rebuild_structure(mobilenet):
    assert mobilenet.kind == "image_classifier"
    assert mobilenet.info["n_params"] == 3_487_816  # BN folded into the convs, as in the file
    assert mobilenet.info["tflite_ops"] == {"ADD": 10, "CONV_2D": 35, "DEPTHWISE_CONV_2D": 17, "FULLY_CONNECTED": 1,
                                           "MEAN": 1, "PAD": 4, "QUANTIZE": 2, "SOFTMAX": 1}
    refs = list(mobilenet.adapter.linears())
    assert len(refs) == 53 and sum(r.role == "conv3x3_dw" for r in refs) == 17
    assert mobilenet.adapter.first_last() == ("layers.conv01", "layers.fc68")
    assert mobilenet.info["input_quantization"] == {"scale": pytest.approx(1 / 127.5), "zero_point": 127}
    assert mobilenet.info["preprocess"] == {"resize": 256, "crop": 224, "interpolation": "bilinear"}
    assert mobilenet.module(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)  # logits, no softmax


def test_same_padding_is_tensorflows():
    assert same_pads(224, 3, 2) == (0, 1)  # the odd pixel goes after: torch's padding=1 would shift the grid
    assert same_pads(225, 3, 2) == (1, 1)
    assert same_pads(7, 3, 1) == (1, 1)
    assert same_pads(7, 1, 1) == (0, 0)
    assert same_pads(8, 5, 3) == (1, 2)  # out 3: (3 - 1) * 3 + 5 - 8 = 3


def test_first_conv_pads_bottom_right(mobilenet):
    """Conv1 (3x3, stride 2, SAME) on 224 pixels pads 0 before and 1 after, as TensorFlow does."""
    conv = mobilenet.module.layers["conv01"]
    seen = []
    handle = conv.register_forward_hook(lambda _m, _a, out: seen.append(out))
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        mobilenet.module(x)
    handle.remove()
    xn = (x - 127) / 127.5
    tf_same = torch.nn.functional.conv2d(torch.nn.functional.pad(xn, (0, 1, 0, 1)), conv.weight, conv.bias, 2)
    symmetric = torch.nn.functional.conv2d(xn, conv.weight, conv.bias, 2, padding=1)
    assert seen[0].shape == tf_same.shape == (1, 32, 112, 112)
    assert torch.allclose(seen[0], tf_same, atol=1e-5)
    assert not torch.allclose(seen[0], symmetric, atol=1e-2)


def test_preprocessing_resizes_shorter_side_and_centre_crops(tmp_path):
    w, h = 512, 256  # shorter side already 256: only the crop acts
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = (np.arange(w) % 256)[None, :]
    img[..., 1] = (np.arange(h) % 256)[:, None]
    Image.fromarray(img).save(tmp_path / "a.png")
    out = resize_center_crop(tmp_path / "a.png", 256, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.array_equal(out, img[16:240, 144:368])  # offsets (256-224)/2 and (512-224)/2
    Image.fromarray(np.full((300, 400, 3), 77, np.uint8)).save(tmp_path / "b.png")
    assert np.all(resize_center_crop(tmp_path / "b.png", 256, 224) == 77)


def test_imagefolder_and_ilsvrc_val_layouts(tmp_path):
    from scipy.io import savemat

    wnids = [f"n{10000000 + 7 * i:08d}" for i in range(1000)]
    tile = np.full((40, 50, 3), 9, np.uint8)
    for w in wnids:
        (tmp_path / "tree" / w).mkdir(parents=True)
    for w in (wnids[3], wnids[999]):
        Image.fromarray(tile).save(tmp_path / "tree" / w / "x.JPEG")
    task = ImageNetClassification(name="imagenet", layout="imagefolder", root=str(tmp_path / "tree"), labels=None)
    assert [(p.parent.name, c) for p, c in task.examples()] == [(wnids[3], 3), (wnids[999], 999)]
    # devkit: ILSVRC2012_IDs in their own (non-sorted) order; leaf synsets only; ground truth = ID per val image
    ids = list(range(1, 1001))
    order = wnids[::-1]  # ID 1 is the last wnid in sorted order
    synsets = np.array([(i, w, 0) for i, w in zip(ids, order)] + [(1001, "n99999999", 5)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    (tmp_path / "devkit" / "data").mkdir(parents=True)
    savemat(tmp_path / "devkit" / "data" / "meta.mat", {"synsets": synsets})
    (tmp_path / "devkit" / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n1000\n")
    task = ImageNetClassification(name="imagenet", layout="ilsvrc_val", root=str(tmp_path / "tree"),
                                  labels=str(tmp_path / "devkit"))
    assert [(p.name, c) for p, c in task.examples()] == [("ILSVRC2012_val_00000001.JPEG", 999),
                                                         ("ILSVRC2012_val_00000002.JPEG", 0)]


def test_missing_data_is_one_line(tmp_path):
    task = ImageNetClassification(name="imagenet", layout="imagefolder", root=str(tmp_path / "val"), labels=None)
    with pytest.raises(DataMissing, match="not found") as err:
        task.examples()
    assert "\n" not in str(err.value)
    with pytest.raises(DataMissing, match="has 0 ImageNet class folders"):
        ImageNetClassification(name="imagenet", layout="imagefolder", root=str(tmp_path), labels=None).examples()
    spec = models.ModelSpec(name="m", source="tflite", file="imagenet_classifier/nope.tflite")
    with pytest.raises(DataMissing, match="nope.tflite"):
        models.load(spec)


def test_sample_task_names_and_cost(mobilenet):
    task = ImageNetClassification(limit=10)
    task.check_applicable(mobilenet)
    metrics = {m.name: m for m in task.evaluate(mobilenet)}
    top1 = metrics["imagenet_sample500.top1.r256c224.first10"]
    assert len(top1.per_sample) == 10 and set(top1.per_sample) <= {0.0, 1.0}
    assert metrics["imagenet_sample500.top5.r256c224.first10"].value >= top1.value
    assert metrics["cost.macs.i224"].value == pytest.approx(300.8e6, rel=1e-3)  # MobileNetV2 1.0/224: 300 M
    assert task.workload(mobilenet).inputs.shape == (1, 3, 224, 224)


def test_vision_methods_apply_and_lm_methods_refuse(mobilenet):
    from bench.methods.gptq import GPTQ
    from bench.methods.rtn import RTN
    from bench.methods.static_ptq import StaticPTQ
    from bench.tasks.sr import SuperResolution

    StaticPTQ().check_applicable(mobilenet)
    RTN(bits=8, group_size=-1).check_applicable(mobilenet)
    with pytest.raises(NotApplicable, match="image_classifier model 'mobilenetv2_tflite'"):
        GPTQ().check_applicable(mobilenet)
    with pytest.raises(NotApplicable):
        SuperResolution().check_applicable(mobilenet)


def test_classifier_calibration_set_is_disjoint_from_the_sample():
    from bench import calib

    node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "calib" / "sr_hr_224.yaml"))
    node.pop("_target_")
    node["seed"] = 0
    cal = calib.load(calib.CalibSpec(**node), None, 4, 1)
    assert cal.windows.shape == (4, 3, 224, 224) and cal.windows.max() <= 255
    assert "imagenet" not in node["images"]


def test_rebuild_agrees_with_litert_on_the_file(mobilenet):
    images, labels = ImageNetClassification(limit=N_AGREE).views(mobilenet)
    with torch.no_grad():
        logits = torch.cat([mobilenet.module(torch.from_numpy(images[i:i + 25]).permute(0, 3, 1, 2).float())
                            for i in range(0, N_AGREE, 25)])
    scores = run_litert(data.local_file(_spec("mobilenetv2_tflite").file), images)
    torch_top1, lite_top1 = logits.argmax(1).numpy(), scores.argmax(1)
    assert np.mean(torch_top1 == lite_top1) >= 0.97
    assert np.mean(torch_top1 == labels) >= 0.85 and np.mean(lite_top1 == labels) >= 0.85  # the sample is easy
