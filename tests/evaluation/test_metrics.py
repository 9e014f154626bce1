"""VOC matching and AP on hand-computed cases, streaming merge, state round trips, bad input."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from detforge.evaluation.metrics import DetectionAccumulator, all_point_ap, voc07_ap

BOX = [0, 0, 10, 10]
BOX2 = [20, 20, 30, 30]
FAR = [50, 50, 60, 60]


def add(acc, gt, preds):
    """gt: [(box, cls)], preds: [(box, score, cls)]."""
    acc.update(
        gt_boxes=[g[0] for g in gt],
        gt_classes=[g[1] for g in gt],
        pred_boxes=[p[0] for p in preds],
        pred_scores=[p[1] for p in preds],
        pred_classes=[p[2] for p in preds],
    )


def case_a(acc, cls=0):
    """Four GT boxes over five images; ties, a duplicate, a miss, an FP-only image, an empty image.

    Image 1: GT g1=BOX, g2=BOX2; d(.9) on g1 -> TP, d(.8) on g1 again -> duplicate -> FP,
             d(.6) on g2 -> TP.
    Image 2: GT g3=BOX; d(.6) on g3 -> TP, d(.6) far away -> FP (a three-way tie at .6).
    Image 3: GT g4=BOX, nothing predicted (a miss).
    Image 4: no GT, d(.95) -> FP.   Image 5: nothing at all.
    """
    add(acc, [(BOX, cls), (BOX2, cls)], [(BOX, 0.9, cls), (BOX, 0.8, cls), (BOX2, 0.6, cls)])
    add(acc, [(BOX, cls)], [(BOX, 0.6, cls), (FAR, 0.6, cls)])
    add(acc, [(BOX, cls)], [])
    add(acc, [], [([0, 0, 5, 5], 0.95, cls)])
    add(acc, [], [])


def test_hand_computed_ties_duplicates_misses_and_fp_only_images():
    acc = DetectionAccumulator(1)
    case_a(acc)
    m = acc.compute()
    # Descending score, cumulative (tp, fp); the tie at .6 (TP, TP, FP) enters as one step:
    #   .95 (0,1) P=0   R=0 ;  .9 (1,1) P=1/2 R=1/4 ;  .8 (1,2) P=1/3 R=1/4 ;  .6 (3,3) P=1/2 R=3/4
    curve = m.pr_curves[0]
    np.testing.assert_allclose(curve.scores, [0.95, 0.9, 0.8, 0.6])
    np.testing.assert_allclose(curve.precision, [0, 1 / 2, 1 / 3, 1 / 2])
    np.testing.assert_allclose(curve.recall, [0, 1 / 4, 1 / 4, 3 / 4])
    # 11-point: t = 0 .. 0.7 (8 thresholds) reach recall 3/4 where max precision is 1/2; t >= .8: 0.
    assert m.per_class_ap_voc07[0] == pytest.approx(8 * 0.5 / 11, abs=1e-15)
    # all-point: envelope is 1/2 up to recall 3/4, then 0: area = 3/4 * 1/2.
    # (Had the tie been ordered TP, TP, FP, a point P=3/5 R=3/4 would give 0.45: a tie enters as one
    # step, so the result does not depend on the order of images.)
    assert m.per_class_ap_all_point[0] == pytest.approx(0.375, abs=1e-15)
    assert m.voc07_map == pytest.approx(4 / 11, abs=1e-15)
    assert m.all_point_map == pytest.approx(0.375, abs=1e-15)
    assert (m.num_images, m.num_detections, m.n_gt) == (5, 6, 4)
    # at score >= 0.5 every detection counts: 3 TP, 3 FP, 1 missed
    s = m.per_class[0]
    assert (s.tp, s.fp, s.fn, s.n_gt) == (3, 3, 1, 4)
    assert s.precision == 0.5 and s.recall == 0.75 and s.f1 == pytest.approx(0.6)


def test_score_threshold_counts():
    acc = DetectionAccumulator(1, score_threshold=0.7)
    case_a(acc)
    m = acc.compute()
    # kept: .95 FP, .9 TP, .8 FP
    assert (m.tp, m.fp, m.fn) == (1, 2, 3)
    assert m.precision == pytest.approx(1 / 3) and m.recall == pytest.approx(1 / 4)
    assert m.f1 == pytest.approx(2 / 7)
    assert m.per_class_ap_voc07[0] == pytest.approx(4 / 11)  # AP uses every detection


def test_no_fallback_to_the_next_box():
    # g_a=[0,0,10,10], g_b=[5,0,15,10]. d2=[2,0,12,10] has IoU 80/120=.667 with g_a (taken by d1) and
    # 70/130=.538 with g_b: VOC takes the best box only, so d2 is a false positive (COCO would match g_b).
    acc = DetectionAccumulator(1)
    add(acc, [([0, 0, 10, 10], 0), ([5, 0, 15, 10], 0)], [([0, 0, 10, 10], 0.9, 0), ([2, 0, 12, 10], 0.8, 0)])
    m = acc.compute()
    np.testing.assert_allclose(m.pr_curves[0].precision, [1, 0.5])
    np.testing.assert_allclose(m.pr_curves[0].recall, [0.5, 0.5])
    # 11-point: t = 0, .1, .2, .3, .4, .5 reach recall 1/2 with precision 1 -> 6/11; all-point 1/2
    assert m.voc07_map == pytest.approx(6 / 11, abs=1e-15)
    assert m.all_point_map == pytest.approx(0.5, abs=1e-15)


def test_iou_exactly_at_threshold_matches():
    # [0,0,10,10] vs [0,0,10,20]: IoU = 100/200 = 0.5 exactly -> a match at IoU >= 0.5
    acc = DetectionAccumulator(1)
    add(acc, [([0, 0, 10, 20], 0)], [([0, 0, 10, 10], 0.5, 0)])
    assert acc.compute().voc07_map == 1.0
    strict = DetectionAccumulator(1, iou_threshold=0.51)
    add(strict, [([0, 0, 10, 20], 0)], [([0, 0, 10, 10], 0.5, 0)])
    assert strict.compute().voc07_map == 0.0


def test_voc07_uses_the_devkit_float_thresholds():
    # 10 GT boxes, 3 found with precision 1: recall 3/10 = 0.29999999999999999 is below the devkit's
    # np.arange threshold 0.30000000000000004, so only t = 0, .1, .2 count: 3/11 (not 4/11).
    acc = DetectionAccumulator(1)
    gts = [([10 * i, 0, 10 * i + 10, 10], 0) for i in range(10)]
    add(acc, gts, [(gts[i][0], 0.9 - i / 10, 0) for i in range(3)])
    m = acc.compute()
    assert m.voc07_map == pytest.approx(3 / 11, abs=1e-15)
    assert m.all_point_map == pytest.approx(0.3, abs=1e-15)


def test_classes_without_gt_are_reported_not_averaged():
    acc = DetectionAccumulator(4)
    case_a(acc, cls=0)
    add(acc, [(BOX, 1)], [])  # class 1: GT, never predicted -> AP 0
    add(acc, [], [(BOX, 0.7, 2)])  # class 2: predictions only; class 3: nothing at all
    m = acc.compute()
    assert m.per_class_ap_voc07 == {0: pytest.approx(4 / 11), 1: 0.0}
    assert m.per_class_ap_all_point == {0: pytest.approx(0.375), 1: 0.0}
    assert m.voc07_map == pytest.approx(2 / 11)
    assert m.all_point_map == pytest.approx(0.1875)
    assert m.classes_without_gt_with_predictions == [2]
    d = m.to_dict(class_names=["a", "b", "c", "d"])
    assert d["per_class"][2]["name"] == "c" and d["per_class"][2]["ap_voc07"] is None
    assert d["validation:mAP"] == pytest.approx(2 / 11)


def test_no_ground_truth_at_all_gives_nan_map():
    acc = DetectionAccumulator(2)
    add(acc, [], [])
    add(acc, [], [(BOX, 0.9, 1)])
    m = acc.compute()
    assert math.isnan(m.voc07_map) and math.isnan(m.all_point_map)
    assert m.to_dict()["voc07_map"] is None
    assert m.classes_without_gt_with_predictions == [1]
    assert (m.tp, m.fp, m.fn, m.precision, m.recall, m.f1) == (0, 1, 0, 0.0, 0.0, 0.0)


def test_confusion_matrix_includes_background():
    acc = DetectionAccumulator(2, score_threshold=0.5)
    # class-0 box predicted as class 1, class-1 box found, a class-0 detection on nothing,
    # a detection below the score threshold (ignored), and a missed class-0 box in another image
    add(acc, [(BOX, 0), (BOX2, 1)], [(BOX, 0.9, 1), (BOX2, 0.8, 1), (FAR, 0.7, 0), (FAR, 0.2, 1)])
    add(acc, [(BOX, 0)], [])
    cm = acc.compute().confusion_matrix
    # rows: GT 0, GT 1, background; columns: predicted 0, 1, background
    np.testing.assert_array_equal(cm, [[0, 1, 1], [0, 1, 0], [1, 0, 0]])


def test_confusion_prefers_own_class_box():
    acc = DetectionAccumulator(2)
    # the class-1 detection overlaps the class-0 box more, but a class-1 box also passes the threshold
    add(acc, [([0, 0, 10, 10], 0), ([1, 0, 11, 10], 1)], [([0, 0, 10, 10], 0.9, 1)])
    np.testing.assert_array_equal(acc.compute().confusion_matrix, [[0, 0, 1], [0, 1, 0], [0, 0, 0]])


def random_images(seed: int, n: int, num_classes: int = 3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (k, 2))
        gt = np.hstack([xy, xy + rng.uniform(5, 20, (k, 2))])
        gc = rng.integers(0, num_classes, k)
        pb = np.vstack([gt + rng.normal(0, 2, gt.shape), rng.uniform(0, 50, (2, 4)) + [0, 0, 50, 50]])
        pc = np.concatenate([gc, rng.integers(0, num_classes, 2)])
        ps = np.round(rng.uniform(0, 1, len(pb)), 1)  # coarse scores: many ties across images
        out.append(dict(gt_boxes=gt, gt_classes=gc, pred_boxes=pb, pred_scores=ps, pred_classes=pc))
    return out


def test_merge_of_three_shards_equals_one_accumulation():
    images = random_images(0, 60)
    whole = DetectionAccumulator(3)
    for img in images:
        whole.update(**img)
    shards = [DetectionAccumulator(3) for _ in range(3)]
    for i, img in enumerate(images):
        shards[i % 3].update(**img)  # interleaved, as a DistributedSampler deals them
    # through the wire format, as all_gather_object would carry them
    states = [pickle.loads(pickle.dumps(s.state_dict())) for s in shards]
    merged = DetectionAccumulator.from_state_dict(states[2])
    merged.merge(DetectionAccumulator.from_state_dict(states[0])).merge(
        DetectionAccumulator.from_state_dict(states[1])
    )
    expected = whole.compute().to_dict(curves=True)
    assert merged.compute().to_dict(curves=True) == expected
    assert expected["num_images"] == 60 and expected["n_gt"] > 50
    assert 0 < expected["voc07_map"] < 1


def test_compute_can_be_called_while_streaming():
    images = random_images(1, 20)
    acc, ref = DetectionAccumulator(3), DetectionAccumulator(3)
    for img in images[:10]:
        acc.update(**img)
    acc.compute()
    for img in images[10:]:
        acc.update(**img)
    for img in images:
        ref.update(**img)
    assert acc.compute().to_dict(curves=True) == ref.compute().to_dict(curves=True)


def test_ap_functions_on_empty_curves():
    assert voc07_ap(np.zeros(0), np.zeros(0)) == 0.0
    assert all_point_ap(np.zeros(0), np.zeros(0)) == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pred_scores": [float("nan")]}, "pred_scores contains NaN (image img7)"),
        ({"pred_classes": [3]}, "pred_classes has class id 3, outside 0..2 (image img7)"),
        ({"gt_classes": [-1]}, "gt_classes has class id -1, outside 0..2"),
        ({"pred_classes": [0.5]}, "pred_classes must be whole class ids"),
        ({"pred_boxes": [[0, 0, float("nan"), 1]]}, "pred_boxes contains NaN or infinite coordinates"),
        ({"pred_boxes": [[0, 0, 1]]}, "boxes must have shape (N, 4)"),
        ({"pred_scores": [0.5, 0.4]}, "1 pred_boxes, 2 pred_scores, 1 pred_classes"),
    ],
)
def test_bad_input(change, message):
    acc = DetectionAccumulator(3)
    args = (
        dict(
            gt_boxes=[BOX],
            gt_classes=[0],
            pred_boxes=[BOX],
            pred_scores=[0.5],
            pred_classes=[0],
            image_id="img7",
        )
        | change
    )
    with pytest.raises(ValueError) as info:
        acc.update(**args)
    assert message in str(info.value)
    assert acc.num_images == 0


def test_merge_refuses_different_settings():
    with pytest.raises(ValueError, match="different num_classes or thresholds"):
        DetectionAccumulator(2).merge(DetectionAccumulator(2, iou_threshold=0.75))
    with pytest.raises(ValueError, match="num_classes must be at least 1"):
        DetectionAccumulator(0)


def test_difficult_boxes_are_neither_hit_nor_miss_as_in_the_voc_devkit():
    """GT: box A, difficult box B. Detections: FP 0.95, on B 0.9, on A 0.8.

    Devkit: the detection on B is ignored and B is not counted -> FP, TP: 11-point AP 0.5 (precision
    1/2 at recall 1). Without the flag B counts: FP, TP, TP -> precision 2/3 at every recall: AP 2/3.
    """
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    pred = np.array([[50, 50, 60, 60], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=float)
    fields = dict(
        gt_boxes=gt, gt_classes=[0, 0], pred_boxes=pred, pred_scores=[0.95, 0.9, 0.8], pred_classes=[0, 0, 0]
    )
    flagged = DetectionAccumulator(1)
    flagged.update(**fields, gt_difficult=[False, True])
    plain = DetectionAccumulator(1)
    plain.update(**fields)
    assert flagged.n_gt.tolist() == [1] and plain.n_gt.tolist() == [2]
    assert flagged.compute().voc07_map == pytest.approx(0.5)
    assert plain.compute().voc07_map == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 gt boxes but 1 gt_difficult"):
        flagged.update(**fields, gt_difficult=[True])
