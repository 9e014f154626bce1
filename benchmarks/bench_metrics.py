"""Detection metrics on 10,000 images x 10 boxes: detforge's streaming VOC accumulator vs pycocotools.

Same data, same run. pycocotools is timed from in-memory dataset dicts (no files): once as
used for COCO AP (10 IoU thresholds) and once restricted to IoU 0.5, the same matching work as
ours. torchmetrics is not installed here, so it is not timed.

    python benchmarks/bench_metrics.py [--images 10000] [--boxes 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from detforge.evaluation.coco_metrics import CocoAccumulator, run_cocoeval  # noqa: E402
from detforge.evaluation.metrics import DetectionAccumulator  # noqa: E402

NUM_CLASSES = 5


def make_images(n: int, boxes: int, seed: int = 0) -> list[dict]:
    """GT boxes in a 640x480 image, detections jittered from them plus a few strays, random scores."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        xy = rng.uniform(0, 560, (boxes, 2))
        gt = np.hstack([xy, xy + rng.uniform(10, 80, (boxes, 2))])
        gc = rng.integers(0, NUM_CLASSES, boxes)
        det = gt + rng.normal(0, 4, gt.shape)
        strays = rng.uniform(size=boxes) < 0.2
        det[strays] = np.hstack([xy[strays] + 40, xy[strays] + 90])
        dc = gc.copy()
        swap = rng.uniform(size=boxes) < 0.1
        dc[swap] = rng.integers(0, NUM_CLASSES, int(swap.sum()))
        images.append(
            dict(
                gt_boxes=gt,
                gt_classes=gc,
                pred_boxes=det,
                pred_scores=rng.uniform(0, 1, boxes),
                pred_classes=dc,
            )
        )
    return images


def time_ours(images: list[dict]) -> tuple[float, float, float, int]:
    start = time.perf_counter()
    acc = DetectionAccumulator(NUM_CLASSES, iou_threshold=0.5)
    for img in images:
        acc.update(**img)
    metrics = acc.compute()
    seconds = time.perf_counter() - start
    state = acc.state_dict()
    state_bytes = sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))
    return seconds, metrics.voc07_map, metrics.all_point_map, state_bytes


def time_pycocotools(images: list[dict], *, only_iou50: bool) -> tuple[float, float]:
    acc = CocoAccumulator([str(c) for c in range(NUM_CLASSES)])
    for img in images:
        acc.update(**img)
    gt, dt = acc.datasets()  # the dataset dicts are not timed: a user of pycocotools has them already
    start = time.perf_counter()
    if only_iou50:
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt, coco_dt = COCO(), COCO()
            coco_gt.dataset, coco_dt.dataset = gt, dt
            coco_gt.createIndex()
            coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluator.params.iouThrs = np.array([0.5])
            evaluator.params.areaRng, evaluator.params.areaRngLbl = [[0, 1e10]], ["all"]
            evaluator.evaluate()
            evaluator.accumulate()
        precision = evaluator.eval["precision"][0, :, :, 0, -1]
        ap50 = float(precision[precision > -1].mean())
    else:
        evaluator = run_cocoeval(gt, dt)
        ap50 = float(evaluator.stats[1])
    return time.perf_counter() - start, ap50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--boxes", type=int, default=10)
    args = parser.parse_args()
    images = make_images(args.images, args.boxes)
    ours, voc07, all_point, state_bytes = time_ours(images)
    coco50, ap50_only = time_pycocotools(images, only_iou50=True)
    coco_full, ap50_full = time_pycocotools(images, only_iou50=False)
    rows = [
        {
            "method": "detforge DetectionAccumulator (VOC07 + all-point AP@0.5, P/R/F1, confusion)",
            "seconds": round(ours, 3),
            "ratio_vs_detforge": 1.0,
            "AP50": round(all_point, 4),
            "note": f"VOC07 mAP {voc07:.4f}; accumulator state {state_bytes / 1e6:.2f} MB",
        },
        {
            "method": "pycocotools COCOeval, IoU 0.5 only, area 'all'",
            "seconds": round(coco50, 3),
            "ratio_vs_detforge": round(coco50 / ours, 2),
            "AP50": round(ap50_only, 4),
            "note": "101-point AP50",
        },
        {
            "method": "pycocotools COCOeval, standard (10 IoUs, 4 areas)",
            "seconds": round(coco_full, 3),
            "ratio_vs_detforge": round(coco_full / ours, 2),
            "AP50": round(ap50_full, 4),
            "note": "what coco_metrics runs for AP@[.5:.95]",
        },
    ]
    summary = (
        f"{args.images} images x {args.boxes} boxes: detforge {ours:.2f} s, pycocotools IoU 0.5 "
        f"{coco50:.2f} s ({coco50 / ours:.1f}x), pycocotools standard {coco_full:.2f} s "
        f"({coco_full / ours:.1f}x); all-point AP50 {all_point:.4f}, pycocotools 101-point "
        f"{ap50_full:.4f}"
    )
    write_result(
        "metrics",
        title="Detection metrics: 10,000 images x 10 boxes vs pycocotools",
        rows=rows,
        summary=summary,
        notes="Shared 2-core machine (about 8 engineers working): ratios matter, "
        "not the absolute seconds. torchmetrics is not installed, not timed.",
    )


if __name__ == "__main__":
    main()
