"""detforge stats: exact figures on a small fixture and on the real jobs."""

from __future__ import annotations

import json

from detforge.cli import main
from detforge.data import groundtruth
from detforge.data.stats import format_stats, manifest_stats


def test_small_fixture(tmp_path, capsys):
    from PIL import Image

    for name in ("a_1.jpg", "a_2.jpg"):  # the images must exist (every reader checks)
        Image.new("RGB", (100, 50), (10, 20, 30) if name == "a_1.jpg" else (40, 50, 60)).save(tmp_path / name)
    path = tmp_path / "m.manifest"
    groundtruth.write_manifest(
        path,
        [
            groundtruth.make_record(
                "a_1.jpg",
                width=100,
                height=50,
                boxes_xyxy=[[0, 0, 10, 5], [0, 0, 50, 50]],
                class_ids=[0, 1],
                class_map={0: "cat", 1: "dog"},
                job_name="j1",
            ),
            groundtruth.make_record(
                "a_2.jpg", width=100, height=50, boxes_xyxy=[], class_ids=[], class_map={}, job_name="j2"
            ),
        ],
    )
    s = manifest_stats([str(path)])
    assert (s["images"], s["boxes"], s["empty_images"], s["max_boxes_per_image"]) == (2, 2, 1, 2)
    assert s["per_class"] == {"cat": 1, "dog": 1} and s["per_job"] == {"j1": 1, "j2": 1}
    assert s["box_width"] == {"min": 10.0, "p25": 20.0, "median": 30.0, "p75": 40.0, "max": 50.0}
    assert s["box_area_fraction"]["max"] == 0.5
    assert format_stats(s).startswith("2 images, 2 boxes, 1 without boxes, at most 2 boxes on one image")
    assert main(["stats", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"] == {"cat": 1, "dog": 1}


def test_real_jobs(shared_data):
    paths = sorted(str(p) for p in (shared_data / "groundtruth").glob("*.manifest"))
    s = manifest_stats(paths)
    assert s["images"] == 677 and s["empty_images"] == 39
    # prepare's rule: each of the 677 source-refs is a distinct image (the images are on S3: paths only)
    assert s["distinct_images"] == 677 and s["duplicates"] == {"same image": 0, "same content": 0}
    assert s["per_class"] == {"storage box": 642}
    assert list(s["per_manifest"].values()) == [624, 21, 32]
