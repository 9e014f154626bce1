"""Models: every architecture trains and predicts at a tiny size; anchors; pretrained backbones from the
torch hub cache; run models saved and loaded without pickle."""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")

from detforge import models  # noqa: E402
from detforge.errors import ConfigError, ModelError  # noqa: E402
from detforge.models.contract import InputSpec  # noqa: E402
from detforge.models.postprocess import select_detections  # noqa: E402
from detforge.training import checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _targets():
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)},
    ]


LOSSES = {
    "ssd": ["bbox_regression", "classification"],
    "gfl": ["distribution_focal", "giou", "quality_focal"],
}


@pytest.mark.parametrize(("detector", "base_network"), models.MODEL_TABLE)
def test_train_and_eval_forward_at_64px(detector, base_network):
    torch.manual_seed(0)
    model = models.build_model(
        base_network, detector=detector, num_classes=2, image_size=64, nms_topk=50, score_threshold=0.0
    )
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 80)]
    model.train()
    losses = model(images, _targets())
    assert sorted(losses) == LOSSES[detector]
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for output, (height, width) in zip(outputs, [(64, 64), (48, 80)], strict=True):
        assert output["boxes"].shape[1] == 4 and len(output["boxes"]) <= 50
        assert set(output["labels"].tolist()) <= {1, 2}  # model label = class id + 1
        assert float(output["boxes"][:, 2].max()) <= width and float(output["boxes"][:, 3].max()) <= height
    assert (model.nms_thresh, model.topk_candidates, model.detections_per_img) == (0.45, 50, 50)


@pytest.mark.parametrize(("detector", "base_network"), models.MODEL_TABLE)
def test_every_model_has_the_detector_contract(detector, base_network):
    """``input_spec`` as data; ``dense_predictions``: every anchor's box (input pixels) and class scores;
    eval mode is ``models.postprocess`` on exactly those (what the ONNX graph is built from)."""
    torch.manual_seed(0)
    model = models.build_model(
        base_network, detector=detector, num_classes=3, image_size=64, nms_topk=20, score_threshold=0.0
    ).eval()
    for module in model.modules():  # LeCun-normal convolutions, head biases 0: distinct scores, no NMS ties
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.weight[0].numel()))
    for module in model.head.modules():
        if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    spec = model.input_spec
    assert isinstance(spec, InputSpec) and spec.size == 64 and len(spec.mean) == len(spec.std) == 3
    images = torch.rand(2, 3, 64, 64)
    x = (images - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        boxes, scores = model.dense_predictions(x)
        outputs = model(list(images))
    anchors = boxes.shape[1]
    assert tuple(boxes.shape) == (2, anchors, 4) and tuple(scores.shape) == (2, anchors, 3)
    assert anchors >= 84
    assert float(boxes.min()) >= 0.0 and float(boxes.max()) <= 64.0
    assert 0.0 <= float(scores.min()) and float(scores.max()) <= 1.0
    for i, output in enumerate(outputs):
        expected = select_detections(
            boxes[i], scores[i], score_thresh=0.0, nms_thresh=0.45, topk_candidates=20, detections_per_img=20
        )
        assert 0 < len(output["labels"]) <= 20 and torch.equal(output["labels"], expected["labels"])
        torch.testing.assert_close(output["scores"], expected["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(output["boxes"], expected["boxes"], rtol=0, atol=1e-4)
    if detector == "ssd":  # the boxes are torchvision's own anchors through its own box coder
        from torchvision.ops import boxes as box_ops

        with torch.no_grad():
            image_list, _ = model.transform(list(images))
            features = list(model.backbone(image_list.tensors).values())
            head = model.head(features)
            for i, own in enumerate(model.anchor_generator(image_list, features)):
                decoded = model.box_coder.decode_single(head["bbox_regression"][i], own)
                torch.testing.assert_close(
                    boxes[i], box_ops.clip_boxes_to_image(decoded, (64, 64)), rtol=0, atol=1e-4
                )


def test_vgg_anchors_follow_ssd300_and_ssd512():
    assert models._vgg_map_sizes(300) == [38, 19, 10, 5, 3, 1]
    assert models._vgg_map_sizes(512) == [64, 32, 16, 8, 6, 4, 1]
    assert models._vgg_map_sizes(64) == [8, 4, 2, 1]
    model = models.build_model("vgg-16", num_classes=3, image_size=300)
    per_location = model.anchor_generator.num_anchors_per_location()
    assert per_location == [4, 6, 6, 6, 4, 4]
    assert sum(n * s * s for n, s in zip(per_location, [38, 19, 10, 5, 3, 1], strict=True)) == 8732
    assert model.transform.fixed_size == (300, 300)


def test_resnet50_has_gluoncv_maps_at_512():
    model = models.build_model("resnet-50", num_classes=4, image_size=512)
    assert len(model.backbone.extra) == 4
    assert model.anchor_generator.num_anchors_per_location() == [4, 6, 6, 6, 4, 4]
    assert model.anchor_generator.scales[:2] == [0.1, 0.2]


def test_bad_model_arguments():
    with pytest.raises(ConfigError) as info:
        models.build_model("resnet-101", num_classes=2, image_size=64)
    assert info.value.field == "base_network"
    with pytest.raises(ConfigError) as info:
        models.build_model("mobilenet-v3", num_classes=2, image_size=16)
    assert info.value.field == "image_shape"
    with pytest.raises(ConfigError) as info:
        models.build_model("mobilenet-v3", detector="yolo", num_classes=2, image_size=64)
    assert info.value.field == "detector"
    with pytest.raises(
        ConfigError,
        match="detector=gfl has no vgg-16 backbone; choose one of shufflenet-v2, mobilenet-v3, resnet-50",
    ) as info:
        models.build_model("vgg-16", detector="gfl", num_classes=2, image_size=64)
    assert info.value.field == "base_network"


def test_pretrained_backbone_comes_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "mobilenet_v3_large-8738ca79.pth"
    assert models.backbone_weights_file("mobilenet-v3") == str(expected)
    with pytest.raises(ModelError) as info:
        models.build_model("mobilenet-v3", num_classes=2, image_size=64, pretrained_backbone=True)
    text = str(info.value)
    assert str(expected) in text and "use_pretrained_model=0" in text and "--weights" in text
    import torchvision

    torch.manual_seed(1)
    imagenet = torchvision.models.mobilenet_v3_large(reduced_tail=False).state_dict()
    expected.parent.mkdir(parents=True)
    torch.save(imagenet, expected)
    model = models.build_model("mobilenet-v3", num_classes=2, image_size=64, pretrained_backbone=True)
    first_conv = model.backbone.features[0][0][0].weight
    assert torch.equal(first_conv, imagenet["features.0.0.weight"])


def test_save_and_load_a_run_model(tmp_path):
    torch.manual_seed(2)
    model = models.build_model("mobilenet-v3", num_classes=2, image_size=64, nms_threshold=0.5, nms_topk=20)
    info = checkpoint.RunInfo(
        base_network="mobilenet-v3",
        image_shape=64,
        num_classes=2,
        classes=["red", "blue"],
        thresholds={"nms_threshold": 0.5, "nms_topk": 20, "score_threshold": 0.01},
    )
    path = checkpoint.save_model(tmp_path, model, info)
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.safetensors"]
    loaded, read = checkpoint.load_run_model(tmp_path)
    assert read.classes == ["red", "blue"] and read.image_shape == 64 and read.base_network == "mobilenet-v3"
    assert (loaded.nms_thresh, loaded.detections_per_img) == (0.5, 20) and not loaded.training
    model.eval()
    image = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        assert torch.equal(model(image)[0]["scores"], loaded(image)[0]["scores"])
    same, _ = checkpoint.load_run_model(path)  # the .safetensors file itself
    assert torch.equal(
        same.state_dict()["head.regression_head.module_list.0.1.weight"],
        model.state_dict()["head.regression_head.module_list.0.1.weight"],
    )
    (tmp_path / "model.json").write_text(
        (tmp_path / "model.json").read_text().replace('"num_classes": 2', '"num_classes": 5')
    )
    with pytest.raises(ModelError, match="weights do not fit a mobilenet-v3 model at 64 px with 5 classes"):
        checkpoint.load_run_model(tmp_path)
    with pytest.raises(ModelError, match="model.json is missing"):
        checkpoint.load_run_model(tmp_path / "nothing")


def test_resume_state_round_trip_without_pickle(tmp_path):
    state = {
        "epoch": 3,
        "weights": {"w": torch.arange(4.0)},
        "history": ['{"epoch": 1}'],
        "best": {"map": None},
    }
    checkpoint.save_state(tmp_path, state)
    loaded = checkpoint.load_state(tmp_path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["weights"]["w"], torch.arange(4.0))
    assert loaded["history"] == ['{"epoch": 1}'] and loaded["best"] == {"map": None}
    with pytest.raises(ModelError, match="nothing to resume"):
        checkpoint.load_state(tmp_path / "other")
