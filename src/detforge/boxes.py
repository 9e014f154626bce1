"""All box math in one pure module (numpy only).

Inside detforge a box is ``xyxy`` float pixels on continuous coordinates: the image spans
``[0, width] x [0, height]``, a box covering pixel columns 10..19 is ``x1=10, x2=20`` (no "+1").
Arrays have shape ``(N, 4)``; every function takes and returns such arrays (``(0, 4)`` for none).

Formats at the edges, each named in the function names:
- ``ltwh``: Ground Truth ``left, top, width, height`` pixels; COCO ``xywh`` is the same layout.
- ``xyxy_norm``: corners as fractions of width/height (SageMaker predictions).
- ``cxcywh_norm``: YOLO centre and size as fractions.
"""

from __future__ import annotations

import numpy as np


def as_boxes(boxes) -> np.ndarray:
    """A float64 ``(N, 4)`` array from any sequence of 4-number boxes (``[]`` gives ``(0, 4)``)."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {array.shape}")
    return array


def ltwh_to_xyxy(boxes) -> np.ndarray:
    """Ground Truth / COCO ``left, top, width, height`` to ``xyxy``."""
    b = as_boxes(boxes)
    return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)


def xyxy_to_ltwh(boxes) -> np.ndarray:
    """``xyxy`` to Ground Truth / COCO ``left, top, width, height``."""
    b = as_boxes(boxes)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def xyxy_to_ltwh_int(boxes) -> np.ndarray:
    """``xyxy`` to integer ``ltwh`` as Ground Truth writes them (corners rounded, then size)."""
    b = np.rint(as_boxes(boxes))
    return xyxy_to_ltwh(b).astype(np.int64)


# COCO's bbox layout is Ground Truth's ltwh; the aliases keep call sites honest about the format.
coco_xywh_to_xyxy = ltwh_to_xyxy
xyxy_to_coco_xywh = xyxy_to_ltwh


def xyxy_to_xyxy_norm(boxes, *, width: float, height: float) -> np.ndarray:
    """Pixel corners to corners as fractions of the image size."""
    return as_boxes(boxes) / np.array([width, height, width, height], dtype=np.float64)


def xyxy_norm_to_xyxy(boxes, *, width: float, height: float) -> np.ndarray:
    """Fractional corners to pixel corners."""
    return as_boxes(boxes) * np.array([width, height, width, height], dtype=np.float64)


def xyxy_to_cxcywh_norm(boxes, *, width: float, height: float) -> np.ndarray:
    """Pixel corners to YOLO's normalized centre and size."""
    b = as_boxes(boxes)
    cx = (b[:, 0] + b[:, 2]) / 2 / width
    cy = (b[:, 1] + b[:, 3]) / 2 / height
    return np.stack([cx, cy, (b[:, 2] - b[:, 0]) / width, (b[:, 3] - b[:, 1]) / height], axis=1)


def cxcywh_norm_to_xyxy(boxes, *, width: float, height: float) -> np.ndarray:
    """YOLO's normalized centre and size to pixel corners."""
    b = as_boxes(boxes)
    half_w, half_h = b[:, 2] * width / 2, b[:, 3] * height / 2
    cx, cy = b[:, 0] * width, b[:, 1] * height
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def area_xyxy(boxes) -> np.ndarray:
    """Area of each box (0 for degenerate boxes)."""
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def clip_xyxy(boxes, *, width: float, height: float) -> np.ndarray:
    """Boxes clipped to the image."""
    b = as_boxes(boxes).copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, height)
    return b


def positive_size_xyxy(boxes, *, min_size: float = 0.0) -> np.ndarray:
    """Boolean mask of boxes whose width and height exceed ``min_size``."""
    b = as_boxes(boxes)
    return ((b[:, 2] - b[:, 0]) > min_size) & ((b[:, 3] - b[:, 1]) > min_size)


def inside_image_xyxy(boxes, *, width: float, height: float, tolerance: float = 0.0) -> np.ndarray:
    """Boolean mask of boxes lying within the image (up to ``tolerance`` pixels outside)."""
    b = as_boxes(boxes)
    return (
        (b[:, 0] >= -tolerance)
        & (b[:, 1] >= -tolerance)
        & (b[:, 2] <= width + tolerance)
        & (b[:, 3] <= height + tolerance)
    )


def iou_xyxy(boxes_a, boxes_b) -> np.ndarray:
    """Pairwise intersection over union, shape ``(len(a), len(b))``; 0 where the union is empty."""
    a, b = as_boxes(boxes_a), as_boxes(boxes_b)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    union = area_xyxy(a)[:, None] + area_xyxy(b)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def flip_x_xyxy(boxes, *, width: float) -> np.ndarray:
    """Boxes of the image mirrored left-right (``x -> width - x``)."""
    b = as_boxes(boxes)
    return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)


def flip_y_xyxy(boxes, *, height: float) -> np.ndarray:
    """Boxes of the image mirrored top-bottom (``y -> height - y``)."""
    b = as_boxes(boxes)
    return np.stack([b[:, 0], height - b[:, 3], b[:, 2], height - b[:, 1]], axis=1)


def rotate_cw_xyxy(boxes, *, height: float) -> np.ndarray:
    """Boxes of the image turned 90° clockwise; the new image is ``height x width``.

    A point ``(x, y)`` goes to ``(height - y, x)``.
    """
    b = as_boxes(boxes)
    return np.stack([height - b[:, 3], b[:, 0], height - b[:, 1], b[:, 2]], axis=1)


def rotate_ccw_xyxy(boxes, *, width: float) -> np.ndarray:
    """Boxes of the image turned 90° counter-clockwise; the new image is ``height x width``.

    A point ``(x, y)`` goes to ``(y, width - x)``.
    """
    b = as_boxes(boxes)
    return np.stack([b[:, 1], width - b[:, 2], b[:, 3], width - b[:, 0]], axis=1)


def rotate_180_xyxy(boxes, *, width: float, height: float) -> np.ndarray:
    """Boxes of the image turned by 180°."""
    return flip_y_xyxy(flip_x_xyxy(boxes, width=width), height=height)
