"""PyTorch vs ONNX Runtime on real images: is an exported graph the model it came from?

``verify(model, onnx_path, images, ...)`` runs both on the same resized images and compares what does not
depend on how NMS breaks ties (``VerifyReport``):

- the **pre-NMS outputs** (the inputs of the graph's one ``NonMaxSuppression``: every anchor's box and each
  class's best ``nms_topk`` scores) against the PyTorch model's own ``dense_predictions`` (the detector
  contract, ``models.contract``): within ``VERIFY_SCORE`` and ``VERIFY_BOX`` pixels for an fp32 graph;
  measured, not bounded, for an int8 one (``quantized``: quantization changes them; its accuracy is bounded
  by the mAP comparison of ``deploy.quantize``);
- the **ONNX detections** as a correct NMS of the graph's own pre-NMS outputs (``check_nms``);
- for information, how many of PyTorch's own detections (``model(images)``) ONNX reproduced exactly.

``sample_images`` picks the images (given ones, a validation manifest's first ones, else random noise with
the reason); ``manifest_images`` reads a manifest's first images. Nothing here asks which family a model
is. Not here: writing the graph (``export``), int8 (``quantize``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from detforge import boxes as boxmath
from detforge.data.groundtruth import read_image_refs, resolve_source_ref
from detforge.errors import DetforgeError, ManifestError, ModelError
from detforge.images import resize_rgb
from detforge.runtime import load_image

# Verification (``verify``): the pre-NMS class scores of every anchor must agree within VERIFY_SCORE and
# its box coordinates within VERIFY_BOX pixels (at the input size); ONNX detections must be a valid NMS of
# those scores. At least MIN_RAW_VALUES values from real images make an export "verified". PyTorch's own
# detections >= VERIFY_THRESHOLD count as reproduced with the same class, IoU >= VERIFY_IOU and a score
# within VERIFY_SCORE (informational: near-equal scores leave NMS free to keep either box).
VERIFY_SCORE = 1e-3
VERIFY_BOX = 0.05
VERIFY_IOU = 0.99
VERIFY_THRESHOLD = 0.05
MIN_RAW_VALUES = 1000


@dataclass
class VerifyReport:
    """What verification compared and how closely ONNX Runtime reproduced PyTorch.

    ``raw_values``: pre-NMS class scores and box coordinates compared (every anchor, every class);
    ``detections``: ONNX detections checked as a valid NMS of those scores; ``matched``: of the PyTorch
    model's own detections scoring at least ``threshold`` (``pytorch_detections``), how many ONNX
    reproduced exactly (near-equal scores leave NMS free to keep either box: informational).
    ``quantized``: an int8 graph, whose pre-NMS differences to PyTorch are measured, not bounded.
    """

    images: int
    quantized: bool = False
    detections: int = 0
    real: bool = True
    source: str = ""
    threshold: float = VERIFY_THRESHOLD
    raw_values: int = 0
    boundary: int = 0  # candidates at the per-class top-k cut, kept on one side only
    max_score_diff: float = 0.0
    max_box_diff: float = 0.0
    min_iou: float = 1.0
    tied: int = 0  # NMS choices between near-equal scores (either one is correct)
    pytorch_detections: int = 0
    matched: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def verified(self) -> bool:
        """Agreement on enough real images: the export can be trusted."""
        return self.ok and self.real and self.images >= 1 and self.raw_values >= MIN_RAW_VALUES

    def why_not(self) -> str | None:
        """Why ``verified`` is False (None when it is True)."""
        if self.problems:
            what = (
                "the int8 graph's detections are not a valid NMS of its scores: "
                if self.quantized
                else "ONNX Runtime does not reproduce PyTorch: "
            )
            return what + "; ".join(self.problems[:5])
        if not self.real or self.images < 1:
            return "no real images to verify on (" + (self.source or "none") + ")"
        if self.raw_values < MIN_RAW_VALUES:
            return f"only {self.raw_values} pre-NMS values compared (at least {MIN_RAW_VALUES} needed)"
        return None

    def to_json(self) -> dict:
        compared = (
            "pre-NMS class scores and boxes of every anchor (ONNX Runtime vs PyTorch), and the ONNX "
            "detections as a valid NMS of those scores"
        )
        if self.quantized:
            compared = (
                "the int8 graph: its detections as a valid NMS of its own pre-NMS scores; its "
                "pre-NMS scores and boxes against PyTorch's fp32 model, measured (int8 changes them; "
                "the int8 record's validation:mAP comparison bounds the loss)"
            )
        return {
            "verified": self.verified,
            "ok": self.ok,
            "reason": self.why_not(),
            "graph": "int8" if self.quantized else "fp32",
            "compared": compared,
            "images": self.images,
            "real_images": self.real,
            "samples": self.source,
            "raw_values": self.raw_values,
            "boundary": self.boundary,
            "max_score_diff": float(f"{self.max_score_diff:.3g}"),
            "max_box_diff_px": float(f"{self.max_box_diff:.3g}"),
            "detections": self.detections,
            "tied": self.tied,
            "threshold": self.threshold,
            "pytorch_detections": self.pytorch_detections,
            "matched": self.matched,
            "min_iou": round(self.min_iou, 6),
            "tolerance": (
                None if self.quantized else {"score": VERIFY_SCORE, "box_px": VERIFY_BOX, "iou": VERIFY_IOU}
            ),
        }


def compare_raw(reference, candidate, *, report: VerifyReport, name: str) -> None:
    """Compare pre-NMS ``(boxes A x 4, scores C x A)`` of one image: every score within VERIFY_SCORE,
    every box coordinate within VERIFY_BOX pixels (``report.quantized``: measured only).

    Scores are those NMS sees: each class's best ``nms_topk`` candidates, the others zeroed. A candidate
    at that cut (within VERIFY_SCORE of the other side's lowest kept score) may be kept on one side only;
    for an int8 graph every candidate kept on one side only counts as ``boundary`` and the score
    difference is measured where both sides keep a candidate.
    """
    ref_boxes, ref_scores = (np.asarray(a, np.float64) for a in reference)
    boxes, scores = (np.asarray(a, np.float64) for a in candidate)
    if ref_boxes.shape != boxes.shape or ref_scores.shape != scores.shape:
        report.problems.append(
            f"{name}: pre-NMS shapes differ: PyTorch {ref_boxes.shape} "
            f"{ref_scores.shape}, ONNX {boxes.shape} {scores.shape}"
        )
        return
    diff = np.abs(scores - ref_scores)
    one_sided = (scores == 0) != (ref_scores == 0)
    if report.quantized:
        report.boundary += int(one_sided.sum())
        diff = np.where(one_sided, 0.0, diff)
    elif one_sided.any():

        def cut(values):  # per class: the lowest kept candidate score
            kept = np.where(values > 0, values, np.inf)
            return kept.min(axis=1, keepdims=True)

        at_cut = np.where(scores > 0, np.abs(scores - cut(ref_scores)), np.abs(ref_scores - cut(scores)))
        boundary = one_sided & (at_cut <= VERIFY_SCORE)
        report.boundary += int(boundary.sum())
        diff = np.where(boundary, 0.0, diff)
    box_diff = np.abs(boxes - ref_boxes)
    report.raw_values += int(scores.size + boxes.size)
    report.max_score_diff = max(report.max_score_diff, float(diff.max(initial=0.0)))
    report.max_box_diff = max(report.max_box_diff, float(box_diff.max(initial=0.0)))
    if report.quantized:
        return
    if diff.max(initial=0.0) > VERIFY_SCORE:
        c, a = np.unravel_index(int(np.argmax(diff)), diff.shape)
        report.problems.append(
            f"{name}: pre-NMS score of class {c} at anchor {a}: ONNX {scores[c, a]:.4f}, "
            f"PyTorch {ref_scores[c, a]:.4f}"
        )
    if box_diff.max(initial=0.0) > VERIFY_BOX:
        a = int(np.unravel_index(int(np.argmax(box_diff)), box_diff.shape)[0])
        report.problems.append(
            f"{name}: pre-NMS box of anchor {a}: ONNX {np.round(boxes[a], 2).tolist()}, "
            f"PyTorch {np.round(ref_boxes[a], 2).tolist()}"
        )


def check_nms(
    raw,
    detections,
    *,
    nms_threshold: float,
    nms_topk: int,
    score_threshold: float,
    keep: int,
    report: VerifyReport,
    name: str,
) -> None:
    """Check that ``detections`` (boxes, scores, classes) are a correct NMS of ``raw`` (boxes A x 4,
    scores C x A) as torchvision's SSD does it: per class, kept boxes overlap each other by at most
    ``nms_threshold``; every other candidate above ``score_threshold`` is suppressed by a kept box of
    at least its score (near-equal scores, within VERIFY_SCORE, may go either way: ``tied``) or cut by
    the ``nms_topk`` per class / ``keep`` per image limits.
    """
    raw_boxes, raw_scores = (np.asarray(a, np.float64) for a in raw)
    boxes, scores, classes = (np.asarray(a) for a in detections)
    kept: dict[int, list[int]] = {}
    for k in range(len(scores)):
        c = int(classes[k])
        if not 0 <= c < raw_scores.shape[0]:
            report.problems.append(f"{name}: detection {k} has class {c}")
            continue
        same = np.flatnonzero(
            (np.abs(raw_boxes - boxes[k]).max(axis=1) <= 1e-4)
            & (np.abs(raw_scores[c] - float(scores[k])) <= 1e-6)
        )
        if not len(same):
            report.problems.append(
                f"{name}: detection (class {c}, score {float(scores[k]):.4f}) is none of "
                "the network's candidates"
            )
            continue
        kept.setdefault(c, []).append(int(same[0]))
        report.detections += 1
    full = len(scores) >= keep
    lowest = float(scores.min()) if len(scores) else 1.0
    for c in range(raw_scores.shape[0]):
        mine = np.array(kept.get(c, []), dtype=np.int64)
        if len(mine) > 1:
            overlap = boxmath.iou_xyxy(raw_boxes[mine], raw_boxes[mine])
            np.fill_diagonal(overlap, 0.0)
            if overlap.max() > nms_threshold + 1e-6:
                report.problems.append(
                    f"{name}: two kept boxes of class {c} overlap by IoU "
                    f"{overlap.max():.3f} > nms_threshold {nms_threshold}"
                )
        candidates = np.flatnonzero(raw_scores[c] > score_threshold + 1e-6)
        candidates = candidates[~np.isin(candidates, mine)]
        if not len(candidates):
            continue
        cut = full or len(mine) >= nms_topk
        floor = min(lowest, float(raw_scores[c, mine].min())) if len(mine) else lowest
        overlap = (
            boxmath.iou_xyxy(raw_boxes[candidates], raw_boxes[mine])
            if len(mine)
            else np.zeros((len(candidates), 0))
        )
        for row, a in enumerate(candidates):
            score = raw_scores[c, a]
            over = overlap[row] > nms_threshold
            stronger = raw_scores[c, mine][over]
            if np.any(stronger >= score):
                continue
            if np.any(stronger >= score - VERIFY_SCORE):
                report.tied += 1
                continue
            if cut and score <= floor + VERIFY_SCORE:
                continue
            report.problems.append(
                f"{name}: candidate (class {c}, score {score:.4f}) is neither kept nor "
                "suppressed by a kept box"
            )


def match_detections(reference, candidate, *, threshold: float, report: VerifyReport) -> None:
    """Count the PyTorch detections >= ``threshold`` that ONNX reproduced (same class, IoU >= VERIFY_IOU,
    score within VERIFY_SCORE): ``pytorch_detections``, ``matched``, ``min_iou`` of the matches."""
    ref_boxes, ref_scores, ref_classes = reference
    boxes, scores, classes = candidate
    taken = np.zeros(len(scores), dtype=bool)
    for j in np.flatnonzero(ref_scores >= threshold):
        report.pytorch_detections += 1
        same = np.flatnonzero(
            (classes == ref_classes[j]) & ~taken & (np.abs(scores - ref_scores[j]) <= VERIFY_SCORE)
        )
        if not len(same):
            continue
        ious = boxmath.iou_xyxy(ref_boxes[j : j + 1], boxes[same])[0]
        if ious.max() >= VERIFY_IOU:
            taken[same[int(np.argmax(ious))]] = True
            report.matched += 1
            report.min_iou = min(report.min_iou, float(ious.max()))


def _with_pre_nms_outputs(onnx_path: str, folder: str) -> str:
    """A copy of the graph that also outputs its ``NonMaxSuppression`` node's inputs (boxes, scores)."""
    import onnx
    from onnx import helper

    model = onnx.load(onnx_path)
    nms = [node for node in model.graph.node if node.op_type == "NonMaxSuppression"]
    if len(nms) != 1:
        raise ModelError(
            f"the exported graph has {len(nms)} NonMaxSuppression nodes (expected 1)", path=onnx_path
        )
    for name in nms[0].input[:2]:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = os.path.join(folder, "pre-nms.onnx")
    onnx.save(model, path)
    return path


def pytorch_pre_nms(model, batch: np.ndarray, *, candidates: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """PyTorch's pre-NMS ``(boxes A x 4, scores C x A)`` per image of a ``uint8`` NHWC ``batch`` at the
    model's input size: its eager ``dense_predictions`` on the batch normalised by its ``input_spec``,
    each class's best ``candidates`` kept (``models.postprocess.class_candidates``), as NMS sees them."""
    import torch

    from detforge.models.postprocess import class_candidates

    spec = model.input_spec
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div(255)
    with torch.inference_mode():
        boxes, scores = model.dense_predictions((x - mean) / std)
        scores = class_candidates(scores.transpose(1, 2).contiguous(), candidates)  # N x C x A
    return [(boxes[i].numpy(), scores[i].numpy()) for i in range(len(batch))]


def verify(
    model,
    onnx_path: str,
    images: Sequence[np.ndarray],
    *,
    nms_threshold: float,
    nms_topk: int,
    score_threshold: float,
    nms_candidates: int = 0,
    threshold: float = VERIFY_THRESHOLD,
    real: bool = True,
    source: str = "",
    quantized: bool = False,
    threads: int | None = None,
) -> VerifyReport:
    """Run PyTorch and ONNX Runtime on the same images, resized to the model's input size, and compare
    (see ``VerifyReport``); ``real`` says whether ``images`` are real pictures, ``quantized`` that the
    graph is int8 (its pre-NMS differences are measured, not bounded).

    Any model with the detector contract (``models.contract``) verifies here when its graph has exactly
    one ONNX ``NonMaxSuppression`` fed with ``boxes`` ``N x A x 4`` (input pixels) and ``scores``
    ``N x C x A`` (each class's best ``nms_candidates`` (0: ``nms_topk``) candidates, the others 0), as
    ``export`` writes it.
    """
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    report = VerifyReport(
        images=len(images), real=real, source=source, threshold=threshold, quantized=quantized
    )
    batch = np.stack([resize_rgb(image, model.input_spec.size) for image in images])
    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(
            _with_pre_nms_outputs(onnx_path, tmp), sess_options=options, providers=["CPUExecutionProvider"]
        )
        outputs = session.run(None, {"images": batch})
    out_boxes, out_scores, out_classes, counts, raw_boxes, raw_scores = outputs
    keep = out_scores.shape[1]
    reference_raw = pytorch_pre_nms(model, batch, candidates=int(nms_candidates or nms_topk))
    with torch.inference_mode():
        reference = model([torch.from_numpy(b.copy()).permute(2, 0, 1).float().div(255) for b in batch])
    for i, ref in enumerate(reference):
        name, n = f"sample image {i}", int(counts[i])
        compare_raw(reference_raw[i], (raw_boxes[i], raw_scores[i]), report=report, name=name)
        detections = (
            out_boxes[i, :n].astype(np.float64),
            out_scores[i, :n].astype(np.float64),
            out_classes[i, :n],
        )
        check_nms(
            (raw_boxes[i], raw_scores[i]),
            detections,
            nms_threshold=nms_threshold,
            nms_topk=nms_topk,
            score_threshold=score_threshold,
            keep=keep,
            report=report,
            name=name,
        )
        match_detections(
            (
                ref["boxes"].numpy().astype(np.float64),
                ref["scores"].numpy().astype(np.float64),
                ref["labels"].numpy() - 1,
            ),
            detections,
            threshold=threshold,
            report=report,
        )
    return report


def manifest_images(manifest: str, count: int) -> list[np.ndarray]:
    """The first ``count`` images of a manifest (labeled or an input manifest), decoded to RGB."""
    images: list[np.ndarray] = []
    for number, obj in read_image_refs(manifest):
        ref = obj.get("source-ref") if isinstance(obj, dict) else None
        if not isinstance(ref, str) or not ref:
            raise ManifestError(
                "missing or not a string", path=os.fspath(manifest), line=number, field="source-ref"
            )
        images.append(load_image(resolve_source_ref(ref, manifest)))
        if len(images) >= count:
            break
    return images


@dataclass
class Samples:
    """Images to verify with: ``real`` pictures (given or validation images) or random noise."""

    images: list[np.ndarray]
    source: str
    real: bool


def sample_images(
    *,
    count: int,
    image_size: int,
    images: Sequence[str] | None = None,
    validation: str | None = None,
    seed: int = 0,
) -> Samples:
    """Images to verify with: ``images``, else the first of ``validation`` (a manifest), else ``count``
    random ones (``real=False``, the source saying why)."""
    if images:
        return Samples(
            [load_image(p) for p in images[:count]], f"{min(count, len(images))} given images", True
        )
    why = "the run names no validation manifest (pass --verify-image or --validation)"
    if validation:
        try:
            loaded = manifest_images(validation, count)
        except DetforgeError as exc:
            loaded, why = [], f"the validation images cannot be read: {exc}"
        else:
            why = f"{validation} has no images"
        if loaded:
            return Samples(loaded, f"{len(loaded)} validation images ({validation})", True)
    rng = np.random.default_rng(seed)
    return Samples(
        [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(count)],
        f"{count} random images: {why}",
        False,
    )
