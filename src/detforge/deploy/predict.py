"""``detforge predict``: a deployed model over many images -> predictions JSON Lines (+ PDF/HTML report).

Inputs (``resolve_inputs``): image files, folders (recursive, by ``storage.IMAGE_SUFFIXES``), Ground
Truth manifests (labeled or not; a relative ``source-ref`` is read beside the manifest) and ``s3://``
prefixes, files or manifests. Images are decoded a few ahead in threads, run through
``runtime.Predictor`` in batches, and written one line each, atomically, in SageMaker's format:
``{"image", "source-ref", "width", "height", "prediction": [[class_id, score, xmin, ymin, xmax, ymax]]}``
(corners as fractions). An image that cannot be read is skipped and listed (``on_error="skip"``) or
stops the run (``"stop"``). Images of a labeled manifest are also matched to their ground truth with the
VOC rules of ``metrics`` (true/false positives, missed boxes) and the batch's mAP is computed from the
very numbers written, so ``detforge evaluate predictions.jsonl MANIFEST`` gives the same value.

Not here: the model (``runtime``), the reports' drawing (``report``), metric definitions (``metrics``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from detforge import boxes as box_ops
from detforge import storage
from detforge.data.groundtruth import (
    Record,
    dumps_line,
    find_label_attribute,
    parse_record,
    read_image_refs,
    resolve_source_ref,
)
from detforge.errors import ConfigError, DetforgeError, ManifestError
from detforge.evaluation.metrics import DetectionAccumulator, DetectionMetrics, match_image

MANIFEST_SUFFIXES = (".manifest", ".jsonl", ".json", ".ndjson")


@dataclass
class InputSpec:
    """One INPUT argument, resolved: an image, a folder's (or prefix's) images, or a manifest."""

    kind: str  # "image", "folder" or "manifest"
    path: str
    files: list[str] = field(default_factory=list)  # images of a folder
    count: int = 0  # images it holds


@dataclass
class Source:
    """One image to predict: where to read it, how to name it, its ground truth when known."""

    ref: str  # path or URI to read
    source_ref: str  # as given (a manifest's own source-ref)
    truth: Record | None = None


@dataclass
class ImageResult:
    """The outcome for one image, as given to reports and callers."""

    source: Source
    width: int
    height: int
    prediction: list[list[float]]  # SageMaker rows, normalized
    is_tp: np.ndarray | None = None
    missed: np.ndarray | None = None  # (N_truth,) bool: labeled boxes no detection matched


@dataclass
class PredictResult:
    """Counts and timing of a ``predict`` run."""

    images: int
    detections_per_class: list[int]
    skipped: list[tuple[str, str]]  # (image, reason)
    seconds: float
    class_names: list[str]
    threshold: float
    metrics: DetectionMetrics | None = None  # against the ground truth of labeled manifest images
    images_with_truth: int = 0
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def detections(self) -> int:
        return sum(self.detections_per_class)

    @property
    def images_per_second(self) -> float:
        return (self.images + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


def _is_image(path: str) -> bool:
    return path.lower().endswith(storage.IMAGE_SUFFIXES)


def _is_folder(path: str) -> bool:
    if storage.is_remote(path):
        return not _is_image(path) and not path.lower().endswith(MANIFEST_SUFFIXES)
    return os.path.isdir(path)


def resolve_inputs(inputs: Sequence[str]) -> list[InputSpec]:
    """What each INPUT is, with the folders listed and the manifests' lines counted."""
    if not inputs:
        raise ConfigError("no INPUT given: image files, folders, manifests or s3:// prefixes")
    specs = []
    for raw in inputs:
        path = os.fspath(raw)
        if _is_folder(path):
            files = storage.list_files(path, suffixes=storage.IMAGE_SUFFIXES)
            if not files:
                raise ConfigError(
                    f"no images ({', '.join(storage.IMAGE_SUFFIXES)}) in this folder", path=path
                )
            specs.append(InputSpec("folder", path, files, len(files)))
        elif _is_image(path):
            if not storage.exists(path):
                raise ConfigError("no such image", path=path)
            specs.append(InputSpec("image", path, count=1))
        elif storage.exists(path):
            count = sum(1 for _, line in storage.iter_lines(path) if line.strip())
            specs.append(InputSpec("manifest", path, count=count))
        else:
            raise ConfigError(
                "no such file, folder or prefix",
                path=path,
                hint=f"INPUT is an image ({', '.join(storage.IMAGE_SUFFIXES)}), a folder, "
                "a manifest or an s3:// prefix",
            )
    return specs


def _manifest_sources(path: str, *, label_attribute: str | None) -> Iterator[Source]:
    labeled: bool | None = None
    for number, obj in read_image_refs(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("source-ref"), str) or not obj["source-ref"]:
            raise ManifestError(
                "missing or not a string",
                path=path,
                line=number,
                field="source-ref",
                hint='a manifest line is {"source-ref": "path or s3:// URI", ...}',
            )
        if labeled is None:  # the first line tells whether the manifest carries labels
            labeled = label_attribute is not None or find_label_attribute(obj) is not None
        truth = (
            parse_record(obj, path=path, line=number, label_attribute=label_attribute) if labeled else None
        )
        ref = obj["source-ref"]
        yield Source(ref=resolve_source_ref(ref, path), source_ref=ref, truth=truth)


def iter_sources(specs: Sequence[InputSpec], *, label_attribute: str | None = None) -> Iterator[Source]:
    """The images of resolved inputs, in order (manifests streamed)."""
    for spec in specs:
        if spec.kind == "image":
            yield Source(spec.path, spec.path)
        elif spec.kind == "folder":
            yield from (Source(f, f) for f in spec.files)
        else:
            yield from _manifest_sources(spec.path, label_attribute=label_attribute)


def match_truth(
    truth: Record, rows: list[list[float]], *, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Detections (SageMaker rows) against a record: pixel boxes, scores, classes, ``is_tp``, ``missed``.

    Boxes are taken to the manifest's ``image_size`` pixels (what ``evaluate`` does with a predictions
    file); ``missed`` marks the labeled boxes that no true positive took.
    """
    array = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    boxes = box_ops.xyxy_norm_to_xyxy(array[:, 2:], width=truth.width, height=truth.height)
    scores, classes = array[:, 1], array[:, 0].astype(np.int64)
    is_tp = match_image(
        gt_boxes=truth.boxes,
        gt_classes=truth.class_ids,
        pred_boxes=boxes,
        pred_scores=scores,
        pred_classes=classes,
        iou_threshold=iou_threshold,
    )
    missed = np.ones(len(truth.boxes), dtype=bool)
    if is_tp.any():
        # the box each true positive took: match_image's rule, the same-class box of highest IoU
        iou = box_ops.iou_xyxy(boxes[is_tp], truth.boxes)
        iou[classes[is_tp][:, None] != truth.class_ids[None, :]] = -1.0
        missed[np.argmax(iou, axis=1)] = False
    return boxes, scores, classes, is_tp, missed


def _check_truth(truth: Record, class_names: list[str], warned: set[int], warnings: list[str]) -> None:
    bad = truth.class_ids[(truth.class_ids < 0) | (truth.class_ids >= len(class_names))]
    if bad.size:
        path, _, line = (truth.origin or "").rpartition(":")
        raise ManifestError(
            f"class id {int(bad[0])} is not one of the model's {len(class_names)} classes {class_names}",
            path=path or None,
            line=int(line) if line.isdigit() else None,
        )
    for cid, name in truth.class_map.items():
        if cid not in warned and 0 <= cid < len(class_names) and name != class_names[cid]:
            warned.add(cid)
            warnings.append(
                f"class {cid} is '{name}' in {truth.origin} but '{class_names[cid]}' in the model"
            )


def _decode(source: Source, make_thumbnail: bool):
    """(image array, thumbnail or None) or the DetforgeError saying why the image cannot be read."""
    from detforge.runtime import load_image

    try:
        image = load_image(source.ref)
    except DetforgeError as exc:
        return exc
    thumbnail = None
    if make_thumbnail:
        from detforge.deploy.report import make_thumbnail as thumb

        thumbnail = thumb(image)
    return image, thumbnail


def _decoded(sources: Iterator[Source], *, workers: int, ahead: int, thumbnails: bool) -> Iterator[tuple]:
    """(source, decoded) in order, decoding up to ``ahead`` images in ``workers`` threads."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="detforge-decode") as pool:
        queue: deque = deque()
        for source in sources:
            queue.append((source, pool.submit(_decode, source, thumbnails)))
            if len(queue) >= ahead:
                item, future = queue.popleft()
                yield item, future.result()
        while queue:
            item, future = queue.popleft()
            yield item, future.result()


def check_options(*, on_error: str, batch_size: int, threshold: float | None, iou_threshold: float) -> None:
    """A ConfigError naming the option when one of predict's settings is out of range."""
    if on_error not in ("skip", "stop"):
        raise ConfigError(f"on_error must be 'skip' or 'stop', got {on_error!r}", field="on-error")
    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}", field="batch-size")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}", field="threshold")
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ConfigError(f"IoU threshold must be in (0, 1], got {iou_threshold}", field="iou")


def predict(
    deploy: str,
    inputs: Sequence[str],
    *,
    out: str,
    report: str | None = None,
    html: str | None = None,
    threshold: float | None = None,
    batch_size: int = 8,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    on_error: str = "skip",
    iou_threshold: float = 0.5,
    label_attribute: str | None = None,
    decode_workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    predictor=None,
    tile: int | None = None,
    overlap: float | None = None,
    tile_full_pass: bool | None = None,
) -> PredictResult:
    """Predict every image of ``inputs`` with the deploy folder ``deploy``; write ``out`` (+ reports).

    ``progress(done, total)`` is called after each batch. ``predictor``: an already loaded
    ``runtime.Predictor`` (then ``deploy``, ``threads``, ``providers`` and the tiling are not used).
    ``tile``, ``overlap``, ``tile_full_pass``: tiled inference (``detforge.tiling``; default: model.json's).
    """
    check_options(on_error=on_error, batch_size=batch_size, threshold=threshold, iou_threshold=iou_threshold)
    if predictor is None:
        from detforge.runtime import Predictor

        predictor = Predictor(
            deploy, threads=threads, providers=providers, tile=tile, overlap=overlap, full_pass=tile_full_pass
        )
    specs = resolve_inputs(inputs)
    total = sum(spec.count for spec in specs)
    names = list(predictor.class_names)
    threshold = float(predictor.threshold if threshold is None else threshold)
    accumulator = DetectionAccumulator(len(names), iou_threshold=iou_threshold, score_threshold=threshold)
    result = PredictResult(
        images=0,
        detections_per_class=[0] * len(names),
        skipped=[],
        seconds=0.0,
        class_names=names,
        threshold=threshold,
    )
    warned: set[int] = set()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writer = stack.enter_context(storage.atomic_writer(out, "wb"))
        reports = []
        if report is not None or html is not None:
            from detforge.deploy.report import HtmlReport
            from detforge.deploy.report.pdf import PdfReport

            title = f"detforge predict: {predictor.metadata.get('name') or os.path.basename(str(deploy))}"
            if report is not None:
                reports.append(stack.enter_context(PdfReport(report, class_names=names, title=title)))
            if html is not None:
                reports.append(stack.enter_context(HtmlReport(html, class_names=names)))
        predict_stream(
            predictor,
            iter_sources(specs, label_attribute=label_attribute),
            writer,
            result=result,
            accumulator=accumulator,
            warned=warned,
            batch_size=batch_size,
            on_error=on_error,
            iou_threshold=iou_threshold,
            decode_workers=decode_workers,
            reports=reports,
            progress=progress,
            total=total,
        )
        result.seconds = time.perf_counter() - started
        if result.images_with_truth:
            result.metrics = accumulator.compute()
        if reports:
            summary = _summary(result, predictor)
            for target in reports:
                target.finish(summary)
    result.files = [out, *(p for p in (report, html) if p is not None)]
    return result


def predict_stream(
    predictor,
    sources: Iterable[Source],
    writer,
    *,
    result: PredictResult,
    accumulator: DetectionAccumulator,
    warned: set[int],
    batch_size: int = 8,
    on_error: str = "skip",
    iou_threshold: float = 0.5,
    decode_workers: int = 2,
    reports: Sequence = (),
    progress: Callable[[int, int], None] | None = None,
    total: int = 0,
) -> None:
    """The heart of ``predict``: ``sources`` decoded (threads), predicted in batches, one line each to
    ``writer``, counted into ``result`` and, for images with ground truth, matched into ``accumulator``.

    ``result.threshold`` is the score threshold used. Also run on each block by ``predict_ray``'s workers,
    which is why both engines write the same lines.
    """
    names = result.class_names
    threshold = result.threshold
    done = 0
    batch: list[tuple[Source, np.ndarray, object]] = []

    def flush() -> None:
        detections = predictor.predict(
            [image for _, image, _ in batch], threshold=threshold, batch_size=len(batch)
        )
        for (source, _, thumbnail), found in zip(batch, detections, strict=True):
            rows = found.to_sagemaker()
            _write_line(writer, source, found.width, found.height, rows)
            outcome = ImageResult(source, found.width, found.height, rows)
            for row in rows:
                result.detections_per_class[int(row[0])] += 1
            if source.truth is not None:
                _check_truth(source.truth, names, warned, result.warnings)
                pixels, scores, classes, outcome.is_tp, outcome.missed = match_truth(
                    source.truth, rows, iou_threshold=iou_threshold
                )
                accumulator.update(
                    gt_boxes=source.truth.boxes,
                    gt_classes=source.truth.class_ids,
                    pred_boxes=pixels,
                    pred_scores=scores,
                    pred_classes=classes,
                    image_id=source.source_ref,
                    gt_difficult=source.truth.difficult,
                )
                result.images_with_truth += 1
            if reports:
                item = _report_item(outcome, thumbnail)
                for target in reports:
                    target.add(item)
            result.images += 1
        batch.clear()

    for source, decoded in _decoded(
        iter(sources),
        workers=max(1, int(decode_workers)),
        ahead=2 * int(batch_size),
        thumbnails=bool(reports),
    ):
        done += 1
        if isinstance(decoded, DetforgeError):
            if on_error == "stop":
                raise decoded
            result.skipped.append((source.source_ref, decoded.message))
        else:
            batch.append((source, *decoded))
            if len(batch) == batch_size:
                flush()
                if progress is not None:
                    progress(done, total)
    if batch:
        flush()
    if progress is not None:
        progress(done, total)


def _write_line(writer, source: Source, width: int, height: int, rows: list[list[float]]) -> None:
    writer.write(
        dumps_line(
            {
                "image": storage.basename(source.source_ref),
                "source-ref": source.source_ref,
                "width": int(width),
                "height": int(height),
                "prediction": rows,
            }
        )
    )


def _report_item(outcome: ImageResult, thumbnail):
    from detforge.deploy.report import ReportItem

    rows = np.asarray(outcome.prediction, dtype=np.float64).reshape(-1, 6)
    item = ReportItem(
        name=storage.basename(outcome.source.source_ref),
        source_ref=outcome.source.source_ref,
        thumbnail=thumbnail,
        boxes=rows[:, 2:],
        scores=rows[:, 1],
        class_ids=rows[:, 0].astype(np.int64),
    )
    truth = outcome.source.truth
    if truth is not None:
        item.is_tp = outcome.is_tp
        item.missed_boxes = box_ops.xyxy_to_xyxy_norm(
            truth.boxes[outcome.missed], width=truth.width, height=truth.height
        )
        item.missed_class_ids = truth.class_ids[outcome.missed]
    return item


def _summary(result: PredictResult, predictor):
    from detforge.deploy.report import ReportSummary

    meta = predictor.metadata
    validation = meta.get("validation:mAP")
    return ReportSummary(
        class_names=result.class_names,
        model_name=str(meta.get("name") or "model"),
        threshold=result.threshold,
        images=result.images,
        detections_per_class=list(result.detections_per_class),
        source_run=meta.get("source_run"),
        input_size=meta.get("input_size"),
        validation_map=float(validation) if isinstance(validation, int | float) else None,
        metrics=result.metrics,
        images_with_truth=result.images_with_truth,
        skipped=list(result.skipped),
    )
