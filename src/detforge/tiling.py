"""Tiled (sliced) inference: where the tiles of a photo are, and how their boxes become the photo's.

A model whose input is ``S x S`` sees a 1920 x 1080 photo shrunk about 6x: a 20-pixel fish becomes 3 pixels
and is lost. Tiling runs the model on overlapping ``tile x tile`` windows of the photo at (nearly) its own
resolution instead, optionally plus one pass over the whole photo for objects larger than a tile, and merges
the boxes. SAHI (Akyon et al. 2022, "Slicing Aided Hyper Inference") and supervision's ``InferenceSlicer`` do
the same for other detectors; this is detforge's own, numpy only (the torch-free runtime uses it).

- ``Tiling(tile, overlap, full_pass)``: the setting, checked; ``overlap`` is a fraction of ``tile``.
  ``parse_tiling`` reads ``model.json``'s ``tiling``, ``resolve_tiling`` puts a command's ``--tile``,
  ``--overlap``, ``--tile-full-pass`` over it, ``deploy_tiling`` does both for a loaded deploy folder;
  ``trained_tiling``: what ``export`` writes for a run trained on tiles (its ``tile_size``).
- ``tile_windows(width, height, tiling)``: ``(N, 4)`` integer ``x0, y0, x1, y1`` windows. On each axis the
  first window starts at 0 and the last ends flush with the photo's edge; the windows in between are spread
  evenly, so neighbours overlap by at least ``round(overlap * tile)`` pixels and every object that small fits
  wholly in one window. A side no longer than ``tile`` is one window of that side (a photo smaller than a
  tile is one window: the photo itself; windows at a short side are not square).
- ``windows_to_photo(boxes, window, input_size)``: boxes in a window's ``S x S`` model input -> photo pixels.
- ``cut_by_inner_edge(boxes, window, width, height)``: boxes touching an edge of their window that is not
  an edge of the photo: the object may go on in the next window (a fragment).
- ``merge(boxes, scores, class_ids, cut)``: the detections of all windows as one set, class by class, greedy
  by score: a box and a lower-scoring box of its class are the same object when their IoU is at least
  ``iou`` (plain NMS: the lower one goes), or when one of them is a fragment and their IoS (intersection over
  the smaller box's area, SAHI's merge metric) is at least ``ios``: then the kept box grows to their union
  (the two halves of an object cut by a window edge, or a fragment inside the whole box another window or
  the full pass saw). Two whole boxes are never unioned, so neighbouring objects of a class (a school of fish)
  are not fused the way merging every IoS match would fuse them. Two fragments that only meet at an edge
  (windows without overlap) are unioned too (``adjoining``).

Not here: running the model (``runtime.Predictor`` batches a photo's windows), training crops
(``training.tiles``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from detforge import boxes as boxmath
from detforge.errors import ConfigError, ModelError

DEFAULT_OVERLAP = 0.2
MIN_TILE = 32
MAX_OVERLAP = 0.75
# The merge thresholds: IoU for duplicates of a whole object, IoS for a fragment and what it belongs to.
MERGE_IOU = 0.5
MERGE_IOS = 0.5
# A box within this fraction of the tile (at least one pixel) of an inner window edge touches it.
EDGE_MARGIN = 0.01


@dataclass(frozen=True)
class Tiling:
    """``tile`` px windows overlapping by ``overlap`` (a fraction of ``tile``), plus a whole-photo pass
    when ``full_pass``."""

    tile: int
    overlap: float = DEFAULT_OVERLAP
    full_pass: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tile, bool) or not isinstance(self.tile, int | np.integer) or self.tile < MIN_TILE:
            raise ConfigError(
                f"the tile size must be an integer of at least {MIN_TILE} pixels, got {self.tile!r}",
                field="tile",
            )
        if (
            isinstance(self.overlap, bool)
            or not isinstance(self.overlap, int | float)
            or not 0.0 <= float(self.overlap) <= MAX_OVERLAP
        ):
            raise ConfigError(
                f"the overlap is a fraction of the tile in [0, {MAX_OVERLAP}], got {self.overlap!r}",
                field="overlap",
            )
        if not isinstance(self.full_pass, bool):
            raise ConfigError(f"full_pass must be true or false, got {self.full_pass!r}", field="full_pass")

    @property
    def overlap_px(self) -> int:
        """The least overlap of neighbouring windows, in pixels."""
        return int(round(self.overlap * self.tile))

    def to_json(self) -> dict:
        """``{"tile": .., "overlap": .., "full_pass": ..}`` (``model.json``'s ``tiling``)."""
        return {"tile": int(self.tile), "overlap": float(self.overlap), "full_pass": bool(self.full_pass)}


def parse_tiling(value, *, where: str = "tiling") -> Tiling | None:
    """A ``Tiling`` from ``model.json``'s ``tiling`` (``None`` or ``{"tile": 0}``: no tiling); ConfigError
    naming ``where`` and the field when it is not one."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"must be an object with tile, overlap and full_pass, got {value!r}", field=where)
    unknown = sorted(set(value) - {"tile", "overlap", "full_pass"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} (known: tile, overlap, full_pass)", field=where)
    if value.get("tile") in (0, None):
        return None
    try:
        return Tiling(value["tile"], value.get("overlap", DEFAULT_OVERLAP), value.get("full_pass", True))
    except ConfigError as exc:
        raise ConfigError(exc.message, field=f"{where}.{exc.field}") from None


def trained_tiling(hyperparameters: dict | None) -> dict | None:
    """``model.json``'s ``tiling`` for a run trained on ``tile_size`` crops (``training.tiles``): tiles of
    that size, ``DEFAULT_OVERLAP`` and a full pass; ``None`` for a run trained on whole photos."""
    tile = int((hyperparameters or {}).get("tile_size") or 0)
    return Tiling(tile).to_json() if tile else None


def resolve_tiling(
    default: Tiling | None,
    *,
    tile: int | None = None,
    overlap: float | None = None,
    full_pass: bool | None = None,
) -> Tiling | None:
    """The tiling a command runs: ``default`` (a deploy folder's) with the command's options over it.

    ``tile``: ``None`` keeps the default's, ``0`` turns tiling off; ``overlap``/``full_pass`` ``None`` keep
    the default's (or ``DEFAULT_OVERLAP`` / a full pass). ``--overlap`` without any tile is an error."""
    if tile == 0:
        return None
    if tile is None and default is None:
        if overlap is not None or full_pass is not None:
            option = "--overlap" if overlap is not None else "--tile-full-pass"
            raise ConfigError(
                f"{option} needs --tile SIZE (the deploy folder's model.json has no tiling)", field=option
            )
        return None
    base = default or Tiling(int(tile))  # type: ignore[arg-type]
    return Tiling(
        int(base.tile if tile is None else tile),
        float(base.overlap if overlap is None else overlap),
        bool(base.full_pass if full_pass is None else full_pass),
    )


def deploy_tiling(
    metadata: dict,
    *,
    path: str,
    tile: int | None = None,
    overlap: float | None = None,
    full_pass: bool | None = None,
) -> Tiling | None:
    """The tiling a loaded deploy folder runs: its ``model.json`` (``path``) ``tiling`` (a ModelError naming
    the file and field when it is not one) with a command's options over it (``resolve_tiling``)."""
    try:
        trained = parse_tiling(metadata.get("tiling"))
    except ConfigError as exc:
        raise ModelError(exc.message, path=path, field=exc.field) from None
    return resolve_tiling(trained, tile=tile, overlap=overlap, full_pass=full_pass)


def axis_starts(length: int, tile: int, overlap_px: int) -> list[int]:
    """Window starts along one axis of ``length`` pixels (see the module docstring)."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap_px)
    count = math.ceil((length - tile) / stride) + 1
    span = length - tile
    # floor(i * span / (count - 1) + 1/2) in integers: exact, no float rounding at .5
    return [(2 * i * span + (count - 1)) // (2 * (count - 1)) for i in range(count)]


def tile_windows(width: int, height: int, tiling: Tiling) -> np.ndarray:
    """``(N, 4)`` int64 windows ``x0, y0, x1, y1`` covering a ``width x height`` photo, row by row."""
    if width < 1 or height < 1:
        raise ValueError(f"a photo has a positive size, got {width}x{height}")
    xs = axis_starts(int(width), tiling.tile, tiling.overlap_px)
    ys = axis_starts(int(height), tiling.tile, tiling.overlap_px)
    tw, th = min(tiling.tile, int(width)), min(tiling.tile, int(height))
    return np.array([[x, y, x + tw, y + th] for y in ys for x in xs], dtype=np.int64)


def passes(width: int, height: int, tiling: Tiling) -> np.ndarray:
    """The windows the model runs on: the tiles, then the whole photo when ``full_pass`` and the photo is
    more than one tile (one tile is the whole photo already)."""
    windows = tile_windows(width, height, tiling)
    if tiling.full_pass and len(windows) > 1:
        windows = np.concatenate([windows, np.array([[0, 0, width, height]], dtype=np.int64)])
    return windows


def windows_to_photo(boxes, window, input_size: int) -> np.ndarray:
    """Boxes in the ``input_size x input_size`` model input of a window -> the photo's pixels."""
    b = boxmath.as_boxes(boxes)
    x0, y0, x1, y1 = (float(v) for v in window)
    scale = np.array([(x1 - x0) / input_size, (y1 - y0) / input_size] * 2)
    return b * scale + np.array([x0, y0, x0, y0])


def cut_by_inner_edge(boxes, window, *, width: int, height: int, margin: float | None = None) -> np.ndarray:
    """Boolean mask: the box (photo pixels) reaches within ``margin`` px of an edge of ``window`` that is
    inside the photo (default margin: ``EDGE_MARGIN`` of the window's longer side, at least 1 px)."""
    b = boxmath.as_boxes(boxes)
    x0, y0, x1, y1 = (float(v) for v in window)
    if margin is None:
        margin = max(1.0, EDGE_MARGIN * max(x1 - x0, y1 - y0))
    cut = np.zeros(len(b), dtype=bool)
    if x0 > 0:
        cut |= b[:, 0] <= x0 + margin
    if y0 > 0:
        cut |= b[:, 1] <= y0 + margin
    if x1 < width:
        cut |= b[:, 2] >= x1 - margin
    if y1 < height:
        cut |= b[:, 3] >= y1 - margin
    return cut


def ios_xyxy(boxes_a, boxes_b) -> np.ndarray:
    """Pairwise intersection over the smaller box's area, ``(len(a), len(b))``; 0 for an empty box."""
    a, b = boxmath.as_boxes(boxes_a), boxmath.as_boxes(boxes_b)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    smaller = np.minimum(boxmath.area_xyxy(a)[:, None], boxmath.area_xyxy(b)[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(smaller > 0, inter / np.where(smaller > 0, smaller, 1), 0.0)


def adjoining(boxes, *, touch: float, ios: float = MERGE_IOS) -> np.ndarray:
    """Pairwise: the boxes meet across a line (at most ``touch`` px apart on one axis) and overlap by at
    least ``ios`` of the shorter one's extent on the other axis -- two halves of an object cut by the edge
    between windows that do not overlap there."""
    b = boxmath.as_boxes(boxes)
    meet = np.minimum(b[:, None, 2:], b[None, :, 2:]) - np.maximum(b[:, None, :2], b[None, :, :2])
    extent = b[:, 2:] - b[:, :2]
    shorter = np.minimum(extent[:, None, :], extent[None, :, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(shorter > 0, meet / np.where(shorter > 0, shorter, 1), 0.0)
    across_x = (meet[:, :, 0] >= -touch) & (share[:, :, 1] >= ios)
    across_y = (meet[:, :, 1] >= -touch) & (share[:, :, 0] >= ios)
    return across_x | across_y


def merge(
    boxes, scores, class_ids, cut, *, iou: float = MERGE_IOU, ios: float = MERGE_IOS, touch: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes, scores, class_ids)`` of the detections of all windows merged (the module docstring's rule),
    highest score first; a merged box keeps its highest score. Two fragments that only meet (``adjoining``
    within ``touch`` px: windows without overlap) are the parts of one object too."""
    b = boxmath.as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    c = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    fragment = np.asarray(cut, dtype=bool).reshape(-1)
    if not len(b) == len(s) == len(c) == len(fragment):
        raise ValueError("boxes, scores, class_ids and cut must have one entry per detection")
    order = np.lexsort((np.arange(len(s)), -s))  # by score, ties in input order: deterministic
    b, s, c, fragment = b[order], s[order], c[order], fragment[order]
    overlap_iou = boxmath.iou_xyxy(b, b)
    overlap_ios = ios_xyxy(b, b)
    meeting = adjoining(b, touch=touch, ios=ios) & fragment[:, None] & fragment[None, :]
    done = np.zeros(len(b), dtype=bool)
    out_boxes, out_scores, out_ids = [], [], []
    for i in range(len(b)):
        if done[i]:
            continue
        done[i] = True
        same = ~done & (c == c[i])
        duplicate = same & (overlap_iou[i] >= iou)
        piece = same & (((fragment | fragment[i]) & (overlap_ios[i] >= ios)) | meeting[i])
        box = b[i].copy()
        for j in np.flatnonzero(piece):
            box[:2] = np.minimum(box[:2], b[j, :2])
            box[2:] = np.maximum(box[2:], b[j, 2:])
        done |= duplicate | piece
        out_boxes.append(box)
        out_scores.append(s[i])
        out_ids.append(c[i])
    if not out_boxes:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.array(out_boxes), np.array(out_scores), np.array(out_ids, dtype=np.int64)


def detect_tiled(
    image: np.ndarray, tiling: Tiling, *, input_size: int, run_batch, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(boxes, scores, class_ids)`` of one ``H x W x 3`` photo, in its pixels: every window of
    ``passes`` resized to ``input_size`` (``images.resize_rgb``), run as one batch through ``run_batch``
    (``N x S x S x 3`` uint8 -> the graph's boxes, scores, classes, num_detections), the detections scoring
    at least ``threshold`` mapped back to the photo, clipped, flagged where cut by an inner edge, merged."""
    from detforge.images import resize_rgb

    height, width = image.shape[:2]
    windows = passes(width, height, tiling)
    batch = np.stack([resize_rgb(image[y0:y1, x0:x1], input_size) for x0, y0, x1, y1 in windows.tolist()])
    boxes, scores, classes, counts = run_batch(batch)
    found, found_scores, found_ids, cut = [], [], [], []
    for i, window in enumerate(windows):
        n = int(counts[i])
        keep = scores[i, :n] >= threshold
        photo = boxmath.clip_xyxy(
            windows_to_photo(boxes[i, :n][keep].astype(np.float64), window, input_size),
            width=width,
            height=height,
        )
        found.append(photo)
        found_scores.append(scores[i, :n][keep].astype(np.float64))
        found_ids.append(classes[i, :n][keep].astype(np.int64))
        cut.append(cut_by_inner_edge(photo, window, width=width, height=height))
    return merge(
        np.concatenate(found),
        np.concatenate(found_scores),
        np.concatenate(found_ids),
        np.concatenate(cut),
        touch=max(1.0, EDGE_MARGIN * tiling.tile),
    )
