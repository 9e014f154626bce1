"""prepare's split, image identity and accounting on project-written photos, frames and exports (issue 27).

Fixtures are tiny JPEGs written here: still photos of unrelated scenes (smooth random colour fields, one
seed each: their difference hashes are 17 bits or more apart in name order) and frames of one clip (one
scene, a small bright bar moving one pixel per frame: 0 to 4 bits apart), labeled as LabelImg writes VOC
(an XML beside each photo) or as a Ground Truth manifest.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detforge.cli import main
from detforge.data import groundtruth
from detforge.data.identity import DuplicateRule, numbered, original_stem, video_frame
from detforge.data.prepare import prepare, split_of_name
from detforge.data.stats import format_stats, manifest_stats
from detforge.errors import ConfigError

W, H = 64, 48


def photo_jpeg(seed: int) -> bytes:
    """A still photo: a smooth random colour field of its own (a different scene per seed)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 5, 3)).astype(np.uint8))
    buffer = io.BytesIO()
    small.resize((W, H), Image.BILINEAR).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def frame_jpeg(index: int, scene: int = 1000) -> bytes:
    """Frame ``index`` of one clip: one scene, a bright bar moved by one pixel per frame."""
    rng = np.random.default_rng(scene)
    small = Image.fromarray(rng.integers(0, 256, (4, 5, 3)).astype(np.uint8))
    pixels = np.asarray(small.resize((W, H), Image.BILINEAR)).astype(np.int16)
    pixels = np.clip(pixels + index % 3, 0, 255).astype(np.uint8)
    pixels[20:28, 2 + index : 10 + index] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def labelimg(folder: Path, name: str, data: bytes, boxes=(("cat", 5, 5, 30, 30),)) -> None:
    """An image and the VOC XML LabelImg writes beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    objects = "".join(
        f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
        f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for c, x1, y1, x2, y2 in boxes
    )
    (folder / (name.rsplit(".", 1)[0] + ".xml")).write_text(
        f"<annotation><folder>{folder.name}</folder><filename>{name}</filename><path>/home/pi/{name}</path>"
        f"<size><width>{W}</width><height>{H}</height><depth>3</depth></size>{objects}</annotation>"
    )


def manifest_line(ref: str, boxes=((0, 5, 5, 20, 20),), class_map=None, job: str = "j") -> str:
    anns = [{"class_id": c, "left": x, "top": y, "width": w, "height": h} for c, x, y, w, h in boxes]
    return json.dumps(
        {
            "source-ref": ref,
            "bb": {"annotations": anns, "image_size": [{"width": W, "height": H, "depth": 3}]},
            "bb-metadata": {
                "job-name": job,
                "type": "groundtruth/object-detection",
                "class-map": class_map if class_map is not None else {"0": "cat"},
                "objects": [{"confidence": 1.0}] * len(anns),
            },
        }
    )


def written_ids(out: Path, name: str) -> list[str]:
    path = out / f"{name}.manifest"
    return [r.image_id for r in groundtruth.read_manifest(path)] if path.exists() else []


def totals_add_up(accounting: dict) -> None:
    for unit in ("images", "boxes"):
        parts = sum(
            c[unit] for section in ("written", "held_out", "skipped") for c in accounting[section].values()
        )
        assert parts == accounting["read"][unit]


def test_naming_rules():
    assert video_frame("blue_box_1_000043") == ("blue_box_1", 43)  # Ground Truth jobs from videos
    assert video_frame("clip_000007") == ("clip", 7)  # what `detforge frames` writes
    for still in (
        "IMG_2385",
        "DSC_0001",
        "DSC01234",
        "IMG_20230101_123456",
        "PXL_20240601_101530123",
        "20230101_123456",
        "P1010001",
    ):
        assert video_frame(still) is None, still
    assert numbered("IMG_2385") == ("img_", 2385) and numbered("DSC_0001") == ("dsc_", 1)
    assert original_stem("IMG_2301_jpeg_jpg.rf.2f319e949748145fb22dcb52bb325a0c") == "IMG_2301"
    assert numbered("IMG_8571_MOV-4_jpg.rf.d7b7c24c46f21df8cca7ae652464d2d1") == ("img_8571_mov-", 4)
    assert numbered("holiday") is None
    assert [
        split_of_name(n)
        for n in (
            "instances_Train.json",
            "instances_Validation.json",
            "val.json",
            "test.manifest",
            "prepared/validation.manifest",
            "job.manifest",
            "instances_default.json",
            "export/valid/_annotations.coco.json",
            "_annotations.coco.json",
        )
    ] == ["train", "validation", "validation", "test", "validation", None, None, "validation", None]


def test_numbered_still_photos_lose_nothing(tmp_path):
    """20 phone photos IMG_2385..IMG_2394 and DSC_0001..DSC_0010: split image by image, 0 dropped
    (before: 16-17 % left out "next to validation", the names read as frames of videos IMG and DSC)."""
    for i in range(10):
        labelimg(tmp_path / "photos", f"IMG_{2385 + i}.JPG", photo_jpeg(i))
        labelimg(tmp_path / "photos", f"DSC_{i + 1:04d}.jpg", photo_jpeg(100 + i))
    s = prepare([str(tmp_path / "photos")], str(tmp_path / "out"), validation_fraction=0.2, seed=1)
    assert (s.group_by, s.stills, s.videos) == ("none", 20, {})
    assert (s.train, s.validation, s.dropped_for_gap) == (16, 4, 0)
    assert s.accounting["held_out"] == {} and s.accounting["skipped"] == {}
    assert s.accounting["read"] == {"images": 20, "boxes": 20}
    assert s.warnings == []


def test_frames_of_a_clip_kept_together_by_content(tmp_path):
    """A 30-frame clip named clip_0001.. (4 digits: not the frames command's naming, so found by content)
    beside 10 unrelated photos and a 3-shot burst: the clip gets one validation run and 10 frames held
    out at its one boundary, the burst goes whole to one side, photos image by image."""
    folder = tmp_path / "shoot"
    for i in range(30):
        labelimg(folder, f"clip_{i + 1:04d}.jpg", frame_jpeg(i))
    for i in range(10):
        labelimg(folder, f"IMG_{100 + i}.jpg", photo_jpeg(i))
    for i in range(3):  # IMG_200..202: one scene shot three times
        labelimg(folder, f"IMG_{200 + i}.jpg", frame_jpeg(i, scene=2000))
    s = prepare([str(folder)], str(tmp_path / "out"), validation_fraction=0.2, seed=0)
    clip, burst = str(folder / "clip_0001.jpg"), str(folder / "IMG_200.jpg")
    assert s.videos == {f"near copies {clip}": 30, f"near copies {burst}": 3} and s.stills == 10
    assert s.group_by == "run" and s.gap == 10
    # the clip: round(30 x 0.2) = 6 validation frames in one run at an end, 10 training frames held out
    # next to it; photos and the burst: 13 images, round(13 x 0.2) = 3 drawn whole
    validation = written_ids(tmp_path / "out", "validation")
    train = written_ids(tmp_path / "out", "train")
    clip_val = sorted(int(i[5:]) for i in validation if i.startswith("clip_"))
    clip_train = sorted(int(i[5:]) for i in train if i.startswith("clip_"))
    assert clip_val in ([1, 2, 3, 4, 5, 6], [25, 26, 27, 28, 29, 30])
    assert len(clip_train) == 14 and s.dropped_for_gap == 10
    assert (
        min(abs(t - v) for t in clip_train for v in clip_val)
        == 11
        == s.nearest_train_to_validation[f"near copies {clip}"]
    )
    bursts = {
        name: {i for i in ids if i.startswith("IMG_20")} for name, ids in (("t", train), ("v", validation))
    }
    assert sorted(bursts["t"] | bursts["v"]) == ["IMG_200", "IMG_201", "IMG_202"]
    assert not (bursts["t"] and bursts["v"])  # never split
    assert (s.train, s.validation) == (24, 9)
    assert s.accounting["held_out"] == {"near a validation frame": {"images": 10, "boxes": 10}}
    assert any("10 training frames held out" in w and "--gap 0 keeps them" in w for w in s.warnings)
    totals_add_up(s.accounting)
    # --gap 0 keeps them (in training); --no-content-checks: names alone, every image a still
    s = prepare([str(folder)], str(tmp_path / "g0"), validation_fraction=0.2, seed=0, gap=0)
    assert (s.train, s.validation, s.dropped_for_gap) == (34, 9, 0)
    s = prepare([str(folder)], str(tmp_path / "nc"), validation_fraction=0.2, seed=0, content=False)
    assert (s.group_by, s.stills, s.train, s.validation, s.dropped_for_gap) == ("none", 43, 34, 9, 0)


def test_two_phones_same_names_kept_and_same_bytes_reported(tmp_path):
    """phoneA/IMG_2385.JPG and phoneB/IMG_2385.JPG are two photos (before: "duplicate IMG_2385: kept 1,
    dropped 2"); phoneB/IMG_2390.JPG is a copy of phoneA/IMG_2386.JPG: held out as same content."""
    for i in range(4):
        labelimg(tmp_path / "phoneA", f"IMG_{2385 + i}.JPG", photo_jpeg(i))
        labelimg(tmp_path / "phoneB", f"IMG_{2385 + i}.JPG", photo_jpeg(50 + i))
    labelimg(
        tmp_path / "phoneB",
        "IMG_2390.JPG",
        photo_jpeg(1),
        boxes=(("cat", 1, 1, 9, 9), ("dog", 10, 10, 20, 20)),
    )
    a, b = tmp_path / "phoneA", tmp_path / "phoneB"
    s = prepare([str(a), str(b)], str(tmp_path / "out"), validation_fraction=0.0)
    assert s.train == 8 and s.stills == 8
    assert s.duplicates == [
        f"{b / 'IMG_2390.JPG'} ({b}:5) has the same bytes as {a / 'IMG_2386.JPG'} ({a}:2); kept the first"
    ]
    assert s.accounting["held_out"] == {"same content as another image": {"images": 1, "boxes": 2}}
    assert s.accounting["read"] == {"images": 9, "boxes": 10}
    assert sorted(written_ids(tmp_path / "out", "train")) == sorted(
        ["IMG_2385", "IMG_2386", "IMG_2387", "IMG_2388"] * 2
    )
    assert s.classes == ["cat"]  # the dog box was only on the held-out copy
    # the same folder given twice: every image is the same image listed again
    s = prepare([str(a), str(a)], str(tmp_path / "twice"), validation_fraction=0.0)
    assert s.train == 4 and s.accounting["held_out"] == {"same image listed again": {"images": 4, "boxes": 4}}
    assert s.duplicates[0] == f"{a / 'IMG_2385.JPG'}: labeled again at {a}:1; kept {a}:1"
    # stats counts them with the same rule
    st = manifest_stats([str(a), str(b)])
    assert st["images"] == 9 and st["distinct_images"] == 8
    assert st["duplicates"] == {"same image": 0, "same content": 1}
    assert (
        "  duplicates (as prepare counts them): 0 the same image listed again, 1 the same bytes under "
        "another path; 8 distinct images"
    ) in format_stats(st)
    st = manifest_stats([str(a), str(a)])
    assert (st["images"], st["distinct_images"], st["duplicates"]) == (
        8,
        4,
        {"same image": 4, "same content": 0},
    )
    rule = DuplicateRule()
    assert rule.check(str(a / "IMG_2385.JPG"), "x:1") is None
    assert rule.check(str(a / ".." / "phoneA" / "IMG_2385.JPG"), "y:1") == ("same image", "x:1")


def test_every_box_of_a_class_bad_is_a_counted_skip(tmp_path):
    """Before: KeyError: 'dog' and a traceback; now the three bad dog boxes are counted and never written."""
    bad_dog = (1, 60, 40, 20, 20)  # outside the 64x48 image
    lines = [
        manifest_line(
            f"s3://b/a_{i}.jpg", boxes=((0, 5, 5, 10, 10), bad_dog), class_map={"0": "cat", "1": "dog"}
        )
        for i in range(3)
    ]
    path = tmp_path / "job.manifest"
    path.write_text("\n".join(lines) + "\n")
    s = prepare([str(path)], str(tmp_path / "out"), on_error="skip", validation_fraction=0.0)
    assert s.classes == ["cat"] and s.boxes_per_class == {"cat": 3}
    assert s.accounting["skipped"] == {"bad box": {"images": 0, "boxes": 3}}
    assert s.accounting["read"] == {"images": 3, "boxes": 6}
    written = [json.loads(x) for x in (tmp_path / "out" / "train.manifest").read_text().splitlines()]
    assert [len(x["bb"]["annotations"]) for x in written] == [1, 1, 1]
    assert [len(x["bb-metadata"]["objects"]) for x in written] == [1, 1, 1]
    assert all(x["bb-metadata"]["class-map"] == {"0": "cat"} for x in written)
    assert main(["prepare", str(path), "--out", str(tmp_path / "cli"), "--on-error", "skip"]) == 0
    # a bad box among good ones of its class: left out of the written line too (before: written as read,
    # while the summary counted it as skipped)
    path.write_text(manifest_line("s3://b/c.jpg", boxes=((0, 5, 5, 10, 10), (0, 60, 40, 20, 20))) + "\n")
    s = prepare([str(path)], str(tmp_path / "mixed"), on_error="skip", validation_fraction=0.0)
    written = json.loads((tmp_path / "mixed" / "train.manifest").read_text())
    assert written["bb"]["annotations"] == [{"class_id": 0, "left": 5, "top": 5, "width": 10, "height": 10}]
    assert s.boxes_per_class == {"cat": 1} and s.accounting["skipped"] == {
        "bad box": {"images": 0, "boxes": 1}
    }


def test_nothing_usable_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.manifest"
    empty.write_text("\n")
    assert main(["prepare", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: nothing to prepare: no labeled image in {empty}")
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    bad = tmp_path / "bad.manifest"
    bad.write_text("{not json\n" + manifest_line("s3://b/x.jpg", class_map={}) + "\n")
    assert main(["prepare", str(bad), "--out", str(tmp_path / "o"), "--on-error", "skip"]) == 2
    err = capsys.readouterr().err
    assert f"none of the 2 lines/images of {bad} is usable (bad line or image 2)" in err
    assert not (tmp_path / "o").exists()


def test_three_images_empty_validation_is_said(tmp_path, capsys):
    path = tmp_path / "three.manifest"
    path.write_text("".join(manifest_line(f"s3://b/p{i}.jpg") + "\n" for i in range(3)))
    assert main(["prepare", str(path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert (
        "warning: validation is empty: 3 images x --validation-fraction 0.1 rounds to no image; give a "
        "larger fraction or more images"
    ) in out
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (s["train"], s["validation"]) == (3, 0) and s["warnings"][0].startswith("validation is empty")


def _coco(path: Path, names: list[str]) -> None:
    """A CVAT COCO export file of the images ``names`` (64x48 JPEGs written beside it), one cat box each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (path.parent / name).write_bytes(photo_jpeg(hash(name) % 1000 + i))
    path.write_text(
        json.dumps(
            {
                "images": [
                    {"id": i + 1, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)
                ],
                "categories": [{"id": 1, "name": "cat", "supercategory": ""}],
                "annotations": [
                    {
                        "id": i + 1,
                        "image_id": i + 1,
                        "category_id": 1,
                        "bbox": [2, 2, 10, 10],
                        "area": 100,
                        "iscrowd": 0,
                    }
                    for i in range(len(names))
                ],
            }
        )
    )


def test_keep_splits_from_file_names_and_input_syntax(tmp_path, capsys):
    train, val = tmp_path / "ann" / "instances_Train.json", tmp_path / "ann" / "instances_Validation.json"
    _coco(train, [f"t{i}.jpg" for i in range(7)])
    _coco(val, ["v0.jpg", "v1.jpg"])
    s = prepare([str(train), str(val)], str(tmp_path / "o"), keep_splits=True)
    # before: validation = 7 images of Train + 1 of Validation (a random split of both)
    assert (s.train, s.validation, s.kept_splits) == (7, 2, True)
    assert sorted(written_ids(tmp_path / "o", "validation")) == ["v0", "v1"]
    # INPUT=SPLIT for files whose names say nothing
    a, b = tmp_path / "a.manifest", tmp_path / "b.manifest"
    a.write_text("".join(manifest_line(f"s3://b/a{i}.jpg") + "\n" for i in range(4)))
    b.write_text("".join(manifest_line(f"s3://b/b{i}.jpg") + "\n" for i in range(2)))
    s = prepare([str(a), f"{b}=val"], str(tmp_path / "p"), keep_splits=True)
    assert (s.train, s.validation, s.kept_splits, s.split_given) == (4, 2, True, {str(b): "validation"})
    assert any("4 images carry no split" in w for w in s.warnings)
    s = prepare(
        [str(a), str(b)], str(tmp_path / "q"), keep_splits=True, split_of={str(a): "train", str(b): "test"}
    )
    assert (s.train, s.validation, s.test) == (4, 0, 2)
    assert s.warnings == ["validation is empty: the inputs' splits name no validation image"]
    # no input says a split: an error naming them, never "(kept splits)"
    with pytest.raises(ConfigError, match=f"--keep-splits: no input says .*: {a}, {b}"):
        prepare([str(a), str(b)], str(tmp_path / "r"), keep_splits=True)
    assert main(["prepare", str(a), str(b), "--keep-splits", "--out", str(tmp_path / "r")]) == 2
    assert "INPUT=train|validation|test" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="--split-of names nope"):
        prepare([str(a)], str(tmp_path / "r"), split_of={"nope": "train"})


def test_cli_prints_the_accounting_table(tmp_path, capsys):
    """The printed table adds up and equals summary.json; per-class counts are what was written."""
    lines = [
        manifest_line(
            f"s3://b/v_{i:06d}.jpg",
            class_map={"0": "cat", "1": "dog"},
            boxes=((0, 5, 5, 10, 10),) + (((1, 20, 20, 10, 10),) if i % 4 == 0 else ()),
        )
        for i in range(40)
    ]
    lines[5] = manifest_line("s3://b/v_000005.jpg", boxes=((0, 60, 40, 20, 20),))  # one bad box
    lines[6] = "{broken"
    path = tmp_path / "job.manifest"
    path.write_text("\n".join(lines + [lines[0]]) + "\n")  # v_000000 listed twice
    assert (
        main(
            [
                "prepare",
                str(path),
                "--out",
                str(tmp_path / "o"),
                "--on-error",
                "skip",
                "--discard",
                "v_000001,v_000002",
                "--validation-fraction",
                "0.25",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    acc = s["accounting"]
    assert acc["read"] == {"images": 41, "boxes": 51}
    assert acc["skipped"] == {
        "bad line or image": {"images": 1, "boxes": 0},
        "bad box": {"images": 0, "boxes": 1},
        "discarded (--discard)": {"images": 2, "boxes": 2},
    }
    assert acc["held_out"] == {
        "same image listed again": {"images": 1, "boxes": 2},
        "near a validation frame": {"images": 10, "boxes": 12},
    }
    # one video v of 37 kept frames: a run of round(37 x 0.25) = 9 at its end (v_000031..39: 9 cats,
    # dogs on 32 and 36), the 10 frames before it held out (21..30: 10 cats, dogs on 24 and 28)
    assert acc["written"] == {"train": {"images": 18, "boxes": 23}, "validation": {"images": 9, "boxes": 11}}
    assert written_ids(tmp_path / "o", "validation") == [f"v_{i:06d}" for i in range(31, 40)]
    totals_add_up(acc)
    table = {
        line[:36].strip(): line[36:].split()
        for line in out.splitlines()
        if line.startswith(("read ", "written", "held out", "skipped:"))
    }
    assert table["read"] == ["41", "51"] and table["written to train"] == ["18", "23"]
    assert table["held out: near a validation frame"] == ["10", "12"]
    assert table["held out: same image listed again"] == ["1", "2"]
    assert table["written + held out + skipped"] == ["41", "51"]
    written = {"cat": 0, "dog": 0}
    for name in ("train", "validation"):
        for r in groundtruth.read_manifest(tmp_path / "o" / f"{name}.manifest"):
            for c in r.class_names:
                written[c] += 1
    assert s["boxes_per_class"] == written == {"cat": 26, "dog": 8}
    assert "boxes per class written: 0 cat: 26, 1 dog: 8" in out


def test_aquarium_default_split_keeps_burst_shots_together(shared_data, tmp_path):
    """Roboflow's Aquarium photos (IMG_2274_jpeg_jpg.rf.<hash>): 13 runs of near copies (30 photos, burst
    shots of one tank) go whole to one side, the 545 other photos image by image, nothing held out."""
    s = prepare([str(shared_data / "aquarium" / "data.yaml")], str(tmp_path / "o"), on_error="skip")
    assert (s.group_by, len(s.videos), sum(s.videos.values()), s.stills) == ("video", 13, 30, 545)
    assert (s.train, s.validation, s.dropped_for_gap) == (518, 57, 0)
    assert s.accounting["read"] == {"images": 575, "boxes": 4233} and s.accounting["held_out"] == {}
    side = {}
    for name in ("train", "validation"):
        for r in groundtruth.read_manifest(tmp_path / "o" / f"{name}.manifest"):
            side[str(Path(r.source_ref).name)] = name
    for key, _ in s.videos.items():
        first = Path(key.removeprefix("near copies ")).name
        prefix, number = numbered(Path(first).stem)
        members = {
            n
            for n in side
            if numbered(Path(n).stem)[0] == prefix
            and number <= numbered(Path(n).stem)[1] < number + s.videos[key]
        }
        assert len({side[n] for n in members}) == 1, key


def test_skips_counted_by_reason(tmp_path):
    """A missing local image and a class outside --classes are skipped with their own reasons."""
    (tmp_path / "a.jpg").write_bytes(photo_jpeg(1))
    (tmp_path / "c.jpg").write_bytes(photo_jpeg(2))
    path = tmp_path / "job.manifest"
    path.write_text(
        manifest_line("a.jpg")
        + "\n"
        + manifest_line("b.jpg")
        + "\n"
        + manifest_line("c.jpg", class_map={"0": "dog"})
        + "\n"
    )
    s = prepare([str(path)], str(tmp_path / "o"), classes=["cat"], on_error="skip", validation_fraction=0.0)
    assert s.accounting["skipped"] == {
        "image missing or unreadable": {"images": 1, "boxes": 1},
        "class not in --classes": {"images": 1, "boxes": 1},
    }
    assert (s.train, s.accounting["read"]) == (1, {"images": 3, "boxes": 3})
    assert "job.manifest:2, field 'source-ref'" in s.skipped[0]
