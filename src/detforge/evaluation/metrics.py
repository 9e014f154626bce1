"""Detection metrics in pure numpy: VOC matching, PR curves, VOC2007 11-point and all-point AP.

``DetectionAccumulator`` streams: ``update`` matches one image's detections to its ground truth at
once (PASCAL VOC rules, docs/DESIGN.md "Validation metric") and keeps only, per detection,
``(score, class, is_tp)`` plus per-class ground-truth counts and a confusion matrix, so memory
grows with the number of detections, never with images or boxes. ``merge`` adds another
accumulator (another process's shard); ``state_dict``/``from_state_dict`` give plain numpy/python
for ``torch.distributed.all_gather_object``. ``compute`` returns ``DetectionMetrics``.

``voc07_map`` is what SageMaker's built-in object detection reports as ``validation:mAP``:
VOC2007 11-point AP at IoU ``overlap_threshold`` averaged over the classes that have ground truth.

Rules, exactly:
- matching per image and class, detections in descending score (ties keep input order); each is
  compared with the same-class ground-truth box of highest IoU (first one on equal IoU); at
  IoU >= threshold it is a true positive if that box is not yet taken, else a false positive
  (no fall-back to the next box). IoU on continuous coordinates, no "+1".
- the PR curve has one point per distinct score (tied detections enter together), so the result
  does not depend on the order of images or on how they were split into shards.
- 11-point AP: mean over ``t in np.arange(0, 1.1, 0.1)`` of the highest precision at recall >= t
  (0 where none), with the devkit's float thresholds (0.30000000000000004 ...), as the VOC2007
  devkit and MXNet's ``VOC07MApMetric`` compute it.
- all-point AP: area under the precision envelope (VOC2010+).
- classes with detections but no ground truth are listed, never averaged; with no ground truth at
  all the mAPs are NaN.

Not here: COCO AP (``coco_metrics``), reading files or models (``evaluate``), plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from detforge import boxes as box_ops

STATE_VERSION = 1
VOC07_RECALL_THRESHOLDS = np.arange(0.0, 1.1, 0.1)  # the devkit's exact floats


@dataclass
class ClassStats:
    """Counts of one class at the score threshold; precision/recall/F1 are 0 when undefined."""

    tp: int
    fp: int
    fn: int
    n_gt: int
    precision: float
    recall: float
    f1: float


@dataclass
class PRCurve:
    """Precision and recall after each distinct score, in descending score."""

    scores: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


@dataclass
class DetectionMetrics:
    """Everything ``DetectionAccumulator.compute`` measures; ``to_dict`` is JSON-ready."""

    voc07_map: float
    all_point_map: float
    per_class_ap_voc07: dict[int, float]
    per_class_ap_all_point: dict[int, float]
    per_class: dict[int, ClassStats]
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    n_gt: int
    classes_without_gt_with_predictions: list[int]
    pr_curves: dict[int, PRCurve]
    confusion_matrix: np.ndarray  # (C+1, C+1): rows ground truth, columns predicted, last = background
    iou_threshold: float
    score_threshold: float
    num_images: int
    num_detections: int
    num_classes: int = field(default=0)

    def to_dict(self, *, class_names: list[str] | None = None, curves: bool = False) -> dict:
        """Plain JSON-ready values (NaN becomes None); ``curves`` adds the PR curves."""

        def name(c: int) -> str:
            return class_names[c] if class_names is not None and c < len(class_names) else str(c)

        out = {
            "validation:mAP": _num(self.voc07_map),
            "voc07_map": _num(self.voc07_map),
            "all_point_map": _num(self.all_point_map),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "n_gt": self.n_gt,
            "iou_threshold": self.iou_threshold,
            "score_threshold": self.score_threshold,
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "per_class": [
                {
                    "class_id": c,
                    "name": name(c),
                    "ap_voc07": _num(self.per_class_ap_voc07.get(c, float("nan"))),
                    "ap_all_point": _num(self.per_class_ap_all_point.get(c, float("nan"))),
                    **vars(stats),
                }
                for c, stats in sorted(self.per_class.items())
            ],
            "classes_without_gt_with_predictions": list(self.classes_without_gt_with_predictions),
            "confusion_matrix": {
                "labels": [name(c) for c in range(self.num_classes)] + ["background"],
                "rows": "ground truth",
                "columns": "predicted",
                "counts": self.confusion_matrix.tolist(),
            },
        }
        if curves:
            out["pr_curves"] = {
                name(c): {
                    "scores": curve.scores.tolist(),
                    "precision": curve.precision.tolist(),
                    "recall": curve.recall.tolist(),
                }
                for c, curve in sorted(self.pr_curves.items())
            }
        return out


def _num(value: float) -> float | None:
    return None if value != value else float(value)


def _as_ids(values, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(values).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(f"{name} must be whole class ids, got {array.tolist()}")
    array = array.astype(np.int64)
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise ValueError(f"{name} has class id {int(bad[0])}, outside 0..{num_classes - 1}")
    return array


def _finite_boxes(values, name: str) -> np.ndarray:
    array = box_ops.as_boxes(values)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return array


def match_image(
    *,
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    pred_classes: np.ndarray,
    iou_threshold: float,
    iou: np.ndarray | None = None,
    gt_difficult: np.ndarray | None = None,
    ignored: np.ndarray | None = None,
) -> np.ndarray:
    """VOC matching of one image: ``is_tp`` (bool) for each detection, in the input order.

    ``iou``: the ``(n_pred, n_gt)`` IoU matrix when the caller has it already. ``gt_difficult``: the
    VOC devkit's rule — a detection whose best same-class box is difficult (IoU >= threshold) is
    neither a hit nor a miss; its index is set in ``ignored`` (a bool array of n_pred) when given.
    """
    n_pred = len(pred_scores)
    is_tp = np.zeros(n_pred, dtype=bool)
    if n_pred == 0 or len(gt_boxes) == 0:
        return is_tp
    iou = box_ops.iou_xyxy(pred_boxes, gt_boxes) if iou is None else iou.copy()
    iou[pred_classes[:, None] != gt_classes[None, :]] = -1.0  # only same-class boxes compete
    best = np.argmax(iou, axis=1)
    best_iou = iou[np.arange(n_pred), best]
    # Without fall-back a detection's box is fixed in advance, so the greedy pass reduces to: a true
    # positive is the highest-scoring detection (first in stable order) among those reaching its box.
    order = np.argsort(-pred_scores, kind="stable")
    order = order[best_iou[order] >= iou_threshold]
    if gt_difficult is not None and np.any(gt_difficult):
        hard = np.asarray(gt_difficult, dtype=bool)[best[order]]
        if ignored is not None:
            ignored[order[hard]] = True
        order = order[~hard]
    _, first = np.unique(best[order], return_index=True)
    is_tp[order[first]] = True
    return is_tp


def confusion_image(
    *,
    gt_boxes: np.ndarray,
    gt_classes: np.ndarray,
    pred_boxes: np.ndarray,
    pred_classes: np.ndarray,
    pred_scores: np.ndarray,
    num_classes: int,
    iou_threshold: float,
    iou: np.ndarray | None = None,
) -> np.ndarray:
    """Confusion counts of one image for detections already above the score threshold.

    Detections in descending score each take the untaken ground-truth box with IoU >= threshold,
    preferring one of their own class, else the one of highest IoU; unmatched detections count
    as predicted-on-background, unmatched boxes as missed (predicted background).
    Rows are ground truth, columns predictions, index ``num_classes`` is background.
    """
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    taken = np.zeros(len(gt_boxes), dtype=bool)
    if not len(pred_boxes) or not len(gt_boxes):
        np.add.at(matrix, (num_classes, pred_classes), 1)
        np.add.at(matrix, (gt_classes, num_classes), 1)
        return matrix
    if iou is None:
        iou = box_ops.iou_xyxy(pred_boxes, gt_boxes)
    # own class first (+2 lifts it above any IoU), then the highest IoU; -1 where IoU is too low
    preference = np.where(
        iou >= iou_threshold, iou + 2.0 * (pred_classes[:, None] == gt_classes[None, :]), -1.0
    )
    for i in np.argsort(-pred_scores, kind="stable"):
        row = np.where(taken, -1.0, preference[i])
        target = int(np.argmax(row))
        if row[target] >= 0:
            taken[target] = True
            matrix[gt_classes[target], pred_classes[i]] += 1
        else:
            matrix[num_classes, pred_classes[i]] += 1
    np.add.at(matrix, (gt_classes[~taken], num_classes), 1)
    return matrix


class DetectionAccumulator:
    """Streaming, mergeable VOC-style detection metrics over many images (see the module docstring).

    ``score_threshold`` is the one at which precision/recall/F1, the TP/FP/FN counts and the
    confusion matrix are reported; AP uses every detection.
    """

    def __init__(self, num_classes: int, *, iou_threshold: float = 0.5, score_threshold: float = 0.5):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.num_classes = int(num_classes)
        self.iou_threshold = float(iou_threshold)
        self.score_threshold = float(score_threshold)
        self.n_gt = np.zeros(self.num_classes, dtype=np.int64)
        self.confusion = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)
        self.num_images = 0
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._scores = np.zeros(0, dtype=np.float64)
        self._classes = np.zeros(0, dtype=np.int32)
        self._tp = np.zeros(0, dtype=bool)

    def update(
        self, *, gt_boxes, gt_classes, pred_boxes, pred_scores, pred_classes, image_id=None, gt_difficult=None
    ) -> None:
        """Add one image: ``(N, 4)`` xyxy pixel boxes, 0-based class ids, detection scores.

        ``image_id`` only names the image in error messages. ``gt_difficult`` (N bools, VOC ``difficult``
        or COCO ``iscrowd``): such boxes are not counted, and detections on them are neither hits nor
        misses (the VOC devkit's rule).
        """
        where = f" (image {image_id})" if image_id is not None else ""
        try:
            gt_b = _finite_boxes(gt_boxes, "gt_boxes")
            gt_c = _as_ids(gt_classes, "gt_classes", self.num_classes)
            pr_b = _finite_boxes(pred_boxes, "pred_boxes")
            pr_c = _as_ids(pred_classes, "pred_classes", self.num_classes)
            pr_s = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
            if len(gt_b) != len(gt_c):
                raise ValueError(f"{len(gt_b)} gt_boxes but {len(gt_c)} gt_classes")
            if not len(pr_b) == len(pr_c) == len(pr_s):
                raise ValueError(f"{len(pr_b)} pred_boxes, {len(pr_s)} pred_scores, {len(pr_c)} pred_classes")
            if np.isnan(pr_s).any():
                raise ValueError("pred_scores contains NaN")
        except ValueError as exc:
            raise ValueError(f"{exc}{where}") from None
        iou = box_ops.iou_xyxy(pr_b, gt_b) if len(pr_b) and len(gt_b) else None
        hard = (
            np.zeros(len(gt_c), dtype=bool)
            if gt_difficult is None
            else np.asarray(gt_difficult, dtype=bool).reshape(-1)
        )
        if len(hard) != len(gt_c):
            raise ValueError(f"{len(gt_c)} gt boxes but {len(hard)} gt_difficult flags{where}")
        ignored = np.zeros(len(pr_s), dtype=bool)
        is_tp = match_image(
            gt_boxes=gt_b,
            gt_classes=gt_c,
            pred_boxes=pr_b,
            pred_scores=pr_s,
            pred_classes=pr_c,
            iou_threshold=self.iou_threshold,
            iou=iou,
            gt_difficult=hard,
            ignored=ignored,
        )
        if ignored.any():
            pr_b, pr_s, pr_c, is_tp = pr_b[~ignored], pr_s[~ignored], pr_c[~ignored], is_tp[~ignored]
            iou = None if iou is None else iou[~ignored]
        if hard.any():  # the confusion matrix counts only boxes that count
            gt_b, gt_c = gt_b[~hard], gt_c[~hard]
            iou = None if iou is None else iou[:, ~hard]
        self.n_gt += np.bincount(gt_c, minlength=self.num_classes)
        keep = pr_s >= self.score_threshold
        self.confusion += confusion_image(
            gt_boxes=gt_b,
            gt_classes=gt_c,
            pred_boxes=pr_b[keep],
            pred_classes=pr_c[keep],
            pred_scores=pr_s[keep],
            num_classes=self.num_classes,
            iou_threshold=self.iou_threshold,
            iou=None if iou is None else iou[keep],
        )
        self.num_images += 1
        if len(pr_s):
            self._chunks.append((pr_s, pr_c.astype(np.int32), is_tp))

    def _flush(self) -> None:
        if self._chunks:
            scores, classes, tps = zip(*self._chunks, strict=True)
            self._scores = np.concatenate([self._scores, *scores])
            self._classes = np.concatenate([self._classes, *classes])
            self._tp = np.concatenate([self._tp, *tps])
            self._chunks = []

    def merge(self, other: DetectionAccumulator) -> DetectionAccumulator:
        """Add another accumulator's images to this one (in place); returns self."""
        if (other.num_classes, other.iou_threshold, other.score_threshold) != (
            self.num_classes,
            self.iou_threshold,
            self.score_threshold,
        ):
            raise ValueError(
                "cannot merge accumulators with different num_classes or thresholds: "
                f"{(self.num_classes, self.iou_threshold, self.score_threshold)} vs "
                f"{(other.num_classes, other.iou_threshold, other.score_threshold)}"
            )
        other._flush()
        self._chunks.append((other._scores, other._classes, other._tp))
        self.n_gt += other.n_gt
        self.confusion += other.confusion
        self.num_images += other.num_images
        return self

    def state_dict(self) -> dict:
        """Plain numpy/python state (picklable, e.g. for ``all_gather_object``)."""
        self._flush()
        return {
            "version": STATE_VERSION,
            "num_classes": self.num_classes,
            "iou_threshold": self.iou_threshold,
            "score_threshold": self.score_threshold,
            "num_images": self.num_images,
            "n_gt": self.n_gt.copy(),
            "confusion": self.confusion.copy(),
            "scores": self._scores.copy(),
            "classes": self._classes.copy(),
            "tp": self._tp.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> DetectionAccumulator:
        """An accumulator from ``state_dict()`` output."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown accumulator state version {state.get('version')!r}")
        acc = cls(
            state["num_classes"],
            iou_threshold=state["iou_threshold"],
            score_threshold=state["score_threshold"],
        )
        acc.num_images = int(state["num_images"])
        acc.n_gt = np.asarray(state["n_gt"], dtype=np.int64).copy()
        acc.confusion = np.asarray(state["confusion"], dtype=np.int64).copy()
        acc._scores = np.asarray(state["scores"], dtype=np.float64).copy()
        acc._classes = np.asarray(state["classes"], dtype=np.int32).copy()
        acc._tp = np.asarray(state["tp"], dtype=bool).copy()
        return acc

    def compute(self) -> DetectionMetrics:
        """All metrics over the images seen so far."""
        self._flush()
        ap07: dict[int, float] = {}
        ap_all: dict[int, float] = {}
        per_class: dict[int, ClassStats] = {}
        curves: dict[int, PRCurve] = {}
        without_gt: list[int] = []
        above = self._scores >= self.score_threshold
        for c in range(self.num_classes):
            mine = self._classes == c
            n_gt = int(self.n_gt[c])
            tp = int(np.count_nonzero(self._tp & mine & above))
            fp = int(np.count_nonzero(~self._tp & mine & above))
            per_class[c] = _class_stats(tp, fp, n_gt)
            if n_gt == 0:
                if mine.any():
                    without_gt.append(c)
                continue
            curve = pr_curve(self._scores[mine], self._tp[mine], n_gt=n_gt)
            curves[c] = curve
            ap07[c] = voc07_ap(curve.recall, curve.precision)
            ap_all[c] = all_point_ap(curve.recall, curve.precision)
        total = _class_stats(
            sum(s.tp for s in per_class.values()), sum(s.fp for s in per_class.values()), int(self.n_gt.sum())
        )
        return DetectionMetrics(
            voc07_map=float(np.mean(list(ap07.values()))) if ap07 else float("nan"),
            all_point_map=float(np.mean(list(ap_all.values()))) if ap_all else float("nan"),
            per_class_ap_voc07=ap07,
            per_class_ap_all_point=ap_all,
            per_class=per_class,
            precision=total.precision,
            recall=total.recall,
            f1=total.f1,
            tp=total.tp,
            fp=total.fp,
            fn=total.fn,
            n_gt=total.n_gt,
            classes_without_gt_with_predictions=without_gt,
            pr_curves=curves,
            confusion_matrix=self.confusion.copy(),
            iou_threshold=self.iou_threshold,
            score_threshold=self.score_threshold,
            num_images=self.num_images,
            num_detections=int(len(self._scores)),
            num_classes=self.num_classes,
        )


def _class_stats(tp: int, fp: int, n_gt: int) -> ClassStats:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / n_gt if n_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ClassStats(tp=tp, fp=fp, fn=n_gt - tp, n_gt=n_gt, precision=precision, recall=recall, f1=f1)


def pr_curve(scores: np.ndarray, is_tp: np.ndarray, *, n_gt: int) -> PRCurve:
    """Precision/recall after each distinct score (descending) from matched detections of one class."""
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    tp = np.cumsum(is_tp[order])
    fp = np.cumsum(~is_tp[order])
    last_of_tie = np.append(s[1:] != s[:-1], True) if len(s) else np.zeros(0, dtype=bool)
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    return PRCurve(
        scores=s[last_of_tie],
        precision=tp / np.maximum(tp + fp, 1),
        recall=tp / n_gt if n_gt else np.zeros(len(tp)),
    )


def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point interpolated AP, exactly as the devkit computes it."""
    total = 0.0
    for t in VOC07_RECALL_THRESHOLDS:
        reached = recall >= t
        total += float(np.max(precision[reached])) if reached.any() else 0.0
    return total / 11.0


def all_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (VOC2010+ "all-point" AP)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
