"""Dynamic label assignment for the anchor-free detector: the task-aligned assigner of TOOD (Feng et al.,
2021, "TOOD: Task-aligned One-stage Object Detection"), with YOLOX's centre region as extra candidates.

``task_aligned_assign(scores, boxes, points, strides, gt_boxes, gt_labels)`` works on one image:

1. Candidates of a ground-truth box are the points inside it, plus the points within ``radius x stride``
   of its centre (so a box smaller than the finest stride still gets candidates).
2. Their alignment metric is ``t = s ** alpha * u ** beta``: ``s`` the predicted score of the box's class,
   ``u`` the IoU of the predicted box with it (both detached: assignment follows the predictions).
3. Each box takes its ``topk`` candidates by ``t`` (ties broken by the lower point index); a point taken
   by several boxes goes to the one its prediction overlaps most (the lower box index on a tie).
4. The soft target of a positive point is ``t / max(t of the box's positives) * max(IoU of them)``
   (the normalisation of TOOD), the quality the classifier learns to predict (GFL's quality focal loss).

Returns ``(assigned, target_scores)``: ``assigned`` the 0-based ground-truth index per point (-1 for
background), ``target_scores`` the soft target per point (0 for background).

Not here: the losses (``gfl``), box math on numpy (``detforge.boxes``).
"""

from __future__ import annotations

ALPHA = 1.0
BETA = 6.0
TOPK = 13
CENTER_RADIUS = 2.5


def box_iou(a, b):
    """IoU matrix of ``a`` (G x 4) and ``b`` (A x 4), xyxy boxes -> G x A (0 where a box is empty)."""
    import torch

    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def candidate_mask(points, strides, gt_boxes, *, radius: float = CENTER_RADIUS):
    """G x A booleans: point inside the box, or within ``radius x stride`` (per axis) of its centre."""
    x, y = points[None, :, 0], points[None, :, 1]
    inside = (
        (x > gt_boxes[:, None, 0])
        & (x < gt_boxes[:, None, 2])
        & (y > gt_boxes[:, None, 1])
        & (y < gt_boxes[:, None, 3])
    )
    cx = (gt_boxes[:, None, 0] + gt_boxes[:, None, 2]) / 2
    cy = (gt_boxes[:, None, 1] + gt_boxes[:, None, 3]) / 2
    reach = radius * strides[None, :]
    near = ((x - cx).abs() < reach) & ((y - cy).abs() < reach)
    return inside | near


def task_aligned_assign(
    scores,
    boxes,
    points,
    strides,
    gt_boxes,
    gt_labels,
    *,
    topk: int = TOPK,
    alpha: float = ALPHA,
    beta: float = BETA,
    radius: float = CENTER_RADIUS,
):
    """Assign the ``A`` points of one image to its ``G`` boxes (see the module docstring).

    ``scores`` A x C (probabilities), ``boxes`` A x 4 predicted xyxy, ``points`` A x 2 centres,
    ``strides`` A, ``gt_boxes`` G x 4 xyxy, ``gt_labels`` G (0-based classes).
    """
    import torch

    num_points = points.shape[0]
    assigned = torch.full((num_points,), -1, dtype=torch.long, device=points.device)
    target_scores = torch.zeros(num_points, dtype=scores.dtype, device=points.device)
    if gt_boxes.shape[0] == 0 or num_points == 0:
        return assigned, target_scores
    ious = box_iou(gt_boxes, boxes)  # G x A
    class_scores = scores[:, gt_labels].T  # G x A
    metric = class_scores.clamp(min=0).pow(alpha) * ious.pow(beta)
    candidates = candidate_mask(points, strides, gt_boxes, radius=radius)
    # rank candidates by metric; stable sort keeps the lower point index first on ties
    ranked = torch.where(candidates, metric, torch.full_like(metric, -1.0))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices[:, : min(topk, num_points)]
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, order, True)
    chosen &= candidates
    # a point chosen by several boxes goes to the box its prediction overlaps most
    taken = chosen.sum(dim=0)
    if bool((taken > 1).any()):
        best = torch.where(chosen, ious, torch.full_like(ious, -1.0)).argmax(dim=0)
        clash = taken > 1
        only_best = torch.zeros_like(chosen)
        only_best[best, torch.arange(num_points, device=points.device)] = True
        chosen = torch.where(clash[None, :], only_best & chosen, chosen)
    positive = chosen.any(dim=0)
    owner = chosen.float().argmax(dim=0)
    assigned = torch.where(positive, owner, assigned)
    aligned = metric * chosen
    max_metric = aligned.max(dim=1, keepdim=True).values
    max_iou = (ious * chosen).max(dim=1, keepdim=True).values
    normalized = aligned / max_metric.clamp(min=1e-9) * max_iou  # G x A
    target_scores = torch.where(positive, normalized.gather(0, owner[None, :])[0], target_scores)
    return assigned, target_scores.detach()
