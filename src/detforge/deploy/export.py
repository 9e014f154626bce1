"""A run folder -> a deploy folder: ``model.onnx`` (pre-processing, network, box decoding, NMS) and
``model.json``.

``export_run(run_dir, out_dir, ...)`` wraps the trained torchvision SSD in ``DeployableSSD`` and writes it
with torch's TorchScript-based ONNX exporter (``dynamo=False``: the dynamo exporter cannot follow the
data-dependent shapes of torchvision's detectors; this wrapper has none except the NMS, which is emitted
as ONNX's own ``NonMaxSuppression`` and therefore works for all three architectures).

The ONNX graph takes ``images``: uint8 ``N x H x W x 3`` RGB (any N; H, W are resized inside, the runtime
feeds the model's input size) and returns, per image, the best ``K = min(nms_topk, classes x anchors)``
detections after per-class NMS, exactly as torchvision's SSD post-processing does:
``boxes`` ``N x K x 4`` (xyxy in input pixels), ``scores`` ``N x K``, ``classes`` ``N x K`` (0-based class
ids, -1 for padding) and ``num_detections`` ``N``.

Every export is verified (``verify``) on real images (the run's validation images, or given ones):
ONNX Runtime's pre-NMS class scores and boxes of every anchor must match PyTorch's (torchvision's own
head, anchors and box coder), and its detections must be a correct NMS of them (near-equal scores may
go either way); otherwise nothing is written. Without real images the export stops unless
``allow_unverified`` (then ``model.json`` says it is unverified). ``--int8`` adds a post-training static
quantization (ONNX Runtime's QDQ tools), compares it with fp32 on the validation images and keeps it
(fp32 twin beside it as ``model-fp32.onnx``) only when it loses at most ``max_map_drop`` mAP points.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from detforge import __version__, storage, tiling
from detforge import boxes as boxmath
from detforge.data.groundtruth import read_image_refs, resolve_source_ref
from detforge.runtime import METADATA_FILE, MODEL_FILE, file_sha256, load_image, resize_rgb
from detforge.errors import ConfigError, DetforgeError, ManifestError, ModelError

DEFAULT_OPSET = 17
DEFAULT_THRESHOLD = 0.3
# --int8 keeps the fp32 model when int8 loses more validation:mAP points than this.
DEFAULT_MAX_MAP_DROP = 1.0
# ... and when it is not at least this much faster than fp32 at batch 1 (a slower int8 model is no gain).
DEFAULT_MIN_SPEEDUP = 1.0
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
# The int8 graph's input normalisation, as one depthwise Conv (quantize_int8).
NORMALIZE_NODE = "/detforge_normalize/Conv"


def _nms_function():
    """An autograd Function: eager batched per-class NMS that exports as ONNX ``NonMaxSuppression``."""
    import torch
    from torchvision.ops import nms

    class BatchedClassNMS(torch.autograd.Function):
        """``boxes`` N x A x 4, ``scores`` N x C x A -> ``selected`` K x 3 (image, class, anchor)."""

        @staticmethod
        def forward(ctx, boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
            picked = []
            for b in range(scores.shape[0]):
                for c in range(scores.shape[1]):
                    score = scores[b, c]
                    candidates = torch.nonzero(score > score_threshold).squeeze(1)
                    keep = nms(boxes[b, candidates], score[candidates], iou_threshold)[:max_per_class]
                    index = candidates[keep]
                    image, klass = torch.full_like(index, b), torch.full_like(index, c)
                    picked.append(torch.stack([image, klass, index], 1))
            if not picked:
                return torch.zeros((0, 3), dtype=torch.int64)
            return torch.cat(picked).to(torch.int64)

        @staticmethod
        def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
            return g.op(
                "NonMaxSuppression", boxes, scores,
                g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
                g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
                center_point_box_i=0,
            )

    return BatchedClassNMS


def deployable(model, *, image_size: int, nms_threshold: float, nms_topk: int, score_threshold: float):
    """``DeployableSSD`` around a torchvision SSD in eval mode (shares its weights); an anchor-free
    detector (``detector=gfl``: it has ``dense_predictions``) gives its boxes and scores directly."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torchvision.models.detection.image_list import ImageList

    nms_fn = _nms_function()
    model = model.eval()
    dense = getattr(model, "dense_predictions", None)
    with torch.no_grad():
        dummy = torch.zeros(1, 3, image_size, image_size)
        if dense is not None:  # one "anchor" per point of the three maps
            anchors = dense(dummy)[0][0]
        else:
            features = list(model.backbone(dummy).values())
            anchors = model.anchor_generator(ImageList(dummy, [(image_size, image_size)]), features)[0]

    class DeployableSSD(nn.Module):
        """uint8 NHWC images -> padded per-image detections (see the module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone = model.backbone
            self.head = model.head
            self.net = model if dense is not None else None
            transform = model if dense is not None else model.transform
            self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(transform.image_std).view(1, 3, 1, 1))
            self.register_buffer("anchors", anchors.clone())
            if dense is None:
                self.weights = tuple(float(w) for w in model.box_coder.weights)
                self.clip = float(model.box_coder.bbox_xform_clip)
            self.size = int(image_size)
            self.num_classes = (int(model.num_classes) if dense is not None
                                else int(model.head.classification_head.num_columns) - 1)
            self.num_anchors = int(anchors.shape[0])
            self.keep = min(int(nms_topk), self.num_classes * self.num_anchors)
            self.candidates = min(int(nms_topk), self.num_anchors)

        def decode(self, codes):
            wx, wy, ww, wh = self.weights
            a = self.anchors
            widths, heights = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
            cx, cy = a[:, 0] + 0.5 * widths, a[:, 1] + 0.5 * heights
            dx, dy = codes[..., 0] / wx, codes[..., 1] / wy
            dw = torch.clamp(codes[..., 2] / ww, max=self.clip)
            dh = torch.clamp(codes[..., 3] / wh, max=self.clip)
            px, py = dx * widths + cx, dy * heights + cy
            half_w, half_h = 0.5 * torch.exp(dw) * widths, 0.5 * torch.exp(dh) * heights
            out = torch.stack([px - half_w, py - half_h, px + half_w, py + half_h], dim=-1)
            return out.clamp(min=0.0, max=float(self.size))

        def forward(self, images):
            shape = torch._shape_as_tensor(images)
            height, width = shape[1].float(), shape[2].float()
            x = images.permute(0, 3, 1, 2).float() / 255.0
            x = (x - self.mean) / self.std
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            if self.net is not None:
                boxes, scores = self.net.dense_predictions(x)
                scores = scores.transpose(1, 2)  # N x C x A
            else:
                head = self.head(list(self.backbone(x).values()))
                boxes = self.decode(head["bbox_regression"])
                scores = F.softmax(head["cls_logits"], dim=-1)[..., 1:].transpose(1, 2)  # N x C x A
            scale = torch.stack([width, height, width, height]) / float(self.size)
            boxes = boxes * scale
            num_anchors = self.num_anchors
            # torchvision keeps the nms_topk best candidates of each class before NMS
            kth = torch.topk(scores, self.candidates, dim=2).values[..., -1:]
            scores = torch.where(scores >= kth, scores, torch.zeros_like(scores))
            selected = nms_fn.apply(boxes, scores, int(nms_topk), float(nms_threshold),
                                    float(score_threshold))
            flat_scores = scores.reshape(-1)
            flat_index = (selected[:, 0] * self.num_classes + selected[:, 1]) * num_anchors + selected[:, 2]
            picked = flat_scores.index_select(0, flat_index)
            dense = torch.full_like(flat_scores, -1.0).scatter(0, flat_index, picked)
            top_scores, top_index = torch.topk(dense.reshape(scores.shape[0], -1), self.keep, dim=1)
            valid = top_scores >= 0
            classes = torch.div(top_index, num_anchors, rounding_mode="floor")
            anchor = top_index - classes * num_anchors
            top_boxes = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(-1, -1, 4))
            return (top_boxes * valid.unsqueeze(-1).float(),
                    torch.where(valid, top_scores, torch.zeros_like(top_scores)),
                    torch.where(valid, classes, torch.full_like(classes, -1)),
                    valid.sum(dim=1))

    return DeployableSSD().eval()


@dataclass
class VerifyReport:
    """What verification compared and how closely ONNX Runtime reproduced PyTorch.

    ``raw_values``: pre-NMS class scores and box coordinates compared (every anchor, every class);
    ``detections``: ONNX detections checked as a valid NMS of those scores; ``matched``: of the PyTorch
    model's own detections scoring at least ``threshold`` (``pytorch_detections``), how many ONNX
    reproduced exactly (near-equal scores leave NMS free to keep either box: informational).
    """

    images: int
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
            return "ONNX Runtime does not reproduce PyTorch: " + "; ".join(self.problems[:5])
        if not self.real or self.images < 1:
            return "no real images to verify on (" + (self.source or "none") + ")"
        if self.raw_values < MIN_RAW_VALUES:
            return f"only {self.raw_values} pre-NMS values compared (at least {MIN_RAW_VALUES} needed)"
        return None

    def to_json(self) -> dict:
        return {
            "verified": self.verified, "ok": self.ok, "reason": self.why_not(),
            "compared": ("pre-NMS class scores and boxes of every anchor (ONNX Runtime vs PyTorch), and "
                         "the ONNX detections as a valid NMS of those scores"),
            "images": self.images, "real_images": self.real, "samples": self.source,
            "raw_values": self.raw_values, "boundary": self.boundary,
            "max_score_diff": float(f"{self.max_score_diff:.3g}"),
            "max_box_diff_px": float(f"{self.max_box_diff:.3g}"),
            "detections": self.detections, "tied": self.tied, "threshold": self.threshold,
            "pytorch_detections": self.pytorch_detections, "matched": self.matched,
            "min_iou": round(self.min_iou, 6),
            "tolerance": {"score": VERIFY_SCORE, "box_px": VERIFY_BOX, "iou": VERIFY_IOU},
        }


def compare_raw(reference, candidate, *, report: VerifyReport, name: str) -> None:
    """Compare pre-NMS ``(boxes A x 4, scores C x A)`` of one image: every score within VERIFY_SCORE,
    every box coordinate within VERIFY_BOX pixels.

    Scores are those NMS sees: each class's best ``nms_topk`` candidates, the others zeroed. A candidate
    at that cut (within VERIFY_SCORE of the other side's lowest kept score) may be kept on one side only.
    """
    ref_boxes, ref_scores = (np.asarray(a, np.float64) for a in reference)
    boxes, scores = (np.asarray(a, np.float64) for a in candidate)
    if ref_boxes.shape != boxes.shape or ref_scores.shape != scores.shape:
        report.problems.append(f"{name}: pre-NMS shapes differ: PyTorch {ref_boxes.shape} "
                               f"{ref_scores.shape}, ONNX {boxes.shape} {scores.shape}")
        return
    diff = np.abs(scores - ref_scores)
    one_sided = (scores == 0) != (ref_scores == 0)
    if one_sided.any():
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
    if diff.max(initial=0.0) > VERIFY_SCORE:
        c, a = np.unravel_index(int(np.argmax(diff)), diff.shape)
        report.problems.append(f"{name}: pre-NMS score of class {c} at anchor {a}: ONNX {scores[c, a]:.4f}, "
                               f"PyTorch {ref_scores[c, a]:.4f}")
    if box_diff.max(initial=0.0) > VERIFY_BOX:
        a = int(np.unravel_index(int(np.argmax(box_diff)), box_diff.shape)[0])
        report.problems.append(f"{name}: pre-NMS box of anchor {a}: ONNX {np.round(boxes[a], 2).tolist()}, "
                               f"PyTorch {np.round(ref_boxes[a], 2).tolist()}")


def check_nms(raw, detections, *, nms_threshold: float, nms_topk: int, score_threshold: float,
              keep: int, report: VerifyReport, name: str) -> None:
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
        same = np.flatnonzero((np.abs(raw_boxes - boxes[k]).max(axis=1) <= 1e-4)
                              & (np.abs(raw_scores[c] - float(scores[k])) <= 1e-6))
        if not len(same):
            report.problems.append(f"{name}: detection (class {c}, score {float(scores[k]):.4f}) is none of "
                                   "the network's candidates")
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
                report.problems.append(f"{name}: two kept boxes of class {c} overlap by IoU "
                                       f"{overlap.max():.3f} > nms_threshold {nms_threshold}")
        candidates = np.flatnonzero(raw_scores[c] > score_threshold + 1e-6)
        candidates = candidates[~np.isin(candidates, mine)]
        if not len(candidates):
            continue
        cut = full or len(mine) >= nms_topk
        floor = min(lowest, float(raw_scores[c, mine].min())) if len(mine) else lowest
        overlap = (boxmath.iou_xyxy(raw_boxes[candidates], raw_boxes[mine]) if len(mine)
                   else np.zeros((len(candidates), 0)))
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
            report.problems.append(f"{name}: candidate (class {c}, score {score:.4f}) is neither kept nor "
                                   "suppressed by a kept box")


def match_detections(reference, candidate, *, threshold: float, report: VerifyReport) -> None:
    """Count the PyTorch detections >= ``threshold`` that ONNX reproduced (same class, IoU >= VERIFY_IOU,
    score within VERIFY_SCORE): ``pytorch_detections``, ``matched``, ``min_iou`` of the matches."""
    ref_boxes, ref_scores, ref_classes = reference
    boxes, scores, classes = candidate
    taken = np.zeros(len(scores), dtype=bool)
    for j in np.flatnonzero(ref_scores >= threshold):
        report.pytorch_detections += 1
        same = np.flatnonzero((classes == ref_classes[j]) & ~taken
                              & (np.abs(scores - ref_scores[j]) <= VERIFY_SCORE))
        if not len(same):
            continue
        ious = boxmath.iou_xyxy(ref_boxes[j:j + 1], boxes[same])[0]
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
        raise ModelError(f"the exported graph has {len(nms)} NonMaxSuppression nodes (expected 1)",
                         path=onnx_path)
    for name in nms[0].input[:2]:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = os.path.join(folder, "pre-nms.onnx")
    onnx.save(model, path)
    return path


def ssd_pre_nms(model, batch: np.ndarray, *, candidates: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """PyTorch's pre-NMS ``(boxes A x 4, scores C x A)`` per image of a torchvision SSD, from its own
    transform, backbone, head, anchors and box coder (not from ``deployable``'s code): the class scores
    (softmax, background dropped) with all but each class's best ``candidates`` zeroed, as NMS sees them."""
    import torch
    from torchvision.ops import boxes as box_ops

    images = [torch.from_numpy(b.copy()).permute(2, 0, 1).float().div(255) for b in batch]
    with torch.inference_mode():
        image_list, _ = model.transform(images)
        features = list(model.backbone(image_list.tensors).values())
        head = model.head(features)
        anchors = model.anchor_generator(image_list, features)
        out = []
        for i, size in enumerate(image_list.image_sizes):
            boxes = box_ops.clip_boxes_to_image(model.box_coder.decode_single(head["bbox_regression"][i],
                                                                              anchors[i]), size)
            scores = torch.softmax(head["cls_logits"][i], dim=-1)[:, 1:].T.contiguous()
            kth = torch.topk(scores, min(candidates, scores.shape[1]), dim=1).values[:, -1:]
            scores = torch.where(scores >= kth, scores, torch.zeros_like(scores))
            out.append((boxes.numpy(), scores.numpy()))
    return out


def dense_pre_nms(model, batch: np.ndarray, *, candidates: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """PyTorch's pre-NMS ``(boxes A x 4, scores C x A)`` per image of an anchor-free detector (``gfl``), from
    its eager ``dense_predictions`` on the normalised batch, each class's best ``candidates`` kept."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div(255)
    with torch.inference_mode():
        boxes, scores = model.dense_predictions((x - model.mean) / model.std)
        scores = scores.transpose(1, 2).contiguous()  # N x C x A
        kth = torch.topk(scores, min(candidates, scores.shape[2]), dim=2).values[..., -1:]
        scores = torch.where(scores >= kth, scores, torch.zeros_like(scores))
    return [(boxes[i].numpy(), scores[i].numpy()) for i in range(len(batch))]


def verify(model, onnx_path: str, images: Sequence[np.ndarray], *, image_size: int, nms_threshold: float,
           nms_topk: int, score_threshold: float, threshold: float = VERIFY_THRESHOLD,
           real: bool = True, source: str = "", pre_nms=ssd_pre_nms,
           threads: int | None = None) -> VerifyReport:
    """Run PyTorch and ONNX Runtime on the same resized images and compare (see ``VerifyReport``).

    ``pre_nms(model, batch, candidates=)`` gives PyTorch's pre-NMS boxes and scores per image
    (``ssd_pre_nms`` for torchvision's SSD); ``real`` says whether ``images`` are real pictures.

    Another model family verifies through this function when its graph has exactly one ONNX
    ``NonMaxSuppression`` (``_nms_function``) fed with ``boxes`` ``N x A x 4`` (input pixels) and
    ``scores`` ``N x C x A`` (each class's best ``nms_topk`` candidates, the others 0), and it passes a
    ``pre_nms`` computing the same from its PyTorch model's own parts; ``model(list of CHW floats)``
    must return torchvision-style ``boxes``/``scores``/``labels`` (1-based) for the informational match.
    """
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    report = VerifyReport(images=len(images), real=real, source=source, threshold=threshold)
    batch = np.stack([resize_rgb(image, image_size) for image in images])
    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(_with_pre_nms_outputs(onnx_path, tmp), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"images": batch})
    out_boxes, out_scores, out_classes, counts, raw_boxes, raw_scores = outputs
    keep = out_scores.shape[1]
    candidates = min(int(nms_topk), raw_boxes.shape[1])
    reference_raw = pre_nms(model, batch, candidates=candidates)
    with torch.inference_mode():
        reference = model([torch.from_numpy(b.copy()).permute(2, 0, 1).float().div(255) for b in batch])
    for i, ref in enumerate(reference):
        name, n = f"sample image {i}", int(counts[i])
        compare_raw(reference_raw[i], (raw_boxes[i], raw_scores[i]), report=report, name=name)
        detections = (out_boxes[i, :n].astype(np.float64), out_scores[i, :n].astype(np.float64),
                      out_classes[i, :n])
        check_nms((raw_boxes[i], raw_scores[i]), detections, nms_threshold=nms_threshold, nms_topk=nms_topk,
                  score_threshold=score_threshold, keep=keep, report=report, name=name)
        match_detections((ref["boxes"].numpy().astype(np.float64), ref["scores"].numpy().astype(np.float64),
                          ref["labels"].numpy() - 1), detections, threshold=threshold, report=report)
    return report


def manifest_images(manifest: str, count: int) -> list[np.ndarray]:
    """The first ``count`` images of a manifest (labeled or an input manifest), decoded to RGB."""
    images: list[np.ndarray] = []
    for number, obj in read_image_refs(manifest):
        ref = obj.get("source-ref") if isinstance(obj, dict) else None
        if not isinstance(ref, str) or not ref:
            raise ManifestError("missing or not a string", path=os.fspath(manifest), line=number,
                                field="source-ref")
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


def sample_images(run_dir: str, *, count: int, image_size: int, images: Sequence[str] | None = None,
                  validation: str | None = None, seed: int = 0) -> Samples:
    """Images to verify with: ``images``, else the first of ``validation`` (default: the run's
    validation manifest), else ``count`` random ones (``real=False``, the source saying why)."""
    if images:
        return Samples([load_image(p) for p in images[:count]], f"{min(count, len(images))} given images",
                       True)
    validation = validation or _run_validation(run_dir)
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
    return Samples([rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(count)],
                   f"{count} random images: {why}", False)


def _constant(model, name: str):
    """The value of an initializer or Constant node output ``name`` (numpy), or None."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _normalization_as_conv(model) -> str | None:
    """Replace the graph's ``x / 255 -> - mean -> / std`` by one 1 x 1 depthwise ``Conv`` (same values).

    Left as they are in an int8 graph, these per-channel broadcasts took a tenth of mobilenet-v3's
    int8 time (measured; ~20x their fp32 time, likely as ONNX Runtime moves them to the NHWC layout of
    its int8 convolutions). As a Conv on the uint8 pixel values they quantize exactly (scale 1).
    Returns the Conv's input tensor (the pixels), None when the pattern is not found.
    """
    from onnx import helper, numpy_helper

    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(node, op_type: str):
        found = consumers.get(node.output[0], [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    for first in list(model.graph.node):
        scale = _constant(model, first.input[1]) if first.op_type == "Div" and len(first.input) == 2 else None
        if scale is None or scale.size != 1 or float(scale.reshape(-1)[0]) != 255.0:
            continue
        sub = only_consumer(first, "Sub")
        div = only_consumer(sub, "Div") if sub is not None else None
        if div is None:
            continue
        mean, std = _constant(model, sub.input[1]), _constant(model, div.input[1])
        if mean is None or std is None or mean.size != 3 or std.size != 3:
            continue
        mean, std = mean.reshape(3).astype(np.float64), std.reshape(3).astype(np.float64)
        weight = (1.0 / (255.0 * std)).astype(np.float32).reshape(3, 1, 1, 1)
        bias = (-mean / std).astype(np.float32)
        names = ("detforge_normalize_weight", "detforge_normalize_bias")
        model.graph.initializer.extend([numpy_helper.from_array(weight, names[0]),
                                        numpy_helper.from_array(bias, names[1])])
        conv = helper.make_node("Conv", [first.input[0], *names], [div.output[0]], name=NORMALIZE_NODE,
                                group=3, kernel_shape=[1, 1])
        index = list(model.graph.node).index(first)
        for node in (first, sub, div):
            model.graph.node.remove(node)
        model.graph.node.insert(index, conv)
        return first.input[0]
    return None


def _network_nodes(model) -> list[str]:
    """Names of the nodes of backbone, neck and head: ancestors of the ``/head/`` nodes that do not feed
    the input ``Resize`` (pre-processing: a ``Resize`` with no ``Conv`` before it; the neck's upsampling
    ``Resize`` nodes are network). Box decoding, softmax, top-k and NMS come after the head."""
    producers = {output: node for node in model.graph.node for output in node.output}

    def ancestors(seeds) -> set[int]:
        seen: set[int] = set()
        stack = list(seeds)
        while stack:
            node = stack.pop()
            if id(node) not in seen:
                seen.add(id(node))
                stack += [producers[name] for name in node.input if name in producers]
        return seen

    network = ancestors(n for n in model.graph.node if n.name.startswith("/head/"))
    by_id = {id(node): node for node in model.graph.node}
    input_resizes = [n for n in model.graph.node if n.op_type == "Resize"
                     and not any(by_id[i].op_type == "Conv" for i in ancestors([n]))]
    network -= ancestors(input_resizes)
    return [node.name for node in model.graph.node if id(node) in network]


def quantize_int8(fp32_path: str, int8_path: str, calibration: Sequence[np.ndarray], *,
                  image_size: int) -> None:
    """Static QDQ int8 quantization of the network, calibrated on ``calibration`` images.

    Quantized: every operator of backbone and head (convolutions per channel, residual adds, the
    activations, squeeze-excitation products, pooling, the head's reshapes and concatenations) and the
    input normalisation (as a 1 x 1 depthwise Conv, exact on uint8 pixels). Left in float: the input
    resize, box decoding, softmax, top-k and NMS, so scores and boxes keep their precision. Quantizing
    the convolutions only (each one wrapped in its own quantize/dequantize pair) made mobilenet-v3
    slower than fp32 at batch 8 (measured: docs/deploy.md, Benchmark).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": resize_rgb(image, image_size)[None]} for image in calibration])

        def get_next(self):
            return next(self.items, None)

    ort.set_default_logger_severity(3)  # the quantizer's sessions warn about every unused initializer
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = os.path.join(tmp, "prepared.onnx")
            quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
            model = onnx.load(prepared)
            pixels = _normalization_as_conv(model)
            for k, node in enumerate(model.graph.node):  # inlined functions (HardSwish) have no names
                if not node.name:
                    node.name = f"/detforge_inlined/{node.op_type}_{k}"
            network = _network_nodes(model)
            options: dict = {"quant_format": QuantFormat.QDQ, "per_channel": True,
                             "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8}
            if network:
                if pixels is not None:
                    network.append(NORMALIZE_NODE)
                    pixel_range = {"rmin": np.float32(0.0), "rmax": np.float32(255.0)}  # scale 1: exact
                    options["extra_options"] = {"TensorQuantOverrides": {pixels: [pixel_range]}}
                options["nodes_to_quantize"] = network
            else:  # not a graph export_run wrote: its convolutions only
                options["op_types_to_quantize"] = ["Conv"]
            onnx.save(model, prepared)
            quantize_static(prepared, int8_path, Reader(), **options)
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default (warnings)


def _run_validation(run_dir: str) -> str | None:
    """The validation manifest a run was trained with, when its resume state names one."""
    from detforge.training.train import resume_data

    try:
        return resume_data(run_dir)[1]
    except DetforgeError:  # no resume state, or one that does not name the manifests
        return None


def compare_int8(staging: str, sample: np.ndarray, *, classes: list[str], image_size: int,
                 validation: str, int8_file: str = "model-int8.onnx", repeats: int = 15) -> dict:
    """Latency (batch 1, median) and validation:mAP (VOC07, on every image of ``validation``) of
    ``staging/model.onnx`` (fp32) and ``staging/<int8_file>``; ``map_points_lost`` = 100 x the mAP drop."""
    import onnxruntime as ort

    from detforge.evaluation.evaluate import evaluate

    files = (("fp32", MODEL_FILE), ("int8", int8_file))
    batch = resize_rgb(sample, image_size)[None]
    sessions = {kind: ort.InferenceSession(os.path.join(staging, name), providers=["CPUExecutionProvider"])
                for kind, name in files}
    times: dict[str, list[float]] = {kind: [] for kind in sessions}
    for _ in range(repeats + 1):  # interleaved, the first call of each is a warm-up
        for kind, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"images": batch})
            times[kind].append(time.perf_counter() - start)
    result: dict = {f"{kind}_ms": round(float(np.median(t[1:])) * 1000.0, 2) for kind, t in times.items()}
    result["speedup"] = round(result["fp32_ms"] / max(result["int8_ms"], 1e-9), 2)
    for kind, name in files:
        folder = os.path.join(staging, f".{kind}")
        os.makedirs(folder)
        os.link(os.path.join(staging, name), os.path.join(folder, MODEL_FILE))
        with open(os.path.join(folder, METADATA_FILE), "wb") as handle:
            handle.write(orjson.dumps({"classes": classes, "input_size": image_size, "score_threshold": 0.0}))
        evaluation = evaluate(folder, validation, coco=False)
        result[f"{kind}_map"] = round(evaluation.metrics.voc07_map, 4)
        result["validation_images"] = evaluation.metrics.num_images
        shutil.rmtree(folder)
    result["validation"] = validation
    result["map_points_lost"] = round(100.0 * (result["fp32_map"] - result["int8_map"]), 2)
    return result


@dataclass
class ExportResult:
    """What ``export_run`` wrote and measured. ``int8``: the quantization's figures (``accepted`` False
    when it lost more than ``max_map_drop`` and the fp32 model was written instead)."""

    out_dir: str
    model_path: str
    metadata: dict
    verify: VerifyReport
    int8: dict | None = None


def export_run(run_dir: str, out_dir: str, *, which: str = "model", opset: int = DEFAULT_OPSET,
               nms_threshold: float | None = None, nms_topk: int | None = None,
               score_threshold: float | None = None, default_threshold: float = DEFAULT_THRESHOLD,
               verify_images: Sequence[str] | None = None, verify_count: int = 4,
               validation: str | None = None, allow_unverified: bool = False,
               int8: bool = False, calibration: str | None = None, calibration_count: int = 32,
               max_map_drop: float = DEFAULT_MAX_MAP_DROP, min_speedup: float = DEFAULT_MIN_SPEEDUP,
               name: str | None = None) -> ExportResult:
    """Export a trained run to ``out_dir`` (``model.onnx`` + ``model.json``), verified against PyTorch.

    Verification runs on ``verify_images``, else the first ``verify_count`` images of ``validation``
    (default: the run's validation manifest). Without real images the export stops (ModelError) unless
    ``allow_unverified``: then it verifies on random images and ``model.json`` says it is unverified.
    ``int8``: quantize (calibrated on ``calibration``, default the validation images), compare with fp32
    on every ``validation`` image and keep fp32 when int8 loses more than ``max_map_drop`` mAP points or
    is not ``min_speedup`` times as fast at batch 1 (``model.json`` → ``int8.refused`` says which).
    """
    import torch

    from detforge.training.checkpoint import load_run_model

    if storage.is_remote(out_dir):
        raise ConfigError("export writes a local deploy folder; copy it to s3:// afterwards", field="--out")
    if not 0.0 <= max_map_drop <= 100.0:
        raise ConfigError(f"must be in [0, 100] mAP points, got {max_map_drop}", field="--max-map-drop")
    if not min_speedup >= 0.0:
        raise ConfigError(f"must be 0 or more, got {min_speedup}", field="--min-speedup")
    model, info = load_run_model(run_dir, which=which)
    thresholds = dict(info.thresholds or {})
    nms_threshold = float(thresholds.get("nms_threshold", 0.45) if nms_threshold is None else nms_threshold)
    nms_topk = int(thresholds.get("nms_topk", 400) if nms_topk is None else nms_topk)
    if score_threshold is None:
        score_threshold = thresholds.get("score_threshold", 0.01)
    score_threshold = float(score_threshold)
    for key, value, low, high in (("nms_threshold", nms_threshold, 0.0, 1.0),
                                  ("score_threshold", score_threshold, 0.0, 1.0),
                                  ("default_threshold", default_threshold, 0.0, 1.0)):
        if not low <= value <= high:
            raise ConfigError(f"must be in [{low}, {high}], got {value}", field=key)
    if nms_topk < 1:
        raise ConfigError(f"must be at least 1, got {nms_topk}", field="nms_topk")
    from detforge.models import set_postprocess

    set_postprocess(model, nms_threshold=nms_threshold, nms_topk=nms_topk, score_threshold=score_threshold)
    size = int(info.image_shape)
    validation = validation or _run_validation(run_dir)
    if int8 and not validation:
        raise ConfigError("--int8 compares the int8 model with fp32 on validation images: the run names "
                          "no validation manifest, pass one with --validation", field="--validation")
    wrapper = deployable(model, image_size=size, nms_threshold=nms_threshold, nms_topk=nms_topk,
                         score_threshold=score_threshold)
    samples = sample_images(run_dir, count=verify_count, image_size=size, images=verify_images,
                            validation=validation)
    if not samples.real and not allow_unverified:
        raise ModelError(f"cannot verify the export: {samples.source.split(': ', 1)[1]}", path=run_dir,
                         hint="or pass --allow-unverified to export unverified (model.json says so)")

    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        onnx_path = os.path.join(staging, MODEL_FILE)
        example = torch.from_numpy(np.stack([resize_rgb(s, size) for s in samples.images[:2]]))
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
                torch.onnx.export(
                    wrapper, (example,), onnx_path, dynamo=False, opset_version=int(opset),
                    input_names=["images"], output_names=["boxes", "scores", "classes", "num_detections"],
                    dynamic_axes={"images": {0: "batch", 1: "height", 2: "width"}, "boxes": {0: "batch"},
                                  "scores": {0: "batch"}, "classes": {0: "batch"},
                                  "num_detections": {0: "batch"}})
        except Exception as exc:  # the exporter's own errors: name the model, not torch's internals
            raise ModelError(f"ONNX export of the {info.base_network} model failed: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                             path=run_dir) from exc
        report = verify(model, onnx_path, samples.images, image_size=size, nms_threshold=nms_threshold,
                        nms_topk=nms_topk, score_threshold=score_threshold, real=samples.real,
                        source=samples.source,
                        pre_nms=dense_pre_nms if hasattr(model, "dense_predictions") else ssd_pre_nms)
        if not report.ok or (not report.verified and not allow_unverified):
            raise ModelError(f"the export could not be verified on {samples.source}: {report.why_not()}",
                             path=run_dir, hint="nothing was written")
        int8_info = None
        if int8:
            assert validation is not None  # checked above
            calib = manifest_images(calibration or validation, calibration_count)
            if not calib:
                raise ConfigError("no calibration images", field="--calibration")
            int8_path = os.path.join(staging, "model-int8.onnx")
            quantize_int8(onnx_path, int8_path, calib, image_size=size)
            int8_info = {"calibration_images": len(calib), "calibration": calibration or validation,
                         **compare_int8(staging, samples.images[0], classes=list(info.classes),
                                        image_size=size, validation=validation),
                         "max_map_drop": float(max_map_drop), "min_speedup": float(min_speedup)}
            refused = []
            if int8_info["map_points_lost"] > max_map_drop:
                refused.append(f"it loses {int8_info['map_points_lost']:.2f} mAP points, more than "
                               f"--max-map-drop {max_map_drop:g}")
            if int8_info["speedup"] < min_speedup:
                refused.append(f"it is {int8_info['speedup']:.2f}x as fast as fp32 at batch 1, less than "
                               f"--min-speedup {min_speedup:g}")
            int8_info["refused"] = refused
            int8_info["accepted"] = not refused
            if int8_info["accepted"]:
                os.replace(onnx_path, os.path.join(staging, "model-fp32.onnx"))
                os.replace(int8_path, onnx_path)
                int8_info["fp32_model"] = "model-fp32.onnx"
            else:  # keep fp32: the int8 model is not written
                os.remove(int8_path)
                int8_info["fp32_model"] = MODEL_FILE
        quantized = bool(int8_info and int8_info["accepted"])
        metadata = {
            "name": name or os.path.basename(os.path.abspath(run_dir)),
            "format": "detforge-deploy/1",
            "classes": list(info.classes),
            "base_network": info.base_network,
            "detector": info.detector,
            "input_size": size,
            "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                      "shape": ["batch", "height", "width", 3],
                      "resize": "the runtime resizes to input_size x input_size (bilinear, antialiased)"},
            "outputs": {"boxes": "N x K x 4 xyxy input pixels", "scores": "N x K",
                        "classes": "N x K (0-based, -1 pad)", "num_detections": "N"},
            "nms_threshold": nms_threshold,
            "nms_topk": nms_topk,
            "score_threshold": score_threshold,
            "default_threshold": float(default_threshold),
            "quantization": "int8" if quantized else "fp32",
            "int8": int8_info,
            "opset": int(opset),
            "source_run": os.path.abspath(run_dir),
            "epoch": info.epoch,
            "validation:mAP": (info.metrics or {}).get("validation:mAP"),
            "hyperparameters": info.hyperparams,
            "tiling": tiling.trained_tiling(info.hyperparams),  # what the runtime runs by default
            "detforge_version": __version__,
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "verification": report.to_json(),
            "sha256": file_sha256(onnx_path),
        }
        with open(os.path.join(staging, METADATA_FILE), "wb") as handle:
            handle.write(orjson.dumps(metadata, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        if os.path.exists(os.path.join(out_dir, METADATA_FILE)):  # an older export: invalid until replaced
            os.remove(os.path.join(out_dir, METADATA_FILE))
        for item in sorted(os.listdir(staging)):  # model.json last: a folder with it is complete
            if item != METADATA_FILE:
                os.replace(os.path.join(staging, item), os.path.join(out_dir, item))
        os.replace(os.path.join(staging, METADATA_FILE), os.path.join(out_dir, METADATA_FILE))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir=out_dir, model_path=os.path.join(out_dir, MODEL_FILE), metadata=metadata,
                        verify=report, int8=int8_info)
