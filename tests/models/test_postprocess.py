"""Post-processing shared by eval mode and the ONNX graph: torchvision SSD's rules on a hand-built case, the
top-k candidate cut, and the traceable padded batch giving the same detections as the eager one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from detforge.models.postprocess import class_candidates, padded_detections, select_detections  # noqa: E402

# anchors 0 and 1 overlap (IoU 0.81), 3 is anchor 0's box again, 2 is apart
BOXES = torch.tensor(
    [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]]
)
SCORES = torch.tensor([[0.9, 0.1], [0.8, 0.0], [0.3, 0.7], [0.005, 0.6]])  # A x C


def select(**settings):
    found = select_detections(
        BOXES,
        SCORES,
        **{
            "score_thresh": 0.01,
            "nms_thresh": 0.5,
            "topk_candidates": 3,
            "detections_per_img": 10,
            **settings,
        },
    )
    return found["scores"].tolist(), found["labels"].tolist(), found["boxes"].tolist()


def test_select_detections_follows_torchvision_ssds_rules():
    scores, labels, boxes = select()
    # class 0: anchor 1 is suppressed by anchor 0, anchor 3 is under score_thresh; class 1: anchor 0 by 3
    assert scores == pytest.approx([0.9, 0.7, 0.6, 0.3]) and labels == [1, 2, 2, 1]
    assert boxes == [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [20, 20, 30, 30]]
    assert select(detections_per_img=2)[1] == [1, 2]
    scores, labels, _ = select(topk_candidates=1)  # each class's best candidate only
    assert scores == pytest.approx([0.9, 0.7]) and labels == [1, 2]
    scores, labels, _ = select(score_thresh=0.65)
    assert scores == pytest.approx([0.9, 0.7]) and labels == [1, 2]
    empty = select_detections(
        BOXES, torch.zeros(4, 2), score_thresh=0.01, nms_thresh=0.5, topk_candidates=3, detections_per_img=10
    )
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


def test_class_candidates_zero_all_but_each_class_best_k():
    scores = SCORES.T[None]  # N x C x A
    kept = class_candidates(scores, 2)
    assert torch.equal(kept[0], torch.tensor([[0.9, 0.8, 0.0, 0.0], [0.0, 0.0, 0.7, 0.6]]))
    assert torch.equal(class_candidates(scores, 10), scores)


def test_padded_detections_are_the_eager_ones_padded():
    scores = class_candidates(SCORES.T[None], 3)
    boxes, top_scores, classes, counts = padded_detections(
        BOXES[None], scores, nms_threshold=0.5, nms_topk=3, score_threshold=0.01
    )
    assert counts.tolist() == [3] and classes.tolist() == [[0, 1, 1]]  # K = nms_topk = 3
    assert top_scores[0].tolist() == pytest.approx([0.9, 0.7, 0.6])
    everything = class_candidates(SCORES.T[None], 10)
    boxes, top_scores, classes, counts = padded_detections(
        BOXES[None], everything, nms_threshold=0.5, nms_topk=10, score_threshold=0.01
    )
    assert boxes.shape == (1, 8, 4) and counts.tolist() == [4]  # K = classes x anchors = 8
    assert classes.tolist() == [[0, 1, 1, 0, -1, -1, -1, -1]]
    assert top_scores[0, 4:].tolist() == [0.0] * 4 and boxes[0, 4:].abs().sum() == 0


@pytest.mark.parametrize("topk", [1, 5, 40])
def test_padded_and_eager_agree_on_random_batches(topk):
    generator = torch.Generator().manual_seed(topk)
    corners = torch.rand(2, 30, 2, generator=generator) * 50
    boxes = torch.cat([corners, corners + 5 + torch.rand(2, 30, 2, generator=generator) * 20], dim=-1)
    scores = torch.rand(2, 30, 3, generator=generator)  # N x A x C, distinct
    padded = padded_detections(
        boxes,
        class_candidates(scores.transpose(1, 2), topk),
        nms_threshold=0.45,
        nms_topk=topk,
        score_threshold=0.2,
    )
    for i in range(2):
        eager = select_detections(
            boxes[i],
            scores[i],
            score_thresh=0.2,
            nms_thresh=0.45,
            topk_candidates=topk,
            detections_per_img=topk,
        )
        n = int(padded[3][i])
        assert n == len(eager["scores"]) > 0
        assert torch.equal(padded[1][i, :n], eager["scores"])
        assert torch.equal(padded[0][i, :n], eager["boxes"])
        assert torch.equal(padded[2][i, :n], eager["labels"] - 1)
