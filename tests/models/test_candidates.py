"""``nms_candidates``: how many candidates per class go into NMS, apart from the ``nms_topk`` detections kept.

Crowded scenes (Pear640: up to 46 pears a crop, each with several high-scoring points) need more candidates
than detections: with one pool of 100 for both, NMS saw the near copies of the first objects only.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from detforge import models
from detforge.errors import ConfigError
from detforge.models.postprocess import class_candidates, padded_detections, select_detections
from detforge.training import checkpoint
from detforge.training.hyperparams import parse_hyperparameters

torch.set_num_threads(1)


def crowd(objects: int = 60, copies: int = 4):
    """``objects`` boxes in a row, each predicted ``copies`` times (near copies, IoU > 0.9), object ``i``'s
    copies scoring just below object ``i - 1``'s: boxes ``A x 4`` and one class's scores ``A x 1``."""
    boxes, scores = [], []
    for i in range(objects):
        for k in range(copies):
            boxes.append([20.0 * i + 0.1 * k, 0.0, 20.0 * i + 10 + 0.1 * k, 10.0])
            scores.append(0.99 - 0.01 * i - 0.001 * k)
    return torch.tensor(boxes), torch.tensor(scores)[:, None]


@pytest.mark.parametrize(("candidates", "found"), [(100, 25), (239, 60), (1000, 60)])
def test_a_crowd_needs_more_candidates_than_detections(candidates, found):
    boxes, scores = crowd()
    out = select_detections(
        boxes, scores, score_thresh=0.01, nms_thresh=0.6, topk_candidates=candidates, detections_per_img=100
    )
    assert len(out["boxes"]) == found  # 100 candidates = 4 copies of the first 25 objects
    assert torch.equal(out["boxes"][:, 0], 20.0 * torch.arange(found))  # each object once, its best copy
    # the exported graph's functions give the same
    dense = class_candidates(scores.T[None], candidates)
    _, kept_scores, classes, count = padded_detections(
        boxes[None], dense, nms_threshold=0.6, nms_topk=100, score_threshold=0.01
    )
    assert int(count[0]) == found and torch.allclose(kept_scores[0, :found], out["scores"])


def test_models_take_it_and_zero_means_nms_topk():
    model = models.build_model(
        "shufflenet-v2", detector="gfl", num_classes=1, image_size=64, nms_topk=100, nms_candidates=1000
    )
    assert (model.topk_candidates, model.detections_per_img) == (1000, 100)
    models.set_postprocess(model, nms_threshold=0.5, nms_topk=30, score_threshold=0.01)
    assert (model.topk_candidates, model.detections_per_img) == (30, 30)  # SageMaker's one knob for both
    ssd = models.build_model("mobilenet-v3", num_classes=2, image_size=64, nms_topk=50, nms_candidates=400)
    assert (ssd.topk_candidates, ssd.detections_per_img) == (400, 50)


def test_the_hyperparameter():
    hp = parse_hyperparameters({"num_classes": "1", "nms_candidates": "1000"})
    assert hp.nms_candidates == 1000 and parse_hyperparameters({"num_classes": "1"}).nms_candidates == 0
    with pytest.raises(ConfigError, match="field 'nms_candidates': must be >= 0"):
        parse_hyperparameters({"num_classes": "1", "nms_candidates": "-1"})


def test_export_puts_the_candidates_into_the_graph_and_model_json(tmp_path):
    from detforge.deploy.export import export_run
    from detforge.runtime import Predictor

    torch.manual_seed(0)
    model = models.build_model("shufflenet-v2", detector="gfl", num_classes=2, image_size=64)
    for module in model.modules():  # LeCun-normal convolutions: distinct scores spread around the middle
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.weight[0].numel()))
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    run = tmp_path / "run"
    info = checkpoint.RunInfo(
        detector="gfl",
        base_network="shufflenet-v2",
        image_shape=64,
        num_classes=2,
        classes=["a", "b"],
        thresholds={"nms_threshold": 0.45, "nms_topk": 40, "nms_candidates": 84, "score_threshold": 0.01},
    )
    checkpoint.save_model(run, model, info)
    images = []
    for seed in (0, 1):
        path = tmp_path / f"noise{seed}.png"
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    result = export_run(str(run), str(tmp_path / "deploy"), verify_images=images)
    assert result.verify.ok  # ONNX Runtime's NMS agrees with PyTorch's on the same 84 candidates a class
    saved = json.loads((tmp_path / "deploy" / "model.json").read_text())
    assert (saved["nms_topk"], saved["nms_candidates"]) == (40, 84)
    # the graph keeps what the PyTorch model with the same pool keeps
    loaded, _ = checkpoint.load_run_model(run)
    models.set_postprocess(loaded, nms_threshold=0.45, nms_topk=40, nms_candidates=84, score_threshold=0.01)
    pixels = np.asarray(Image.open(images[0]).convert("RGB"))
    with torch.inference_mode():
        expected = loaded([torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)])[0]
    got = Predictor(tmp_path / "deploy").predict([pixels], threshold=0.01)[0]
    assert len(got) == len(expected["scores"]) > 0
