"""Whole outputs: prepare, convert (every format) and their s3:// outputs appear whole or not at all, and an
existing output is refused unless --overwrite, which replaces it whole (never a mix of two runs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from PIL import Image

from detforge import storage
from detforge.cli import main
from detforge.data import groundtruth
from detforge.data.convert import convert
from detforge.data.output import OutputExistsError, whole_output
from detforge.data.prepare import prepare

CLASSES_A = {0: "cat", 1: "dog"}


def _dataset(root: Path, names: list[str], class_map: dict[int, str], size=(64, 48)) -> Path:
    """A manifest of len(names) images, each with one box per class of ``class_map``."""
    records = []
    for n, name in enumerate(names):
        path = root / "images" / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", size, (70, 70, 70))
        image.paste((200, 30 * n % 256, 9 * n), (n * 5 % size[0], 0, n * 5 % size[0] + 5, size[1]))
        image.save(path)  # distinct photos (prepare reports same-bytes copies as duplicates)
        ids = sorted(class_map)
        records.append(
            groundtruth.make_record(
                f"images/{name}.jpg",
                width=size[0],
                height=size[1],
                boxes_xyxy=[[2 + 3 * i, 2, 20 + 3 * i, 30] for i in range(len(ids))],
                class_ids=ids,
                class_map=class_map,
            )
        )
    manifest = root / "in.manifest"
    groundtruth.write_manifest(manifest, records)
    return manifest


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_convert_into_an_existing_output_is_refused_and_overwrite_replaces_it_whole(tmp_path, capsys):
    a = _dataset(tmp_path / "a", [f"a{i}" for i in range(3)], CLASSES_A)
    b = _dataset(tmp_path / "b", ["b0"], {0: "bird"})
    out = tmp_path / "x"
    assert main(["convert", str(a), "--to", "yolo", "--out", str(out)]) == 0
    before = _tree(out)
    assert sorted(before) == ["data.yaml"] + [
        f"train/{k}/a{i}.{s}" for k, s in (("images", "jpg"), ("labels", "txt")) for i in range(3)
    ]
    capsys.readouterr()
    # B's class 0 would relabel A's leftover label files: refused, one line naming the folder
    assert main(["convert", str(b), "--to", "yolo", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {out}: the output folder is not empty (holds data.yaml, train) (give --overwrite to "
        "replace it whole, or another --out)\n"
    )
    assert _tree(out) == before
    assert main(["convert", str(b), "--to", "yolo", "--out", str(out), "--overwrite"]) == 0
    after = _tree(out)
    assert sorted(after) == ["data.yaml", "train/images/b0.jpg", "train/labels/b0.txt"]  # nothing of A left
    assert yaml.safe_load(after["data.yaml"]) == {"train": "train/images", "nc": 1, "names": {0: "bird"}}
    assert _leftovers(tmp_path) == []
    # the same rule for a single-file output
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"c.json: the output file is not empty \(holds c.json\)"):
        convert(str(a), to="coco", out=str(tmp_path / "c.json"))
    assert (tmp_path / "c.json").read_text() == "{}"


@pytest.mark.parametrize("fmt", ["yolo", "voc", "coco"])
def test_a_failure_half_way_leaves_the_previous_output_untouched(tmp_path, monkeypatch, fmt):
    a = _dataset(tmp_path / "a", [f"a{i}" for i in range(4)], CLASSES_A)
    out = tmp_path / "out"
    convert(str(a), to=fmt, out=str(out))
    before = _tree(out)
    assert len(before) == {"yolo": 9, "voc": 4, "coco": 1}[fmt]

    real_write = storage.write_bytes
    calls = []

    def failing_write(uri, data):  # the second file written fails (a full disk, a crash ...)
        calls.append(uri)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", failing_write)
    b = _dataset(tmp_path / "b", [f"b{i}" for i in range(4)], {0: "bird"})
    if fmt == "coco":  # one file per split: a second split makes the second write
        lines = (tmp_path / "b" / "in.manifest").read_text().splitlines()
        marked = [
            dict(json.loads(line), **{groundtruth.SPLIT_FIELD: s})
            for line, s in zip(lines, ["train", "train", "validation", "validation"], strict=True)
        ]
        (tmp_path / "b" / "in.manifest").write_text("".join(json.dumps(m) + "\n" for m in marked))
    with pytest.raises(OSError, match="No space left on device"):
        convert(str(b), to=fmt, out=str(out), overwrite=True)
    assert len(calls) == 2
    assert _tree(out) == before
    assert _leftovers(tmp_path) == []
    # and into a new folder: nothing at all
    calls.clear()
    with pytest.raises(OSError, match="No space left on device"):
        convert(str(b), to=fmt, out=str(tmp_path / "new"))
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []


def test_whole_output_keeps_the_previous_output_on_ctrl_c(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), whole_output(target, overwrite=True) as staging:
        Path(staging, "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert _tree(target) == {"old.txt": b"old"} and _leftovers(tmp_path) == []
    with whole_output(target, overwrite=True) as staging:
        Path(staging, "new.txt").write_text("new")
    assert _tree(target) == {"new.txt": b"new"} and _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is no output to protect
    with whole_output(empty) as staging:
        Path(staging, "a.txt").write_text("a")
    assert _tree(empty) == {"a.txt": b"a"}


def test_prepare_into_a_folder_with_a_stale_test_manifest(tmp_path, capsys):
    a = _dataset(tmp_path / "a", [f"photo{i}" for i in range(10)], CLASSES_A)
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "test.manifest").write_text('{"source-ref": "old.jpg"}\n')
    assert main(["prepare", str(a), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {out}: the output folder is not empty (holds test.manifest) (give --overwrite "
        "to replace it whole, or another --out)\n"
    )
    s = prepare([str(a)], str(out), overwrite=True)
    assert sorted(os.listdir(out)) == [
        "classes.json",
        "summary.json",
        "train.manifest",
        "validation.manifest",
    ]
    assert s.train + s.validation == 10 and s.test == 0
    assert json.loads((out / "summary.json").read_text())["test"] == 0
    assert _leftovers(tmp_path) == []
    # the written manifests find their images from the final folder, not the staging one
    for name in ("train", "validation"):
        for record in groundtruth.read_manifest(out / f"{name}.manifest"):
            assert os.path.isfile(groundtruth.resolve_source_ref(record.source_ref, out / "x.manifest"))


def test_s3_outputs_are_refused_when_present_and_replaced_whole(tmp_path, make_bucket):
    bucket = make_bucket()
    a = _dataset(tmp_path / "a", ["a0", "a1"], CLASSES_A)
    b = _dataset(tmp_path / "b", ["b0"], {0: "bird"})
    out = f"s3://{bucket}/yolo"
    convert(str(a), to="yolo", out=out)
    assert sorted(storage.list_files(out)) == [f"{out}/data.yaml"] + [
        f"{out}/train/{k}/a{i}.{s}" for k, s in (("images", "jpg"), ("labels", "txt")) for i in range(2)
    ]
    with pytest.raises(OutputExistsError, match=rf"s3://{bucket}/yolo: the output folder is not empty"):
        convert(str(b), to="yolo", out=out)
    convert(str(b), to="yolo", out=out, overwrite=True)
    assert sorted(storage.list_files(out)) == [
        f"{out}/data.yaml",
        f"{out}/train/images/b0.jpg",
        f"{out}/train/labels/b0.txt",
    ]
    s = prepare([str(a)], f"s3://{bucket}/prepared", validation_fraction=0.5)
    assert sorted(storage.list_files(f"s3://{bucket}/prepared")) == [
        f"s3://{bucket}/prepared/{n}"
        for n in ("classes.json", "summary.json", "train.manifest", "validation.manifest")
    ]
    assert s.train + s.validation == 2
