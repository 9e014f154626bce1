"""detforge prepare: the real Ground Truth jobs, discards, classes, leak-aware split, S3, bad input."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from detforge import storage
from detforge.cli import main
from detforge.data import groundtruth
from detforge.data.groundtruth import read_discard
from detforge.data.prepare import FRAME_STEM, parse_group_by, prepare
from detforge.errors import ConfigError, ManifestError, StorageError

REJECTED = [
    "blue_box_1_000023",
    "blue_box_1_000152",
    "blue_box_2_000292",
    "yellow_box_2_000193",
    "yellow_box_2_000204",
    "yellow_box_2_000205",
]
JOBS = ["blue-box-large-job-public", "blue-box-small-job-public", "yellow-box-small-job-public"]


@pytest.fixture
def manifests(shared_data) -> list[str]:
    return [str(shared_data / "groundtruth" / f"{job}.output.manifest") for job in JOBS]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _line(
    ref: str, *, color: str = "blue", boxes=((0, 10, 10, 20, 20),), job: str = "j", class_map=None
) -> str:
    anns = [{"class_id": c, "left": x, "top": y, "width": w, "height": h} for c, x, y, w, h in boxes]
    return json.dumps(
        {
            "source-ref": ref,
            "color": color,
            "object": "box",
            "extra": {"keep": [1, 2]},
            "bb": {"annotations": anns, "image_size": [{"width": 100, "height": 80, "depth": 3}]},
            "bb-metadata": {
                "job-name": job,
                "class-map": class_map if class_map is not None else ({"0": "storage box"} if anns else {}),
                "objects": [{"confidence": 0.5}] * len(anns),
                "type": "groundtruth/object-detection",
            },
        }
    )


def test_real_jobs_counts_classes_discards(manifests, tmp_path):
    discard = tmp_path / "rejected.txt"
    discard.write_text("# rejected after review\n" + "\n".join(f"{i}\tblurry" for i in REJECTED) + "\n")
    s = prepare(
        manifests,
        str(tmp_path / "out"),
        discard=[str(discard)],
        class_from="{color} {object}",
        validation_fraction=0.1,
        seed=7,
    )
    assert list(s.lines.values()) == [624, 21, 32]
    assert s.jobs == {f"labeling-job/{job}": n for job, n in zip(JOBS, [624, 21, 32], strict=True)}
    # only three of the six listed ids are in these public manifests (one of them has no box)
    assert sorted(s.discarded) == ["blue_box_1_000023", "blue_box_1_000152", "blue_box_2_000292"]
    assert s.classes == ["blue box", "yellow box"]
    # the default split: one validation run per video (3 videos, too few to take whole ones), the 10
    # training frames next to each run held out: 30 of 674 (4.5 %; block:10 held out 143, 21 %)
    assert (s.group_by, s.videos) == (
        "run",
        {"video blue_box_1": 289, "video blue_box_2": 353, "video yellow_box_1": 32},
    )
    assert (s.train, s.validation, s.dropped_for_gap) == (577, 67, 30)
    assert s.accounting["read"] == {"images": 677, "boxes": 642}
    assert s.accounting["written"] == {
        "train": {"images": 577, "boxes": 546},
        "validation": {"images": 67, "boxes": 64},
    }
    assert s.accounting["held_out"] == {"near a validation frame": {"images": 30, "boxes": 30}}
    assert s.accounting["skipped"] == {"discarded (--discard)": {"images": 3, "boxes": 2}}
    # what was written, not what was read (607 blue and 33 yellow boxes in the kept lines)
    assert s.boxes_per_class == {"blue box": 587, "yellow box": 23}
    assert s.boxes_per_class_per_split == {
        "train": {"blue box": 526, "yellow box": 20},
        "validation": {"blue box": 61, "yellow box": 3},
    }
    assert s.empty_images == 38
    out = tmp_path / "out"
    assert json.loads((out / "classes.json").read_text()) == ["blue box", "yellow box"]
    assert json.loads((out / "summary.json").read_text())["train"] == s.train
    records = {
        r.image_id: r
        for name in ("train", "validation")
        for r in groundtruth.read_manifest(out / f"{name}.manifest")
    }
    assert not set(REJECTED) & set(records)
    for r in records.values():
        expected = f"{r.fields['color']} box"
        assert r.class_names == [expected] * len(r.boxes)
        assert set(r.class_map.values()) <= {expected}
    # the rare yellow class is in both parts
    val = [r for r in groundtruth.read_manifest(out / "validation.manifest")]
    assert any("yellow box" in r.class_names for r in val)


def test_nearest_training_frame_to_validation_per_video(manifests, tmp_path):
    """The leak check on the real jobs, counted from the written files: per video one validation run and
    the nearest training frame 11 frame numbers away (the gap is 10)."""
    s = prepare(manifests, str(tmp_path / "o"), class_from="{color} {object}", seed=7)
    frames: dict[str, dict[str, list[int]]] = {}
    for name in ("train", "validation"):
        for r in groundtruth.read_manifest(tmp_path / "o" / f"{name}.manifest"):
            m = FRAME_STEM.match(r.image_id)
            frames.setdefault(m.group("video"), {"train": [], "validation": []})[name].append(
                int(m.group("frame"))
            )
    nearest = {
        video: min(abs(t - v) for t in parts["train"] for v in parts["validation"])
        for video, parts in frames.items()
    }
    assert nearest == {"blue_box_1": 11, "blue_box_2": 11, "yellow_box_1": 11}
    assert s.nearest_train_to_validation == {f"video {v}": n for v, n in nearest.items()}
    runs = {
        video: (min(p["validation"]), max(p["validation"]), len(p["validation"]))
        for video, p in frames.items()
    }
    # one contiguous run per video, at an end of the video (one boundary, so 10 frames held out each)
    assert runs == {"blue_box_1": (284, 312, 29), "blue_box_2": (18, 52, 35), "yellow_box_1": (48, 50, 3)}
    assert (s.train, s.validation, s.dropped_for_gap) == (580, 67, 30)


def test_small_job_gets_the_asked_fraction(manifests, tmp_path, capsys):
    """The 21-frame job with 0.1: before, train 3 / validation 8 / 10 dropped without a word."""
    assert main(["prepare", manifests[1], "--out", str(tmp_path / "o"), "--validation-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (s["train"], s["validation"], s["dropped_for_gap"]) == (9, 2, 10)
    assert (
        "warning: 10 training frames held out: within 10 frames of a validation frame of their video "
        "(near copies of what validation grades); --gap 0 keeps them in training"
    ) in out
    assert main(["prepare", manifests[1], "--out", str(tmp_path / "g"), "--gap", "0"]) == 0
    s = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert (s["train"], s["validation"], s["dropped_for_gap"]) == (19, 2, 0)


def test_no_block_of_neighbouring_frames_straddles_the_split(manifests, tmp_path):
    prepare(
        manifests,
        str(tmp_path / "o"),
        class_from="{color} {object}",
        validation_fraction=0.2,
        seed=3,
        group_by="block:10",
    )
    side = {}
    for name in ("train", "validation"):
        for r in groundtruth.read_manifest(tmp_path / "o" / f"{name}.manifest"):
            m = FRAME_STEM.match(r.image_id)
            side.setdefault((m.group("video"), int(m.group("frame")) // 10), set()).add(name)
    assert all(len(v) == 1 for v in side.values())
    assert {n for v in side.values() for n in v} == {"train", "validation"}
    key = parse_group_by("video")
    assert key("blue_box_1_000043") == "blue_box_1"
    assert parse_group_by("block:10")("blue_box_1_000043") == "blue_box_1#4"
    assert parse_group_by("regex:^(\\w+?)_\\d+_")("blue_box_1_000043") == "blue_box"
    with pytest.raises(ConfigError, match="block size"):
        parse_group_by("block:x")


def test_unknown_fields_kept_and_output_deterministic(manifests, tmp_path):
    a = prepare(manifests, str(tmp_path / "a"), class_from="{color} {object}", seed=5)
    b = prepare(manifests, str(tmp_path / "b"), class_from="{color} {object}", seed=5)
    assert (tmp_path / "a" / "validation.manifest").read_bytes() == (
        tmp_path / "b" / "validation.manifest"
    ).read_bytes()
    assert a.validation == b.validation
    original = {x["source-ref"]: x for m in manifests for x in _lines(m)}
    for line in _lines(tmp_path / "a" / "train.manifest"):
        before = original[line["source-ref"]]
        assert set(line) == set(before)
        assert line["bb-metadata"]["creation-date"] == before["bb-metadata"]["creation-date"]


def test_pass_through_merges_class_maps_by_name_and_duplicates(tmp_path):
    m1, m2 = tmp_path / "a.manifest", tmp_path / "b.manifest"
    m1.write_text(
        _line("s3://b/v_000001.jpg", class_map={"0": "cat"})
        + "\n"
        + _line("s3://b/v_000002.jpg", boxes=())
        + "\n"
    )
    m2.write_text(
        _line("s3://b/w_000001.jpg", class_map={"0": "ant"})
        + "\n"
        + _line("s3://b/v_000001.jpg", class_map={"0": "cat"})
        + "\n"
    )
    s = prepare([str(m1), str(m2)], str(tmp_path / "o"), validation_fraction=0.0)
    assert s.classes == ["ant", "cat"]
    assert s.duplicates == [f"s3://b/v_000001.jpg: labeled again at {m2}:2; kept {m1}:1"]
    lines = _lines(tmp_path / "o" / "train.manifest")
    ids = [x["bb"]["annotations"][0]["class_id"] if x["bb"]["annotations"] else None for x in lines]
    assert ids == [1, None, 0]
    assert [x["bb-metadata"]["class-map"] for x in lines] == [{"1": "cat"}, {}, {"0": "ant"}]
    assert lines[0]["extra"] == {"keep": [1, 2]}
    s = prepare(
        [str(m1), str(m2)],
        str(tmp_path / "p"),
        validation_fraction=0.0,
        drop_empty=True,
        classes=["cat", "ant"],
        discard=["w_000001"],
    )
    assert (s.dropped_empty, s.discarded, s.classes, s.train) == (1, ["w_000001"], ["cat", "ant"], 1)
    assert _lines(tmp_path / "p" / "train.manifest")[0]["bb"]["annotations"][0]["class_id"] == 0


def _verified(line: str, answer: str, index: str, *, attribute: str = "verify-bb") -> dict:
    obj = json.loads(line)
    obj[attribute] = index  # the index of the worker's choice in the job's own label list: no meaning alone
    obj[f"{attribute}-metadata"] = {
        "class-name": answer,
        "confidence": 0.9,
        "job-name": "labeling-job/check",
        "type": "groundtruth/label-verification",
        "human-annotated": "yes",
        "worker-feedback": [{"comment": f"{answer} box"}],
    }
    return obj


def test_verification_job_decided_by_class_name(tmp_path):
    """Approved images stay, rejected ones go, whatever the index says and the attribute is called."""
    job = tmp_path / "job1.manifest"
    job.write_text("".join(_line(f"s3://b/v_00000{i}.jpg") + "\n" for i in range(1, 5)))
    verify = tmp_path / "verify.manifest"
    lines = [
        _verified(_line("s3://b/v_000001.jpg"), "good", "0"),
        _verified(_line("s3://b/v_000002.jpg"), "bad", "1", attribute="quality-check"),
        _verified(_line("s3://b/v_000003.jpg"), "needs fixing", "2"),
    ]
    bare = _verified(_line("s3://b/v_000005.jpg"), "bad", "1")  # an answer on a line without boxes
    del bare["bb"], bare["bb-metadata"]
    verify.write_text("".join(json.dumps(o) + "\n" for o in [*lines, bare]))
    s = prepare([str(job), str(verify)], str(tmp_path / "o"), validation_fraction=0.0)
    assert s.rejected_by_verification == ["v_000002"] and s.train == 3
    assert s.verification == {
        "v_000001": "good",
        "v_000002": "bad",
        "v_000003": "needs fixing",
        "v_000005": "bad",
    }
    assert s.verification_comments["v_000002"] == ["bad box"]
    s = prepare(
        [str(job), str(verify)],
        str(tmp_path / "o"),
        validation_fraction=0.0,
        reject_labels=["bad", "needs fixing"],
        overwrite=True,
    )
    assert s.rejected_by_verification == ["v_000002", "v_000003"] and s.train == 2
    kept = {r.image_id for r in groundtruth.read_manifest(tmp_path / "o" / "train.manifest")}
    assert kept == {"v_000001", "v_000004"}


def test_bad_lines_stop_with_file_and_line_or_skip(tmp_path):
    path = tmp_path / "bad.manifest"
    path.write_text(
        _line("s3://b/v_000001.jpg")
        + "\n{not json\n"
        + _line("s3://b/v_000003.jpg", boxes=((0, 90, 10, 20, 20),))
        + "\n"
        + _line("s3://b/v_000004.jpg", boxes=((3, 1, 1, 5, 5),))
        + "\n"
    )
    out = tmp_path / "o"
    with pytest.raises(ManifestError, match=r"bad.manifest:2: not valid JSON"):
        prepare([str(path)], str(out))
    assert not out.exists()
    s = prepare([str(path)], str(out), on_error="skip", validation_fraction=0.0)
    # a bad line is passed over, a bad box is left out of its (kept) line
    assert s.train == 2 and len(s.skipped) == 2 and len(s.skipped_boxes) == 1
    assert "bad.manifest:3, field 'bb.annotations[0]': box (left=90" in s.skipped_boxes[0]
    assert (
        "bad.manifest:4, field 'bb.annotations[0].class_id': class_id 3 is not in the class map"
        in s.skipped[1]
    )


def test_template_field_missing(tmp_path):
    obj = json.loads(_line("s3://b/v_000001.jpg"))
    del obj["color"]
    path = tmp_path / "m.manifest"
    path.write_text(_line("s3://b/v_000000.jpg") + "\n" + json.dumps(obj) + "\n")
    message = r"m.manifest:2, field 'color': template field 'color' is missing"
    with pytest.raises(ManifestError, match=message):
        prepare([str(path)], str(tmp_path / "o"), class_from="{color} {object}")
    with pytest.raises(ConfigError, match="not a valid template"):
        prepare([str(path)], str(tmp_path / "o"), class_from="{color")
    with pytest.raises(ManifestError, match="'green box' is not in --classes"):
        p2 = tmp_path / "g.manifest"
        p2.write_text(_line("s3://b/x_000001.jpg", color="green") + "\n")
        prepare([str(p2)], str(tmp_path / "o"), class_from="{color} {object}", classes=["blue box"])


def test_discard_file_format(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("# comment\na_1\n\nb_2\tblurry box\nc_3  # trailing\nIMG 1234\tan id with a space\nd#4\n")
    assert read_discard(str(path)) == {
        "a_1": "",
        "b_2": "blurry box",
        "c_3": "",
        "IMG 1234": "an id with a space",
        "d#4": "",
    }
    # what review writes, prepare drops: a phone photo's stem holds a space (was read as 'IMG')
    manifest = tmp_path / "m.manifest"
    manifest.write_text("\n".join(_line(f"s3://b/{name}.jpg") for name in ("IMG 1234", "IMG 1235")) + "\n")
    from detforge.label.review import format_discard

    path.write_text(format_discard({"IMG 1234": "blurry"}))
    prepare(
        [str(manifest)], str(tmp_path / "out"), discard=[str(path)], validation_fraction=0.5, group_by="none"
    )
    kept = [
        json.loads(x)["source-ref"]
        for name in ("train", "validation")
        for x in (tmp_path / "out" / f"{name}.manifest").read_text().splitlines()
    ]
    assert kept == ["s3://b/IMG 1235.jpg"]


def test_cli_bad_input_prints_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.manifest"
    path.write_text(_line("s3://b/v_000001.jpg") + "\n[1, 2\n")
    code = main(["prepare", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {path}:2: not valid JSON")
    assert "Traceback" not in err
    assert (
        main(
            [
                "prepare",
                str(path),
                "--out",
                str(tmp_path / "o"),
                "--on-error",
                "skip",
                "--validation-fraction",
                "0",
            ]
        )
        == 0
    )
    assert "skipped: bad line or image" in capsys.readouterr().out


def test_cli_manifest_with_utf8_bom_reads_as_without(tmp_path, capsys):
    """A manifest a Windows tool saved starts with a UTF-8 BOM: prepare and stats read it as without."""
    text = "".join(_line(f"s3://b/v_{i:06d}.jpg") + "\n" for i in range(1, 4))
    results = {}
    for name, head in (("plain", b""), ("bom", codecs.BOM_UTF8)):
        path = tmp_path / name / "m.manifest"
        path.parent.mkdir()
        path.write_bytes(head + text.encode())
        out = tmp_path / name / "o"
        assert main(["prepare", str(path), "--out", str(out), "--validation-fraction", "0"]) == 0
        assert f"read 3 lines from {path} (manifest)" in capsys.readouterr().out
        assert main(["stats", str(path), "--json"]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert (stats["images"], stats["boxes"], stats.pop("per_manifest")) == (3, 3, {str(path): 3})
        results[name] = ((out / "train.manifest").read_bytes(), stats)
    assert results["bom"] == results["plain"]
    assert [x["source-ref"] for x in _lines(tmp_path / "bom" / "o" / "train.manifest")] == [
        "s3://b/v_000001.jpg",
        "s3://b/v_000002.jpg",
        "s3://b/v_000003.jpg",
    ]
    # a BOM anywhere but at the start of the file is still a bad line, named the same by both commands
    path = tmp_path / "late.manifest"
    path.write_bytes(text.encode() + codecs.BOM_UTF8 + text.encode())
    for args in (["prepare", str(path), "--out", str(tmp_path / "late")], ["stats", str(path)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}:4: not valid JSON") and err.count("\n") == 1, err
    assert not (tmp_path / "late").exists()


def test_s3_in_and_out_same_as_local(manifests, make_bucket, tmp_path):
    bucket = make_bucket()
    remote = []
    for path in manifests:
        uri = f"s3://{bucket}/gt/{Path(path).name}"
        storage.write_bytes(uri, Path(path).read_bytes())
        remote.append(uri)
    storage.write_text(f"s3://{bucket}/rejected.txt", "\n".join(REJECTED) + "\n")
    local = tmp_path / "local"
    prepare(
        manifests, str(local), discard=[f"s3://{bucket}/rejected.txt"], class_from="{color} {object}", seed=7
    )
    prepare(
        remote,
        f"s3://{bucket}/prepared",
        discard=[f"s3://{bucket}/rejected.txt"],
        class_from="{color} {object}",
        seed=7,
    )
    for name in ("train.manifest", "validation.manifest", "classes.json"):
        assert storage.read_bytes(f"s3://{bucket}/prepared/{name}") == (local / name).read_bytes()
    with pytest.raises(StorageError, match="missing.manifest: cannot"):
        prepare([f"s3://{bucket}/gt/missing.manifest"], str(tmp_path / "x"))
