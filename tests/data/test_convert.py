"""detforge convert: every direction on small fixtures, class names kept; COCO loaded by pycocotools."""

from __future__ import annotations

import os

import pytest
import yaml
from PIL import Image

from detforge.cli import main
from detforge.data import groundtruth
from detforge.data.convert import convert
from detforge.data.sources import detect_format, read_source
from detforge.errors import FormatError

CLASSES = {0: "blue box", 1: "yellow box"}


@pytest.fixture
def manifest(tmp_path):
    for name, size in (("v_000001", (200, 100)), ("v_000002", (200, 100)), ("v_000003", (64, 48))):
        (tmp_path / "f").mkdir(exist_ok=True)
        Image.new("RGB", size, (80, 80, 80)).save(tmp_path / "f" / f"{name}.jpg")
    records = [
        groundtruth.make_record(
            "f/v_000001.jpg",
            width=200,
            height=100,
            boxes_xyxy=[[10, 20, 50, 60], [100, 0, 200, 100]],
            class_ids=[0, 1],
            class_map=CLASSES,
            job_name="job-a",
            metadata={"color": "blue"},
        ),
        groundtruth.make_record(
            "f/v_000002.jpg", width=200, height=100, boxes_xyxy=[], class_ids=[], class_map={}
        ),
        groundtruth.make_record(
            "f/v_000003.jpg",
            width=64,
            height=48,
            boxes_xyxy=[[1, 2, 33, 47]],
            class_ids=[1],
            class_map={1: "yellow box"},
        ),
    ]
    path = tmp_path / "in.manifest"
    groundtruth.write_manifest(path, records)
    return path


def _signature(records, manifest):
    return [
        (
            os.path.realpath(groundtruth.resolve_source_ref(r.source_ref, manifest)),
            r.width,
            r.height,
            r.boxes.round(4).tolist(),
            r.class_names,
        )
        for r in records
    ]


@pytest.mark.parametrize("fmt", ["coco", "voc", "yolo"])
def test_round_trip_through_each_format(manifest, tmp_path, fmt):
    middle = tmp_path / ("mid.json" if fmt == "coco" else "mid")
    s = convert(str(manifest), to=fmt, out=str(middle))
    assert (s.source_format, s.images) == ("manifest", 3)
    assert detect_format(str(middle)) == fmt
    back = tmp_path / "out" / "back.manifest"
    s = convert(str(middle), to="manifest", out=str(back))
    assert (s.source_format, s.images) == (fmt, 3)
    original = list(groundtruth.read_manifest(manifest))
    again = list(groundtruth.read_manifest(back))
    key = lambda r: r.image_id  # noqa: E731
    if fmt == "yolo":  # YOLO holds copies of the images in its own layout
        got = [(r.width, r.height, r.boxes.round(4).tolist(), r.class_names) for r in sorted(again, key=key)]
        assert got == [x[1:] for x in _signature(original, manifest)]
    else:
        assert _signature(sorted(again, key=key), back) == _signature(original, manifest)
    kind, classes, _ = read_source(str(middle))
    assert classes == ["blue box", "yellow box"]


def test_coco_file_loads_in_pycocotools(manifest, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "c.json"
    convert(str(manifest), to="coco", out=str(out))
    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["blue box", "yellow box"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert [a["bbox"] for a in anns] == [[10.0, 20.0, 40.0, 40.0], [100.0, 0.0, 100.0, 100.0]]
    assert [a["category_id"] for a in anns] == [1, 2]
    assert len(coco.getAnnIds(imgIds=[2])) == 0


def test_yolo_lines_are_exact(manifest, tmp_path):
    convert(str(manifest), to="yolo", out=str(tmp_path / "y"))
    text = (tmp_path / "y" / "train" / "labels" / "v_000001.txt").read_text().split("\n")
    assert text[0] == "0 0.15000000 0.40000000 0.20000000 0.40000000"
    assert text[1] == "1 0.75000000 0.50000000 0.50000000 1.00000000"
    assert (tmp_path / "y" / "train" / "labels" / "v_000002.txt").read_text() == ""
    assert (tmp_path / "y" / "train" / "images" / "v_000002.jpg").exists()
    # no split in the input: data.yaml names no validation set (never the training images as `val`)
    assert yaml.safe_load((tmp_path / "y" / "data.yaml").read_text()) == {
        "train": "train/images",
        "nc": 2,
        "names": {0: "blue box", 1: "yellow box"},
    }


def test_voc_xml_values(manifest, tmp_path):
    convert(str(manifest), to="voc", out=str(tmp_path / "v"))
    text = (tmp_path / "v" / "Annotations" / "v_000003.xml").read_text()
    assert "<name>yellow box</name>" in text and "<xmax>33</xmax>" in text and "<width>64</width>" in text


def test_bad_inputs(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": []}')
    with pytest.raises(FormatError, match="not a COCO detection file: no 'categories' list"):
        convert(str(bad), to="manifest", out=str(tmp_path / "o.manifest"))
    folder = tmp_path / "y"
    (folder / "labels").mkdir(parents=True)
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(folder / "images" / "x.png")
    (folder / "data.yaml").write_text('names:\n  - "a"\ntrain: images\n')
    (folder / "labels" / "x.txt").write_text("0 0.5 0.5 0.2 0.2\n4 0.5 0.5 0.1 0.1\n")
    assert main(["convert", str(folder), "--to", "coco", "--out", str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {folder}/labels/x.txt:2: class 4 is not one of the 1")
    # the old behaviour: a folder that is no label layout converted "0 images from voc" and exited 0
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), "--to", "coco", "--out", str(tmp_path / "c.json")]) == 2
    assert "not a label folder" in capsys.readouterr().err
    with pytest.raises(Exception, match="--to 'pdf'"):
        convert(str(bad), to="pdf", out="x")
