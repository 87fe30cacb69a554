"""`source: hf_image`: transformers image classifiers (AutoModelForImageClassification + AutoImageProcessor, no
torchvision) loaded from a local directory by the same code path as a hub id, evaluated by task=imagenet_sample500
on real sample images. A tiny random-init DeiT stands in for the hub weights (none offline); the checks are
that our Pillow view and in-model normalisation reproduce the processor's own pixel values and the transformers
model's own logits, for the three processor styles the shipped YAMLs use (ViT/DeiT square resize, ConvNeXt
crop_pct of microsoft/resnet-50, shortest edge + crop of google/mobilenet_v2), and the label mapping."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bench import models
from bench.errors import DataMissing, NotApplicable
from bench.models.hf_vision import imagenet_label_offset, processor_facts
from bench.tasks.imagenet import ImageNetClassification, resize_center_crop

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SAMPLE = ImageNetClassification(limit=4)


def _tiny_deit_dir(path: Path, num_labels: int = 1000) -> Path:
    from transformers import DeiTConfig, DeiTForImageClassification, DeiTImageProcessorPil

    torch.manual_seed(0)
    cfg = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                     patch_size=8, num_labels=num_labels)
    DeiTForImageClassification(cfg).save_pretrained(path)
    DeiTImageProcessorPil(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}, resample=3,
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    path = _tiny_deit_dir(tmp_path_factory.mktemp("deit"))
    return models.load(models.ModelSpec(name="tiny_deit", source="hf_image", name_or_path=str(path))), path


def test_shipped_yamls_name_the_hub_models():
    for name, hub in (("deit_tiny", "facebook/deit-tiny-patch16-224"), ("resnet50", "microsoft/resnet-50"),
                      ("mobilenetv2_hf", "google/mobilenet_v2_1.0_224")):
        node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))
        node.pop("_target_")
        spec = models.ModelSpec(**node)
        assert (spec.source, spec.name_or_path, spec.name) == ("hf_image", hub, name)


def test_local_directory_loads_as_an_image_classifier(deit):
    model, _ = deit
    assert model.kind == "image_classifier" and model.tokenizer is None
    assert model.info["preprocess"] == {"resize": 36, "crop": 32, "resize_mode": "square", "interpolation": "bicubic",
                                        "crop_offset": "floor"}
    assert model.info["normalize"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert (model.info["architecture"], model.info["classes"], model.info["vit_tokens"]) == ("deit", "imagenet1k", 18)
    roles = [r.role for r in model.adapter.linears()]
    assert roles[:7] == ["conv8x8", "q", "k", "v", "o", "up", "down"] and roles.count("q") == 2
    enc = model.adapter.vit_encoder()
    assert (enc.n_prefix, enc.n_patches, enc.dim, enc.heads, len(enc.layers)) == (2, 16, 32, 2, 2)


def test_imagenet_task_reproduces_the_processor_and_the_model(deit):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model, path = deit
    SAMPLE.check_applicable(model)
    rows = SAMPLE.examples()
    images, labels = SAMPLE.views(model)
    proc = AutoImageProcessor.from_pretrained(path)
    pils = [Image.open(p).convert("RGB") for p, _ in rows]
    raw = proc(pils, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
    assert np.array_equal(images.transpose(0, 3, 1, 2), raw)  # the processor's own resize and crop, pixel for pixel
    net = AutoModelForImageClassification.from_pretrained(path).eval()
    models.round_to_storage(net, torch.float16)  # the suite's base weights
    with torch.no_grad():
        ours = model.module(torch.from_numpy(images).permute(0, 3, 1, 2).float())
        theirs = net(**proc(pils, return_tensors="pt")).logits
    assert torch.allclose(ours, theirs, atol=1e-4)
    metrics = {m.name: m for m in SAMPLE.evaluate(model)}
    top1 = metrics["imagenet_sample500.top1.sq36c32_bicubic.first4"]
    assert top1.per_sample == [float(c == lab) for c, lab in zip(ours.argmax(1).tolist(), labels)]
    assert SAMPLE.workload(model).inputs.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("style", ["convnext_crop_pct", "mobilenet_v2_shortest_edge"])
def test_the_other_processor_styles_are_mirrored(style, tmp_path):
    from transformers import ConvNextImageProcessorPil, MobileNetV2ImageProcessorPil

    if style == "convnext_crop_pct":  # microsoft/resnet-50's preprocessor_config.json
        proc = ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875, resample=3)
        want = {"resize": 256, "crop": 224, "resize_mode": "shorter_side", "interpolation": "bicubic"}
    else:  # google/mobilenet_v2_1.0_224's
        proc = MobileNetV2ImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2)
        want = {"resize": 256, "crop": 224, "resize_mode": "shorter_side", "interpolation": "bilinear"}
    geometry, norm = processor_facts(proc)
    assert {k: geometry[k] for k in want} == want
    for (w, h) in ((301, 407), (500, 333)):  # odd size differences: floor offsets, as transformers
        img = np.random.default_rng(w).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "x.png")
        ours = resize_center_crop(tmp_path / "x.png", geometry["resize"], geometry["crop"],
                                  geometry["interpolation"], geometry["resize_mode"] == "square", True)
        raw = proc(Image.fromarray(img), do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
        assert np.array_equal(ours.transpose(2, 0, 1), raw)


def test_label_spaces(tmp_path):
    from transformers import PretrainedConfig

    background = PretrainedConfig(id2label={0: "background", **{i: f"c{i}" for i in range(1, 1001)}})
    assert imagenet_label_offset(PretrainedConfig(num_labels=1000)) == 0
    assert imagenet_label_offset(background) == 1
    assert imagenet_label_offset(PretrainedConfig(num_labels=10)) is None
    model = models.load(models.ModelSpec(name="ten", source="hf_image",
                                         name_or_path=str(_tiny_deit_dir(tmp_path / "ten", num_labels=10))))
    with pytest.raises(NotApplicable, match="needs an ImageNet-1k head; model 'ten' has 10 labels") as err:
        SAMPLE.check_applicable(model)
    assert "\n" not in str(err.value)


def test_missing_directory_is_one_line(tmp_path):
    with pytest.raises(DataMissing, match="does not exist"):
        models.load(models.ModelSpec(name="m", source="hf_image", name_or_path=str(tmp_path / "nope")))


def test_a_batchnorm_cnn_loads_with_its_statistics_rounded_like_its_weights(tmp_path):
    """The microsoft/resnet-50 path: a ResNet (BatchNorm buffers, a 0-dim batch counter) with a ConvNeXt-style
    processor; its statistics are stored at fp16 too, so they get the load-time rounding the weights get."""
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    net = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                    num_labels=1000))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    net.save_pretrained(tmp_path)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875, resample=3).save_pretrained(tmp_path)
    model = models.load(models.ModelSpec(name="tiny_resnet", source="hf_image", name_or_path=str(tmp_path)))
    assert model.info["preprocess"]["resize"] == 36 and model.info["preprocess"]["crop"] == 32
    assert model.adapter.vit_encoder() is None and model.info["architecture"] == "resnet"
    var = next(m.running_var for m in model.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(var, var.half().float())
    with torch.no_grad():
        assert model.module(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
