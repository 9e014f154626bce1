"""Tests for ``detforge.tiling``: exact window geometry, mapping back, edge flags and the merge rule on
hand-built cases, and whole tiled passes with a numpy detector (the bounding box of the red pixels)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from detforge import images
from detforge.errors import ConfigError
from detforge.tiling import (
    Tiling,
    axis_starts,
    cut_by_inner_edge,
    detect_tiled,
    ios_xyxy,
    merge,
    parse_tiling,
    passes,
    resolve_tiling,
    tile_windows,
    windows_to_photo,
)


@pytest.mark.parametrize(
    ("length", "tile", "overlap_px", "starts"),
    [
        (1024, 512, 102, [0, 256, 512]),  # 2 strides of 410 do not reach: 3 windows spread evenly
        (1024, 512, 0, [0, 512]),  # no overlap: edge to edge
        (1030, 512, 102, [0, 259, 518]),  # last flush with the edge: 518 + 512 = 1030
        (1001, 256, 51, [0, 186, 373, 559, 745]),  # odd sizes: 745 + 256 = 1001
        (1920, 640, 128, [0, 427, 853, 1280]),
        (1080, 640, 128, [0, 440]),
        (513, 512, 102, [0, 1]),  # one pixel more than a tile is two windows
        (512, 512, 102, [0]),
        (300, 512, 102, [0]),  # smaller than a tile: one window
    ],
)
def test_axis_starts(length, tile, overlap_px, starts):
    assert axis_starts(length, tile, overlap_px) == starts


def test_windows_of_a_photo_row_by_row():
    windows = tile_windows(1024, 768, Tiling(512, 0.2))
    assert windows.tolist() == [
        [0, 0, 512, 512],
        [256, 0, 768, 512],
        [512, 0, 1024, 512],
        [0, 256, 512, 768],
        [256, 256, 768, 768],
        [512, 256, 1024, 768],
    ]
    full = passes(1024, 768, Tiling(512, 0.2))
    assert full.tolist()[-1] == [0, 0, 1024, 768] and len(full) == 7
    assert len(passes(1024, 768, Tiling(512, 0.2, full_pass=False))) == 6


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (300, 200, [[0, 0, 300, 200]]),  # smaller than a tile: the photo itself, and no extra full pass
        (512, 512, [[0, 0, 512, 512]]),
        (700, 301, [[0, 0, 512, 301], [188, 0, 700, 301], [0, 0, 700, 301]]),  # short side: not square
    ],
)
def test_small_photos_and_short_sides(width, height, expected):
    assert passes(width, height, Tiling(512, 0.2)).tolist() == expected


def test_windows_cover_every_photo_and_overlap_at_least_as_asked():
    for tile, overlap in ((64, 0.0), (64, 0.25), (100, 0.5), (37, 0.75)):
        t = Tiling(tile, overlap)
        for length in (1, 36, 37, 63, 64, 65, 99, 100, 101, 127, 128, 129, 333, 1001):
            starts = axis_starts(length, tile, t.overlap_px)
            side = min(tile, length)
            assert starts[0] == 0 and starts[-1] + side == length, (tile, overlap, length)
            gaps = np.diff(starts)
            assert (gaps >= 1).all() and (side - gaps >= t.overlap_px).all(), (tile, overlap, length)


def test_tiling_setting_is_checked_and_read_from_model_json():
    assert parse_tiling(None) is None
    assert parse_tiling({"tile": 0}) is None
    assert parse_tiling({"tile": 640}) == Tiling(640, 0.2, True)
    assert parse_tiling({"tile": 512, "overlap": 0.25, "full_pass": False}).to_json() == {
        "tile": 512,
        "overlap": 0.25,
        "full_pass": False,
    }
    with pytest.raises(ConfigError, match=r"field 'model.json tiling.overlap': the overlap is a fraction"):
        parse_tiling({"tile": 512, "overlap": 0.9}, where="model.json tiling")
    with pytest.raises(ConfigError, match=r"field 'tiling': unknown key 'size'"):
        parse_tiling({"size": 512})
    with pytest.raises(ConfigError, match=r"field 'tile': the tile size must be an integer of at least 32"):
        Tiling(16)
    with pytest.raises(ConfigError, match="field 'tile'"):
        Tiling(512.5)  # type: ignore[arg-type]


def test_command_options_over_the_deploy_folders_tiling():
    trained = Tiling(640, 0.25, True)
    assert resolve_tiling(None) is None
    assert resolve_tiling(trained) == trained
    assert resolve_tiling(trained, tile=0) is None  # --tile 0: whole photos
    assert resolve_tiling(trained, overlap=0.1, full_pass=False) == Tiling(640, 0.1, False)
    assert resolve_tiling(None, tile=320) == Tiling(320, 0.2, True)
    assert resolve_tiling(trained, tile=320) == Tiling(320, 0.25, True)
    with pytest.raises(ConfigError, match=r"field '--overlap': --overlap needs --tile SIZE"):
        resolve_tiling(None, overlap=0.3)


def test_boxes_of_a_window_back_to_the_photo():
    # a 512 px window at (256, 256) run at 320 px: 1.6 photo px per input px
    photo = windows_to_photo([[0, 0, 320, 320], [10, 20, 30, 40]], [256, 256, 768, 768], 320)
    assert photo.tolist() == [[256, 256, 768, 768], [272, 288, 304, 320]]
    short = windows_to_photo([[0, 0, 64, 64]], [188, 0, 700, 301], 64)  # non-square window
    assert short.tolist() == [[188, 0, 700, 301]]


def test_boxes_touching_an_inner_window_edge():
    window = [256, 0, 768, 512]  # of a 1024 x 768 photo: left, right and bottom edges are inner
    boxes = [
        [257, 100, 300, 150],  # within 5.12 px of the left edge
        [300, 0, 400, 50],  # on the top edge, which is the photo's: not cut
        [300, 100, 400, 200],  # inside
        [300, 400, 400, 508],  # near the bottom (inner) edge
        [700, 100, 762.8, 150],  # 5.2 px from the right edge: not within the margin
        [700, 100, 763, 150],
    ]  # 5 px: within
    assert cut_by_inner_edge(boxes, window, width=1024, height=768).tolist() == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    # the photo's own edges never cut, whatever the margin
    whole = cut_by_inner_edge([[0, 0, 10, 10]], [0, 0, 64, 64], width=64, height=64, margin=20)
    assert whole.tolist() == [False]


def test_intersection_over_smaller():
    assert ios_xyxy([[0, 0, 10, 10]], [[5, 0, 25, 10], [2, 2, 4, 4], [20, 20, 30, 30]]).tolist() == [
        [0.5, 1.0, 0.0]
    ]
    assert ios_xyxy([[0, 0, 0, 10]], [[0, 0, 10, 10]]).tolist() == [[0.0]]  # an empty box


def test_merge_an_object_cut_by_a_window_edge():
    # a 300 px wide fish across the edges of windows [0, 512] and [410, 922]: each window sees a part
    boxes = [[300, 100, 512, 160], [410, 102, 600, 158]]
    merged, scores, ids = merge(boxes, [0.6, 0.8], [2, 2], [True, True])
    assert merged.tolist() == [[300, 100, 600, 160]] and scores.tolist() == [0.8] and ids.tolist() == [2]


def test_merge_a_fragment_into_the_whole_box_of_another_window():
    boxes = [[300, 100, 340, 140], [300, 100, 320, 140]]  # whole in one window, cut in the next
    merged, scores, _ = merge(boxes, [0.5, 0.9], [0, 0], [False, True])
    assert merged.tolist() == [[300, 100, 340, 140]] and scores.tolist() == [0.9]


def test_merge_keeps_neighbours_and_other_classes_apart():
    # two whole fish of a class touching (IoU 0.25, IoS 0.4): both stay; a duplicate (IoU 0.9) goes
    boxes = [[0, 0, 50, 50], [30, 0, 80, 50], [1, 0, 50, 50], [0, 0, 50, 50]]
    merged, scores, ids = merge(boxes, [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 1], [False] * 4)
    assert merged.tolist() == [[0, 0, 50, 50], [30, 0, 80, 50], [0, 0, 50, 50]]
    assert scores.tolist() == [0.9, 0.8, 0.6] and ids.tolist() == [0, 0, 1]
    # a small whole box inside a large whole one (IoS 1, IoU 0.04) is a second object, not a fragment
    merged, _, _ = merge([[0, 0, 100, 100], [10, 10, 30, 30]], [0.9, 0.8], [0, 0], [False, False])
    assert len(merged) == 2


def test_merge_of_nothing():
    merged, scores, ids = merge(np.zeros((0, 4)), [], [], [])
    assert merged.shape == (0, 4) and scores.shape == (0,) and ids.dtype == np.int64


def red_detector(batch: np.ndarray):
    """The bounding box of the clearly red pixels of each input, score 0.9, class 0 (none: no box)."""
    n = len(batch)
    boxes, scores = np.zeros((n, 1, 4), np.float32), np.zeros((n, 1), np.float32)
    classes, counts = np.zeros((n, 1), np.int64), np.zeros(n, np.int64)
    for i, image in enumerate(batch):
        red = (image[:, :, 0] > 160) & (image[:, :, 1] < 100)
        if red.any():
            ys, xs = np.nonzero(red)
            boxes[i, 0] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            scores[i, 0], counts[i] = 0.9, 1
    return boxes, scores, classes, counts


def photo_with(width: int, height: int, *rects) -> np.ndarray:
    array = np.full((height, width, 3), 100, np.uint8)
    for x0, y0, x1, y1 in rects:
        array[y0:y1, x0:x1] = (230, 20, 20)
    return array


def test_tiled_pass_merges_a_box_cut_by_the_tile_edge_into_one():
    photo = photo_with(128, 64, (40, 10, 100, 30))  # across the edge x = 64 of two 64 px tiles
    seen = []

    def detector(batch):
        seen.append(batch.shape)
        return red_detector(batch)

    boxes, scores, ids = detect_tiled(
        photo, Tiling(64, 0.0, full_pass=False), input_size=64, run_batch=detector, threshold=0.5
    )
    assert seen == [(2, 64, 64, 3)]  # the photo's tiles as one batch
    assert boxes.tolist() == [[40, 10, 100, 30]] and scores.tolist() == [pytest.approx(0.9)]
    # with the whole-photo pass (128 x 64 shrunk to 64 x 64: the box's edges fall on even columns)
    boxes, _, _ = detect_tiled(photo, Tiling(64, 0.0), input_size=64, run_batch=detector, threshold=0.5)
    assert seen[-1] == (3, 64, 64, 3) and boxes.tolist() == [[40, 10, 100, 30]]


def test_tiled_pass_with_overlap_sees_a_small_box_whole_once():
    # windows [0, 64] and [32, 96] (overlap 0.5): the box at 40..56 is whole in both
    photo = photo_with(96, 64, (40, 8, 56, 24))
    boxes, _, _ = detect_tiled(
        photo, Tiling(64, 0.5, full_pass=False), input_size=64, run_batch=red_detector, threshold=0.5
    )
    assert boxes.tolist() == [[40, 8, 56, 24]]


def test_tiled_pass_on_a_photo_smaller_than_a_tile_and_odd_sizes():
    photo = photo_with(50, 50, (3, 5, 20, 30))  # one window, the photo itself, at a 50 px input
    boxes, _, _ = detect_tiled(photo, Tiling(64), input_size=50, run_batch=red_detector, threshold=0.5)
    assert boxes.tolist() == [[3, 5, 20, 30]]
    # odd: 101 x 67 in 64 px tiles at a 64 px input: windows at x 0 and 37, y 0 and 3
    photo = photo_with(101, 67, (70, 50, 90, 60))
    assert passes(101, 67, Tiling(64, 0.2)).tolist()[:4] == [
        [0, 0, 64, 64],
        [37, 0, 101, 64],
        [0, 3, 64, 67],
        [37, 3, 101, 67],
    ]
    boxes, _, _ = detect_tiled(
        photo, Tiling(64, 0.2, full_pass=False), input_size=64, run_batch=red_detector, threshold=0.5
    )
    assert boxes.tolist() == [[70, 50, 90, 60]]


def test_tiled_pass_on_an_exif_rotated_photo_is_in_upright_pixels(tmp_path):
    upright = photo_with(128, 64, (90, 40, 120, 60))
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 64 x 128 as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: upright again
    path = tmp_path / "phone.png"
    out = io.BytesIO()
    stored.save(out, "PNG", exif=exif.tobytes())
    path.write_bytes(out.getvalue())
    assert images.probe(path) == (128, 64)
    photo = images.read(path)
    assert photo.shape == (64, 128, 3)
    assert passes(128, 64, Tiling(64, 0.0)).tolist() == [[0, 0, 64, 64], [64, 0, 128, 64], [0, 0, 128, 64]]
    boxes, _, _ = detect_tiled(
        photo, Tiling(64, 0.0, full_pass=False), input_size=64, run_batch=red_detector, threshold=0.5
    )
    assert boxes.tolist() == [[90, 40, 120, 60]]


def test_detections_below_the_threshold_are_left_out_before_merging():
    photo = photo_with(128, 64, (40, 10, 100, 30))
    boxes, _, _ = detect_tiled(photo, Tiling(64, 0.0), input_size=64, run_batch=red_detector, threshold=0.95)
    assert boxes.shape == (0, 4)


def test_fragments_that_only_meet_at_an_edge_are_one_object():
    # windows without overlap: the halves touch at x = 64 and share 18 of 20 rows
    boxes = [[40, 10, 64, 30], [64, 12, 100, 30], [64, 40, 100, 60]]
    merged, _, _ = merge(boxes, [0.9, 0.8, 0.7], [0, 0, 0], [True, True, True], touch=1.0)
    assert merged.tolist() == [[40, 10, 100, 30], [64, 40, 100, 60]]  # the third shares no rows
    # whole boxes that meet are two objects
    merged, _, _ = merge(boxes[:2], [0.9, 0.8], [0, 0], [False, False], touch=1.0)
    assert len(merged) == 2
