"""Ground Truth manifests: round trip of the real jobs, and every bad line named by file, line, field."""

from __future__ import annotations

import json

import pytest

from detforge import groundtruth
from detforge.errors import ManifestError

GOOD = {"source-ref": "s3://b/a_000001.jpg", "color": "blue",
        "bb": {"annotations": [{"class_id": 0, "left": 1, "top": 2, "width": 10, "height": 20}],
               "image_size": [{"width": 100, "height": 50, "depth": 3}]},
        "bb-metadata": {"job-name": "labeling-job/x", "class-map": {"0": "storage box"},
                        "objects": [{"confidence": 0.25}], "type": "groundtruth/object-detection"}}


def test_real_manifests_round_trip(shared_data, tmp_path):
    for path in sorted((shared_data / "groundtruth").glob("*.manifest")):
        records = list(groundtruth.read_manifest(path))
        out = tmp_path / path.name
        assert groundtruth.write_manifest(out, records) == len(records)
        before = [json.loads(x) for x in path.read_text().splitlines()]
        after = [json.loads(x) for x in out.read_text().splitlines()]
        assert after == before


def test_good_line_values(tmp_path):
    record = groundtruth.parse_record(json.loads(json.dumps(GOOD)))
    assert record.boxes.tolist() == [[1, 2, 11, 22]]
    assert record.class_names == ["storage box"] and record.confidences.tolist() == [0.25]
    assert (record.width, record.height, record.job_name, record.image_id) == (100, 50, "labeling-job/x",
                                                                               "a_000001")
    adjusted = json.loads(json.dumps(GOOD))
    adjusted["adjusted-bb"] = {"annotations": [], "image_size": [{"width": 100, "height": 50}]}
    adjusted["adjusted-bb-metadata"] = dict(GOOD["bb-metadata"], **{"class-map": {}})
    adjusted["verify-bb"] = "0"
    record = groundtruth.parse_record(adjusted)
    assert record.label_attribute == "adjusted-bb" and len(record.boxes) == 0 and record.verified is False


def _bad(change) -> dict:
    obj = json.loads(json.dumps(GOOD))
    change(obj)
    return obj


@pytest.mark.parametrize(("change", "message"), [
    (lambda o: o.pop("bb"), "bad.manifest:2: no bounding-box label attribute"),
    (lambda o: o["bb"]["annotations"][0].update(left=95),
     "field 'bb.annotations[0]': box (left=95, top=2, width=10, height=20) lies outside the 100x50 image"),
    (lambda o: o["bb"]["annotations"][0].update(width=0), "box has non-positive size 0x20"),
    (lambda o: o["bb"]["annotations"][0].update(class_id=4),
     "field 'bb.annotations[0].class_id': class_id 4"),
    (lambda o: o["bb"]["annotations"][0].update(top="x"), "field 'bb.annotations[0].top': expected a number"),
    (lambda o: o["bb"].pop("image_size"), "field 'bb.image_size': missing"),
    (lambda o: o.pop("source-ref"), "field 'source-ref': missing or empty"),
])
def test_bad_lines(tmp_path, change, message):
    path = tmp_path / "bad.manifest"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(_bad(change)) + "\n")
    with pytest.raises(ManifestError) as info:
        list(groundtruth.read_manifest(path))
    assert str(info.value).startswith(f"{path}:2")
    assert message in str(info.value)
    report = groundtruth.ReadReport()
    assert len(list(groundtruth.read_manifest(path, on_error="skip", report=report))) == 1
    assert report.lines == 2 and report.skipped[0][1] == 2


def test_malformed_json_and_missing_named_attribute(tmp_path):
    path = tmp_path / "m.manifest"
    path.write_text(json.dumps(GOOD) + "\n\n{oops\n")
    with pytest.raises(ManifestError, match=r"m.manifest:3: not valid JSON"):
        list(groundtruth.read_manifest(path))
    path.write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(ManifestError, match=r"m.manifest:1, field 'labels': label attribute missing"):
        list(groundtruth.read_manifest(path, label_attribute="labels"))


def test_resolve_source_ref(tmp_path, monkeypatch):
    """A URI, an absolute path or a path that exists as given stays; other refs sit beside the manifest."""
    resolve_source_ref = groundtruth.resolve_source_ref

    manifest = str(tmp_path / "jobs" / "a.manifest")
    assert resolve_source_ref("s3://b/k.jpg", manifest) == "s3://b/k.jpg"
    assert resolve_source_ref("/data/x.jpg", manifest) == "/data/x.jpg"
    assert resolve_source_ref("img/x.jpg", manifest) == str(tmp_path / "jobs" / "img" / "x.jpg")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.jpg").write_bytes(b"")
    assert resolve_source_ref("here.jpg", manifest) == "here.jpg"
    assert resolve_source_ref("x.jpg", "s3://b/jobs/a.manifest") == "s3://b/jobs/x.jpg"
