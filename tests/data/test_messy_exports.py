"""Messy real exports: absent images in every format, a <size> that lies, EXIF-turned photos, mixed
folders, labelme, CVAT's layouts, BOMs and other encodings, and hostile files (a YAML alias bomb,
image names that climb out of the dataset). Project-written fixtures in the shape each tool writes."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from detforge.cli import main
from detforge.data import groundtruth
from detforge.data.convert import convert
from detforge.data.groundtruth import ReadReport
from detforge.data.prepare import prepare
from detforge.data.sources import detect_format, read_source
from detforge.errors import DetforgeError, FormatError, ManifestError


def _jpeg(path: Path, size=(80, 60), exif_orientation: int | None = None, box=None) -> Path:
    """A JPEG marked by its path (never the same bytes twice); ``box`` painted white in stored pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (40, 40, 40))
    mark = zlib.crc32(str(path).encode())
    image.putpixel((0, 0), (mark % 256, mark // 256 % 256, 0))
    if box is not None:
        image.paste((255, 255, 255), tuple(box))
    extra = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        extra["exif"] = exif
    image.save(path, "JPEG", quality=95, **extra)
    return path


def _coco(
    path: Path,
    images: list[tuple[str, int, int]],
    boxes: list[tuple[int, int, list]],
    categories=((1, "fish"),),
) -> Path:
    data = {
        "images": [
            {"id": i + 1, "file_name": name, "width": w, "height": h} for i, (name, w, h) in enumerate(images)
        ],
        "categories": [{"id": cid, "name": name} for cid, name in categories],
        "annotations": [
            {"id": n + 1, "image_id": image_id, "category_id": cid, "bbox": bbox, "iscrowd": 0}
            for n, (image_id, cid, bbox) in enumerate(boxes)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


VOC_XML = """<annotation>
  <filename>{name}</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>
"""


def _voc_xml(path: Path, name: str, size, boxes=(("dog", (10, 10, 30, 30)),)) -> Path:
    objects = "\n  ".join(
        f"<object><name>{n}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax>"
        "</bndbox></object>"
        for n, (a, b, c, d) in boxes
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(VOC_XML.format(name=name, w=size[0], h=size[1], objects=objects))
    return path


# ------------------------------------------------------------------ missing images, every format


def test_sparse_cvat_coco_export_missing_images_error_or_counted_skip(tmp_path, capsys):
    """CVAT exports every task image; only some were copied along: 2 of 5 listed images absent."""
    for name in ("a.jpg", "c.jpg", "e.jpg"):
        _jpeg(tmp_path / "export" / "images" / "Train" / name)
    listed = [(n, 80, 60) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg")]
    _coco(
        tmp_path / "export" / "annotations" / "instances_Train.json",
        listed,
        [(i, 1, [5, 5, 20, 20]) for i in range(1, 6)],
    )
    assert detect_format(str(tmp_path / "export")) == "coco"
    with pytest.raises(DetforgeError) as error:
        list(read_source(str(tmp_path / "export"))[2])
    expected = (
        f"{tmp_path}/export/annotations/instances_Train.json, field 'image 2 (id 2).file_name': "
        f"image 'b.jpg' not found in {tmp_path}/export/images/Train/, {tmp_path}/export/images/, "
        f"{tmp_path}/export/annotations/, {tmp_path}/export/annotations/images/ (give the image "
        "folder with --images)"
    )
    assert str(error.value) == expected
    report = ReadReport()
    kind, names, records = read_source(str(tmp_path / "export"), on_error="skip", report=report)
    records = list(records)
    assert (kind, names, [r.image_id for r in records]) == ("coco", ["fish"], ["a", "c", "e"])
    assert [r.split for r in records] == ["train"] * 3  # the subset is the split
    second = expected.replace("image 2 (id 2)", "image 4 (id 4)").replace("'b.jpg'", "'d.jpg'")
    assert [m for _, _, m in report.skipped] == [expected, second]
    out = tmp_path / "m.manifest"
    assert (
        main(
            ["convert", str(tmp_path / "export"), "--to", "manifest", "--out", str(out), "--on-error", "skip"]
        )
        == 0
    )
    out = capsys.readouterr()
    assert out.out == (
        f"converted 3 images (train 3) from coco to manifest: {tmp_path}/m.manifest (skipped "
        "2 images, 0 boxes)\n"
    )
    assert out.err.count("skipped: ") == 2


def test_manifest_naming_a_missing_local_image(tmp_path, capsys):
    _jpeg(tmp_path / "a_1.jpg", (100, 50))
    path = tmp_path / "m.manifest"
    groundtruth.write_manifest(
        path,
        [
            groundtruth.make_record(
                name, width=100, height=50, boxes_xyxy=[[0, 0, 10, 5]], class_ids=[0], class_map={0: "cat"}
            )
            for name in ("a_1.jpg", "a_2.jpg")
        ],
    )
    assert main(["convert", str(path), "--to", "coco", "--out", str(tmp_path / "c.json")]) == 2
    assert capsys.readouterr().err == (f"error: {path}:2, field 'source-ref': cannot read: no such file\n")
    assert not (tmp_path / "c.json").exists()
    s = convert(str(path), to="coco", out=str(tmp_path / "c.json"), on_error="skip")
    assert (s.images, s.skipped) == (1, [f"{path}:2, field 'source-ref': cannot read: no such file"])
    # a size that is not the image's is the same kind of error
    groundtruth.write_manifest(
        path,
        [groundtruth.make_record("a_1.jpg", width=50, height=100, boxes_xyxy=[], class_ids=[], class_map={})],
    )
    with pytest.raises(
        ManifestError,
        match=r"m.manifest:1, field 'bb.image_size': the line says the image "
        r"is 50x100 but .*a_1.jpg is 100x50",
    ):
        list(read_source(str(path))[2])


# ------------------------------------------------------------------ sizes: the header is the truth


def test_voc_size_that_contradicts_the_image_names_the_file(tmp_path, capsys):
    _jpeg(tmp_path / "shots" / "IMG_2385.JPG", (378, 504))
    xml = _voc_xml(tmp_path / "shots" / "IMG_2385.xml", "IMG_2385.JPG", (3000, 3000))
    assert main(["stats", str(tmp_path / "shots")]) == 2
    assert capsys.readouterr().err == (
        f"error: {xml}:3, field 'size': the annotation says the image is 3000x3000 but "
        f"{tmp_path}/shots/IMG_2385.JPG is 378x504 (upright)\n"
    )


def test_exif_turned_photo_stored_size_is_corrected_and_counted(tmp_path):
    """LabelImg shows a phone photo as stored: <size> and boxes are the stored pixels of an Orientation=6
    photo. Read upright, the box must cover the same pixels."""
    stored_box = (10, 5, 30, 15)  # x0, y0, x1, y1 in the stored 60x40 image
    _jpeg(tmp_path / "shots" / "IMG_1.jpg", (60, 40), exif_orientation=6, box=stored_box)
    _voc_xml(tmp_path / "shots" / "IMG_1.xml", "IMG_1.jpg", (60, 40), [("dog", stored_box)])
    report = ReadReport()
    _, _, records = read_source(str(tmp_path / "shots"), report=report)
    (record,) = list(records)
    assert (record.width, record.height) == (40, 60)
    assert record.boxes.tolist() == [[25.0, 10.0, 35.0, 30.0]]
    assert report.corrected == [
        f"{tmp_path}/shots/IMG_1.xml:3: <size> 60x40 is the stored size of an EXIF-turned photo (40x60 "
        "upright): boxes turned with it"
    ]
    from detforge import images

    upright = images.read(str(tmp_path / "shots" / "IMG_1.jpg"))
    white = np.argwhere(upright.min(axis=2) > 200)
    (y0, x0), (y1, x1) = white.min(axis=0), white.max(axis=0) + 1
    assert (int(x0), int(y0), int(x1), int(y1)) == (25, 10, 35, 30)  # the painted box, upright


# ------------------------------------------------------------------ mixed folders


def test_folder_with_two_formats_is_refused_with_how_to_pick(tmp_path, capsys):
    folder = tmp_path / "mixed"
    _jpeg(folder / "images" / "p.jpg")
    (folder / "labels").mkdir()
    (folder / "labels" / "p.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (folder / "data.yaml").write_text("names: [cat]\ntrain: images\n")
    _voc_xml(folder / "p.xml", "images/p.jpg", (80, 60), [("dog", (1, 1, 20, 20)), ("dog", (2, 2, 9, 9))])
    assert main(["stats", str(folder)]) == 2
    assert capsys.readouterr().err == (
        f"error: {folder}: this folder holds several label formats (YOLO data.yaml; 1 VOC .xml files): which "
        f"one to read is not guessed (name one as yolo:{folder} or voc:{folder}, or give --format)\n"
    )
    assert main(["stats", f"voc:{folder}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"] == {"dog": 2}
    assert (
        main(
            [
                "convert",
                str(folder),
                "--format",
                "yolo",
                "--to",
                "manifest",
                "--out",
                str(tmp_path / "y.manifest"),
            ]
        )
        == 0
    )
    assert [r.class_names for r in groundtruth.read_manifest(tmp_path / "y.manifest")] == [["cat"]]
    # a COCO JSON beside labels/ is refused the same way
    _coco(folder / "annotations" / "instances_default.json", [("images/p.jpg", 80, 60)], [])
    with pytest.raises(
        FormatError,
        match=r"several label formats \(YOLO data.yaml; COCO annotations/"
        r"instances_default.json; 1 VOC .xml files\)",
    ):
        detect_format(str(folder))


# ------------------------------------------------------------------ labelme, CVAT, encodings


def test_labelme_folder_rectangles_read_other_shapes_counted(tmp_path, capsys):
    folder = tmp_path / "labelme"
    _jpeg(folder / "one.jpg", (80, 60))
    _jpeg(folder / "two.jpg", (80, 60))
    shapes_one = [
        {
            "label": "dog",
            "points": [[30, 40], [10, 5]],
            "group_id": None,
            "shape_type": "rectangle",
            "flags": {},
        },
        {"label": "dog", "points": [[1, 1], [5, 1], [5, 5]], "shape_type": "polygon", "flags": {}},
        {"label": "eye", "points": [[3, 3]], "shape_type": "point", "flags": {}},
    ]
    shapes_two = [{"label": "cat", "points": [[0, 0], [80, 60]], "shape_type": "rectangle", "flags": {}}]
    for name, shapes in (("one", shapes_one), ("two", shapes_two)):
        (folder / f"{name}.json").write_text(
            json.dumps(
                {
                    "version": "5.4.1",
                    "flags": {},
                    "shapes": shapes,
                    "imagePath": f"{name}.jpg",
                    "imageData": None,
                    "imageHeight": 60,
                    "imageWidth": 80,
                }
            )
        )
    assert detect_format(str(folder)) == "labelme"
    report = ReadReport()
    kind, names, records = read_source(str(folder), report=report)
    records = {r.image_id: r for r in records}
    assert (kind, names) == ("labelme", ["cat", "dog"])
    assert records["one"].boxes.tolist() == [[10.0, 5.0, 30.0, 40.0]]
    assert records["one"].class_names == ["dog"]
    assert records["two"].boxes.tolist() == [[0.0, 0.0, 80.0, 60.0]]
    assert report.notes == ["2 labelme shapes that are not rectangles left out (point 1, polygon 1)"]
    assert main(["convert", str(folder), "--to", "coco", "--out", str(tmp_path / "c.json")]) == 0
    err = capsys.readouterr().err
    assert err == "note: 2 labelme shapes that are not rectangles left out (point 1, polygon 1)\n"
    # labelme's imagePath climbing out of the folder given is refused
    (folder / "two.json").write_text(
        json.dumps({"shapes": [], "imagePath": "../../etc/app.env.txt", "imageHeight": 1, "imageWidth": 1})
    )
    with pytest.raises(
        FormatError,
        match=r"two.json, field 'imagePath': imagePath '../../etc/app.env.txt' "
        r"climbs out of the dataset folder",
    ):
        list(read_source(str(folder))[2])


def test_cvat_voc_layout_subsets_are_splits(tmp_path):
    root = tmp_path / "cvat_voc"
    for name in ("a", "b", "c"):
        _jpeg(root / "JPEGImages" / f"{name}.jpg")
        _voc_xml(root / "Annotations" / f"{name}.xml", f"{name}.jpg", (80, 60))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "Train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "Validation.txt").write_text("c\n")
    (root / "ImageSets" / "Main" / "dog_Train.txt").write_text("a 1\nb 1\n")  # per-class list: not a split
    (root / "labelmap.txt").write_text("# label:color_rgb:parts:actions\ndog:250,50,83::\n")
    records = {r.image_id: r.split for r in read_source(str(root))[2]}
    assert records == {"a": "train", "b": "train", "c": "validation"}


def test_roboflow_coco_images_moved_into_split_images_folders(tmp_path):
    for split, name in (("train", "t.jpg"), ("valid", "v.jpg"), ("test", "x.jpg")):
        _jpeg(tmp_path / "rf" / split / "images" / name)
        _coco(tmp_path / "rf" / split / "_annotations.coco.json", [(name, 80, 60)], [(1, 1, [1, 2, 30, 40])])
    records = list(read_source(str(tmp_path / "rf"))[2])
    assert [(r.image_id, r.split) for r in records] == [("x", "test"), ("t", "train"), ("v", "validation")]
    assert records[0].source_ref == str(tmp_path / "rf" / "test" / "images" / "x.jpg")


def test_bom_accepted_and_non_utf8_json_names_line_and_column(tmp_path):
    _jpeg(tmp_path / "a.jpg")
    path = _coco(tmp_path / "c.json", [("a.jpg", 80, 60)], [(1, 1, [1, 1, 10, 10])])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # what Windows tools write
    assert [r.image_id for r in read_source(str(path))[2]] == ["a"]
    text = path.read_bytes()[3:].replace(b'"fish"', b'"poisson \xe9"')  # Latin-1, not UTF-8
    path.write_bytes(text)
    line = text[: text.index(b"\xe9")].count(b"\n") + 1
    column = text.index(b"\xe9") - text.rfind(b"\n", 0, text.index(b"\xe9"))
    with pytest.raises(FormatError) as error:
        read_source(str(path))
    assert str(error.value) == (
        f"{path}:{line}: not UTF-8 text: byte 0xe9 at line {line}, column {column} (save the file as UTF-8)"
    )
    path.write_text('{"images": [],\n  "categories": [}')
    with pytest.raises(FormatError, match=r"c.json:2: not valid JSON at line 2, column 18: "):
        read_source(str(path))


def test_unparseable_coco_file_is_passed_over_with_skip(tmp_path):
    for split in ("train", "valid"):
        _jpeg(tmp_path / "rf" / split / f"{split}.jpg")
        _coco(tmp_path / "rf" / split / "_annotations.coco.json", [(f"{split}.jpg", 80, 60)], [])
    (tmp_path / "rf" / "valid" / "_annotations.coco.json").write_text('{"images": [')
    with pytest.raises(FormatError, match=r"valid/_annotations.coco.json:1: not valid JSON"):
        read_source(str(tmp_path / "rf"))
    report = ReadReport()
    _, _, records = read_source(str(tmp_path / "rf"), on_error="skip", report=report)
    assert [r.image_id for r in records] == ["train"]
    assert len(report.skipped) == 1
    assert "valid/_annotations.coco.json:1: not valid JSON" in report.skipped[0][2]


# ------------------------------------------------------------------ convert keeps splits and classes


@pytest.fixture
def split_yolo(tmp_path) -> Path:
    root = tmp_path / "yolo"
    for split, names in (("train", ["t1", "t2", "t3"]), ("valid", ["v1", "v2"]), ("test", ["x1"])):
        for name in names:
            _jpeg(root / split / "images" / f"{name}.jpg")
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            (root / split / "labels" / f"{name}.txt").write_text(f"{1 + (name == 'x1')} 0.5 0.5 0.25 0.5\n")
    (root / "data.yaml").write_text(
        "train: train/images\nval: valid/images\ntest: test/images\n"
        "nc: 3\nnames: ['_background_', 'fish', 'shark']\n"
    )
    return root


def test_convert_keeps_splits_in_every_format(split_yolo, tmp_path):
    expected = {
        "t1": "train",
        "t2": "train",
        "t3": "train",
        "v1": "validation",
        "v2": "validation",
        "x1": "test",
    }
    s = convert(str(split_yolo), to="voc", out=str(tmp_path / "voc"))
    assert s.splits == {"train": 3, "validation": 2, "test": 1}
    main_sets = tmp_path / "voc" / "ImageSets" / "Main"
    assert {p.name: p.read_text() for p in main_sets.iterdir()} == {
        "train.txt": "t1\nt2\nt3\n",
        "val.txt": "v1\nv2\n",
        "test.txt": "x1\n",
    }
    s = convert(str(split_yolo), to="coco", out=str(tmp_path / "coco"))
    assert sorted(p.name for p in (tmp_path / "coco" / "annotations").iterdir()) == [
        "instances_test.json",
        "instances_train.json",
        "instances_val.json",
    ]
    assert [
        len(json.loads((tmp_path / "coco" / "annotations" / f"instances_{n}.json").read_text())["images"])
        for n in ("train", "val", "test")
    ] == [3, 2, 1]
    for middle in ("voc", "coco"):
        back = convert(str(tmp_path / middle), to="yolo", out=str(tmp_path / f"yolo-from-{middle}"))
        assert back.splits == {"train": 3, "validation": 2, "test": 1}
        assert yaml.safe_load((tmp_path / f"yolo-from-{middle}" / "data.yaml").read_text()) == {
            "train": "train/images",
            "val": "val/images",
            "test": "test/images",
            "nc": 2,
            "names": {0: "fish", 1: "shark"},
        }
        again = read_source(str(tmp_path / f"yolo-from-{middle}"))[2]
        assert {r.image_id: r.split for r in again} == expected
    s = convert(str(split_yolo), to="manifest", out=str(tmp_path / "m.manifest"))
    assert {r.image_id: r.split for r in groundtruth.read_manifest(tmp_path / "m.manifest")} == expected


def test_prepare_and_convert_keep_the_same_classes_for_one_coco_file(tmp_path, capsys):
    """labelme2coco and CVAT list a `_background_` category no box uses."""
    for name in ("a.jpg", "b.jpg"):
        _jpeg(tmp_path / name)
    path = _coco(
        tmp_path / "c.json",
        [("a.jpg", 80, 60), ("b.jpg", 80, 60)],
        [(1, 2, [1, 1, 10, 10]), (2, 3, [5, 5, 10, 10])],
        categories=((1, "_background_"), (2, "fish"), (3, "shark"), (4, "whale")),
    )
    assert main(["convert", str(path), "--to", "yolo", "--out", str(tmp_path / "y")]) == 0
    assert capsys.readouterr().err.startswith("classes no box uses, left out: _background_, whale\n")
    data = yaml.safe_load((tmp_path / "y" / "data.yaml").read_text())
    s = prepare([str(path)], str(tmp_path / "p"), validation_fraction=0)
    assert list(data["names"].values()) == s.classes == ["fish", "shark"] and data["nc"] == 2


# ------------------------------------------------------------------ hostile files


def test_yaml_alias_bomb_is_refused_naming_the_file(tmp_path, capsys):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)
    ]
    bomb = tmp_path / "data.yaml"
    bomb.write_text("\n".join(levels) + "\nnames: *i\ntrain: images\n")
    assert len(bomb.read_bytes()) < 600
    assert main(["stats", str(bomb)]) == 2
    assert capsys.readouterr().err == (
        f"error: {bomb}:2: not valid YAML: an alias (*a) is not accepted in a dataset file\n"
    )
    bomb.write_text("names: [a]\ntrain: images\n# " + "x" * (1 << 20) + "\n")
    assert main(["stats", str(bomb)]) == 2
    assert capsys.readouterr().err == (
        f"error: {bomb}: {(1 << 20) + 28} bytes is too large for a dataset YAML (the limit is 1048576)\n"
    )


@pytest.mark.parametrize("fmt", ["voc", "coco", "manifest"])
def test_image_paths_escaping_the_dataset_are_refused_and_nothing_is_copied(tmp_path, capsys, fmt):
    secret = tmp_path / "secret" / "app.env.txt"
    secret.parent.mkdir()
    secret.write_text("AWS_SECRET_ACCESS_KEY=hunter2\n")
    data = tmp_path / "a" / "b" / "data"
    _jpeg(data / ("JPEGImages/ok.jpg" if fmt == "voc" else "ok.jpg"))
    escape = "../../../secret/app.env.txt"
    if fmt == "voc":
        source = data / "Annotations"
        _voc_xml(source / "ok.xml", "ok.jpg", (80, 60))
        _voc_xml(source / "x.xml", escape, (80, 60))
        expected = (
            f"error: {source}/x.xml:2, field 'filename': image name '{escape}' climbs out of the "
            f"dataset folder {data}/JPEGImages\n"
        )
    elif fmt == "coco":
        source = _coco(data / "c.json", [("ok.jpg", 80, 60), (escape, 80, 60)], [])
        expected = (
            f"error: {source}, field 'image 2 (id 2).file_name': image name '{escape}' climbs out of "
            f"the dataset folder {data}\n"
        )
    else:  # a manifest may refer anywhere (prepare writes ../ references), but only to an image
        source = data / "m.manifest"
        groundtruth.write_manifest(
            source,
            [
                groundtruth.make_record(name, width=80, height=60, boxes_xyxy=[], class_ids=[], class_map={})
                for name in ("ok.jpg", escape)
            ],
        )
        expected = (
            f"error: {source}:2, field 'source-ref': not a JPEG/PNG/WEBP/BMP image (unknown format "
            "or corrupt data)\n"
        )
    for on_error in ("stop", "skip"):
        code = main(
            [
                "convert",
                str(source),
                "--to",
                "yolo",
                "--out",
                str(tmp_path / "out"),
                "--on-error",
                on_error,
                "--overwrite",
            ]
        )
        err = capsys.readouterr().err
        if on_error == "stop":
            assert (code, err) == (2, expected)
            assert not (tmp_path / "out").exists()
        else:
            assert code == 0 and f"skipped: {expected[len('error: ') :]}" in err
            assert sorted(p.name for p in (tmp_path / "out" / "train" / "images").iterdir()) == ["ok.jpg"]
    assert [p for p in tmp_path.rglob("app.env.txt")] == [secret]


def test_prepare_finds_a_manifests_missing_local_image(tmp_path, capsys):
    _jpeg(tmp_path / "a_1.jpg", (100, 50))
    path = tmp_path / "m.manifest"
    groundtruth.write_manifest(
        path,
        [
            groundtruth.make_record(
                name, width=100, height=50, boxes_xyxy=[[0, 0, 10, 5]], class_ids=[0], class_map={0: "cat"}
            )
            for name in ("a_1.jpg", "a_2.jpg")
        ],
    )
    assert main(["prepare", str(path), "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == f"error: {path}:2, field 'source-ref': cannot read: no such file\n"
    assert not (tmp_path / "p").exists()
    s = prepare([str(path)], str(tmp_path / "p"), on_error="skip", validation_fraction=0)
    assert (s.train, s.skipped) == (1, [f"{path}:2, field 'source-ref': cannot read: no such file"])


def test_review_stats_convert_prepare_share_images_and_on_error(tmp_path):
    import typer

    from detforge.cli import build_app
    from detforge.label.review import load_review

    commands = typer.main.get_command(build_app()).commands
    shared = {}
    for command in ("prepare", "convert", "stats", "review"):
        params = {p.opts[0]: (p.help, p.default) for p in commands[command].params if p.opts}
        shared[command] = {opt: params[opt] for opt in ("--images", "--on-error", "--label-attribute")}
    assert (
        shared["convert"]
        == shared["prepare"]
        == shared["stats"]
        == shared["review"]
        == {
            "--images": (
                "Image folder of VOC/COCO/labelme inputs (default: the layout's own); INPUT=DIR for "
                "one input's (repeatable).",
                None,
            ),
            "--on-error": ("stop at a bad line/box/file, or skip it and count it.", "stop"),
            "--label-attribute": (
                "A manifest's label attribute (default: found by its metadata type).",
                None,
            ),
        }
    )
    review_inputs = next(p for p in commands["review"].params if p.name == "manifests")
    assert "YOLO data.yaml" in review_inputs.help and "labelme" in review_inputs.help
    # review reads any format with the same --images / --on-error treatment
    for name in ("a.jpg", "c.jpg"):
        _jpeg(tmp_path / "pics" / name)
    path = _coco(
        tmp_path / "ann" / "c.json",
        [(n, 80, 60) for n in ("a.jpg", "b.jpg", "c.jpg")],
        [(1, 1, [1, 1, 10, 10]), (3, 1, [2, 2, 10, 10])],
    )
    with pytest.raises(
        DetforgeError,
        match=r"c.json, field 'image 1 \(id 1\).file_name': image 'a.jpg' "
        r"not found",
    ):
        load_review([str(path)], discard=str(tmp_path / "d.txt"))  # not beside the JSON
    report = ReadReport()
    session = load_review(
        [str(path)],
        discard=str(tmp_path / "d.txt"),
        images=str(tmp_path / "pics"),
        on_error="skip",
        report=report,
    )
    assert session.progress()["total"] == 2 and len(report.skipped) == 1


def test_images_per_input(tmp_path, capsys):
    """Two exports whose images live in folders of their own: one --images INPUT=DIR each."""
    paths = []
    for export, names in (("phoneA", ["IMG_2385.JPG"]), ("phoneB", ["IMG_2385.JPG", "IMG_2386.JPG"])):
        for name in names:
            _jpeg(tmp_path / "pictures" / export / name)
        paths.append(
            _coco(
                tmp_path / "labels" / f"{export}.json",
                [(n, 80, 60) for n in names],
                [(i + 1, 1, [1, 1, 10, 10]) for i in range(len(names))],
            )
        )
    a, b = (str(p) for p in paths)
    out = tmp_path / "p"
    assert (
        main(
            [
                "prepare",
                a,
                b,
                "--out",
                str(out),
                "--validation-fraction",
                "0",
                "--images",
                f"{a}={tmp_path}/pictures/phoneA",
                "--images",
                f"{b}={tmp_path}/pictures/phoneB",
            ]
        )
        == 0
    )
    refs = sorted(
        groundtruth.resolve_source_ref(r.source_ref, out / "train.manifest")
        for r in groundtruth.read_manifest(out / "train.manifest")
    )
    assert refs == [
        f"{tmp_path}/pictures/phoneA/IMG_2385.JPG",
        f"{tmp_path}/pictures/phoneB/IMG_2385.JPG",
        f"{tmp_path}/pictures/phoneB/IMG_2386.JPG",
    ]
    capsys.readouterr()
    assert main(["stats", a, "--images", f"{tmp_path}/x.json={tmp_path}"]) == 2
    assert capsys.readouterr().err == (
        f"error: --images '{tmp_path}/x.json={tmp_path}' names "
        f"'{tmp_path}/x.json', which is not one of the inputs (the inputs "
        f"are {a})\n"
    )


def test_yolo_label_file_with_a_bom(tmp_path):
    _jpeg(tmp_path / "train" / "images" / "a.jpg", (80, 60))
    (tmp_path / "train" / "labels").mkdir()
    (tmp_path / "train" / "labels" / "a.txt").write_bytes(b"\xef\xbb\xbf0 0.5 0.5 0.25 0.5\n")
    (tmp_path / "data.yaml").write_bytes(b"\xef\xbb\xbfnames: [fish]\ntrain: train/images\n")
    (record,) = list(read_source(str(tmp_path / "data.yaml"))[2])
    assert record.boxes.tolist() == [[30.0, 15.0, 50.0, 45.0]] and record.class_names == ["fish"]
