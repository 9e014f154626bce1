"""detforge predict: inputs (folders, manifests, s3), skipped images, ground truth, the CLI, its reports."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CLASSES, need_binary

from detforge import storage
from detforge.cli import main
from detforge.data.groundtruth import make_record, write_manifest
from detforge.deploy.predict import match_truth, predict, resolve_inputs
from detforge.errors import ConfigError, ManifestError
from detforge.evaluation.evaluate import evaluate
from detforge.images import ImageError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def predictor(tiny_deploy):
    from detforge.runtime import Predictor

    return Predictor(tiny_deploy, threads=1)


@pytest.fixture
def images(tiny_deploy, tmp_path) -> Path:
    """The tiny model's four validation PNGs in a folder tree, with a corrupt PNG and a text file."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    validation = tiny_deploy.parent / "validation"
    for i, png in enumerate(sorted(validation.glob("*.png"))):
        shutil.copy(png, folder / ("sub" if i % 2 else "") / png.name)
    (folder / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    return folder


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines()]


def test_folder_skips_and_names_a_corrupt_image(predictor, images, tmp_path):
    out = tmp_path / "p.jsonl"
    seen = []
    result = predict(
        "unused",
        [str(images)],
        out=str(out),
        predictor=predictor,
        batch_size=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert result.images == 4
    assert [name for name, _ in result.skipped] == [str(images / "sub" / "corrupt.png")]
    assert "not a JPEG/PNG/WEBP/BMP image" in result.skipped[0][1]
    assert seen[-1] == (5, 5) and all(total == 5 for _, total in seen)
    lines = read_lines(out)
    paths = [line["source-ref"] for line in lines]
    assert paths == sorted(str(p) for p in images.rglob("box_*.png"))  # recursive, sorted, corrupt skipped
    assert [line["image"] for line in lines] == [Path(p).name for p in paths]
    assert all((line["width"], line["height"]) == (64, 64) for line in lines)
    # exactly what the Predictor answers for those files
    expected = predictor.predict(paths)
    assert [line["prediction"] for line in lines] == [d.to_sagemaker() for d in expected]
    assert result.detections == sum(len(d) for d in expected)
    per_class = [sum(int((d.class_ids == c).sum()) for d in expected) for c in (0, 1)]
    assert result.detections_per_class == per_class
    assert result.threshold == predictor.threshold and result.metrics is None


def test_threshold_and_single_images(predictor, images, tmp_path):
    out = tmp_path / "p.jsonl"
    files = sorted(str(p) for p in images.rglob("box_*.png"))
    result = predict("unused", files[:2], out=str(out), predictor=predictor, threshold=0.3)
    lines = read_lines(out)
    assert [line["source-ref"] for line in lines] == files[:2] and result.threshold == 0.3
    assert all(row[1] >= 0.3 for line in lines for row in line["prediction"])
    assert [line["prediction"] for line in lines] == [
        d.to_sagemaker() for d in predictor.predict(files[:2], threshold=0.3)
    ]


def test_on_error_stop_writes_nothing(predictor, images, tmp_path):
    out = tmp_path / "out" / "p.jsonl"
    with pytest.raises(ImageError, match="corrupt.png: not a JPEG/PNG/WEBP/BMP image"):
        predict(
            "unused",
            [str(images)],
            out=str(out),
            predictor=predictor,
            on_error="stop",
            report=str(tmp_path / "out" / "r.pdf"),
            html=str(tmp_path / "out" / "r.html"),
        )
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_labeled_manifest_gives_the_same_map_as_evaluate(predictor, tiny_deploy, tmp_path):
    manifest = tiny_deploy.parent / "validation" / "data.manifest"  # relative source-refs
    out = tmp_path / "p.jsonl"
    result = predict("unused", [str(manifest)], out=str(out), predictor=predictor)
    lines = read_lines(out)
    assert [line["source-ref"] for line in lines] == [f"box_2_{i:03d}.png" for i in range(4)]
    assert result.images_with_truth == 4 and result.metrics is not None
    evaluated = evaluate(str(out), str(manifest), score_threshold=result.threshold, coco=False).metrics
    m = result.metrics
    assert m.voc07_map == evaluated.voc07_map and m.all_point_map == evaluated.all_point_map
    assert (m.tp, m.fp, m.fn, m.n_gt) == (evaluated.tp, evaluated.fp, evaluated.fn, 4)
    assert m.num_detections == result.detections


def test_match_truth_marks_tp_fp_and_missed():
    record = make_record(
        "a.jpg",
        width=200,
        height=100,
        boxes_xyxy=[[20, 10, 60, 50], [100, 20, 180, 80]],
        class_ids=[0, 1],
        class_map=dict(enumerate(TINY_CLASSES)),
    )
    rows = [
        [0, 0.9, 0.1, 0.1, 0.3, 0.5],  # the blue box exactly: TP
        [0, 0.8, 0.1, 0.1, 0.3, 0.5],  # the same box again: FP
        [0, 0.7, 0.5, 0.2, 0.9, 0.8],  # on the yellow box but blue: FP, the yellow box is missed
        [1, 0.6, 0.0, 0.0, 0.05, 0.05],
    ]  # nowhere: FP
    boxes, scores, classes, is_tp, missed = match_truth(record, rows, iou_threshold=0.5)
    assert boxes[0].tolist() == [20, 10, 60, 50] and scores.tolist() == [0.9, 0.8, 0.7, 0.6]
    assert classes.tolist() == [0, 0, 0, 1]
    assert is_tp.tolist() == [True, False, False, False] and missed.tolist() == [False, True]
    _, _, _, is_tp, missed = match_truth(record, [], iou_threshold=0.5)
    assert is_tp.tolist() == [] and missed.tolist() == [True, True]


def test_unlabeled_manifest_and_a_missing_image(predictor, images, tmp_path):
    manifest = tmp_path / "input.manifest"
    refs = [str(images / "box_2_000.png"), "s/absent.png", str(images / "sub" / "box_2_001.png")]
    manifest.write_text("".join(json.dumps({"source-ref": ref, "color": "blue"}) + "\n" for ref in refs))
    out = tmp_path / "p.jsonl"
    result = predict("unused", [str(manifest)], out=str(out), predictor=predictor)
    assert result.images == 2 and result.metrics is None and result.images_with_truth == 0
    assert result.skipped == [("s/absent.png", "cannot read: no such file")]
    assert [line["source-ref"] for line in read_lines(out)] == [refs[0], refs[2]]


def test_bad_inputs_are_named(predictor, images, tmp_path):
    out = str(tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="nowhere: no such file, folder or prefix"):
        predict("unused", [str(tmp_path / "nowhere")], out=out, predictor=predictor)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: no images"):
        predict("unused", [str(tmp_path / "empty")], out=out, predictor=predictor)
    with pytest.raises(ConfigError, match="threshold must be in"):
        predict("unused", [str(images)], out=out, predictor=predictor, threshold=1.5)
    with pytest.raises(ConfigError, match="on_error"):
        predict("unused", [str(images)], out=out, predictor=predictor, on_error="ignore")
    manifest = tmp_path / "three.manifest"
    names = {0: "blue box", 1: "yellow box", 2: "red box"}
    write_manifest(
        manifest,
        [
            make_record(
                str(images / name),
                width=64,
                height=64,
                boxes_xyxy=[[0, 0, 9, 9]],
                class_ids=[cid],
                class_map=names,
            )
            for name, cid in (("box_2_000.png", 0), ("box_2_002.png", 2))
        ],
    )
    with pytest.raises(ManifestError, match=r"three.manifest:2: class id 2 is not one of the model's 2"):
        predict("unused", [str(manifest)], out=out, predictor=predictor)
    bad = tmp_path / "bad.manifest"
    bad.write_text('{"source-ref": "a.png"}\n{"color": "blue"}\n')
    with pytest.raises(ManifestError, match="bad.manifest:2, field 'source-ref'"):
        predict("unused", [str(bad)], out=out, predictor=predictor)
    assert not (tmp_path / "p.jsonl").exists()


def test_class_names_that_differ_are_warned(predictor, images, tmp_path):
    manifest = tmp_path / "m.manifest"
    write_manifest(
        manifest,
        [
            make_record(
                str(images / "box_2_000.png"),
                width=64,
                height=64,
                boxes_xyxy=[[0, 0, 9, 9]],
                class_ids=[1],
                class_map={0: "blue box", 1: "green box"},
            )
        ],
    )
    result = predict("unused", [str(manifest)], out=str(tmp_path / "p.jsonl"), predictor=predictor)
    assert result.warnings == [f"class 1 is 'green box' in {manifest}:1 but 'yellow box' in the model"]


def test_s3_prefix_and_manifest_in_and_out(predictor, images, tmp_path, make_bucket):
    bucket = make_bucket()
    local = sorted(images.rglob("*.png"))
    for path in local:
        storage.copy_file(str(path), f"s3://{bucket}/frames/{path.relative_to(images)}")
    records = [
        make_record(
            f"s3://{bucket}/frames/{p.relative_to(images)}",
            width=64,
            height=64,
            boxes_xyxy=[[10, 10, 40, 40]],
            class_ids=[0],
            class_map={0: "blue box"},
        )
        for p in local
        if p.name != "corrupt.png"
    ]
    write_manifest(f"s3://{bucket}/labels/output.manifest", records)
    out = f"s3://{bucket}/out/predictions.jsonl"
    specs = resolve_inputs([f"s3://{bucket}/frames", f"s3://{bucket}/labels/output.manifest"])
    assert [(s.kind, s.count) for s in specs] == [("folder", 5), ("manifest", 4)]
    result = predict(
        "unused",
        [f"s3://{bucket}/frames", f"s3://{bucket}/labels/output.manifest"],
        out=out,
        predictor=predictor,
        html=str(tmp_path / "r.html"),
    )
    assert result.images == 8 and [name for name, _ in result.skipped] == [
        f"s3://{bucket}/frames/sub/corrupt.png"
    ]
    assert result.images_with_truth == 4
    lines = read_lines(out)
    assert lines[0]["source-ref"] == f"s3://{bucket}/frames/box_2_000.png"
    assert lines[0]["image"] == "box_2_000.png"
    expected = predictor.predict([str(p) for p in local if p.name != "corrupt.png"])
    assert [line["prediction"] for line in lines] == [d.to_sagemaker() for d in expected] * 2
    assert (tmp_path / "r.html").read_text().count('<figure class="item"') == 8


def test_cli_writes_predictions_pdf_and_html(tiny_deploy, images, tmp_path, capsys):
    pdftoppm = need_binary("pdftoppm")
    manifest = tiny_deploy.parent / "validation" / "data.manifest"
    more = tmp_path / "more"
    more.mkdir()
    for i in range(10):  # 4 + 4 + 10 images: 18 cells, a title page and two grid pages
        shutil.copy(images / "box_2_000.png", more / f"copy_{i:02d}.png")
    out, pdf, page = tmp_path / "p.jsonl", tmp_path / "r.pdf", tmp_path / "r.html"
    code = main(
        [
            "predict",
            str(tiny_deploy),
            str(images),
            str(manifest),
            str(more),
            "--out",
            str(out),
            "--report",
            str(pdf),
            "--html",
            str(page),
            "--threshold",
            "0.1",
            "--batch-size",
            "4",
            "--threads",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "18 images," in captured.out and "images/s" in captured.out
    assert "against the labels of 4 images: mAP (VOC07, IoU 0.5)" in captured.out
    assert "skipped 1 unreadable images" in captured.out and "corrupt.png" in captured.out
    assert len(read_lines(out)) == 18
    done = subprocess.run(
        [pdftoppm, "-png", "-r", "40", str(pdf), str(tmp_path / "page")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stderr == ""
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == 3
    from PIL import Image

    for png in pages:
        pixels = np.asarray(Image.open(png).convert("L"))
        assert (pixels < 250).mean() > 0.01 and pixels.std() > 5
    assert page.read_text().count('<figure class="item"') == 18


def test_cli_errors_exit_2(tiny_deploy, tmp_path, capsys):
    out = str(tmp_path / "p.jsonl")
    code = main(["predict", str(tiny_deploy), str(tmp_path / "nowhere.jpg"), "--out", out])
    assert code == 2 and "nowhere.jpg: no such image" in capsys.readouterr().err
    code = main(["predict", str(tmp_path), str(tiny_deploy.parent / "validation"), "--out", out])
    assert code == 2 and "not a deploy folder" in capsys.readouterr().err


def test_an_s3_deploy_folder_predicts_evaluates_and_fails_as_a_local_one(
    tiny_deploy, images, tmp_path, make_bucket, monkeypatch, capsys
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bucket = make_bucket()
    for name in ("model.onnx", "model.json"):
        storage.copy_file(str(tiny_deploy / name), f"s3://{bucket}/deploy/{name}")
    manifest = tiny_deploy.parent / "validation" / "data.manifest"
    local_out, remote_out = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    for deploy, out in ((str(tiny_deploy), local_out), (f"s3://{bucket}/deploy/", remote_out)):
        code = main(["predict", deploy, str(images), str(manifest), "--out", str(out), "--threads", "1"])
        assert code == 0, capsys.readouterr().err
    assert remote_out.read_bytes() == local_out.read_bytes()
    local = evaluate(str(tiny_deploy), str(manifest), coco=False).metrics
    remote = evaluate(f"s3://{bucket}/deploy", str(manifest), coco=False).metrics
    assert remote.voc07_map == local.voc07_map and remote.tp == local.tp
    # the same missing file, the same error, wherever the folder is
    storage.copy_file(str(tiny_deploy / "model.json"), f"s3://{bucket}/half/model.json")
    capsys.readouterr()
    for deploy in (f"s3://{bucket}/half", f"s3://{bucket}/nothing"):
        code = main(["predict", deploy, str(images), "--out", str(tmp_path / "x.jsonl")])
        err = capsys.readouterr().err
        assert code == 2 and deploy in err
        assert ("missing model.onnx" if "half" in deploy else "not a deploy folder") in err
    assert not (tmp_path / "x.jsonl").exists()
