"""Post-processing of every detector family: dense pre-NMS predictions -> detections (torchvision SSD's
rules).

The rules: per class, the scores above ``score_thresh``, that class's ``topk_candidates`` best, NMS at
``nms_thresh``, then the ``detections_per_img`` best of all classes.

- ``select_detections(boxes, scores, ...)``: one image in eager PyTorch (boxes ``A x 4``, class scores
  ``A x C``) -> ``{"boxes", "scores", "labels"}`` with labels = class index + 1: what eval mode returns.
- ``class_candidates(scores, topk)``: scores ``N x C x A`` with all but each class's ``topk`` best zeroed,
  as NMS sees them (the graph and its verification both use it).
- ``padded_detections(boxes, scores, ...)``: the same rules on a batch, traceable: NMS is emitted as one
  ONNX ``NonMaxSuppression`` (``BatchedClassNMS``); the result is padded to ``K`` per image.

Not here: the detectors (``ssd``, ``gfl``), the ONNX wrapper and its verification (``detforge.deploy``).
"""

from __future__ import annotations

import torch
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms


def select_detections(
    boxes, scores, *, score_thresh: float, nms_thresh: float, topk_candidates: int, detections_per_img: int
) -> dict:
    """Detections of one image from its boxes ``A x 4`` and class scores ``A x C`` (labels = class + 1)."""
    out_boxes, out_scores, out_labels = [], [], []
    for c in range(scores.shape[1]):
        score = scores[:, c]
        keep = torch.nonzero(score > score_thresh).squeeze(1)
        score = score[keep]
        score, order = score.topk(min(int(topk_candidates), score.numel()))
        out_boxes.append(boxes[keep[order]])
        out_scores.append(score)
        out_labels.append(torch.full_like(order, c + 1))
    all_boxes, all_scores, all_labels = torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels)
    keep = box_ops.batched_nms(all_boxes, all_scores, all_labels, nms_thresh)[:detections_per_img]
    return {"boxes": all_boxes[keep], "scores": all_scores[keep], "labels": all_labels[keep]}


def class_candidates(scores, topk: int):
    """``N x C x A`` scores with all but each class's ``topk`` best set to 0 (ties at the cut kept)."""
    kth = torch.topk(scores, min(int(topk), int(scores.shape[2])), dim=2).values[..., -1:]
    return torch.where(scores >= kth, scores, torch.zeros_like(scores))


class BatchedClassNMS(torch.autograd.Function):
    """Per-class NMS of a batch: ``boxes`` N x A x 4, ``scores`` N x C x A -> ``selected`` K x 3 (image,
    class, anchor); eager torchvision NMS, exported as ONNX ``NonMaxSuppression`` (same inputs)."""

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
        picked = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                score = scores[b, c]
                candidates = torch.nonzero(score > score_threshold).squeeze(1)
                keep = nms(boxes[b, candidates], score[candidates], iou_threshold)[:max_per_class]
                index = candidates[keep]
                image, klass = torch.full_like(index, b), torch.full_like(index, c)
                picked.append(torch.stack([image, klass, index], 1))
        if not picked:
            return torch.zeros((0, 3), dtype=torch.int64)
        return torch.cat(picked).to(torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
            g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
            center_point_box_i=0,
        )


def padded_detections(boxes, scores, *, nms_threshold: float, nms_topk: int, score_threshold: float):
    """The ``K = min(nms_topk, C x A)`` best detections per image of ``boxes`` N x A x 4 and ``scores``
    N x C x A (``class_candidates`` already applied): boxes ``N x K x 4``, scores ``N x K``, classes
    ``N x K`` (0-based, -1 padding, padded boxes and scores 0) and their number ``N``."""
    num_classes, num_anchors = int(scores.shape[1]), int(scores.shape[2])  # constants in a trace
    keep = min(int(nms_topk), num_classes * num_anchors)
    selected = BatchedClassNMS.apply(
        boxes, scores, int(nms_topk), float(nms_threshold), float(score_threshold)
    )
    flat_scores = scores.reshape(-1)
    flat_index = (selected[:, 0] * num_classes + selected[:, 1]) * num_anchors + selected[:, 2]
    picked = flat_scores.index_select(0, flat_index)
    dense = torch.full_like(flat_scores, -1.0).scatter(0, flat_index, picked)
    top_scores, top_index = torch.topk(dense.reshape(scores.shape[0], -1), keep, dim=1)
    valid = top_scores >= 0
    classes = torch.div(top_index, num_anchors, rounding_mode="floor")
    anchor = top_index - classes * num_anchors
    top_boxes = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(-1, -1, 4))
    return (
        top_boxes * valid.unsqueeze(-1).float(),
        torch.where(valid, top_scores, torch.zeros_like(top_scores)),
        torch.where(valid, classes, torch.full_like(classes, -1)),
        valid.sum(dim=1),
    )
