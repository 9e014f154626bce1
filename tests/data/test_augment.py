"""Offline augmentation: exact boxes and pixels per op, lossless JPEG, resume after a crash, refusals, S3."""

from __future__ import annotations

import io
import os

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from detforge import boxes as box_ops
from detforge.data import augment as aug
from detforge.data.groundtruth import make_record, parse_record, read_manifest, record_to_json
from detforge.data.output import OutputExistsError
from detforge.errors import ConfigError, ManifestError

REAL_LINE_BOX = (213, 443, 688, 632)  # ltwh of blue_box_1_000133 in blue-box-large-job-public
# Hand-computed ltwh of that box in each op's image (1920x1080 frame; 90° turns give 1080x1920).
REAL_EXPECTED = {
    "xflip": ((1019, 443, 688, 632), (1920, 1080)),
    "yflip": ((213, 5, 688, 632), (1920, 1080)),
    "cw": ((5, 213, 632, 688), (1080, 1920)),
    "ccw": ((443, 1019, 632, 688), (1080, 1920)),
    "rot180": ((1019, 5, 688, 632), (1920, 1080)),
}
# The same turn on a numpy H x W x C array.
NUMPY_OP = {
    "xflip": lambda a: a[:, ::-1],
    "yflip": lambda a: a[::-1],
    "cw": lambda a: np.rot90(a, -1),
    "ccw": lambda a: np.rot90(a, 1),
    "rot180": lambda a: a[::-1, ::-1],
}


def _decode(data_or_path) -> np.ndarray:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with Image.open(src) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _crop(array: np.ndarray, ltwh) -> np.ndarray:
    left, top, w, h = ltwh
    return array[top : top + h, left : left + w]


def _scene(width: int, height: int, box_ltwh, seed: int = 0) -> np.ndarray:
    """A smooth gradient with a red rectangle and a small blue mark in its top-left corner (shows turns)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack(
        [xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), np.full_like(xx, 90)], axis=2
    ).astype(np.uint8)
    left, top, w, h = box_ltwh
    image[top : top + h, left : left + w] = (220, 30, 30)
    image[top : top + h // 3, left : left + w // 3] = (20, 40, 230)
    image[top + h // 2, left + w // 2] = rng.integers(0, 255, 3)
    return image


def _write_scene(
    folder,
    name: str,
    width: int,
    height: int,
    box_ltwh,
    *,
    fmt: str = "JPEG",
    subsampling: int = 0,
    seed: int = 0,
) -> str:
    path = os.path.join(folder, name)
    image = Image.fromarray(_scene(width, height, box_ltwh, seed))
    image.save(path, format=fmt, **({"quality": 90, "subsampling": subsampling} if fmt == "JPEG" else {}))
    return path


def _line(source_ref: str, width: int, height: int, boxes_ltwh, **metadata) -> dict:
    record = make_record(
        source_ref,
        width=width,
        height=height,
        boxes_xyxy=box_ops.ltwh_to_xyxy(boxes_ltwh),
        class_ids=[0] * len(boxes_ltwh),
        class_map={0: "storage box"},
        job_name="labeling-job/test",
        creation_date="2019-05-21T22:21:52.381549",
        metadata={"color": "blue", "object": "box", **metadata},
    )
    return record_to_json(record)


def _write_manifest(path, lines) -> str:
    with open(path, "wb") as handle:
        for line in lines:
            handle.write(orjson.dumps(line) + b"\n")
    return str(path)


def _lines(path) -> list[dict]:
    return [orjson.loads(raw) for raw in open(path, "rb") if raw.strip()]


def _ann(line: dict) -> tuple:
    a = line["bb"]["annotations"][0]
    return (a["left"], a["top"], a["width"], a["height"])


def _size(line: dict) -> tuple:
    s = line["bb"]["image_size"][0]
    return (s["width"], s["height"])


# ---------------------------------------------------------------- the real frame


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, shared_data):
    frame = shared_data / "frames" / "blue_box_1_000133.jpg"
    manifest_path = shared_data / "groundtruth" / "blue-box-large-job-public.output.manifest"
    line = next(orjson.loads(raw) for raw in open(manifest_path, "rb") if b"blue_box_1_000133" in raw)
    assert _ann(line) == REAL_LINE_BOX
    line["source-ref"] = str(frame)
    folder = tmp_path_factory.mktemp("real")
    manifest = _write_manifest(folder / "train.manifest", [line])
    result = aug.augment(manifest, out_dir=folder / "out", ops=list(REAL_EXPECTED))
    return frame, line, folder / "out", result


@pytest.mark.parametrize("op", list(REAL_EXPECTED))
def test_real_frame_box_size_and_pixels(real_run, op):
    frame, original_line, out, _ = real_run
    (line,) = _lines(out / f"{op}.manifest")
    expected_box, expected_size = REAL_EXPECTED[op]
    assert _ann(line) == expected_box
    assert _size(line) == expected_size
    assert line["source-ref"] == str(out / "images" / f"blue_box_1_000133{aug.OPS[op].suffix}.jpg")
    assert line[aug.PROVENANCE_KEY] == {"op": op, "from": str(frame)}
    for key in ("color", "object", "bb-metadata"):
        assert line[key] == original_line[key]
    new = _decode(line["source-ref"])
    assert (new.shape[1], new.shape[0]) == expected_size
    region_new = _crop(new, expected_box)
    region_old = NUMPY_OP[op](_crop(_decode(str(frame)), REAL_LINE_BOX))
    assert region_new.shape == region_old.shape
    assert np.abs(region_new.mean(axis=(0, 1)) - region_old.mean(axis=(0, 1))).max() < 0.5
    assert _psnr(region_new, region_old) > 38


def test_real_frame_lossless_only_where_mcu_allows(real_run):
    # 1920x1080 4:2:0 has 16x16 MCUs: 1920 is a multiple, 1080 is not, so only xflip is lossless.
    _, _, _, result = real_run
    assert (result.written, result.lossless, result.reencoded, result.skipped) == (5, 1, 4, 0)
    _, _, out, _ = real_run
    (combined_first, *copies) = _lines(out / "augmented.manifest")
    assert [c[aug.PROVENANCE_KEY]["op"] for c in copies] == list(REAL_EXPECTED)
    assert _ann(combined_first) == REAL_LINE_BOX


# ---------------------------------------------------------------- synthetic images, exact pixels


@pytest.mark.parametrize("op", list(aug.OPS))
def test_synthetic_png_pixels_inside_box_are_the_turned_box(tmp_path, op):
    box = (7, 5, 21, 13)
    path = _write_scene(tmp_path, "scene.png", 50, 30, box, fmt="PNG")
    manifest = _write_manifest(tmp_path / "train.manifest", [_line(path, 50, 30, [box])])
    result = aug.augment(manifest, out_dir=tmp_path / "out", ops=[op])
    assert (result.written, result.lossless, result.reencoded) == (1, 0, 1)
    (line,) = _lines(tmp_path / "out" / f"{op}.manifest")
    new = _decode(line["source-ref"])
    original = _decode(path)
    assert np.array_equal(new, NUMPY_OP[op](original))
    assert np.array_equal(_crop(new, _ann(line)), NUMPY_OP[op](_crop(original, box)))
    expected = {
        "xflip": (22, 5, 21, 13),
        "yflip": (7, 12, 21, 13),
        "cw": (12, 7, 13, 21),
        "ccw": (5, 22, 13, 21),
        "rot180": (22, 12, 21, 13),
    }[op]
    assert _ann(line) == expected
    assert _size(line) == ((30, 50) if aug.OPS[op].swaps_size else (50, 30))


@pytest.mark.parametrize("subsampling", [0, 2])
@pytest.mark.parametrize("op", list(aug.OPS))
def test_jpeg_lossless_when_mcu_aligned(tmp_path, op, subsampling):
    box = (16, 8, 24, 16)
    path = _write_scene(tmp_path, "a.jpg", 64, 48, box, subsampling=subsampling)
    data = open(path, "rb").read()
    assert aug.lossless_possible(data, op)
    out, lossless = aug.transform_image_bytes(data, op, suffix=".jpg")
    assert lossless
    decoded, exact = _decode(out), NUMPY_OP[op](_decode(data))
    assert decoded.shape == exact.shape
    # DCT-domain turns match the pixel turn up to IDCT/upsampling rounding.
    assert _psnr(decoded, exact) > 45
    # No generation loss: turning back gives the very same pixels as the original.
    inverse = {"xflip": "xflip", "yflip": "yflip", "cw": "ccw", "ccw": "cw", "rot180": "rot180"}[op]
    back, lossless_back = aug.transform_image_bytes(out, inverse, suffix=".jpg")
    assert lossless_back
    assert np.array_equal(_decode(back), _decode(data))


@pytest.mark.parametrize(
    ("op", "lossless"), [("xflip", False), ("yflip", True), ("cw", False), ("ccw", False), ("rot180", False)]
)
def test_jpeg_falls_back_when_not_mcu_aligned(tmp_path, op, lossless):
    # 4:2:0 (16x16 MCU): width 72 is not a multiple of 16, height 48 is.
    path = _write_scene(tmp_path, "b.jpg", 72, 48, (10, 10, 30, 20), subsampling=2)
    data = open(path, "rb").read()
    out, was_lossless = aug.transform_image_bytes(data, op, suffix=".jpg")
    assert was_lossless is lossless
    decoded = _decode(out)
    exact = NUMPY_OP[op](_decode(data))
    assert decoded.shape == exact.shape  # never trimmed
    assert _psnr(decoded, exact) > 33  # quality 95 on sharp 4:2:0 chroma edges


def test_cw_then_ccw_returns_the_original(tmp_path):
    box = (16, 8, 24, 16)
    path = _write_scene(tmp_path, "c.jpg", 64, 48, box)
    record = parse_record(_line(path, 64, 48, [box]))
    turned = aug.augment_record(record, "cw", source_ref="turned.jpg")
    back = aug.augment_record(turned, "ccw", source_ref=path)
    assert (turned.width, turned.height) == (48, 64)
    assert np.array_equal(back.boxes, record.boxes) and (back.width, back.height) == (64, 48)
    data = open(path, "rb").read()
    once, _ = aug.transform_image_bytes(data, "cw", suffix=".jpg")
    twice, _ = aug.transform_image_bytes(once, "ccw", suffix=".jpg")
    assert np.array_equal(_decode(twice), _decode(data))


@settings(max_examples=150, deadline=None)
@given(
    width=st.integers(1, 4000), height=st.integers(1, 4000), data=st.data(), op=st.sampled_from(list(aug.OPS))
)
def test_property_boxes_stay_inside_and_keep_their_size(width, height, data, op):
    n = data.draw(st.integers(0, 6))
    ltwh = []
    for _ in range(n):
        w = data.draw(st.integers(1, width))
        h = data.draw(st.integers(1, height))
        ltwh.append((data.draw(st.integers(0, width - w)), data.draw(st.integers(0, height - h)), w, h))
    ids = list(range(n))
    record = make_record(
        "x.jpg",
        width=width,
        height=height,
        boxes_xyxy=box_ops.ltwh_to_xyxy(ltwh),
        class_ids=ids,
        class_map={i: f"c{i}" for i in ids},
    )
    new = aug.augment_record(record, op, source_ref="y.jpg")
    swapped = aug.OPS[op].swaps_size
    assert (new.width, new.height) == ((height, width) if swapped else (width, height))
    assert box_ops.inside_image_xyxy(new.boxes, width=new.width, height=new.height).all()
    sizes = box_ops.xyxy_to_ltwh(new.boxes)[:, 2:]
    assert np.array_equal(
        sizes,
        np.array(ltwh, dtype=float).reshape(-1, 4)[:, 2:][:, ::-1]
        if swapped
        else np.array(ltwh, dtype=float).reshape(-1, 4)[:, 2:],
    )
    assert np.array_equal(new.class_ids, np.array(ids, dtype=np.int64))
    # The written line parses back to the same boxes (integer pixels stay integers).
    again = parse_record(record_to_json(new))
    assert np.array_equal(again.boxes, new.boxes) and np.array_equal(again.class_ids, new.class_ids)


# ---------------------------------------------------------------- runs: resume, refusals, refs, workers, S3


def _dataset(folder, count: int = 5, name: str = "train.manifest") -> str:
    os.makedirs(folder / "frames", exist_ok=True)
    lines = []
    for i in range(count):
        box = (4 + i, 6, 20, 12 + i)
        path = _write_scene(folder / "frames", f"img_{i:03d}.jpg", 64 if i % 2 else 70, 48, box, seed=i)
        lines.append(_line(f"frames/img_{i:03d}.jpg", 64 if i % 2 else 70, 48, [box]))
        assert os.path.exists(path)
    return _write_manifest(folder / name, lines)


def _tree(out) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            data = open(path, "rb").read()
            files[os.path.relpath(path, out)] = data.replace(str(out).encode(), b"OUT")
    return files


def test_interrupted_run_resumes_to_the_same_output(tmp_path, monkeypatch):
    manifest = _dataset(tmp_path)
    clean = aug.augment(manifest, out_dir=tmp_path / "clean")
    assert (clean.images, clean.written, clean.skipped) == (5, 20, 0)

    import threading

    real_write = aug.storage.write_bytes
    calls = []
    lock = threading.Lock()

    def crash_after_seven(uri, data):
        with lock:  # writes of one image run in threads
            if len(calls) == 7:
                raise KeyboardInterrupt("simulated kill")
            calls.append(uri)
        real_write(uri, data)

    monkeypatch.setattr(aug.storage, "write_bytes", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        aug.augment(manifest, out_dir=tmp_path / "crashed")
    monkeypatch.setattr(aug.storage, "write_bytes", real_write)
    assert not (tmp_path / "crashed").exists()  # nothing half-written where the output goes
    partial = tmp_path / ".crashed.partial"
    assert sorted(os.listdir(partial)) == ["images"]  # no manifest, no temporary file
    assert sorted(os.listdir(partial / "images")) == sorted(os.path.basename(c) for c in calls)
    # A temporary file that a hard kill would leave behind is cleaned up by the next run.
    (partial / "images" / ".detforge-abc.part").write_bytes(b"half")

    resumed = aug.augment(manifest, out_dir=tmp_path / "crashed")
    assert (resumed.images, resumed.written, resumed.skipped) == (5, 13, 7)
    assert _tree(tmp_path / "crashed") == _tree(tmp_path / "clean") and not partial.exists()
    # a complete output is not mixed into: refused, or replaced whole with overwrite
    with pytest.raises(
        OutputExistsError,
        match=r"crashed: the output folder is not empty \(holds "
        r"augmented.manifest, ccw.manifest, cw.manifest and 3 "
        r"more\)",
    ):
        aug.augment(manifest, out_dir=tmp_path / "crashed")
    again = aug.augment(manifest, out_dir=tmp_path / "crashed", overwrite=True)
    assert (again.written, again.skipped) == (20, 0)
    assert _tree(tmp_path / "crashed") == _tree(tmp_path / "clean")


def test_existing_file_of_the_wrong_size_is_rewritten(tmp_path):
    manifest = _dataset(tmp_path, count=1)
    first = aug.augment(manifest, out_dir=tmp_path / "out", ops="cw")
    target = tmp_path / "out" / "images" / "img_000-cw-rotate.jpg"
    good = target.read_bytes()
    # an interrupted run's image of the right name but the unturned size is not reused
    stale = tmp_path / ".again.partial" / "images" / "img_000-cw-rotate.jpg"
    stale.parent.mkdir(parents=True)
    Image.new("RGB", (70, 48)).save(stale)
    second = aug.augment(manifest, out_dir=tmp_path / "again", ops="cw")
    assert (first.written, second.written, second.skipped) == (1, 1, 0)
    assert (tmp_path / "again" / "images" / "img_000-cw-rotate.jpg").read_bytes() == good


def test_relative_source_refs_resolve_against_the_manifest_folder(tmp_path):
    manifest = _dataset(tmp_path, count=2)
    aug.augment(manifest, out_dir=tmp_path / "out", ops="xflip")
    lines = _lines(tmp_path / "out" / "augmented.manifest")
    assert [line["source-ref"] for line in lines] == [
        str(tmp_path / "frames" / "img_000.jpg"),
        str(tmp_path / "out" / "images" / "img_000-x-flip.jpg"),
        str(tmp_path / "frames" / "img_001.jpg"),
        str(tmp_path / "out" / "images" / "img_001-x-flip.jpg"),
    ]
    assert lines[1][aug.PROVENANCE_KEY] == {"op": "xflip", "from": "frames/img_000.jpg"}
    assert [r.image_id for r in read_manifest(tmp_path / "out" / "xflip.manifest")] == [
        "img_000-x-flip",
        "img_001-x-flip",
    ]


def test_validation_manifest_is_refused_unless_forced(tmp_path):
    manifest = _dataset(tmp_path, count=1, name="validation.manifest")
    with pytest.raises(
        ConfigError,
        match=r"validation\.manifest: refusing to augment validation data: the "
        r"manifest's name says validation \(.*--force",
    ):
        aug.augment(manifest, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert aug.augment(manifest, out_dir=tmp_path / "out", force=True).written == 4


def test_line_marked_validation_is_refused(tmp_path):
    _dataset(tmp_path, count=2)
    lines = _lines(tmp_path / "train.manifest")
    lines[1]["split"] = "validation"
    manifest = _write_manifest(tmp_path / "mixed.manifest", lines)
    with pytest.raises(ConfigError, match=r"mixed\.manifest:2: refusing .* marked \"split\": \"validation\""):
        aug.augment(manifest, out_dir=tmp_path / "out")


def test_bad_inputs_have_clear_messages(tmp_path):
    manifest = _dataset(tmp_path, count=1)
    with pytest.raises(ConfigError, match="field '--ops': unknown op\\(s\\) flip .*choose from xflip"):
        aug.augment(manifest, out_dir=tmp_path / "out", ops="flip")
    with pytest.raises(ConfigError, match="--workers"):
        aug.augment(manifest, out_dir=tmp_path / "out", workers=0)
    lines = _lines(manifest) * 2
    twice = r"twice\.manifest:2, field 'source-ref': two lines refer to images named img_000\.jpg"
    with pytest.raises(ManifestError, match=twice):
        aug.augment(_write_manifest(tmp_path / "twice.manifest", lines), out_dir=tmp_path / "out")
    wrong = _lines(manifest)
    wrong[0]["bb"]["image_size"][0]["width"] = 80
    with pytest.raises(
        ManifestError,
        match=r"wrong\.manifest:1, field 'image_size': the image "
        r".*img_000\.jpg is 70x48 but the line says 80x48",
    ):
        aug.augment(_write_manifest(tmp_path / "wrong.manifest", wrong), out_dir=tmp_path / "out2")


def test_workers_give_the_same_output(tmp_path):
    manifest = _dataset(tmp_path, count=4)
    one = aug.augment(manifest, out_dir=tmp_path / "one", ops="xflip,cw")
    two = aug.augment(manifest, out_dir=tmp_path / "two", ops="xflip,cw", workers=2)
    assert (one.written, two.written, two.lossless) == (8, 8, 4)  # the 64x48 images (8x8 MCUs)
    tree_one = {k: v.replace(b"OUT", b"") for k, v in _tree(tmp_path / "one").items()}
    tree_two = {k: v.replace(b"OUT", b"") for k, v in _tree(tmp_path / "two").items()}
    assert tree_one == tree_two


def test_s3_in_and_out(tmp_path, make_bucket):
    from detforge import storage

    bucket = make_bucket()
    _dataset(tmp_path, count=2)
    for i in range(2):
        storage.copy_file(
            tmp_path / "frames" / f"img_{i:03d}.jpg", f"s3://{bucket}/data/frames/img_{i:03d}.jpg"
        )
    storage.copy_file(tmp_path / "train.manifest", f"s3://{bucket}/data/train.manifest")
    result = aug.augment(f"s3://{bucket}/data/train.manifest", out_dir=f"s3://{bucket}/aug", ops="xflip,ccw")
    assert (result.images, result.written) == (2, 4)
    lines = [orjson.loads(raw) for _, raw in storage.iter_lines(f"s3://{bucket}/aug/augmented.manifest")]
    assert [line["source-ref"] for line in lines[:3]] == [
        f"s3://{bucket}/data/frames/img_000.jpg",
        f"s3://{bucket}/aug/images/img_000-x-flip.jpg",
        f"s3://{bucket}/aug/images/img_000-ccw-rotate.jpg",
    ]
    assert _size(lines[2]) == (48, 70)
    turned = _decode(storage.read_bytes(lines[2]["source-ref"]))
    assert turned.shape[:2] == (70, 48)
    with pytest.raises(OutputExistsError, match=rf"s3://{bucket}/aug: the output folder is not empty"):
        aug.augment(f"s3://{bucket}/data/train.manifest", out_dir=f"s3://{bucket}/aug", ops="xflip")
    again = aug.augment(
        f"s3://{bucket}/data/train.manifest", out_dir=f"s3://{bucket}/aug", ops="xflip", overwrite=True
    )
    assert (again.written, again.skipped) == (2, 0)
    assert sorted(storage.list_files(f"s3://{bucket}/aug")) == [  # the ccw copies of the first run are gone
        f"s3://{bucket}/aug/{name}"
        for name in (
            "augmented.manifest",
            "images/img_000-x-flip.jpg",
            "images/img_001-x-flip.jpg",
            "xflip.manifest",
        )
    ]


def test_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from detforge.cli import augment as cli_augment

    app = typer.Typer()
    cli_augment.register(app)
    app.command("noop")(lambda: None)  # two commands keep typer's sub-command layout
    manifest = _dataset(tmp_path, count=2)
    result = CliRunner().invoke(app, ["augment", manifest, "--out", str(tmp_path / "out"), "--ops", "xflip"])
    assert result.exit_code == 0, result.output
    assert "2 images: wrote 2 copies (1 lossless, 1 re-encoded), reused 0 already written" in result.output
    assert len(_lines(tmp_path / "out" / "augmented.manifest")) == 4


def test_hard_kill_leaves_only_complete_files_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    os.makedirs(tmp_path / "frames")
    lines = []
    for i in range(8):
        path = _write_scene(
            tmp_path / "frames", f"big_{i:02d}.png", 640, 480, (40, 30, 200, 150), fmt="PNG", seed=i
        )
        lines.append(_line(path, 640, 480, [(40, 30, 200, 150)]))
    manifest = _write_manifest(tmp_path / "train.manifest", lines)
    out = str(tmp_path / "killed")
    code = f"from detforge.data.augment import augment; augment({manifest!r}, out_dir={out!r})"
    process = subprocess.Popen([sys.executable, "-c", code])
    images = tmp_path / ".killed.partial" / "images"
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if images.is_dir() and any(not name.startswith(".") for name in os.listdir(images)):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed").exists()
    finished = [name for name in os.listdir(images) if not name.startswith(".")]
    assert 1 <= len(finished) < 32
    for name in finished:  # every image there is whole
        assert _decode(str(images / name)).shape[:2] in ((480, 640), (640, 480))
    resumed = aug.augment(manifest, out_dir=tmp_path / "killed")
    assert resumed.skipped == len(finished) and resumed.written == 32 - len(finished)
    aug.augment(manifest, out_dir=tmp_path / "clean")
    assert _tree(tmp_path / "killed") == _tree(tmp_path / "clean")


@pytest.mark.parametrize(
    ("mode", "subsampling", "width", "height"),
    [
        ("RGB", 1, 72, 48),  # 4:2:2, even: re-encoded from YUV planes, 4:2:2 turns into 4:4:0
        ("RGB", 1, 71, 45),  # 4:2:2, odd: through Pillow (4:4:4 after a 90° turn)
        ("L", 0, 70, 45),  # gray
    ],
)
@pytest.mark.parametrize("op", ["xflip", "cw"])
def test_other_jpeg_layouts_keep_size_and_pixels(tmp_path, mode, subsampling, width, height, op):
    image = Image.fromarray(_scene(width, height, (10, 10, 30, 20))).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, subsampling=subsampling)
    data = buffer.getvalue()
    out, lossless = aug.transform_image_bytes(data, op, suffix=".jpg")
    assert not lossless  # none of these sizes is a whole number of MCUs on the mirrored axis
    with Image.open(io.BytesIO(out)) as turned:
        assert turned.mode == mode
        expected = NUMPY_OP[op](np.asarray(Image.open(io.BytesIO(data))).astype(np.int16))
        assert _psnr(np.asarray(turned).astype(np.int16), expected) > 33
