"""Box math: exact hand values and hypothesis properties of every conversion, flip and rotation."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from detforge import boxes as B

W, H = 640.0, 480.0


@st.composite
def box_arrays(draw, min_size: int = 0):
    """``(N, 4)`` float64 boxes inside a WxH image, N from ``min_size`` to 5 (0 gives a ``(0, 4)`` array)."""
    n = draw(st.integers(min_size, 5))
    rows = []
    for _ in range(n):
        x1 = draw(st.floats(0, W - 1, allow_nan=False))
        y1 = draw(st.floats(0, H - 1, allow_nan=False))
        x2 = draw(st.floats(x1 + 0.5, W, allow_nan=False))
        y2 = draw(st.floats(y1 + 0.5, H, allow_nan=False))
        rows.append([x1, y1, x2, y2])
    return np.asarray(rows, dtype=np.float64).reshape(n, 4)


def same(actual, expected, atol: float) -> None:
    """Equal shape (an empty input stays ``(0, 4)``), dtype and values."""
    assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype)
    np.testing.assert_allclose(actual, expected, atol=atol)


def test_hand_values():
    np.testing.assert_array_equal(B.ltwh_to_xyxy([[10, 20, 30, 40]]), [[10, 20, 40, 60]])
    np.testing.assert_array_equal(B.xyxy_to_ltwh([[10, 20, 40, 60]]), [[10, 20, 30, 40]])
    np.testing.assert_allclose(
        B.xyxy_to_xyxy_norm([[64, 48, 320, 240]], width=W, height=H), [[0.1, 0.1, 0.5, 0.5]]
    )
    np.testing.assert_allclose(
        B.xyxy_to_cxcywh_norm([[64, 48, 320, 240]], width=W, height=H), [[0.3, 0.3, 0.4, 0.4]]
    )
    np.testing.assert_array_equal(B.area_xyxy([[0, 0, 4, 5]]), [20])
    np.testing.assert_array_equal(B.clip_xyxy([[-5, -5, 700, 100]], width=W, height=H), [[0, 0, 640, 100]])
    np.testing.assert_allclose(B.iou_xyxy([[0, 0, 2, 2]], [[1, 1, 3, 3], [5, 5, 6, 6]]), [[1 / 7, 0]])
    np.testing.assert_array_equal(B.flip_x_xyxy([[10, 20, 40, 60]], width=100), [[60, 20, 90, 60]])
    np.testing.assert_array_equal(B.flip_y_xyxy([[10, 20, 40, 60]], height=100), [[10, 40, 40, 80]])
    np.testing.assert_array_equal(B.rotate_cw_xyxy([[10, 20, 40, 60]], height=100), [[40, 10, 80, 40]])
    np.testing.assert_array_equal(B.rotate_ccw_xyxy([[10, 20, 40, 60]], width=100), [[20, 60, 60, 90]])


@settings(max_examples=60, deadline=None)
@given(box_arrays())
@example(np.zeros((0, 4)))  # the strategy draws it too; this makes it certain
def test_round_trips(b):
    same(B.ltwh_to_xyxy(B.xyxy_to_ltwh(b)), b, atol=1e-9)
    same(B.coco_xywh_to_xyxy(B.xyxy_to_coco_xywh(b)), b, atol=1e-9)
    norm = B.xyxy_to_xyxy_norm(b, width=W, height=H)
    same(B.xyxy_norm_to_xyxy(norm, width=W, height=H), b, atol=1e-9)
    same(B.cxcywh_norm_to_xyxy(B.xyxy_to_cxcywh_norm(b, width=W, height=H), width=W, height=H), b, atol=1e-7)
    rounded = B.xyxy_to_ltwh_int(b)
    assert (rounded.shape, rounded.dtype) == (b.shape, np.int64)
    same(B.ltwh_to_xyxy(rounded), np.rint(b), atol=0)
    same(B.clip_xyxy(b, width=W, height=H), b, atol=0)  # drawn inside the image: clipping changes nothing
    for mask in (B.positive_size_xyxy(b), B.inside_image_xyxy(b, width=W, height=H)):
        assert (mask.shape, mask.dtype, mask.all()) == ((len(b),), np.bool_, True)
    assert B.area_xyxy(b).shape == (len(b),)


@settings(max_examples=60, deadline=None)
@given(box_arrays())
@example(np.zeros((0, 4)))  # the strategy draws it too; this makes it certain
def test_flips_and_rotations(b):
    same(B.flip_x_xyxy(B.flip_x_xyxy(b, width=W), width=W), b, atol=1e-9)
    same(B.flip_y_xyxy(B.flip_y_xyxy(b, height=H), height=H), b, atol=1e-9)
    # cw turns a WxH image into HxW
    same(B.rotate_ccw_xyxy(B.rotate_cw_xyxy(b, height=H), width=H), b, atol=1e-9)
    same(B.rotate_180_xyxy(B.rotate_180_xyxy(b, width=W, height=H), width=W, height=H), b, atol=1e-9)
    four = b
    for size in (H, W, H, W):
        four = B.rotate_cw_xyxy(four, height=size)
    same(four, b, atol=1e-9)
    np.testing.assert_allclose(B.area_xyxy(B.rotate_cw_xyxy(b, height=H)), B.area_xyxy(b), atol=1e-6)
    assert B.inside_image_xyxy(B.rotate_cw_xyxy(b, height=H), width=H, height=W, tolerance=1e-9).all()


@settings(max_examples=60, deadline=None)
@given(box_arrays(), box_arrays())
@example(np.zeros((0, 4)), np.zeros((0, 4)))
@example(np.zeros((0, 4)), np.array([[0.0, 0.0, 1.0, 1.0]]))
def test_iou_symmetric_and_bounded(a, b):
    ab, ba = B.iou_xyxy(a, b), B.iou_xyxy(b, a)
    assert ab.shape == (len(a), len(b))
    np.testing.assert_allclose(ab, ba.T)
    assert ((ab >= 0) & (ab <= 1 + 1e-12)).all()
    np.testing.assert_allclose(np.diag(B.iou_xyxy(a, a)), 1.0)


def test_empty_inputs_keep_shape_0_4():
    """``[]`` and ``(0, 4)`` arrays go through every function as ``(0, 4)`` (or ``(0,)`` masks/areas)."""
    for empty in ([], np.zeros((0, 4)), np.zeros((0, 4), dtype=np.float32)):
        for convert in (
            B.as_boxes,
            B.ltwh_to_xyxy,
            B.xyxy_to_ltwh,
            lambda e: B.clip_xyxy(e, width=W, height=H),
            lambda e: B.xyxy_to_cxcywh_norm(e, width=W, height=H),
            lambda e: B.rotate_180_xyxy(e, width=W, height=H),
        ):
            same(convert(empty), np.zeros((0, 4)), atol=0)
        assert B.xyxy_to_ltwh_int(empty).shape == (0, 4)
        assert B.area_xyxy(empty).shape == B.positive_size_xyxy(empty).shape == (0,)
        assert B.iou_xyxy(empty, [[0, 0, 1, 1]]).shape == (0, 1)
        assert B.iou_xyxy([[0, 0, 1, 1]], empty).shape == (1, 0)
