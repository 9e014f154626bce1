"""``detforge evaluate`` on a predictions file: exact metrics, written files, the CLI, bad input."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
import typer
from typer.testing import CliRunner

from detforge.cli import evaluate as evaluate_cli
from detforge.data.groundtruth import make_record, read_manifest, write_manifest
from detforge.errors import ConfigError, FormatError, ManifestError
from detforge.evaluation.evaluate import evaluate, find_source

CLASSES = ["blue box", "yellow box"]
CMAP = {0: "blue box", 1: "yellow box"}
W, H = 200, 100


def norm(box):
    return [box[0] / W, box[1] / H, box[2] / W, box[3] / H]


@pytest.fixture
def data(tmp_path):
    """Three 200x100 images; hand-computed expectations in test_predictions_end_to_end."""
    records = [
        make_record(
            "s3://bucket/imgs/a.jpg",
            width=W,
            height=H,
            boxes_xyxy=[[20, 10, 60, 50], [100, 20, 180, 80]],
            class_ids=[0, 1],
            class_map=CMAP,
        ),
        make_record(
            "s3://bucket/imgs/b.jpg",
            width=W,
            height=H,
            boxes_xyxy=[[0, 0, 50, 50]],
            class_ids=[0],
            class_map=CMAP,
        ),
        make_record("s3://bucket/imgs/c.jpg", width=W, height=H, boxes_xyxy=[], class_ids=[], class_map={}),
    ]
    manifest = tmp_path / "validation.manifest"
    write_manifest(manifest, records)
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    lines = [
        # b first: the order of predictions does not matter; matched by source-ref
        {
            "source-ref": "s3://bucket/imgs/b.jpg",
            "image": "b.jpg",
            "prediction": [[1, 0.6, *norm([120, 0, 160, 40])]],
        },
        # a by file name: blue found (.9), yellow found (.8), blue again (.7, a duplicate)
        {
            "image": "a.jpg",
            "prediction": [
                [0, 0.9, *norm([20, 10, 60, 50])],
                [1, 0.8, *norm([100, 20, 180, 80])],
                [0, 0.7, *norm([21, 10, 60, 50])],
            ],
        },
        # c: no line at all
    ]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return tmp_path, manifest, predictions


def test_predictions_end_to_end(data):
    folder, manifest, predictions = data
    out = folder / "eval"
    result = evaluate(str(predictions), str(manifest), out_dir=str(out))
    m = result.metrics
    # blue: 2 boxes; .9 TP, .7 FP (duplicate) -> P/R (1, 1/2), (1/2, 1/2): 11-point 6/11, all-point 1/2
    # yellow: 1 box; .8 TP, .6 FP (nothing there) -> (1, 1), (1/2, 1): 11-point 1, all-point 1
    assert m.per_class_ap_voc07 == {0: pytest.approx(6 / 11, abs=1e-12), 1: pytest.approx(1.0, abs=1e-12)}
    assert m.voc07_map == pytest.approx(17 / 22, abs=1e-12)
    assert m.all_point_map == pytest.approx(0.75, abs=1e-12)
    assert (m.tp, m.fp, m.fn, m.num_images) == (2, 2, 1, 3)
    assert result.images_without_predictions == 1
    assert result.class_names == CLASSES and result.source == "predictions"
    # rows GT blue, yellow, background; columns predicted blue, yellow, background
    np.testing.assert_array_equal(m.confusion_matrix, [[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    # pycocotools AP50 samples the envelope at 101 recalls: blue 1 at recall 0..0.5 (51 points), yellow 1
    assert result.coco["AP50"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-12)

    written = sorted(p.name for p in out.iterdir())
    assert written == ["confusion_matrix.png", "metrics.json", "pr_0_blue_box.png", "pr_1_yellow_box.png"]
    for name in written:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["validation:mAP"] == pytest.approx(17 / 22)
    assert [c["name"] for c in saved["per_class"]] == CLASSES
    assert saved["confusion_matrix"]["labels"] == CLASSES + ["background"]
    assert saved["pr_curves"]["yellow box"] == {
        "scores": [0.8, 0.6],
        "precision": [1.0, 0.5],
        "recall": [1.0, 1.0],
    }
    assert saved["coco"]["AP50"] == pytest.approx(result.coco["AP50"])


def test_iou_threshold_and_stem_matching(data, tmp_path):
    folder, manifest, _ = data
    predictions = tmp_path / "p.jsonl"
    # matched by stem; the box has IoU 40*40/(50*50) = 0.64 with b's blue box
    predictions.write_text(json.dumps({"image": "b", "prediction": [[0, 0.9, *norm([0, 0, 40, 40])]]}) + "\n")
    assert evaluate(str(predictions), str(manifest), coco=False).metrics.per_class_ap_all_point[0] == 0.5
    assert (
        evaluate(
            str(predictions), str(manifest), iou_threshold=0.7, coco=False
        ).metrics.per_class_ap_all_point[0]
        == 0.0
    )


def test_class_names_from_the_manifest_without_classes_json(data):
    folder, manifest, predictions = data
    (folder / "classes.json").unlink()
    result = evaluate(str(predictions), str(manifest), coco=False)
    assert result.class_names == CLASSES
    assert result.metrics.voc07_map == pytest.approx(17 / 22)


def test_cli_prints_a_table_and_writes_files(data):
    folder, manifest, predictions = data
    app = typer.Typer()
    evaluate_cli.register(app)
    app.command("unused")(lambda: None)  # two commands, so typer keeps the command name
    out = folder / "cli-out"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(predictions), str(manifest), "--out", str(out), "--threshold", "0.75", "--no-coco"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "validation:mAP (VOC07 11-point) = 0.773" in result.output
    assert "yellow box" in result.output and "1 manifest images had no predictions line" in result.output
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["score_threshold"] == 0.75 and saved["coco"] is None
    assert (saved["tp"], saved["fp"], saved["fn"]) == (2, 0, 1)  # .9 and .8 kept


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"image": "zzz.jpg", "prediction": []}',
            "p.jsonl:2, field 'image': image 'zzz.jpg' is not in the manifest",
        ),
        (
            '{"image": "b.jpg", "prediction": [[2, 0.5, 0, 0, 0.1, 0.1]]}',
            "p.jsonl:2, field 'prediction[0].class_id': unknown class id 2 (the classes are 0..1)",
        ),
        (
            '{"image": "b.jpg", "prediction": [[0, NaN, 0, 0, 0.1, 0.1]]}',
            "p.jsonl:2, field 'prediction[0].score': score is nan",
        ),
        (
            '{"image": "b.jpg", "prediction": [[0, 0.5, 0, 0, 0.1]]}',
            "p.jsonl:2, field 'prediction[0]': expected [class_id, score, xmin, ymin, xmax, ymax] numbers",
        ),
        ('{"image": "b.jpg", "prediction": [[0.5, 0.5, 0, 0, 0.1, 0.1]]}', "unknown class id 0.5"),
        ('{"image": "b.jpg"}', "p.jsonl:2, field 'prediction': missing or not a list"),
        (
            '{"image": "a.jpg", "prediction": []}',
            "p.jsonl:2, field 'image': second predictions line for image",
        ),
        ('{"image": "b.jpg", "prediction": [}', "p.jsonl:2: not valid JSON"),
    ],
)
def test_bad_predictions_name_file_and_line(data, tmp_path, line, message):
    _, manifest, _ = data
    path = write_lines(tmp_path / "p.jsonl", '{"image": "a.jpg", "prediction": []}', line)
    with pytest.raises(FormatError) as info:
        evaluate(path, str(manifest), coco=False)
    assert message in str(info.value)


def test_ambiguous_names_and_unknown_sources(data, tmp_path):
    _, manifest, _ = data
    twin = tmp_path / "twins.manifest"
    write_manifest(
        twin,
        [
            make_record(f"s3://b/{d}/x.jpg", width=W, height=H, boxes_xyxy=[], class_ids=[], class_map=CMAP)
            for d in ("one", "two")
        ],
    )
    path = write_lines(tmp_path / "p.jsonl", '{"image": "x.jpg", "prediction": []}')
    with pytest.raises(FormatError, match="matches 2 manifest images .*give the full source-ref"):
        evaluate(path, str(twin), coco=False)
    ok = write_lines(
        tmp_path / "q.jsonl", '{"source-ref": "s3://b/two/x.jpg", "image": "x.jpg", "prediction": []}'
    )
    assert evaluate(ok, str(twin), coco=False).images_without_predictions == 1
    with pytest.raises(ConfigError, match="not a predictions JSON Lines file or a training run folder"):
        find_source(str(tmp_path / "nothing-here"))
    assert find_source(str(tmp_path / "deploy" / "model.onnx")) == "deploy"


def test_manifest_class_outside_classes_json(data):
    folder, manifest, predictions = data
    (folder / "classes.json").write_text(json.dumps(["blue box"]))
    with pytest.raises(ManifestError, match=r"validation.manifest:1: class id 1 is not one of the 1 classes"):
        evaluate(str(predictions), str(manifest), coco=False)


def test_real_manifest_with_perfect_predictions(shared_data, tmp_path):
    manifest = shared_data / "groundtruth" / "blue-box-large-job-public.output.manifest"
    records = list(read_manifest(manifest))
    lines = []
    for r in records:
        boxes = r.boxes / [r.width, r.height, r.width, r.height]
        rows = [[int(c), 0.9, *b] for c, b in zip(r.class_ids, boxes.tolist(), strict=True)]
        lines.append(orjson.dumps({"image": r.source_ref.rsplit("/", 1)[-1], "prediction": rows}))
    predictions = tmp_path / "perfect.jsonl"
    predictions.write_bytes(b"\n".join(lines) + b"\n")
    result = evaluate(str(predictions), str(manifest), coco=False)
    n_boxes = sum(len(r.boxes) for r in records)
    assert n_boxes > 0 and result.metrics.n_gt == n_boxes and result.metrics.num_images == len(records)
    assert result.metrics.voc07_map == pytest.approx(1.0) and result.metrics.fp == 0


def test_run_folder_gives_the_same_metrics_as_its_predictions(tmp_path):
    """A run folder is evaluated by running its model; the same detections as a predictions file agree."""
    torch = pytest.importorskip("torch")
    from PIL import Image

    from detforge.models import build_model, labels_to_class_ids
    from detforge.training.checkpoint import RunInfo, save_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    run = tmp_path / "run"
    model = build_model("mobilenet-v3", num_classes=2, image_size=64).eval()
    save_model(
        run, model, RunInfo(base_network="mobilenet-v3", image_shape=64, num_classes=2, classes=CLASSES)
    )
    assert find_source(str(run)) == "run"
    rng = np.random.default_rng(0)
    files = []
    for name, (w, h) in (("p.png", (64, 48)), ("q.png", (40, 40))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        files.append(tmp_path / name)
    from detforge.runtime import resize_rgb

    pictures = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    with torch.inference_mode():  # the model sees each image resized to 64 x 64 by the runtime's resize
        outputs = model(
            [torch.from_numpy(resize_rgb(p, 64).copy()).permute(2, 0, 1).float().div(255) for p in pictures]
        )
    # q.png is labeled at twice its size (its manifest image_size is 80x80): boxes scale with it
    sizes, scales = [(64, 48), (80, 80)], [1, 2]
    records, lines = [], []
    for f, p, out, (w, h), k in zip(files, pictures, outputs, sizes, scales, strict=True):
        boxes = out["boxes"].numpy().astype(np.float64) * np.array([p.shape[1] / 64, p.shape[0] / 64] * 2)
        classes = labels_to_class_ids(out["labels"].numpy())
        assert len(boxes) > 2
        gt = np.clip(np.rint(boxes[:2] * k), 0, [w, h, w, h])  # two of its own detections as labels
        records.append(
            make_record(str(f), width=w, height=h, boxes_xyxy=gt, class_ids=classes[:2], class_map=CMAP)
        )
        norm_boxes = boxes / [w / k, h / k, w / k, h / k]
        lines.append(
            {
                "image": f.name,
                "prediction": [
                    [int(c), float(s), *b]
                    for c, s, b in zip(
                        classes, out["scores"].numpy().tolist(), norm_boxes.tolist(), strict=True
                    )
                ],
            }
        )
    manifest = tmp_path / "m.manifest"
    write_manifest(manifest, records)
    predictions = tmp_path / "model.jsonl"
    predictions.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))

    from_run = evaluate(str(run), str(manifest), score_threshold=0.0, out_dir=str(tmp_path / "out"))
    from_file = evaluate(str(predictions), str(manifest), score_threshold=0.0)
    assert from_run.source == "run" and from_run.class_names == CLASSES
    a, b = from_run.metrics, from_file.metrics
    assert a.num_detections == b.num_detections == sum(len(o["boxes"]) for o in outputs)
    assert (a.tp, a.fp, a.n_gt) == (b.tp, b.fp, 4) and a.tp >= 2
    assert a.voc07_map == pytest.approx(b.voc07_map, abs=1e-12) and a.voc07_map > 0
    assert a.all_point_map == pytest.approx(b.all_point_map, abs=1e-12)
    assert (tmp_path / "out" / "metrics.json").exists()


def test_a_deploy_folder_scores_as_its_predictions_file(tiny_deploy, tmp_path):
    """ONNX Runtime evaluated directly gives the metrics of `detforge predict`'s file on the same manifest."""
    pytest.importorskip("onnxruntime")
    from detforge.deploy.predict import predict

    manifest = tiny_deploy.parent / "validation" / "data.manifest"
    direct = evaluate(str(tiny_deploy), str(manifest), coco=False)
    predictions = tmp_path / "p.jsonl"
    predict(str(tiny_deploy), [str(manifest)], out=str(predictions), threshold=0.0)
    via_file = evaluate(str(predictions), str(manifest), coco=False)
    assert direct.source == "deploy" and direct.metrics.num_images == 4
    assert direct.metrics.voc07_map == pytest.approx(via_file.metrics.voc07_map, abs=1e-3)
    assert direct.metrics.num_detections == via_file.metrics.num_detections


def test_run_deploy_predictions_and_training_validation_agree(tmp_path):
    """The same model on the same data gives one validation:mAP: training's last validation row, evaluate
    RUN (torch), evaluate DEPLOY (ONNX Runtime) and evaluate of `predict`'s file. The images (80 px) are
    larger than the model (48 px): every path resizes them with ``runtime.resize_rgb``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from conftest import TINY_HP, make_tiny_set

    from detforge.deploy.export import export_run
    from detforge.deploy.predict import predict
    from detforge.training.train import TrainConfig, train

    torch.set_num_threads(1)
    train_manifest = make_tiny_set(tmp_path / "train", 16, 1, size=80)
    manifest = make_tiny_set(tmp_path / "validation", 6, 2, size=80)
    train(
        TrainConfig(
            train=str(train_manifest),
            validation=str(manifest),
            out=str(tmp_path / "run"),
            hyperparameters={**TINY_HP, "epochs": "3", "image_shape": "48"},
            progress=False,
        )
    )
    export_run(str(tmp_path / "run"), str(tmp_path / "deploy"))
    predict(str(tmp_path / "deploy"), [str(manifest)], out=str(tmp_path / "p.jsonl"), threshold=0.0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = rows[-1]["validation:mAP"]
    results = {
        name: evaluate(str(tmp_path / name), str(manifest), coco=False)
        for name in ("run", "deploy", "p.jsonl")
    }
    assert [r.source for r in results.values()] == ["run", "deploy", "predictions"]
    assert trained > 0.0 and rows[-1]["validation_images"] == 6
    for result in results.values():
        assert result.metrics.num_images == 6
        assert result.metrics.voc07_map == pytest.approx(trained, abs=1e-6)
    assert results["run"].metrics.num_detections == results["deploy"].metrics.num_detections


def test_classes_are_matched_by_name(tiny_run, tiny_deploy, tmp_path):
    """A manifest whose class ids are ordered differently (yellow box = 0) scores the same after mapping
    by name; a class the model lacks is an error; --classes names the manifest's classes."""
    pytest.importorskip("onnxruntime")
    manifest = tiny_run.parent / "validation" / "data.manifest"
    folder = tmp_path / "swapped"
    folder.mkdir()
    records = []
    for record in read_manifest(str(manifest)):
        source = str(tiny_run.parent / "validation" / record.source_ref)
        records.append(
            make_record(
                source,
                width=record.width,
                height=record.height,
                boxes_xyxy=record.boxes,
                class_ids=1 - record.class_ids,
                class_map={0: "yellow box", 1: "blue box"},
            )
        )
    write_manifest(folder / "data.manifest", records)
    (folder / "classes.json").write_text(json.dumps(["yellow box", "blue box"]))
    for model in (tiny_run, tiny_deploy):
        same = evaluate(str(model), str(manifest), coco=False)
        swapped = evaluate(str(model), str(folder / "data.manifest"), coco=False)
        assert swapped.class_names == ["blue box", "yellow box"]
        assert swapped.manifest_classes == ["yellow box", "blue box"]
        assert swapped.metrics.voc07_map == pytest.approx(same.metrics.voc07_map, abs=1e-12)
        assert swapped.metrics.per_class_ap_voc07 == pytest.approx(same.metrics.per_class_ap_voc07)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(["yellow box", "red box"]))
    with pytest.raises(ConfigError, match=r"the manifest's classes \['red box'\] are not among the model's"):
        evaluate(str(tiny_run), str(folder / "data.manifest"), classes=str(other), coco=False)
