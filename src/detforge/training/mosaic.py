"""Mosaic augmentation (YOLOv4, Bochkovskiy et al. 2020): four training images in one, then a random
zoom, so every step sees more objects, at more scales and in more contexts than there are photos.

``mosaic(pieces, size=S, rng=..., scale_jitter=j)``: ``pieces`` are four ``(uint8 H x W x 3 image, (N, 4)
xyxy boxes, (N,) labels)``. Each image is scaled to a long side of ``S`` and placed in one quadrant of a
``2S x 2S`` grey canvas around a random centre in ``[S/2, 3S/2]^2``; then a square window of side
``S / s``, ``s`` uniform in ``[1 - j, 1 + j]``, centred on that point (moved inside the canvas) is cut
out and resized to ``S x S``. Boxes follow exactly; a box keeps its label when at least
``MIN_VISIBLE`` of its area stays in the window and both sides are at least ``MIN_SIDE`` px.

Returns ``(S x S x 3 uint8, (M, 4) float64 xyxy, (M,) int64)``. Pure numpy + Pillow; randomness only from
``rng`` (a ``numpy.random.Generator``). Not here: per-image augmentation (``transforms``).
"""

from __future__ import annotations

import numpy as np

from detforge import boxes as box_ops

FILL = 114
MIN_VISIBLE = 0.25
MIN_SIDE = 2.0


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if image.shape[1] == width and image.shape[0] == height:
        return image
    return np.array(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def mosaic(pieces, *, size: int, rng: np.random.Generator, scale_jitter: float = 0.5):
    """Four images -> one ``size x size`` training image with its boxes and labels (see the docstring)."""
    if len(pieces) != 4:
        raise ValueError(f"mosaic needs 4 images, got {len(pieces)}")
    s2 = 2 * size
    canvas = np.full((s2, s2, 3), FILL, dtype=np.uint8)
    xc, yc = (int(v) for v in rng.uniform(0.5 * size, 1.5 * size, 2))
    all_boxes, all_labels = [], []
    for quadrant, (image, boxes, labels) in enumerate(pieces):
        height, width = image.shape[:2]
        r = size / max(height, width)
        w, h = max(1, round(width * r)), max(1, round(height * r))
        x1 = xc - w if quadrant in (0, 2) else xc
        y1 = yc - h if quadrant in (0, 1) else yc
        cx0, cy0, cx1, cy1 = max(x1, 0), max(y1, 0), min(x1 + w, s2), min(y1 + h, s2)
        if cx1 > cx0 and cy1 > cy0:
            piece = _resize(image, w, h)
            canvas[cy0:cy1, cx0:cx1] = piece[cy0 - y1 : cy1 - y1, cx0 - x1 : cx1 - x1]
        b = box_ops.as_boxes(boxes) * np.array([w / width, h / height] * 2) + np.array([x1, y1] * 2)
        all_boxes.append(b)
        all_labels.append(np.asarray(labels, dtype=np.int64).reshape(-1))
    scale = rng.uniform(1 - scale_jitter, 1 + scale_jitter)
    side = int(min(s2, max(8, round(size / scale))))
    x0 = int(np.clip(xc - side // 2, 0, s2 - side))
    y0 = int(np.clip(yc - side // 2, 0, s2 - side))
    out = _resize(np.ascontiguousarray(canvas[y0 : y0 + side, x0 : x0 + side]), size, size)
    boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
    labels = np.concatenate(all_labels) if all_labels else np.zeros(0, dtype=np.int64)
    before = box_ops.area_xyxy(boxes)
    moved = (boxes - np.array([x0, y0] * 2)) * (size / side)
    clipped = box_ops.clip_xyxy(moved, width=size, height=size)
    after = box_ops.area_xyxy(clipped) / (size / side) ** 2
    keep = (
        (clipped[:, 2] - clipped[:, 0] >= MIN_SIDE)
        & (clipped[:, 3] - clipped[:, 1] >= MIN_SIDE)
        & (after >= MIN_VISIBLE * np.maximum(before, 1e-9))
    )
    return out, clipped[keep], labels[keep]
