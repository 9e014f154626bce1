"""COCO metrics through pycocotools, and the cross-check of our all-point AP@0.5 against it."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from detforge.data.groundtruth import make_record
from detforge.evaluation.coco_metrics import CocoAccumulator, coco_metrics, run_cocoeval
from detforge.evaluation.metrics import DetectionAccumulator, all_point_ap, pr_curve

NUM_CLASSES = 3


def jittered_images(seed: int = 5, n: int = 500):
    """A fixed random set: GT boxes in distinct cells of a 4x4 grid of 100 px, jittered detections.

    GT boxes never overlap, so no detection can reach IoU >= 0.5 with two of them; that is the one
    place where VOC matching (best box or nothing) and COCO's (best *untaken* box) could differ.
    Scores are continuous (no ties), at most 100 detections an image (COCO's maxDets).
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        k = int(rng.integers(0, 7))
        cells = rng.choice(16, size=k, replace=False)
        origin = np.stack([cells % 4, cells // 4], axis=1) * 100.0
        size = rng.uniform(20, 90, (k, 2))
        top_left = origin + rng.uniform(0, 1, (k, 2)) * (100 - size)
        gt = np.hstack([top_left, top_left + size])
        gc = rng.integers(0, NUM_CLASSES, k)
        found = rng.uniform(size=k) < 0.85
        det = gt[found] + rng.normal(0, 1, (int(found.sum()), 4)) * np.tile(size[found], 2) * 0.12
        dc = gc[found].copy()
        swap = rng.uniform(size=len(dc)) < 0.1  # some found with the wrong class
        dc[swap] = (dc[swap] + 1) % NUM_CLASSES
        dup = rng.uniform(size=len(det)) < 0.15  # some duplicates
        det = np.vstack([det, det[dup] + rng.normal(0, 3, (int(dup.sum()), 4))])
        dc = np.concatenate([dc, dc[dup]])
        n_fp = int(rng.integers(0, 3))
        xy = rng.uniform(0, 350, (n_fp, 2))
        det = np.vstack([det, np.hstack([xy, xy + rng.uniform(10, 50, (n_fp, 2))])])
        dc = np.concatenate([dc, rng.integers(0, NUM_CLASSES, n_fp)])
        det = np.hstack([np.minimum(det[:, :2], det[:, 2:] - 1), np.maximum(det[:, 2:], det[:, :2] + 1)])
        # found boxes tend to score higher than duplicates and strays, as a trained model's would
        n_found = int(found.sum())
        scores = np.concatenate([rng.uniform(0.3, 1.0, n_found), rng.uniform(0, 0.8, len(det) - n_found)])
        images.append(dict(gt_boxes=gt, gt_classes=gc, pred_boxes=det, pred_scores=scores, pred_classes=dc))
    return images


def test_all_point_ap50_agrees_with_pycocotools():
    images = jittered_images()
    ours, coco = DetectionAccumulator(NUM_CLASSES, iou_threshold=0.5), CocoAccumulator(["a", "b", "c"])
    for img in images:
        ours.update(**img)
        coco.update(**img)
    m = ours.compute()
    assert m.n_gt > 1000 and 0.5 < m.all_point_map < 0.95
    evaluator = run_cocoeval(*coco.datasets())
    p = evaluator.params
    assert p.iouThrs[0] == 0.5 and p.maxDets[-1] == 100 and p.areaRng[0] == [0, 1e10]
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    for k, cat in enumerate(p.catIds):
        # pycocotools' own per-image matching at IoU 0.5 (index 0; a match at IoU >= t, no "+1",
        # area range "all", 100 detections), gathered per class as its accumulate() does, then
        # integrated as all-point AP instead of its 101-point sampling: equal to 1e-9.
        per_image = [evaluator.evalImgs[k * n_area * n_img + i] for i in range(n_img)]
        per_image = [e for e in per_image if e is not None]
        scores = np.concatenate([e["dtScores"] for e in per_image])
        matched = np.concatenate([e["dtMatches"][0] for e in per_image]) > 0
        assert not np.concatenate([e["dtIgnore"][0] for e in per_image]).any()
        n_gt = int(sum(np.count_nonzero(~np.asarray(e["gtIgnore"], dtype=bool)) for e in per_image))
        assert n_gt == ours.n_gt[cat]
        curve = pr_curve(scores, matched, n_gt=n_gt)
        assert m.per_class_ap_all_point[cat] == pytest.approx(
            all_point_ap(curve.recall, curve.precision), abs=1e-9
        )
        # pycocotools' own AP50 samples the same precision envelope at 101 recall points; for a
        # non-increasing envelope p, |mean of p(k/100), k=0..100 - area under p| <= 1/100.
        sampled = evaluator.eval["precision"][0, :, k, 0, -1]
        assert abs(float(sampled.mean()) - m.per_class_ap_all_point[cat]) <= 0.01
    stats = coco.compute()
    assert stats["AP50"] == pytest.approx(float(evaluator.eval["precision"][0, :, :, 0, -1].mean()))
    assert abs(stats["AP50"] - m.all_point_map) <= 0.01
    assert 0 < stats["AP"] < stats["AP50"]


def test_known_coco_values():
    acc = CocoAccumulator(["box"])
    # IoU of the detection with its box: 100*93 / (100*100) = 0.93 -> matched at .5 ... .9, not .95
    acc.update(
        gt_boxes=[[0, 0, 100, 100]],
        gt_classes=[0],
        pred_boxes=[[0, 0, 100, 93]],
        pred_scores=[0.9],
        pred_classes=[0],
    )
    acc.update(gt_boxes=[], gt_classes=[], pred_boxes=[], pred_scores=[], pred_classes=[])
    stats = acc.compute()
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == pytest.approx(1.0)
    assert stats["AP"] == pytest.approx(0.9)  # 9 of 10 IoU thresholds
    assert stats["AR100"] == pytest.approx(0.9)
    # area 10000 > 96^2: a "large" box; no small or medium ones
    assert stats["APl"] == pytest.approx(0.9) and stats["APs"] is None and stats["APm"] is None
    assert stats["per_class_AP"] == {0: pytest.approx(0.9)}


def test_coco_metrics_from_records_and_merge():
    cmap = {0: "blue box", 1: "yellow box"}
    records = [
        make_record(
            "s3://b/a.jpg",
            width=200,
            height=200,
            boxes_xyxy=[[10, 10, 60, 60]],
            class_ids=[0],
            class_map=cmap,
        ),
        make_record(
            "s3://b/b.jpg",
            width=200,
            height=200,
            boxes_xyxy=[[20, 20, 120, 120]],
            class_ids=[1],
            class_map=cmap,
        ),
    ]
    preds = {"a": ([[10, 10, 60, 60]], [0.8], [0]), "b": ([[20, 20, 120, 120]], [0.7], [0])}
    stats = coco_metrics(records, preds, ["blue box", "yellow box"])
    assert stats["per_class_AP"] == {0: pytest.approx(1.0), 1: pytest.approx(0.0)}
    assert stats["AP"] == pytest.approx(0.5)
    aligned = coco_metrics(records, [preds["a"], preds["b"]], ["blue box", "yellow box"])
    assert aligned == stats

    images = jittered_images(seed=9, n=30)
    whole, shards = CocoAccumulator("abc"), [CocoAccumulator("abc") for _ in range(3)]
    for i, img in enumerate(images):
        whole.update(**img)
        shards[i // 10].update(**img)
    merged = CocoAccumulator.from_state_dict(pickle.loads(pickle.dumps(shards[0].state_dict())))
    merged.merge(shards[1]).merge(shards[2])
    assert merged.compute() == whole.compute()


def test_coco_empty_and_bad_input():
    acc = CocoAccumulator(["x"])
    acc.update(gt_boxes=[], gt_classes=[], pred_boxes=[[0, 0, 1, 1]], pred_scores=[0.5], pred_classes=[0])
    assert acc.compute()["AP"] is None
    with pytest.raises(ValueError, match=r"pred_classes outside 0..0: \[1\] \(image q\)"):
        acc.update(
            gt_boxes=[],
            gt_classes=[],
            pred_boxes=[[0, 0, 1, 1]],
            pred_scores=[0.5],
            pred_classes=[1],
            image_id="q",
        )
    with pytest.raises(ValueError, match="NaN"):
        acc.update(
            gt_boxes=[],
            gt_classes=[],
            pred_boxes=[[0, 0, 1, 1]],
            pred_scores=[float("nan")],
            pred_classes=[0],
        )
    with pytest.raises(ValueError, match="class names differ"):
        acc.merge(CocoAccumulator(["y"]))
