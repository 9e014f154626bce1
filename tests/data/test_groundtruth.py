"""Ground Truth manifests: round trip of the real jobs, and every bad line named by file, line, field."""

from __future__ import annotations

import json

import pytest

from detforge.data import groundtruth
from detforge.errors import ManifestError

GOOD = {
    "source-ref": "s3://b/a_000001.jpg",
    "color": "blue",
    "bb": {
        "annotations": [{"class_id": 0, "left": 1, "top": 2, "width": 10, "height": 20}],
        "image_size": [{"width": 100, "height": 50, "depth": 3}],
    },
    "bb-metadata": {
        "job-name": "labeling-job/x",
        "class-map": {"0": "storage box"},
        "objects": [{"confidence": 0.25}],
        "type": "groundtruth/object-detection",
    },
}


# the three public jobs in ../shared/data/groundtruth: lines, boxes, images without a box (from the raw JSON)
REAL_MANIFESTS = {
    "blue-box-large-job-public.output.manifest": (624, 590, 36),
    "blue-box-small-job-public.output.manifest": (21, 19, 2),
    "yellow-box-small-job-public.output.manifest": (32, 33, 1),
}


def test_real_manifests_round_trip(shared_data, tmp_path):
    paths = sorted((shared_data / "groundtruth").glob("*.manifest"))
    assert [path.name for path in paths] == sorted(REAL_MANIFESTS)
    for path in paths:
        records = list(groundtruth.read_manifest(path))
        counts = (len(records), sum(len(r.boxes) for r in records), sum(len(r.boxes) == 0 for r in records))
        assert counts == REAL_MANIFESTS[path.name], path.name
        assert {name for r in records for name in r.class_names} == {"storage box"}
        out = tmp_path / path.name
        assert groundtruth.write_manifest(out, records) == len(records)
        before = [json.loads(x) for x in path.read_text().splitlines()]
        after = [json.loads(x) for x in out.read_text().splitlines()]
        assert after == before


def test_good_line_values(tmp_path):
    record = groundtruth.parse_record(json.loads(json.dumps(GOOD)))
    assert record.boxes.tolist() == [[1, 2, 11, 22]]
    assert record.class_names == ["storage box"] and record.confidences.tolist() == [0.25]
    assert (record.width, record.height, record.job_name, record.image_id) == (
        100,
        50,
        "labeling-job/x",
        "a_000001",
    )
    adjusted = json.loads(json.dumps(GOOD))
    adjusted["adjusted-bb"] = {"annotations": [], "image_size": [{"width": 100, "height": 50}]}
    adjusted["adjusted-bb-metadata"] = dict(GOOD["bb-metadata"], **{"class-map": {}})
    # AWS's own example: the value is the index of the worker's choice; what it means is class-name
    adjusted["check"] = "1"
    adjusted["check-metadata"] = {
        "class-name": "bad",
        "confidence": 0.93,
        "job-name": "verify-job",
        "type": "groundtruth/label-verification",
        "worker-feedback": [{"comment": "too wide"}],
    }
    record = groundtruth.parse_record(adjusted)
    assert record.label_attribute == "adjusted-bb" and len(record.boxes) == 0
    assert record.verification == groundtruth.Verification("check", "bad", "verify-job", ("too wide",))
    assert record.verification.rejects(groundtruth.DEFAULT_REJECT_LABELS)
    assert not record.verification.rejects(["needs fixing"])
    del adjusted["check-metadata"]["class-name"]
    with pytest.raises(ManifestError, match="field 'check-metadata.class-name'"):
        groundtruth.parse_record(adjusted, path="v.manifest", line=3)


def _bad(change) -> dict:
    obj = json.loads(json.dumps(GOOD))
    change(obj)
    return obj


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.pop("bb"), "bad.manifest:2: no bounding-box label attribute"),
        (
            lambda o: o["bb"]["annotations"][0].update(left=95),
            "field 'bb.annotations[0]': box (left=95, top=2, width=10, height=20) "
            "lies outside the 100x50 image",
        ),
        (lambda o: o["bb"]["annotations"][0].update(width=0), "box has non-positive size 0x20"),
        (
            lambda o: o["bb"]["annotations"][0].update(class_id=4),
            "field 'bb.annotations[0].class_id': class_id 4",
        ),
        (
            lambda o: o["bb"]["annotations"][0].update(top="x"),
            "field 'bb.annotations[0].top': expected a number",
        ),
        (lambda o: o["bb"].pop("image_size"), "field 'bb.image_size': missing"),
        (lambda o: o.pop("source-ref"), "field 'source-ref': missing or empty"),
    ],
)
def test_bad_lines(tmp_path, change, message):
    path = tmp_path / "bad.manifest"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(_bad(change)) + "\n")
    with pytest.raises(ManifestError) as info:
        list(groundtruth.read_manifest(path))
    assert str(info.value).startswith(f"{path}:2")
    assert message in str(info.value)
    report = groundtruth.ReadReport()
    records = list(groundtruth.read_manifest(path, on_error="skip", report=report))
    if "box (" in message or "non-positive" in message:  # a bad box is left out of its line, the line kept
        assert [len(r.boxes) for r in records] == [1, 0] and report.skipped == []
        assert report.skipped_boxes == [str(info.value)]
    else:
        assert len(records) == 1 and report.skipped[0][1] == 2
    assert report.lines == 2


def test_malformed_json_and_missing_named_attribute(tmp_path):
    path = tmp_path / "m.manifest"
    path.write_text(json.dumps(GOOD) + "\n\n{oops\n")
    with pytest.raises(ManifestError, match=r"m.manifest:3: not valid JSON"):
        list(groundtruth.read_manifest(path))
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(ManifestError, match=r"m.manifest:1, field 'labels': label attribute missing"):
        list(groundtruth.read_manifest(path, label_attribute="labels"))


def test_resolve_source_ref(tmp_path, monkeypatch):
    """A URI or an absolute path stays; any relative ref sits beside the manifest, whatever the cwd."""
    resolve_source_ref = groundtruth.resolve_source_ref

    manifest = str(tmp_path / "jobs" / "a.manifest")
    assert resolve_source_ref("s3://b/k.jpg", manifest) == "s3://b/k.jpg"
    assert resolve_source_ref("/data/x.jpg", manifest) == "/data/x.jpg"
    assert resolve_source_ref("img/x.jpg", manifest) == str(tmp_path / "jobs" / "img" / "x.jpg")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.jpg").write_bytes(b"")
    assert resolve_source_ref("here.jpg", manifest) == str(tmp_path / "jobs" / "here.jpg")
    assert resolve_source_ref("../img/y.jpg", manifest) == str(tmp_path / "img" / "y.jpg")
    assert resolve_source_ref("x.jpg", "s3://b/jobs/a.manifest") == "s3://b/jobs/x.jpg"


def test_ref_from_relative_only_within_a_shared_top_folder(tmp_path):
    out = tmp_path / "prepared"
    assert groundtruth.ref_from(str(tmp_path / "frames" / "a.jpg"), out) == "../frames/a.jpg"
    assert groundtruth.ref_from("s3://b/frames/a.jpg", out) == "s3://b/frames/a.jpg"
    assert groundtruth.ref_from(str(tmp_path / "a.jpg"), "s3://b/prepared") == str(tmp_path / "a.jpg")
    # nothing in common but the root: the absolute path, not ../../../...
    assert groundtruth.ref_from("/opt/photos/a.jpg", "/srv/out") == "/opt/photos/a.jpg"


@pytest.mark.parametrize(
    "text, message",
    [
        ('["a", ', "not valid JSON"),
        ('{"a": 1}', "expected a non-empty JSON list of class names"),
        ("[]", "expected a non-empty JSON list of class names"),
        ('["a", 2]', "expected a non-empty JSON list of class names"),
    ],
)
def test_one_class_file_reader_and_the_same_error_in_every_command(tmp_path, text, message, capsys):
    from detforge.cli import main
    from detforge.errors import FormatError

    assert groundtruth.read_class_names(_write(tmp_path / "ok.json", '["b", "a"]')) == ["b", "a"]
    assert groundtruth.read_class_names(_write(tmp_path / "model.json", '{"classes": ["x"]}')) == ["x"]
    manifest = _write(tmp_path / "train.manifest", "")
    assert groundtruth.classes_beside(manifest) is None  # no classes.json beside it
    bad = _write(tmp_path / "bad" / "classes.json", text)
    with pytest.raises(FormatError, match=message):
        groundtruth.classes_beside(tmp_path / "bad" / "x.manifest")
    # train, evaluate and label read a --classes file through it: the same message naming the file
    for args in (
        [
            "train",
            "--train",
            manifest,
            "--out",
            str(tmp_path / "run"),
            "--classes",
            bad,
            "--set",
            "num_classes=1",
        ],
        ["evaluate", _write(tmp_path / "p.jsonl", ""), manifest, "--classes", bad],
        ["label", manifest, "--out", str(tmp_path / "o.manifest"), "--classes", bad, "--no-browser"],
    ):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and f"{bad}: {message}" in err, (args[0], err)


def _write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_one_class_map_merge_in_convert_and_evaluate(tmp_path):
    """An id that means two names is the same error in convert, evaluate and training (evaluate used to keep
    the first silently)."""
    from PIL import Image

    from detforge.data.convert import convert
    from detforge.evaluation.evaluate import manifest_class_names

    path = tmp_path / "m.manifest"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (20, 10)).save(tmp_path / name)
    groundtruth.write_manifest(
        path,
        [
            groundtruth.make_record(
                "a.jpg", width=20, height=10, boxes_xyxy=[[0, 0, 5, 5]], class_ids=[0], class_map={0: "cat"}
            ),
            groundtruth.make_record(
                "b.jpg", width=20, height=10, boxes_xyxy=[[0, 0, 5, 5]], class_ids=[2], class_map={2: "bird"}
            ),
            groundtruth.make_record(
                "c.jpg", width=20, height=10, boxes_xyxy=[[0, 0, 5, 5]], class_ids=[0], class_map={0: "dog"}
            ),
        ],
    )
    expected = (
        f"{path}:3, field 'bb-metadata.class-map': class id 0 means 'cat' at {path}:1 and 'dog' here "
        "(run `detforge prepare` first to merge the class maps by name)"
    )
    with pytest.raises(ManifestError) as error:
        convert(str(path), to="coco", out=str(tmp_path / "c.json"))
    assert str(error.value) == expected
    with pytest.raises(ManifestError) as error:
        manifest_class_names(str(path))
    assert str(error.value) == expected
    from detforge.training.dataset import load_split

    with pytest.raises(ManifestError) as error:
        load_split(str(path))  # training, without a classes.json: the same merge
    assert str(error.value) == expected
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")
    assert manifest_class_names(str(path)) == ["cat", "1", "bird"]  # an id no line names: its number
