"""Tiled training: crops of a photo at its own resolution, so the model learns objects at the size it will
see them in tiled inference (``detforge.tiling``), instead of at the photo-shrunk-to-the-input size.

SAHI's users report sliced inference making results worse when the model was trained on whole photos: a
tile's objects are then several times larger than any the model saw. ``TileCrops(tile)`` makes every
training item (with ``probability``; else the whole photo) a ``tile x tile`` window of the photo, in photo
pixels, which training's resize then brings to ``image_shape`` exactly as inference resizes a tile.

A box cut by the window's edge:
- kept (clipped) when at least ``min_visible`` of its area is inside the window;
- otherwise dropped, and its visible part is painted ``FILL`` grey (outside every kept box): the unlabeled
  fragment of a fish must not teach the model that fish pixels are background. The window is also drawn
  ``TRIES`` times and the one cutting the fewest boxes is used, so fragments are rare to begin with.
  (Dropping a whole crop that cuts a box would leave crowded photos with almost no crop at all; an ignore
  region in the loss would need every detector family's assigner to know it. Greying is neither.)

``crop(image, boxes, labels, side=, rng=, ...)`` is the pure function (numpy; randomness only from ``rng``;
``crop_at`` for a given window);
the dataset calls ``TileCrops.sample`` on its decoded (possibly cached, scaled) image, before mosaic and
augmentation, so mosaic builds its four quarters from tiles. Not here: tiled inference (``detforge.tiling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detforge import boxes as box_ops

FILL = 114  # mosaic's canvas grey
MIN_VISIBLE = 0.6
TRIES = 4


@dataclass(frozen=True)
class TileCrops:
    """Training windows of ``tile`` photo pixels (see the module docstring)."""

    tile: int
    min_visible: float = MIN_VISIBLE
    probability: float = 1.0

    @classmethod
    def from_hyperparameters(cls, hp) -> TileCrops | None:
        """The crops ``tile_size``, ``tile_min_visible`` and ``tile_probability`` ask for (None: off)."""
        if not hp.tile_size:
            return None
        return cls(int(hp.tile_size), float(hp.tile_min_visible), float(hp.tile_probability))

    def sample(self, image: np.ndarray, boxes, labels, *, scale: float, rng: np.random.Generator):
        """``crop`` of a decoded image that is ``scale`` times the photo's size (the image cache shrinks)."""
        if rng.random() >= self.probability:
            return image, box_ops.as_boxes(boxes), np.asarray(labels, dtype=np.int64).reshape(-1)
        return crop(
            image, boxes, labels, side=max(1, round(self.tile * scale)), rng=rng, min_visible=self.min_visible
        )


def visible_fraction(boxes, window) -> np.ndarray:
    """The share of each box's area inside ``window`` (``x0, y0, x1, y1``); 0 for an empty box."""
    b = box_ops.as_boxes(boxes)
    x0, y0, x1, y1 = window
    inside = box_ops.clip_xyxy(b - np.array([x0, y0, x0, y0]), width=x1 - x0, height=y1 - y0)
    area = box_ops.area_xyxy(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area > 0, box_ops.area_xyxy(inside) / np.where(area > 0, area, 1), 0.0)


def crop(
    image: np.ndarray,
    boxes,
    labels,
    *,
    side: int,
    rng: np.random.Generator,
    min_visible: float = MIN_VISIBLE,
    tries: int = TRIES,
):
    """``(window pixels, its boxes, their labels)``: the best of ``tries`` random ``side x side`` windows
    (a side no longer than ``side`` is taken whole), boxes handled as the module docstring says."""
    height, width = image.shape[:2]
    b = box_ops.as_boxes(boxes)
    ids = np.asarray(labels, dtype=np.int64).reshape(-1)
    cw, ch = min(side, width), min(side, height)
    xs = rng.integers(0, width - cw + 1, tries)
    ys = rng.integers(0, height - ch + 1, tries)
    best, best_cut = None, None
    for x0, y0 in zip(xs.tolist(), ys.tolist(), strict=True):
        seen = visible_fraction(b, (x0, y0, x0 + cw, y0 + ch))
        cut = int(((seen > 0) & (seen < min_visible)).sum())
        if best is None or cut < best_cut:
            best, best_cut = (x0, y0, seen), cut
    x0, y0, _ = best
    return crop_at(image, b, ids, (x0, y0, x0 + cw, y0 + ch), min_visible=min_visible)


def crop_at(image: np.ndarray, boxes, labels, window, *, min_visible: float = MIN_VISIBLE):
    """``crop``'s result for one given ``window`` (``x0, y0, x1, y1`` integers inside the image)."""
    x0, y0, x1, y1 = (int(v) for v in window)
    cw, ch = x1 - x0, y1 - y0
    b = box_ops.as_boxes(boxes)
    ids = np.asarray(labels, dtype=np.int64).reshape(-1)
    seen = visible_fraction(b, (x0, y0, x1, y1))
    pixels = np.array(image[y0:y1, x0:x1], dtype=np.uint8)
    moved = box_ops.clip_xyxy(b - np.array([x0, y0, x0, y0]), width=cw, height=ch)
    keep = seen >= min_visible
    dropped = (seen > 0) & ~keep
    if dropped.any():
        grey = np.zeros((ch, cw), dtype=bool)
        for x1, y1, x2, y2 in np.rint(moved[dropped]).astype(int).tolist():
            grey[y1:y2, x1:x2] = True
        for x1, y1, x2, y2 in np.rint(moved[keep]).astype(int).tolist():
            grey[y1:y2, x1:x2] = False
        pixels[grey] = FILL
    return pixels, moved[keep], ids[keep]
