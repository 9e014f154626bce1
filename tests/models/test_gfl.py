"""The anchor-free detector: the task-aligned assigner on hand-built cases, the GFL losses' exact values,
a tiny overfit, multi-scale batches and the eval-mode output."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from detforge import models  # noqa: E402
from detforge.models import assign, gfl  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _row_points():
    points = torch.tensor([[4.0, 4.0], [12.0, 4.0], [20.0, 4.0], [28.0, 4.0], [100.0, 100.0]])
    return points, torch.full((5,), 8.0)


def test_assigner_takes_the_topk_aligned_candidates_with_normalised_targets():
    points, strides = _row_points()
    gt = torch.tensor([[0.0, 0.0, 24.0, 8.0]])
    scores = torch.tensor([[0.2], [0.8], [0.5], [0.9], [0.95]])
    pred = gt.repeat(5, 1)
    pred[3] = torch.tensor([0.0, 0.0, 12.0, 8.0])  # IoU 0.5: metric 0.9 * 0.5 ** 6
    assigned, target = assign.task_aligned_assign(
        scores, pred, points, strides, gt, torch.tensor([0]), topk=2
    )
    # point 4 scores highest but is no candidate (outside the box, 96 px from its centre)
    assert assigned.tolist() == [-1, 0, 0, -1, -1]
    assert torch.allclose(target, torch.tensor([0.0, 1.0, 0.625, 0.0, 0.0]))
    assigned, target = assign.task_aligned_assign(
        scores, pred, points, strides, gt, torch.tensor([0]), topk=13
    )
    assert assigned.tolist() == [0, 0, 0, 0, -1]
    assert torch.allclose(target, torch.tensor([0.25, 1.0, 0.625, 0.9 * 0.5**6 / 0.8, 0.0]))


def test_a_point_two_boxes_want_goes_to_the_one_it_overlaps_most():
    points, strides = torch.tensor([[12.0, 8.0], [100.0, 100.0]]), torch.tensor([8.0, 8.0])
    gt = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0]])
    pred = torch.tensor([[8.0, 0.0, 24.0, 16.0], [90.0, 90.0, 110.0, 110.0]])  # IoU 1/3 with box 0, 1 with 1
    scores = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assigned, target = assign.task_aligned_assign(
        scores, pred, points, strides, gt, torch.tensor([0, 1]), topk=1
    )
    assert assigned.tolist() == [1, -1] and target.tolist() == [1.0, 0.0]


def test_no_boxes_means_all_background_and_tiny_boxes_get_centre_candidates():
    points, strides = gfl.grid_points([(8, 8)], (8,))
    scores, pred = torch.full((64, 3), 0.1), torch.zeros(64, 4)
    assigned, target = assign.task_aligned_assign(
        scores, pred, points, strides, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    )
    assert assigned.tolist() == [-1] * 64 and float(target.sum()) == 0.0
    tiny = torch.tensor([[30.0, 30.0, 32.0, 32.0]])  # smaller than the stride: no point inside it
    mask = assign.candidate_mask(points, strides, tiny)
    assert int(mask.sum()) == 25  # centres 12..44 on both axes are within 2.5 x 8 px of (31, 31)
    assert int(assign.candidate_mask(points, strides, tiny, radius=0.0).sum()) == 0


def test_grid_points_are_cell_centres():
    points, strides = gfl.grid_points([(2, 2), (1, 1)], (8, 16))
    assert points.tolist() == [[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0], [8.0, 8.0]]
    assert strides.tolist() == [8.0, 8.0, 8.0, 8.0, 16.0]


def test_loss_functions_have_their_textbook_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    assert torch.allclose(gfl.giou_loss(a, b), torch.tensor([4 / 3, 0.0]))
    uniform = torch.zeros(1, 4, gfl.REG_MAX + 1)
    assert torch.allclose(
        gfl.distribution_focal_loss(uniform, torch.tensor([[0.0, 2.5, 3.0, 6.0]])),
        torch.tensor([math.log(gfl.REG_MAX + 1)]),
    )
    peaked = torch.full((1, 4, gfl.REG_MAX + 1), -1e4)
    peaked[0, :, 3] = 0.0
    assert float(gfl.distribution_focal_loss(peaked, torch.full((1, 4), 3.0))) == pytest.approx(0.0, abs=1e-6)
    assert float(gfl.quality_focal_loss(torch.zeros(2), torch.tensor([0.5, 1.0]))) == pytest.approx(
        0.25 * math.log(2)
    )


def _overfit_case():
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, 10:40, 8:30] = 1.0
    images[1, 1, 20:60, 30:60] = 0.8
    targets = [
        {"boxes": torch.tensor([[8.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([2])},
    ]
    return list(images), targets


def test_the_loss_falls_on_a_tiny_overfit_case():
    torch.manual_seed(0)
    model = models.build_model("mobilenet-v3", detector="gfl", num_classes=2, image_size=64).train()
    images, targets = _overfit_case()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(25):
        losses = model(images, targets)
        loss = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(float(loss.detach()))
    assert sum(totals[-3:]) / 3 < 0.3 * sum(totals[:3]) / 3


def test_train_batches_of_one_size_divisible_by_32_are_not_resized():
    model = models.build_model("mobilenet-v3", detector="gfl", num_classes=2, image_size=64).train()
    boxes = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    x, _, scaled = model._batch([torch.rand(3, 96, 128)] * 2, boxes)
    assert tuple(x.shape) == (2, 3, 96, 128) and scaled[0].tolist() == [[8.0, 8.0, 40.0, 40.0]]
    assert x.is_contiguous(memory_format=torch.channels_last)  # NHWC: oneDNN's faster CPU kernels
    x, _, scaled = model._batch([torch.rand(3, 96, 128), torch.rand(3, 64, 64)], boxes)
    assert tuple(x.shape) == (2, 3, 64, 64)
    assert torch.allclose(scaled[0], torch.tensor([[4.0, 16 / 3, 20.0, 80 / 3]]))
    model.eval()
    x, _, _ = model._batch([torch.rand(3, 96, 96)])
    assert tuple(x.shape) == (1, 3, 64, 64)


def test_eval_shrinks_a_photo_as_training_and_the_runtime_do():
    """A full-size photo handed to the model in eval mode is shrunk with antialiasing, like ``resize_rgb``
    (PIL) in training, ``evaluate`` and the runtime: stripes finer than the output grid average to grey
    instead of aliasing into a different picture."""
    import numpy as np

    from detforge.images import resize_rgb

    stripes = np.zeros((256, 320, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes; at 64 px each output pixel covers 5 of them
    stripes[::3] = 90
    model = models.build_model("shufflenet-v2", detector="gfl", num_classes=2, image_size=64).eval()
    x, _, _ = model._batch([torch.from_numpy(stripes).permute(2, 0, 1).float().div(255)])
    expected = torch.from_numpy(resize_rgb(stripes, 64).copy()).permute(2, 0, 1).float().div(255)[None]
    expected = (expected - model.mean) / model.std
    grey_level = 1.0 / 255 / float(model.std.min())
    assert float((x - expected).abs().max()) <= 1.5 * grey_level


def test_eval_boxes_map_back_to_each_image_and_follow_the_postprocess_settings():
    torch.manual_seed(3)
    model = models.build_model(
        "mobilenet-v3", detector="gfl", num_classes=3, image_size=64, nms_topk=7, score_threshold=0.0
    ).eval()
    with torch.no_grad():
        outputs = model([torch.rand(3, 128, 32), torch.rand(3, 64, 64)])
        boxes, scores = model.dense_predictions(torch.zeros(1, 3, 64, 64))
    assert tuple(boxes.shape) == (1, 84, 4) and tuple(scores.shape) == (1, 84, 3)  # 8x8 + 4x4 + 2x2 points
    assert float(boxes.min()) >= 0.0 and float(boxes.max()) <= 64.0
    first = outputs[0]
    assert 0 < len(first["boxes"]) <= 7 and set(first["labels"].tolist()) <= {1, 2, 3}
    assert float(first["boxes"][:, [0, 2]].max()) <= 32.0 and float(first["boxes"][:, [1, 3]].max()) <= 128.0
    assert first["scores"].tolist() == sorted(first["scores"].tolist(), reverse=True)
