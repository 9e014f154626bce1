"""Box math: exact hand values and hypothesis properties of every conversion, flip and rotation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from detforge import boxes as B

W, H = 640.0, 480.0


@st.composite
def box_arrays(draw):
    n = draw(st.integers(1, 5))
    rows = []
    for _ in range(n):
        x1 = draw(st.floats(0, W - 1, allow_nan=False))
        y1 = draw(st.floats(0, H - 1, allow_nan=False))
        x2 = draw(st.floats(x1 + 0.5, W, allow_nan=False))
        y2 = draw(st.floats(y1 + 0.5, H, allow_nan=False))
        rows.append([x1, y1, x2, y2])
    return np.asarray(rows)


def test_hand_values():
    np.testing.assert_array_equal(B.ltwh_to_xyxy([[10, 20, 30, 40]]), [[10, 20, 40, 60]])
    np.testing.assert_array_equal(B.xyxy_to_ltwh([[10, 20, 40, 60]]), [[10, 20, 30, 40]])
    np.testing.assert_allclose(B.xyxy_to_xyxy_norm([[64, 48, 320, 240]], width=W, height=H),
                               [[0.1, 0.1, 0.5, 0.5]])
    np.testing.assert_allclose(B.xyxy_to_cxcywh_norm([[64, 48, 320, 240]], width=W, height=H),
                               [[0.3, 0.3, 0.4, 0.4]])
    np.testing.assert_array_equal(B.area_xyxy([[0, 0, 4, 5]]), [20])
    np.testing.assert_array_equal(B.clip_xyxy([[-5, -5, 700, 100]], width=W, height=H), [[0, 0, 640, 100]])
    np.testing.assert_allclose(B.iou_xyxy([[0, 0, 2, 2]], [[1, 1, 3, 3], [5, 5, 6, 6]]), [[1 / 7, 0]])
    np.testing.assert_array_equal(B.flip_x_xyxy([[10, 20, 40, 60]], width=100), [[60, 20, 90, 60]])
    np.testing.assert_array_equal(B.flip_y_xyxy([[10, 20, 40, 60]], height=100), [[10, 40, 40, 80]])
    np.testing.assert_array_equal(B.rotate_cw_xyxy([[10, 20, 40, 60]], height=100), [[40, 10, 80, 40]])
    np.testing.assert_array_equal(B.rotate_ccw_xyxy([[10, 20, 40, 60]], width=100), [[20, 60, 60, 90]])


@settings(max_examples=60, deadline=None)
@given(box_arrays())
def test_round_trips(b):
    np.testing.assert_allclose(B.ltwh_to_xyxy(B.xyxy_to_ltwh(b)), b, atol=1e-9)
    norm = B.xyxy_to_xyxy_norm(b, width=W, height=H)
    np.testing.assert_allclose(B.xyxy_norm_to_xyxy(norm, width=W, height=H), b, atol=1e-9)
    np.testing.assert_allclose(
        B.cxcywh_norm_to_xyxy(B.xyxy_to_cxcywh_norm(b, width=W, height=H), width=W, height=H), b, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(box_arrays())
def test_flips_and_rotations(b):
    np.testing.assert_allclose(B.flip_x_xyxy(B.flip_x_xyxy(b, width=W), width=W), b, atol=1e-9)
    np.testing.assert_allclose(B.flip_y_xyxy(B.flip_y_xyxy(b, height=H), height=H), b, atol=1e-9)
    # cw turns a WxH image into HxW
    np.testing.assert_allclose(B.rotate_ccw_xyxy(B.rotate_cw_xyxy(b, height=H), width=H), b, atol=1e-9)
    four = b
    for size in (H, W, H, W):
        four = B.rotate_cw_xyxy(four, height=size)
    np.testing.assert_allclose(four, b, atol=1e-9)
    np.testing.assert_allclose(B.area_xyxy(B.rotate_cw_xyxy(b, height=H)), B.area_xyxy(b), atol=1e-6)
    assert B.inside_image_xyxy(B.rotate_cw_xyxy(b, height=H), width=H, height=W, tolerance=1e-9).all()


@settings(max_examples=60, deadline=None)
@given(box_arrays(), box_arrays())
def test_iou_symmetric_and_bounded(a, b):
    ab, ba = B.iou_xyxy(a, b), B.iou_xyxy(b, a)
    np.testing.assert_allclose(ab, ba.T)
    assert ((ab >= 0) & (ab <= 1 + 1e-12)).all()
    np.testing.assert_allclose(np.diag(B.iou_xyxy(a, a)), 1.0)
