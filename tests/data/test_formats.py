"""Labels from the tools people use: Roboflow/Ultralytics YOLO, LabelImg/CVAT VOC, CVAT/Roboflow COCO.

The real Roboflow export in ``../shared/data/aquarium`` is checked against its own label files; the
project's fixtures are written in the shape each tool writes (foreign ``<path>``, ``difficult``, category
id gaps, ``iscrowd``, Roboflow's group category and per-split folders).
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from detforge.cli import main
from detforge.data import groundtruth
from detforge.data.convert import convert
from detforge.data.formats import coco, voc, yolo
from detforge.data.prepare import prepare
from detforge.data.sources import detect_format, read_source
from detforge.data.stats import manifest_stats
from detforge.errors import FormatError, ManifestError

AQUARIUM_CLASSES = ["fish", "jellyfish", "penguin", "puffin", "shark", "starfish", "stingray"]


def _jpeg(path: Path, size=(80, 60), color=(90, 90, 90)) -> Path:
    """A small JPEG, its corner pixel marked by its name (two fixtures are never the same bytes: prepare
    reports same-bytes copies as duplicates)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    image.putpixel((0, 0), (zlib.crc32(path.name.encode()) % 256, 0, 0))
    image.save(path, "JPEG")
    return path


# ------------------------------------------------------------------ the real Roboflow export


@pytest.fixture(scope="module")
def aquarium(shared_data) -> Path:
    folder = shared_data / "aquarium"
    if not (folder / "data.yaml").exists():
        pytest.fail("../shared/data/aquarium is missing") if os.environ.get("CI") else pytest.skip(
            "../shared/data/aquarium is not here"
        )
    return folder


def _label_file_counts(folder: Path) -> tuple[int, Counter, int]:
    """(images, boxes per class name, zero-size boxes) read straight from the label files."""
    per_class: Counter = Counter()
    zero = 0
    labels = sorted((folder / "labels").glob("*.txt"))
    for path in labels:
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts:
                if float(parts[3]) == 0 or float(parts[4]) == 0:
                    zero += 1
                else:
                    per_class[AQUARIUM_CLASSES[int(parts[0])]] += 1
    assert len(labels) == len(list((folder / "images").glob("*.jpg")))
    return len(labels), per_class, zero


def test_aquarium_data_yaml_counts_per_split_and_class(aquarium, tmp_path):
    assert detect_format(str(aquarium / "data.yaml")) == "yolo" == detect_format(str(aquarium))
    names, records = yolo.read_yolo(str(aquarium / "data.yaml"))
    records = list(records)
    assert names == AQUARIUM_CLASSES
    for split, folder in (("train", "train"), ("validation", "valid")):
        count, per_class, zero = _label_file_counts(aquarium / folder)
        mine = [r for r in records if r.split == split]
        assert len(mine) == count and zero == 0
        assert Counter(n for r in mine for n in r.class_names) == per_class
    # the empty label file is an image without objects, kept
    empty = [r for r in records if len(r.boxes) == 0]
    assert [r.image_id for r in empty] == ["IMG_3133_jpeg_jpg.rf.f439b9d382fd153b96f0a88cdf169172"]
    # a box in pixels of its image: the first line of the first train label file
    first = next(r for r in records if r.image_id.startswith("IMG_2274"))
    assert (first.width, first.height) == Image.open(first.source_ref).size


def test_aquarium_zero_size_test_boxes_error_or_skip(aquarium, tmp_path):
    count, per_class, zero = _label_file_counts(aquarium / "test")
    assert zero == 2
    with pytest.raises(
        ManifestError,
        match=r"test/labels/IMG_2423_jpeg_jpg\.rf\.[0-9a-f]+\.txt:17: "
        r"box has non-positive size 0x0",
    ):
        prepare([str(aquarium / "test")], str(tmp_path / "stop"))
    assert not (tmp_path / "stop").exists()
    s = prepare([str(aquarium / "test")], str(tmp_path / "o"), on_error="skip", keep_splits=True)
    assert s.formats == {str(aquarium / "test"): "yolo"}
    assert len(s.skipped_boxes) == 2 and all("non-positive size 0x0" in m for m in s.skipped_boxes)
    assert s.test == count and s.train == s.validation == 0
    assert s.boxes_per_class == {n: per_class.get(n, 0) for n in s.classes}
    # what was written reads back with no complaint, from another working directory too
    records = list(groundtruth.read_manifest(tmp_path / "o" / "test.manifest"))
    assert sum(len(r.boxes) for r in records) == sum(per_class.values())
    ref = groundtruth.resolve_source_ref(records[0].source_ref, tmp_path / "o" / "test.manifest")
    assert Path(ref).resolve() == (aquarium / "test" / "images" / f"{records[0].image_id}.jpg").resolve()
    # stats and convert treat the same bad boxes the same way
    with pytest.raises(ManifestError, match="non-positive size 0x0"):
        manifest_stats([str(aquarium / "test")])
    assert len(manifest_stats([str(aquarium / "test")], on_error="skip")["skipped"]) == 2


def test_aquarium_prepare_keeps_its_splits(aquarium, tmp_path):
    s = prepare([str(aquarium / "data.yaml")], str(tmp_path / "p"), keep_splits=True)
    assert (s.train, s.validation, s.test) == (448, 127, 0)
    assert s.classes == AQUARIUM_CLASSES and s.empty_images == 1
    train = list(groundtruth.read_manifest(tmp_path / "p" / "train.manifest"))
    assert all(groundtruth.SPLIT_FIELD not in r.fields for r in train)


def test_aquarium_yolo_round_trip_in_ultralytics_layout(aquarium, tmp_path):
    """YOLO -> manifest -> YOLO: the layout Ultralytics' dataset rules accept, the same labels."""
    manifest = tmp_path / "aq" / "all.manifest"
    s = convert(str(aquarium / "valid"), to="manifest", out=str(manifest))
    assert (s.source_format, s.images) == ("yolo", 127)
    out = tmp_path / "yolo"
    convert(str(manifest), to="yolo", out=str(out))
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(AQUARIUM_CLASSES)) and data["nc"] == 7
    # the split is kept through the manifest: the valid folder's images are the val split, nothing else
    assert sorted(data) == ["names", "nc", "val"]
    # Ultralytics: split entries relative to the yaml's folder; labels where 'images' becomes 'labels'
    for key in ("val",):
        images = sorted((out / data[key]).glob("*.jpg"))
        assert len(images) == 127
        for image in images[:5]:
            assert Path(yolo.label_path(str(image))).exists()
    again = {r.image_id: r for r in yolo.read_yolo(str(out / "data.yaml"))[1]}
    original = {r.image_id: r for r in yolo.read_yolo(str(aquarium / "valid"))[1]}
    assert again.keys() == original.keys()
    for key, record in original.items():
        assert again[key].class_names == record.class_names
        # a manifest holds whole pixels (Ground Truth's format): corners move by at most half a pixel
        assert np.abs(again[key].boxes - record.boxes).max(initial=0) <= 0.5 + 1e-3


# ------------------------------------------------------------------ YOLO fixtures


def test_yolo_names_map_list_files_polygons_and_roboflow_paths(tmp_path):
    root = tmp_path / "ds"
    _jpeg(root / "train" / "images" / "a.jpg", (100, 50))
    _jpeg(root / "train" / "images" / "b.jpg", (100, 50))
    (root / "train" / "labels").mkdir(parents=True)
    # a segmentation export: a polygon becomes its bounding box
    (root / "train" / "labels" / "a.txt").write_text("1 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n0 0.5 0.5 0.2 0.4\n")
    (root / "lists").mkdir()
    (root / "lists" / "val.txt").write_text("./../train/images/b.jpg\n")
    (root / "data.yaml").write_text(
        "path: .\ntrain: ../train/images\nval: lists/val.txt\nnames:\n  0: cat\n  1: dog\n"
    )
    names, records = yolo.read_yolo(str(root / "data.yaml"))
    records = list(records)
    assert names == ["cat", "dog"]
    a = next(r for r in records if r.image_id == "a")
    assert a.split == "train" and a.class_names == ["dog", "cat"]
    assert a.boxes.tolist() == [[10, 10, 50, 30], [40, 15, 60, 35]]
    b = [r for r in records if r.image_id == "b"]
    # named by train and by val's list: read once, in its first split; no label file: no objects
    assert [r.split for r in b] == ["train"] and len(b[0].boxes) == 0


@pytest.mark.parametrize(
    ("yaml_text", "label", "message"),
    [
        ("names: [a\ntrain: x\n", "", r"data.yaml:2: not valid YAML"),
        ("names: [a, b]\nnc: 3\ntrain: train/images\n", "", r"field 'nc': 'nc' is 3 but 'names' has 2"),
        ("names: [a]\ntrain: train/images\n", "3 0.5 0.5 0.1 0.1\n", r"a.txt:1: class 3 is not one of the 1"),
        ("names: [a]\ntrain: train/images\n", "0 0.5 0.5\n", r"a.txt:1: expected 'class cx cy w h'"),
        (
            "names: [a]\ntrain: train/images\n",
            "0 0.5 0.5 0.2 0.2\n0 1.2 0.5 0.2 0.2\n",
            r"a.txt:2: box .* lies outside",
        ),
    ],
)
def test_yolo_bad_input_names_file_and_line(tmp_path, capsys, yaml_text, label, message):
    _jpeg(tmp_path / "train" / "images" / "a.jpg", (64, 48))
    (tmp_path / "train" / "labels").mkdir()
    (tmp_path / "train" / "labels" / "a.txt").write_text(label)
    (tmp_path / "data.yaml").write_text(yaml_text)
    with pytest.raises((FormatError, ManifestError), match=message):
        list(read_source(str(tmp_path / "data.yaml"))[2])
    for command in (
        ["prepare", str(tmp_path / "data.yaml"), "--out", str(tmp_path / "p")],
        ["convert", str(tmp_path / "data.yaml"), "--to", "coco", "--out", str(tmp_path / "c.json")],
        ["stats", str(tmp_path / "data.yaml")],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


# ------------------------------------------------------------------ VOC fixtures

LABELIMG_XML = """<annotation>
  <folder>shots</folder>
  <filename>{name}</filename>
  <path>/home/pi/Desktop/shots/{name}</path>
  <source><database>Unknown</database></source>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  <segmented>0</segmented>
  {objects}
</annotation>"""
OBJECT = (
    "<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
    "<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
    "<ymax>{y1}</ymax></bndbox></object>"
)


def _voc(root: Path, name: str, objects, size=(80, 60), image_folder="JPEGImages") -> None:
    if image_folder:
        _jpeg(root / image_folder / name, size)
    body = "".join(
        OBJECT.format(name=n, difficult=d, x0=a, y0=b, x1=c, y1=e) for n, d, (a, b, c, e) in objects
    )
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / (name.rsplit(".", 1)[0] + ".xml")).write_text(
        LABELIMG_XML.format(name=name, w=size[0], h=size[1], objects=body)
    )


def test_labelimg_voc_foreign_path_difficult_and_imagesets(tmp_path):
    root = tmp_path / "voc"
    _voc(root, "one.jpg", [("dog", 0, (10, 20, 30, 40)), ("cat", 1, (0, 0, 80, 60))])
    _voc(root, "two.jpg", [("cat", 0, (5, 5, 15, 15))])
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("one\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("two\n")
    assert detect_format(str(root / "Annotations")) == "voc"
    names, records = voc.read_voc(str(root / "Annotations"))
    records = {r.image_id: r for r in records}
    assert names == ["cat", "dog"]
    one = records["one"]
    # the image is the layout's own JPEGImages/one.jpg, never /home/pi/...
    assert Path(one.source_ref) == root / "JPEGImages" / "one.jpg"
    assert one.class_names == ["dog", "cat"] and one.difficult.tolist() == [False, True]
    assert (one.split, records["two"].split) == ("train", "validation")
    s = prepare([str(root / "Annotations")], str(tmp_path / "p"), keep_splits=True)
    assert (s.train, s.validation) == (1, 1)
    line = json.loads((tmp_path / "p" / "train.manifest").read_text())
    assert [a.get("difficult") for a in line["bb"]["annotations"]] == [None, 1]
    assert (tmp_path / "p" / line["source-ref"]).resolve() == (root / "JPEGImages" / "one.jpg").resolve()


def test_voc_images_option_missing_image_and_bad_box(tmp_path, capsys):
    root = tmp_path / "voc"
    _voc(root, "a.jpg", [("dog", 0, (10, 10, 10, 30))], image_folder=None)  # zero width
    with pytest.raises(FormatError, match=r"a.xml:3, field 'filename': image 'a.jpg' not found"):
        list(read_source(str(root / "Annotations"))[2])
    _jpeg(tmp_path / "pics" / "a.jpg")
    with pytest.raises(
        ManifestError, match=r"a.xml:8, field 'object 1.bndbox': box has non-positive size 0x20"
    ):
        prepare([str(root / "Annotations")], str(tmp_path / "p"), images=str(tmp_path / "pics"))
    s = prepare(
        [str(root / "Annotations")],
        str(tmp_path / "p"),
        images=str(tmp_path / "pics"),
        on_error="skip",
        validation_fraction=0,
    )
    assert s.train == 1 and s.empty_images == 1 and len(s.skipped_boxes) == 1
    assert (
        main(
            [
                "convert",
                str(root / "Annotations"),
                "--images",
                str(tmp_path / "pics"),
                "--to",
                "manifest",
                "--out",
                str(tmp_path / "m.manifest"),
            ]
        )
        == 2
    )
    assert "box has non-positive size 0x20" in capsys.readouterr().err
    assert not (tmp_path / "m.manifest").exists()


def test_voc_refuses_entity_expansion(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "x.xml").write_text(
        '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e "boom">]>'
        "<annotation><filename>&e;</filename></annotation>"
    )
    with pytest.raises(FormatError, match="refused unsafe XML"):
        list(read_source(str(root / "Annotations"))[2])


# ------------------------------------------------------------------ COCO fixtures


def test_cvat_coco_id_gaps_and_iscrowd(tmp_path):
    _jpeg(tmp_path / "imgs" / "f1.jpg", (100, 80))
    _jpeg(tmp_path / "imgs" / "f2.jpg", (100, 80))
    data = {
        "images": [
            {"id": 7, "file_name": "f1.jpg", "width": 100, "height": 80},
            {"id": 9, "file_name": "f2.jpg", "width": 100, "height": 80},
        ],
        "categories": [{"id": 3, "name": "truck"}, {"id": 11, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 11, "bbox": [10, 10, 20, 30], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 100, 80], "iscrowd": 1},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    names, records = coco.read_coco(str(tmp_path / "ann.json"), images_dir=str(tmp_path / "imgs"))
    records = list(records)
    assert names == ["truck", "car"]
    assert records[0].class_names == ["car", "truck"] and records[0].difficult.tolist() == [False, True]
    assert records[0].boxes.tolist() == [[10, 10, 30, 40], [0, 0, 100, 80]] and len(records[1].boxes) == 0
    out = tmp_path / "back.json"
    convert(str(tmp_path / "ann.json"), to="coco", out=str(out), images=str(tmp_path / "imgs"))
    from pycocotools.coco import COCO

    loaded = COCO(str(out))
    assert [a["iscrowd"] for a in loaded.loadAnns(loaded.getAnnIds(imgIds=[1]))] == [0, 1]
    assert (tmp_path / loaded.loadImgs([1])[0]["file_name"]).resolve() == (
        tmp_path / "imgs" / "f1.jpg"
    ).resolve()


def test_roboflow_coco_export_per_split_and_group_category(tmp_path):
    for split, name in (("train", "t.jpg"), ("valid", "v.jpg")):
        _jpeg(tmp_path / "export" / split / name, (64, 64))
        data = {
            "images": [{"id": 0, "file_name": name, "width": 64, "height": 64}],
            "categories": [
                {"id": 0, "name": "fishes", "supercategory": "none"},
                {"id": 1, "name": "fish", "supercategory": "fishes"},
                {"id": 2, "name": "shark", "supercategory": "fishes"},
            ],
            "annotations": [
                {"id": 0, "image_id": 0, "category_id": 2, "bbox": [1, 2, 30, 40], "area": 1200, "iscrowd": 0}
            ],
        }
        (tmp_path / "export" / split / coco.ROBOFLOW_FILE).write_text(json.dumps(data))
    assert detect_format(str(tmp_path / "export")) == "coco"
    s = prepare(
        [str(tmp_path / "export" / "train" / coco.ROBOFLOW_FILE), str(tmp_path / "export")],
        str(tmp_path / "p"),
        keep_splits=True,
    )
    assert s.classes == ["shark"] and (s.train, s.validation) == (1, 1) and len(s.duplicates) == 1
    names, _ = coco.read_coco(str(tmp_path / "export"))
    assert names == ["fish", "shark"]


def test_coco_bad_box_and_unknown_category(tmp_path):
    _jpeg(tmp_path / "a.jpg", (50, 50))
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 50, "height": 50}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [40, 40, 20, 5]}],
    }
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"c.json, field 'annotation 1 \(id 1\).bbox': box .* outside"):
        list(read_source(str(tmp_path / "c.json"))[2])
    data["annotations"][0].update(category_id=5, bbox=[1, 1, 5, 5])
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(
        FormatError, match=r"field 'annotation 1 \(id 1\).category_id': category_id 5 is not a class"
    ):
        list(read_source(str(tmp_path / "c.json"))[2])
