"""detforge.data.synth: the synthetic storage-box dataset (layout, Ground Truth format, exact boxes)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from PIL import Image

from detforge import boxes, storage
from detforge.data import groundtruth, synth
from detforge.data.synth import scene as synth_scene
from detforge.errors import ConfigError


@pytest.fixture(scope="module")
def rendered():
    """Every frame of a 300-image plan at 192x108, with its display list."""
    plans = synth.plan_videos(300, seed=3)
    return [f for plan in plans for f in synth.render_video(plan, seed=3, width=192, height=108)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 40-image dataset written to disk."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return synth.synthesize(out, images=40, seed=7, size=(160, 96))


def test_plan_videos_jobs_and_lengths():
    plans = synth.plan_videos(600, seed=0)
    assert [(p.name, p.job, p.frames) for p in plans] == [
        ("blue_box_1", "blue-box-small-job", 43),
        ("blue_box_2", "blue-box-large-job", 86),
        ("blue_box_3", "blue-box-large-job", 86),
        ("blue_box_4", "blue-box-large-job", 85),
        ("yellow_box_1", "yellow-box-small-job", 43),
        ("yellow_box_2", "yellow-box-large-job", 86),
        ("yellow_box_3", "yellow-box-large-job", 86),
        ("yellow_box_4", "yellow-box-large-job", 85),
    ]
    five = [(p.name, p.frames) for p in synth.plan_videos(5, seed=0)]
    assert five == [("blue_box_1", 3), ("yellow_box_1", 2)]
    assert [(p.name, p.frames) for p in synth.plan_videos(1, seed=0)] == [("blue_box_1", 1)]
    short = synth.plan_videos(600, seed=0, frames_per_video=20)  # more, shorter videos: more scenes
    assert len(short) == 34 and sum(p.frames for p in short) == 600 and max(p.frames for p in short) <= 20
    with pytest.raises(ConfigError, match="frames per video"):
        synth.plan_videos(600, seed=0, frames_per_video=1)


def test_labels_are_the_drawn_boxes(rendered):
    """Render object masks: every label is the tight box of its object's visible pixels (within 1 px)."""
    worst = 0.0
    cut = 0
    for frame in rendered:
        owners = synth_scene.paint_owners((192, 108), frame.shapes)
        shown = sorted(set(np.unique(owners)) - {0})
        assert shown == list(range(1, len(frame.true_boxes) + 1)), frame.image_id
        for k, box in enumerate(frame.true_boxes):
            ys, xs = np.nonzero(owners == k + 1)
            drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            worst = max(worst, float(np.abs(drawn - box).max()))
            cut += bool(box[0] == 0 or box[1] == 0 or box[2] == 192 or box[3] == 108)
    assert worst <= 1.0
    assert cut >= 5  # boxes cut by the frame edge are part of the check


def test_frames_have_boxes_sized_for_a_small_detector(rendered):
    all_boxes = np.concatenate([f.true_boxes for f in rendered])
    empty = sum(len(f.true_boxes) == 0 for f in rendered)
    two = sum(len(f.true_boxes) == 2 for f in rendered)
    assert len(rendered) == 300 and 5 <= empty <= 45 and two >= 1
    side = np.maximum(all_boxes[:, 2] - all_boxes[:, 0], all_boxes[:, 3] - all_boxes[:, 1]) / 192
    assert np.median(side) > 0.25 and np.percentile(side, 90) < 0.6


def test_lid_colours_separate_the_classes(rendered):
    """Mean colour of the top-most pixels of each box: blue lids are blue, yellow lids are yellow."""
    for frame in rendered[::10]:
        image = np.asarray(synth.preview(frame), dtype=np.float64)
        owners = synth_scene.paint_owners((192, 108), frame.shapes)
        for k, color in enumerate(frame.colors):
            r, g, b = image[owners == k + 1].mean(axis=0)
            if color == "blue":
                assert b > r + 40 and b > g + 20, frame.image_id
            else:
                assert r > b + 60 and g > b + 60, frame.image_id


def test_bad_labels_are_listed_and_wrong(rendered):
    bad = [f for f in rendered if f.reject_reason and f.reject_reason.startswith("bad label")]
    good = [f for f in rendered if not f.reject_reason]
    assert len(bad) >= 2
    for frame in bad:
        assert boxes.iou_xyxy(frame.label_boxes[:1], frame.true_boxes[:1])[0, 0] < 0.75
    for frame in good:
        np.testing.assert_array_equal(frame.label_boxes, frame.true_boxes)


def test_videos_move_smoothly(rendered):
    video = [f for f in rendered if f.video.name == "blue_box_2" and len(f.true_boxes) == 1]
    centers = np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in (f.true_boxes[0] for f in video)])
    steps = np.linalg.norm(np.diff(centers, axis=0), axis=1)
    assert len(video) > 20 and np.median(steps) < 8  # a few pixels a frame at 192 wide


def test_dataset_layout_and_summary(small):
    out = Path(small.out)
    assert sorted(p.name for p in (out / "manifests").iterdir()) == [
        "blue-box-large-job.output.manifest",
        "blue-box-small-job.output.manifest",
        "yellow-box-large-job.output.manifest",
        "yellow-box-small-job.output.manifest",
    ]
    assert small.images == 40 and len(list((out / "images").glob("*.jpg"))) == 40
    assert small.rejected == {
        "blue_box_2_000032": "two colours in one frame (the line's colour names one)",
        "yellow_box_1_000015": "bad label: box shifted",
        "yellow_box_2_000033": "bad label: box too large",
    }
    assert sum(small.job_images.values()) == 40
    saved = json.loads((out / "synth.json").read_text())
    assert saved == small.to_json() and saved["seed"] == 7 and saved["width"] == 160
    assert "seed 7, 160x96, 40 images" in (out / "README.txt").read_text()
    lines = (out / "rejected.txt").read_text().splitlines()
    assert lines[0].startswith("# ") and [x for x in lines if not x.startswith("#")] == sorted(small.rejected)


def test_manifests_are_ground_truth_jobs(small):
    n_boxes = empty = 0
    for path in small.manifests:
        job = storage.stem(storage.stem(path))  # <job>.output.manifest
        for record in groundtruth.read_manifest(path):
            obj = record.fields
            assert record.job_name == f"labeling-job/{job}"
            assert obj["color"] == job.split("-")[0] and obj["object"] == "box"
            assert record.source_ref == str(Path(small.out) / "images" / f"{record.image_id}.jpg")
            assert record.image_id.startswith(f"{obj['color']}_box_")
            with Image.open(record.source_ref) as image:
                assert image.size == (160, 96) and image.format == "JPEG"
            assert (record.width, record.height, record.depth) == (160, 96, 3)
            meta = obj["bb-metadata"]
            assert meta["type"] == "groundtruth/object-detection" and meta["human-annotated"] == "yes"
            if len(record.boxes):
                assert meta["class-map"] == {"0": "storage box"} and set(record.class_ids) == {0}
                assert set(record.confidences) <= {0.09, 0.29}
            else:
                assert meta["class-map"] == {} and obj["bb"]["annotations"] == [] and meta["objects"] == []
                empty += 1
            n_boxes += len(record.boxes)
    assert n_boxes == small.boxes and empty == small.empty_images


def _shape(value):
    """The nested key structure and value types of a JSON value."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def test_lines_have_the_shape_of_real_ground_truth_lines(small, shared_data):
    real = {}
    for path in sorted((shared_data / "groundtruth").glob("*.manifest")):
        for line in path.read_bytes().splitlines():
            obj = orjson.loads(line)
            real.setdefault(bool(obj["bb"]["annotations"]), _shape(obj))
    ours = {}
    for path in small.manifests:
        for line in Path(path).read_bytes().splitlines():
            obj = orjson.loads(line)
            ours.setdefault(bool(obj["bb"]["annotations"]), _shape(obj))
    assert ours == real
    one = orjson.loads(Path(small.manifests[0]).read_bytes().splitlines()[0])
    assert len(one["bb-metadata"]["creation-date"]) == len("2019-05-21T21:45:58.350877")


def test_same_seed_same_bytes(tmp_path):
    a = synth.synthesize(tmp_path / "a", images=12, seed=5, size=(96, 64))
    b = synth.synthesize(tmp_path / "b", images=12, seed=5, size=(96, 64))
    synth.synthesize(tmp_path / "c", images=12, seed=6, size=(96, 64))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12 + 2 + 3
    for rel in files:
        data_a = (tmp_path / "a" / rel).read_bytes().replace(a.out.encode(), b"OUT")
        data_b = (tmp_path / "b" / rel).read_bytes().replace(b.out.encode(), b"OUT")
        assert data_a == data_b, rel
    names_a = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    names_c = sorted(p.name for p in (tmp_path / "c" / "images").iterdir())
    assert [(tmp_path / "a" / "images" / n).read_bytes() for n in names_a] != [
        (tmp_path / "c" / "images" / n).read_bytes() for n in names_c
    ]


def test_bad_input():
    with pytest.raises(ConfigError, match="images must be at least 1"):
        synth.plan_videos(0, seed=0)
    with pytest.raises(ConfigError, match="640x360"):
        synth.parse_size("640by360")
    assert synth.parse_size("320X180") == (320, 180)
    with pytest.raises(ConfigError, match="at least 32x32"):
        synth.synthesize("/nonexistent-never-written", images=2, size=(16, 16))


def test_synthesize_to_s3(make_bucket):
    bucket = make_bucket()
    summary = synth.synthesize(f"s3://{bucket}/demo", images=6, seed=1, size=(64, 48))
    listed = storage.list_files(f"s3://{bucket}/demo")
    assert sum(x.endswith(".jpg") for x in listed) == 6
    assert f"s3://{bucket}/demo/rejected.txt" in listed and f"s3://{bucket}/demo/synth.json" in listed
    records = [r for m in summary.manifests for r in groundtruth.read_manifest(m)]
    assert len(records) == 6 and all(r.source_ref.startswith(f"s3://{bucket}/demo/images/") for r in records)
    with Image.open(io.BytesIO(storage.read_bytes(records[0].source_ref))) as image:
        assert image.size == (64, 48)


def test_cli_synth(tmp_path):
    import typer
    from typer.testing import CliRunner

    from detforge.cli import synth as cli_synth

    app = typer.Typer()
    cli_synth.register(app)
    app.command("noop")(lambda: None)  # keep typer in multi-command mode
    result = CliRunner().invoke(
        app, ["synth", "--out", str(tmp_path / "d"), "--images", "8", "--seed", "2", "--size", "96x64"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 8 images (96x64, 2 videos)" in result.output
    assert len(list((tmp_path / "d" / "images").iterdir())) == 8


def test_prepare_takes_the_dataset_unchanged(small, tmp_path):
    """`detforge prepare` with the blog's options: rejected ids gone, classes from the colour field."""
    import typer
    from typer.testing import CliRunner

    from detforge.cli import prepare as cli_prepare

    app = typer.Typer()
    cli_prepare.register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "prepared"
    args = [
        "prepare",
        *small.manifests,
        "--discard",
        small.rejected_file,
        "--class-from",
        "{color} {object}",
        "--validation-fraction",
        "0.2",
        "--gap",
        "0",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    classes = json.loads((out / "classes.json").read_text())
    assert sorted(classes) == ["blue box", "yellow box"]
    records = [
        r for name in ("train.manifest", "validation.manifest") for r in groundtruth.read_manifest(out / name)
    ]
    expected = {}
    for path in small.manifests:
        for r in groundtruth.read_manifest(path):
            if r.image_id not in small.rejected:
                expected[r.image_id] = [f"{r.fields['color']} box"] * len(r.boxes)
    assert sorted(r.image_id for r in records) == sorted(expected)
    for r in records:
        assert [classes[int(c)] for c in r.class_ids] == expected[r.image_id]
        assert r.class_names == expected[r.image_id]


def test_default_split_leaves_no_training_frame_next_to_a_validation_frame(tmp_path):
    """The leak check: under the default split no validation frame has a training frame within the gap."""
    from detforge.data.prepare import DEFAULT_BLOCK, FRAME_STEM, prepare

    data = synth.synthesize(tmp_path / "d", images=120, seed=4, size=(64, 48), frames_per_video=30)
    s = prepare(data.manifests, str(tmp_path / "p"), validation_fraction=0.2, seed=1)
    # 4 videos of 20-40 frames: one validation run per video, the 10 frames beside each run held out
    assert (s.group_by, s.train, s.validation, s.dropped_for_gap) == ("run", 56, 24, 40)

    def frames(name):
        found = {}
        for r in groundtruth.read_manifest(tmp_path / "p" / name):
            m = FRAME_STEM.match(r.image_id)
            found.setdefault(m.group("video"), []).append(int(m.group("frame")))
        return found

    train, validation = frames("train.manifest"), frames("validation.manifest")
    closest = min(
        abs(t - v) for video, vs in validation.items() for v in vs for t in train.get(video, [10**9])
    )
    assert closest > DEFAULT_BLOCK
    assert s.train + s.validation + s.dropped_for_gap + len(s.discarded) == 120
    # with enough videos the default takes whole videos: nothing is left out
    many = synth.synthesize(tmp_path / "m", images=120, seed=4, size=(64, 48), frames_per_video=6)
    s = prepare(many.manifests, str(tmp_path / "q"), validation_fraction=0.2, seed=1)
    assert s.group_by == "video" and s.dropped_for_gap == 0
    videos = {
        name: {
            FRAME_STEM.match(r.image_id).group("video")
            for r in groundtruth.read_manifest(tmp_path / "q" / name)
        }
        for name in ("train.manifest", "validation.manifest")
    }
    assert videos["validation.manifest"] and not videos["train.manifest"] & videos["validation.manifest"]
