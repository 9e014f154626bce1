"""``detforge evaluate``: a model's detections against a labeled manifest -> metrics.json and plots.

The detections come from one of three sources, told apart by ``find_source``:
- a predictions JSON Lines file in SageMaker's format (``{"image", "prediction": [[class_id, score,
  xmin, ymin, xmax, ymax], ...]}``, corners as fractions), matched to the manifest's images by
  ``source-ref``, file name or file stem;
- a training run folder (``checkpoint.load_run_model``, torch, imported only then);
- a deploy folder (``model.onnx``, ONNX Runtime through ``runtime.Predictor``).

A run and a deploy folder see the same pixels: each image resized to the model's input size by
``images.resize_rgb`` (PIL bilinear, antialiased), as the runtime and training's validation do, so
``evaluate RUN``, ``evaluate DEPLOY`` and the run's validation:mAP agree. Their class ids are matched by
name: the manifest's classes (``--classes``, else ``classes.json`` beside it, else its class maps) are
looked up in the model's; a name the model lacks is an error.

Images stream through ``metrics.DetectionAccumulator`` (VOC07 ``validation:mAP``, all-point AP,
P/R/F1, confusion matrix) and ``coco_metrics.CocoAccumulator``. Written: ``metrics.json``,
``pr_<class>.png`` per class with ground truth, ``confusion_matrix.png``.

Not here: the metric definitions (``metrics``, ``coco_metrics``), running models (``checkpoint``,
``runtime``), training.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson

from detforge import boxes as box_ops
from detforge import images, storage
from detforge.data.groundtruth import ClassMaps, classes_beside, read_manifest, resolve_source_ref
from detforge.errors import ConfigError, FormatError, ManifestError, require
from detforge.evaluation.coco_metrics import CocoAccumulator
from detforge.evaluation.metrics import DetectionAccumulator, DetectionMetrics

PREDICTION_SUFFIXES = (".jsonl", ".json", ".ndjson", ".out")


@dataclass
class GroundTruth:
    """What evaluation needs of one manifest line."""

    source_ref: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) xyxy pixels
    class_ids: np.ndarray  # (N,)
    origin: str
    difficult: np.ndarray | None = None  # (N,) bool: neither a hit nor a miss (VOC devkit, COCO iscrowd)


@dataclass
class EvaluationResult:
    """Metrics of one evaluation and where they were written."""

    metrics: DetectionMetrics
    coco: dict | None
    class_names: list[str]
    source: str  # "predictions", "run" or "deploy"
    images_without_predictions: int = 0
    files: list[str] = field(default_factory=list)
    manifest_classes: list[str] | None = None  # run/deploy: the manifest's names, mapped to the model's

    def to_dict(self) -> dict:
        """The content of metrics.json."""
        return {
            "source": self.source,
            "classes": list(self.class_names),
            "manifest_classes": self.manifest_classes,
            **self.metrics.to_dict(class_names=self.class_names, curves=True),
            "images_without_predictions": self.images_without_predictions,
            "coco": self.coco,
        }


def find_source(path: str) -> str:
    """``"predictions"``, ``"deploy"`` or ``"run"`` for a path given to evaluate (ConfigError otherwise)."""
    text = os.fspath(path).rstrip("/")
    if text.endswith(".onnx") or storage.exists(storage.join(text, "model.onnx")):
        return "deploy"
    if text.endswith(".safetensors") or any(
        storage.exists(storage.join(text, name)) for name in ("model.safetensors", "model.json")
    ):
        return "run"
    if text.lower().endswith(PREDICTION_SUFFIXES) and storage.exists(text):
        return "predictions"
    raise ConfigError(
        "not a predictions JSON Lines file or a training run folder (model.safetensors)", path=text
    )


def load_ground_truth(manifest: str, *, label_attribute: str | None = None) -> Iterator[GroundTruth]:
    """Stream the manifest as GroundTruth items (the untouched line is dropped)."""
    for record in read_manifest(manifest, label_attribute=label_attribute):
        yield GroundTruth(
            source_ref=record.source_ref,
            width=record.width,
            height=record.height,
            boxes=record.boxes,
            class_ids=record.class_ids,
            origin=record.origin or manifest,
            difficult=record.difficult,
        )


def manifest_class_names(manifest: str, *, label_attribute: str | None = None) -> list[str]:
    """Class names from the manifest's class maps (``groundtruth.ClassMaps``: an id meaning two names is an
    error, as in ``convert`` and ``stats``; ids without a name are named by their number)."""
    merged = ClassMaps()
    for record in read_manifest(manifest, label_attribute=label_attribute):
        merged.add(record, manifest)
    if not merged.names:
        raise ManifestError(
            "no class map on any line: cannot tell the classes",
            path=manifest,
            hint="pass --classes classes.json",
        )
    return merged.by_id()


class _ImageIndex:
    """Finds a manifest image from a prediction's ``source-ref``, file name or stem."""

    def __init__(self) -> None:
        self.by_key: dict[str, list[int]] = {}

    def add(self, index: int, source_ref: str) -> None:
        for key in {source_ref, storage.basename(source_ref), storage.stem(source_ref)}:
            self.by_key.setdefault(key, []).append(index)

    def find(self, entry: dict) -> list[int]:
        for key in (entry.get("source-ref"), entry.get("image")):
            if isinstance(key, str) and key:
                for candidate in (key, storage.basename(key), storage.stem(key)):
                    if candidate in self.by_key:
                        return self.by_key[candidate]
        return []


def iter_predictions(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-empty line of a predictions JSON Lines file (streamed); the rows
    are checked by ``prediction_rows``. FormatError naming the line when it is not a JSON object."""
    for number, raw in storage.iter_lines(path):
        if not raw.strip():
            continue
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            try:  # Python's json writes NaN/Infinity; read them so the check below can name the field
                entry = json.loads(raw)
            except (ValueError, RecursionError):  # orjson stops at 1024 levels; json would overflow the stack
                raise FormatError(f"not valid JSON: {exc}", path=path, line=number) from None
        if not isinstance(entry, dict):
            raise FormatError("expected a JSON object", path=path, line=number)
        yield number, entry


def prediction_rows(entry, *, path: str, line: int, num_classes: int | None = None) -> list[list[float]]:
    """The checked ``prediction`` rows ``[class_id, score, xmin, ymin, xmax, ymax]`` (normalized) of one
    predictions line: the one parser of SageMaker-format predictions (evaluate and review). Without
    ``num_classes`` a class id need only be a whole number >= 0. FormatError naming line and field."""
    rows = entry.get("prediction") if isinstance(entry, dict) else None
    if not isinstance(rows, list):
        raise FormatError("missing or not a list", path=path, line=line, field="prediction")
    checked = []
    for i, row in enumerate(rows):
        where = f"prediction[{i}]"
        if (
            not isinstance(row, list)
            or len(row) != 6
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
        ):
            raise FormatError(
                f"expected [class_id, score, xmin, ymin, xmax, ymax] numbers, got {row!r}",
                path=path,
                line=line,
                field=where,
            )
        cid, score = row[0], row[1]
        if not math.isfinite(score):
            raise FormatError(f"score is {score}", path=path, line=line, field=f"{where}.score")
        known = "" if num_classes is None else f" (the classes are 0..{num_classes - 1})"
        if (
            not math.isfinite(cid)
            or cid != int(cid)
            or cid < 0
            or (num_classes is not None and cid >= num_classes)
        ):
            raise FormatError(
                f"unknown class id {cid!r}{known}", path=path, line=line, field=f"{where}.class_id"
            )
        if not all(math.isfinite(v) for v in row[2:]):
            raise FormatError(
                f"box corners must be finite numbers, got {row[2:]}", path=path, line=line, field=where
            )
        checked.append([float(v) for v in row])
    return checked


def parse_prediction(
    entry, *, path: str, line: int, num_classes: int, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One predictions line's detections as pixel ``xyxy`` boxes, scores, class ids (FormatError if bad)."""
    rows = np.array(
        prediction_rows(entry, path=path, line=line, num_classes=num_classes), dtype=np.float64
    ).reshape(-1, 6)
    boxes = box_ops.xyxy_norm_to_xyxy(rows[:, 2:], width=width, height=height)
    return boxes, rows[:, 1].copy(), rows[:, 0].astype(np.int64)


def _detections_from_predictions(
    predictions: str, images: list[GroundTruth], num_classes: int, seen: np.ndarray
) -> Iterator[tuple[int, tuple]]:
    index = _ImageIndex()
    for i, gt in enumerate(images):
        index.add(i, gt.source_ref)
    for number, entry in iter_predictions(predictions):
        found = index.find(entry)
        name = entry.get("source-ref") or entry.get("image")
        if not found:
            raise FormatError(
                f"image {name!r} is not in the manifest", path=predictions, line=number, field="image"
            )
        if len(found) > 1:
            raise FormatError(
                f"image {name!r} matches {len(found)} manifest images "
                f"({images[found[0]].source_ref}, {images[found[1]].source_ref})",
                path=predictions,
                line=number,
                field="image",
                hint="give the full source-ref",
            )
        i = found[0]
        if seen[i]:
            raise FormatError(
                f"second predictions line for image {images[i].source_ref}",
                path=predictions,
                line=number,
                field="image",
            )
        seen[i] = True
        gt = images[i]
        yield (
            i,
            parse_prediction(
                entry,
                path=predictions,
                line=number,
                num_classes=num_classes,
                width=gt.width,
                height=gt.height,
            ),
        )


def _checked(
    items: Iterator[GroundTruth], names: list[str], to_model: np.ndarray | None = None
) -> Iterator[GroundTruth]:
    """The manifest's images, with a ManifestError for a class id the class list does not have; with
    ``to_model`` (manifest id -> model id) the class ids are the model's."""
    for gt in items:
        bad = gt.class_ids[(gt.class_ids < 0) | (gt.class_ids >= len(names))]
        if bad.size:
            path, _, line = gt.origin.rpartition(":")
            raise ManifestError(
                f"class id {int(bad[0])} is not one of the {len(names)} classes {names}",
                path=path,
                line=int(line),
            )
        if to_model is not None:
            gt.class_ids = to_model[gt.class_ids.astype(np.int64)]
        yield gt


def class_mapping(manifest_names: list[str], model_names: list[str], *, source: str) -> np.ndarray:
    """Manifest class id -> model class id, by name; ConfigError for a name the model lacks."""
    index = {name: i for i, name in enumerate(model_names)}
    missing = [name for name in manifest_names if name not in index]
    if missing:
        raise ConfigError(
            f"the manifest's classes {missing} are not among the model's {model_names}",
            path=source,
            field="classes",
            hint="evaluate on a manifest of the model's classes, or name them with --classes",
        )
    return np.array([index[name] for name in manifest_names], dtype=np.int64)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _open_image(source_ref: str, manifest: str) -> np.ndarray:
    """An ``HxWx3`` uint8 RGB array of a manifest image; a relative reference is read beside the manifest."""
    return images.read(resolve_source_ref(source_ref, manifest))


def torch_detector(model, size: int):
    """A function from RGB arrays to ``[(boxes_xyxy, scores, class_ids)]`` of an eval-mode torch detector:
    each array resized by ``images.resize_rgb`` to ``size`` (what training and the runtime feed the model),
    boxes scaled back to the array's pixels."""
    import torch

    from detforge.images import resize_rgb
    from detforge.models import labels_to_class_ids

    def run_torch(pictures: list[np.ndarray]) -> list[tuple]:
        tensors = [
            torch.from_numpy(resize_rgb(p, size).copy()).permute(2, 0, 1).float().div(255) for p in pictures
        ]
        with torch.inference_mode():
            outputs = model(tensors)
        found = []
        for picture, o in zip(pictures, outputs, strict=True):
            scale = np.array([picture.shape[1], picture.shape[0]] * 2, dtype=np.float64) / size
            found.append(
                (
                    o["boxes"].cpu().numpy().astype(np.float64) * scale,
                    o["scores"].cpu().numpy(),
                    labels_to_class_ids(o["labels"].cpu().numpy()),
                )
            )
        return found

    return run_torch


def _open_model(path: str):
    """Class names of a run and its ``torch_detector`` at the run's image size."""
    require("torch", "training")
    from detforge.training.checkpoint import load_run_model

    model, info = load_run_model(path)
    return list(info.classes), torch_detector(model, int(info.image_shape))


def _open_deploy(path: str, **tiling):
    """Class names of a deploy folder and a function from RGB arrays to detections (ONNX Runtime;
    ``tiling``: ``Predictor``'s ``tile``, ``overlap``, ``full_pass``)."""
    from detforge.runtime import Predictor

    predictor = Predictor(path, **tiling)

    def run_onnx(pictures: list[np.ndarray]) -> list[tuple]:
        found = predictor.predict(pictures, threshold=0.0)
        return [(d.boxes_xyxy, d.scores, d.class_ids) for d in found]

    return list(predictor.class_names), run_onnx


def evaluate(
    model_or_predictions: str,
    manifest: str,
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    out_dir: str | None = None,
    classes: str | None = None,
    label_attribute: str | None = None,
    coco: bool = True,
    batch_size: int = 8,
    tile: int | None = None,
    overlap: float | None = None,
    tile_full_pass: bool | None = None,
) -> EvaluationResult:
    """Evaluate detections (a predictions file, a run folder or a deploy folder) against ``manifest``.

    ``tile``, ``overlap``, ``tile_full_pass``: a deploy folder's tiled inference (``detforge.tiling``;
    default: its model.json's tiling).

    Writes ``metrics.json``, ``pr_<class>.png`` and ``confusion_matrix.png`` into ``out_dir`` when given.
    """
    model_or_predictions = os.fspath(model_or_predictions)
    manifest = os.fspath(manifest)
    source = find_source(model_or_predictions)
    manifest_names = classes_beside(manifest, classes) or manifest_class_names(
        manifest, label_attribute=label_attribute
    )
    to_model = None
    tiling = {"tile": tile, "overlap": overlap, "full_pass": tile_full_pass}
    if source != "deploy" and tiling != dict.fromkeys(tiling):
        raise ConfigError(
            "tiled inference (--tile, --overlap, --tile-full-pass) runs a deploy folder "
            "(`detforge export RUN --out DIR`)",
            field="tile",
        )
    if source == "predictions":
        names = manifest_names
    else:
        names, run_model = (
            _open_deploy(model_or_predictions, **tiling)
            if source == "deploy"
            else _open_model(model_or_predictions)
        )
        to_model = class_mapping(manifest_names, names, source=manifest)
    num_classes = len(names)
    acc = DetectionAccumulator(num_classes, iou_threshold=iou_threshold, score_threshold=score_threshold)
    coco_acc = CocoAccumulator(names) if coco else None

    def add(gt: GroundTruth, boxes, scores, labels) -> None:
        for target in (acc, coco_acc):
            if target is not None:
                target.update(
                    gt_boxes=gt.boxes,
                    gt_classes=gt.class_ids,
                    pred_boxes=boxes,
                    pred_scores=scores,
                    pred_classes=labels,
                    image_id=gt.source_ref,
                    gt_difficult=gt.difficult,
                )

    images_iter = _checked(
        load_ground_truth(manifest, label_attribute=label_attribute), manifest_names, to_model
    )
    missing = 0
    if source == "predictions":
        # Predictions come in any order: the manifest's boxes are indexed (small), the predictions stream.
        images = list(images_iter)
        seen = np.zeros(len(images), dtype=bool)
        for i, (boxes, scores, labels) in _detections_from_predictions(
            model_or_predictions, images, num_classes, seen
        ):
            add(images[i], boxes, scores, labels)
        empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64))
        for i in np.flatnonzero(~seen):
            add(images[i], *empty)
        missing = int((~seen).sum())
    else:
        for batch in _batches(images_iter, batch_size):
            pictures = [_open_image(gt.source_ref, manifest) for gt in batch]
            detections = run_model(pictures)
            for gt, picture, (boxes, scores, labels) in zip(batch, pictures, detections, strict=True):
                # the model saw the decoded image; the manifest's boxes are in its image_size
                scale = np.array([gt.width / picture.shape[1], gt.height / picture.shape[0]] * 2)
                add(gt, np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale, scores, labels)
    result = EvaluationResult(
        metrics=acc.compute(),
        coco=coco_acc.compute() if coco_acc else None,
        class_names=names,
        source=source,
        images_without_predictions=missing,
        manifest_classes=None if to_model is None else list(manifest_names),
    )
    if out_dir is not None:
        result.files = write_outputs(result, out_dir)
    return result


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def write_outputs(result: EvaluationResult, out_dir: str) -> list[str]:
    """metrics.json, a PR curve PNG per class with ground truth and the confusion matrix PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storage.makedirs(out_dir)
    written = []
    path = storage.join(out_dir, "metrics.json")
    options = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    storage.write_bytes(path, orjson.dumps(result.to_dict(), option=options) + b"\n")
    written.append(path)
    m = result.metrics

    def save(fig, name: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        target = storage.join(out_dir, name)
        storage.write_bytes(target, buffer.getvalue())
        written.append(target)

    for c, curve in sorted(m.pr_curves.items()):
        fig, ax = plt.subplots(figsize=(5, 4))
        if len(curve.recall):
            envelope = np.maximum.accumulate(curve.precision[::-1])[::-1]
            ax.plot(curve.recall, curve.precision, ".", color="0.6", markersize=3, label="after each score")
            ax.step(
                np.concatenate([[0.0], curve.recall]),
                np.concatenate([envelope[:1], envelope]),
                where="pre",
                label="interpolated",
            )
            ax.legend(loc="lower left")
        else:
            ax.text(0.5, 0.5, "no detections of this class", ha="center", va="center")
        ax.set(
            xlim=(0, 1.01),
            ylim=(0, 1.01),
            xlabel="recall",
            ylabel="precision",
            title=f"{result.class_names[c]}: AP07 {m.per_class_ap_voc07[c]:.3f}, "
            f"AP {m.per_class_ap_all_point[c]:.3f} @IoU {m.iou_threshold:g}",
        )
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save(fig, f"pr_{c}_{_safe_name(result.class_names[c])}.png")

    labels = list(result.class_names) + ["background"]
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    matrix = m.confusion_matrix
    ax.imshow(matrix, cmap="Blues")
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(
            col,
            row,
            str(value),
            ha="center",
            va="center",
            color="white" if value > matrix.max() / 2 else "black",
        )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="ground truth")
    ax.set_title(f"score >= {m.score_threshold:g}, IoU >= {m.iou_threshold:g}", fontsize=10)
    fig.tight_layout()
    save(fig, "confusion_matrix.png")
    return written
