"""COCO box metrics (AP@[.5:.95], AP50, AP75, AP/AR by size, AR@1/10/100) through pycocotools.

Our records and detections are turned into COCO datasets in memory (no files): image ids are
1..N in the order seen, category ids are our 0-based class ids, boxes ``xyxy`` pixels become COCO
``xywh`` through ``detforge.boxes``, ``area`` is the box area (no segmentation), ``iscrowd`` 1 for
difficult/crowd ground truth (``gt_difficult``), else 0.
``CocoAccumulator`` has the same ``update``/``merge``/``state_dict``/``compute`` shape as
``metrics.DetectionAccumulator``; it keeps every box (validation sets are small).

Not here: VOC matching and ``validation:mAP`` (``metrics``), reading files (``evaluate``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from detforge import boxes as box_ops
from detforge.errors import require

STATE_VERSION = 2  # 2: ground truth carries difficult (iscrowd) flags
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class CocoAccumulator:
    """Collects ground truth and detections image by image; ``compute`` runs pycocotools' COCOeval."""

    def __init__(self, class_names: Sequence[str]):
        if not class_names:
            raise ValueError("class_names must name at least one class")
        self.class_names = [str(n) for n in class_names]
        self.num_images = 0
        self._gt: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._dt: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def update(
        self, *, gt_boxes, gt_classes, pred_boxes, pred_scores, pred_classes, image_id=None, gt_difficult=None
    ) -> None:
        """Add one image: ``(N, 4)`` xyxy pixel boxes, 0-based class ids, scores (``image_id`` unused).

        ``gt_difficult`` boxes go to pycocotools as ``iscrowd`` (neither a hit nor a miss).
        """
        n = len(self.class_names)
        gt_b, pr_b = box_ops.as_boxes(gt_boxes), box_ops.as_boxes(pred_boxes)
        gt_c = np.asarray(gt_classes, dtype=np.int64).reshape(-1)
        pr_c = np.asarray(pred_classes, dtype=np.int64).reshape(-1)
        pr_s = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
        where = f" (image {image_id})" if image_id is not None else ""
        if len(gt_b) != len(gt_c) or not len(pr_b) == len(pr_c) == len(pr_s):
            raise ValueError(f"boxes, classes and scores differ in length{where}")
        for ids, name in ((gt_c, "gt_classes"), (pr_c, "pred_classes")):
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise ValueError(f"{name} outside 0..{n - 1}: {ids.tolist()}{where}")
        if np.isnan(pr_s).any():
            raise ValueError(f"pred_scores contains NaN{where}")
        index = self.num_images
        self.num_images += 1
        hard = (
            np.zeros(len(gt_c), dtype=bool)
            if gt_difficult is None
            else np.asarray(gt_difficult, dtype=bool).reshape(-1)
        )
        if len(hard) != len(gt_c):
            raise ValueError(f"{len(gt_c)} gt boxes but {len(hard)} gt_difficult flags{where}")
        if len(gt_b):
            self._gt.append((index, gt_b, gt_c, hard))
        if len(pr_b):
            self._dt.append((index, pr_b, pr_s, pr_c))

    def merge(self, other: CocoAccumulator) -> CocoAccumulator:
        """Append another accumulator's images (renumbered after ours); returns self."""
        if other.class_names != self.class_names:
            raise ValueError(f"cannot merge: class names differ ({self.class_names} vs {other.class_names})")
        offset = self.num_images
        self._gt += [(i + offset, b, c, h) for i, b, c, h in other._gt]
        self._dt += [(i + offset, b, s, c) for i, b, s, c in other._dt]
        self.num_images += other.num_images
        return self

    def state_dict(self) -> dict:
        """Plain numpy/python state (picklable)."""
        return {
            "version": STATE_VERSION,
            "class_names": list(self.class_names),
            "num_images": self.num_images,
            "gt": list(self._gt),
            "dt": list(self._dt),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> CocoAccumulator:
        """An accumulator from ``state_dict()`` output."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown COCO accumulator state version {state.get('version')!r}")
        acc = cls(state["class_names"])
        acc.num_images = int(state["num_images"])
        acc._gt = [
            (int(i), np.asarray(b), np.asarray(c), np.asarray(h, dtype=bool)) for i, b, c, h in state["gt"]
        ]
        acc._dt = [(int(i), np.asarray(b), np.asarray(s), np.asarray(c)) for i, b, s, c in state["dt"]]
        return acc

    def datasets(self) -> tuple[dict, dict]:
        """The ground truth and the detections as COCO dataset dicts."""
        images = [{"id": i + 1} for i in range(self.num_images)]
        categories = [{"id": c, "name": name} for c, name in enumerate(self.class_names)]
        gt_anns, dt_anns = [], []
        for index, b, c, h in self._gt:
            xywh = box_ops.xyxy_to_coco_xywh(b).tolist()
            for box, cls, hard in zip(xywh, c.tolist(), h.tolist(), strict=True):
                gt_anns.append(
                    {
                        "id": len(gt_anns) + 1,
                        "image_id": index + 1,
                        "category_id": int(cls),
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": int(hard),
                    }
                )
        for index, b, s, c in self._dt:
            for box, score, cls in zip(
                box_ops.xyxy_to_coco_xywh(b).tolist(), s.tolist(), c.tolist(), strict=True
            ):
                dt_anns.append(
                    {
                        "id": len(dt_anns) + 1,
                        "image_id": index + 1,
                        "category_id": int(cls),
                        "bbox": box,
                        "area": box[2] * box[3],
                        "score": float(score),
                        "iscrowd": 0,
                    }
                )
        return (
            {"images": images, "annotations": gt_anns, "categories": categories},
            {"images": images, "annotations": dt_anns, "categories": categories},
        )

    def compute(self) -> dict:
        """COCO stats by name (None where COCO has nothing to average) and ``per_class_AP``."""
        empty = {name: None for name in STAT_NAMES} | {"per_class_AP": {}}
        if not self._gt:
            return empty
        evaluator = run_cocoeval(*self.datasets())
        stats = {
            name: (None if value < 0 else float(value))
            for name, value in zip(STAT_NAMES, evaluator.stats, strict=True)
        }
        # precision: [iou thresholds, recall thresholds, classes, area ranges, max dets]
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cat in enumerate(evaluator.params.catIds):
            values = precision[:, :, k]
            values = values[values > -1]
            per_class[int(cat)] = float(values.mean()) if values.size else None
        stats["per_class_AP"] = per_class
        return stats


def run_cocoeval(gt_dataset: dict, dt_dataset: dict):
    """pycocotools' COCOeval (bbox) run on two in-memory dataset dicts, silenced; returns the evaluator."""
    require("pycocotools", "training")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset, coco_dt.dataset = gt_dataset, dt_dataset
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_metrics(gts: Iterable, preds: Mapping | Iterable, class_names: Sequence[str]) -> dict:
    """COCO stats of ground-truth records against detections.

    ``gts``: ``groundtruth.Record``s (``boxes``, ``class_ids``, ``image_id``). ``preds``: either a
    mapping from ``image_id`` to ``(boxes_xyxy, scores, class_ids)`` (a missing image has no
    detections) or an iterable of such tuples in the order of ``gts``.
    """
    acc = CocoAccumulator(class_names)
    aligned = None if isinstance(preds, Mapping) else iter(preds)
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
    for record in gts:
        if aligned is None:
            boxes, scores, classes = preds.get(record.image_id, empty)
        else:
            boxes, scores, classes = next(aligned, empty)
        acc.update(
            gt_boxes=record.boxes,
            gt_classes=record.class_ids,
            pred_boxes=boxes,
            pred_scores=scores,
            pred_classes=classes,
            image_id=record.image_id,
        )
    return acc.compute()
