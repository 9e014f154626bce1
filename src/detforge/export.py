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

Every export is verified: PyTorch and ONNX Runtime run on sample images (the run's validation images
when known) and must agree (``verify``); otherwise nothing is written. ``--int8`` adds a post-training
static quantization (ONNX Runtime's QDQ tools) calibrated on given images, written as the deploy model
with its fp32 twin kept beside it as ``model-fp32.onnx``.
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

from detforge import __version__, storage
from detforge import boxes as boxmath
from detforge.errors import ConfigError, DetforgeError, ManifestError, ModelError
from detforge.groundtruth import read_image_refs, resolve_source_ref
from detforge.runtime import METADATA_FILE, MODEL_FILE, file_sha256, load_image, resize_rgb

DEFAULT_OPSET = 17
DEFAULT_THRESHOLD = 0.3
# Verification tolerances: a matched ONNX detection must have the same class, IoU >= VERIFY_IOU with the
# PyTorch box and a score within VERIFY_SCORE; detections within VERIFY_SCORE of the threshold may be
# present on one side only.
VERIFY_IOU = 0.99
VERIFY_SCORE = 1e-3
VERIFY_THRESHOLD = 0.05
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
    """How closely ONNX Runtime reproduced PyTorch on the sample images."""

    images: int
    detections: int
    min_iou: float = 1.0
    max_score_diff: float = 0.0
    threshold: float = VERIFY_THRESHOLD
    tied: int = 0  # detections whose score equals another's of the same class: compared by score only
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"images": self.images, "detections": self.detections, "min_iou": round(self.min_iou, 6),
                "max_score_diff": float(f"{self.max_score_diff:.3g}"), "threshold": self.threshold,
                "tied": self.tied, "tolerance": {"iou": VERIFY_IOU, "score": VERIFY_SCORE}, "ok": self.ok}


def _tied(scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Detections whose score another detection of the same class shares (within 1e-6)."""
    tied = np.zeros(len(scores), dtype=bool)
    for c in np.unique(classes):
        index = np.flatnonzero(classes == c)
        order = index[np.argsort(scores[index])]
        close = np.diff(scores[order]) <= 1e-6
        tied[order[1:][close]] = True
        tied[order[:-1][close]] = True
    return tied


def compare_detections(reference, candidate, *, threshold: float, report: VerifyReport, name: str) -> None:
    """Match ``candidate`` (boxes, scores, classes) to ``reference`` above ``threshold``; note problems.

    Detections with exactly equal scores (an undertrained model scores many anchors alike) leave NMS free
    to keep any of them, and PyTorch and ONNX Runtime may choose differently: such a detection only needs
    a reference detection of its class with the same score, and a tied reference is never "missing".
    """
    ref_boxes, ref_scores, ref_classes = reference
    boxes, scores, classes = candidate
    sure = threshold + VERIFY_SCORE
    taken = np.zeros(len(ref_scores), dtype=bool)
    ref_tied, tied = _tied(ref_scores, ref_classes), _tied(scores, classes)
    for i in np.argsort(-scores):
        if scores[i] < threshold:
            continue
        if tied[i]:
            report.tied += 1
            if not np.any((ref_classes == classes[i]) & (np.abs(ref_scores - scores[i]) <= VERIFY_SCORE)):
                report.problems.append(f"{name}: ONNX detection (class {classes[i]}, score {scores[i]:.4f}) "
                                       "has no PyTorch detection of that score")
            continue
        same = np.flatnonzero((ref_classes == classes[i]) & ~taken & (ref_scores >= threshold - VERIFY_SCORE))
        ious = boxmath.iou_xyxy(boxes[i:i + 1], ref_boxes[same])[0] if len(same) else np.zeros(0)
        if len(same) and ious.max() >= VERIFY_IOU:
            j = same[int(np.argmax(ious))]
            taken[j] = True
            report.detections += 1
            report.min_iou = min(report.min_iou, float(ious.max()))
            report.max_score_diff = max(report.max_score_diff, abs(float(scores[i]) - float(ref_scores[j])))
            if abs(float(scores[i]) - float(ref_scores[j])) > VERIFY_SCORE:
                report.problems.append(f"{name}: score {scores[i]:.4f} vs PyTorch {ref_scores[j]:.4f}")
        elif scores[i] >= sure:
            report.problems.append(f"{name}: ONNX detection (class {classes[i]}, score {scores[i]:.4f}) "
                                   "has no PyTorch match")
    missing = np.flatnonzero(~taken & ~ref_tied & (ref_scores >= sure))
    for j in missing:
        report.problems.append(f"{name}: PyTorch detection (class {ref_classes[j]}, "
                               f"score {ref_scores[j]:.4f}) missing from ONNX")


def verify(model, onnx_path: str, images: Sequence[np.ndarray], *, image_size: int,
           threshold: float = VERIFY_THRESHOLD, threads: int | None = None) -> VerifyReport:
    """Run PyTorch (the eval model) and ONNX Runtime on the same resized images and compare detections."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(onnx_path, sess_options=options, providers=["CPUExecutionProvider"])
    report = VerifyReport(images=len(images), detections=0, threshold=threshold)
    batch = np.stack([resize_rgb(image, image_size) for image in images])
    out_boxes, out_scores, out_classes, counts = session.run(None, {"images": batch})
    with torch.inference_mode():
        reference = model([torch.from_numpy(b.copy()).permute(2, 0, 1).float().div(255) for b in batch])
    for i, ref in enumerate(reference):
        n = int(counts[i])
        compare_detections(
            (ref["boxes"].numpy().astype(np.float64), ref["scores"].numpy().astype(np.float64),
             ref["labels"].numpy() - 1),
            (out_boxes[i, :n].astype(np.float64), out_scores[i, :n].astype(np.float64), out_classes[i, :n]),
            threshold=threshold, report=report, name=f"sample image {i}")
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


def sample_images(run_dir: str, *, count: int, image_size: int, images: Sequence[str] | None = None,
                  seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Images to verify and calibrate with: given ones, else the run's validation images, else random."""
    if images:
        return [load_image(p) for p in images[:count]], f"{min(count, len(images))} given images"
    validation = _run_validation(run_dir)
    if validation:
        try:
            loaded = manifest_images(validation, count)
        except DetforgeError:  # unreadable now: fall back to random images
            loaded = []
        if loaded:
            return loaded, f"{len(loaded)} validation images of the run ({validation})"
    rng = np.random.default_rng(seed)
    return ([rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(count)],
            f"{count} random images (the run's validation images were not found)")


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
    """Names of the nodes of backbone and head: ancestors of the ``/head/`` nodes that do not feed the
    input ``Resize`` (pre-processing). Box decoding, softmax, top-k and NMS come after the head."""
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
    network -= ancestors(n for n in model.graph.node if n.op_type == "Resize")
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
    from detforge.train import resume_data

    try:
        return resume_data(run_dir)[1]
    except DetforgeError:  # no resume state, or one that does not name the manifests
        return None


def compare_int8(staging: str, sample: np.ndarray, *, classes: list[str], image_size: int,
                 validation: str | None, repeats: int = 15) -> dict:
    """Latency (batch 1, median) of the fp32 and int8 models and, given a manifest, their validation:mAP."""
    import onnxruntime as ort

    from detforge.evaluate import evaluate

    batch = resize_rgb(sample, image_size)[None]
    sessions = {kind: ort.InferenceSession(os.path.join(staging, name), providers=["CPUExecutionProvider"])
                for kind, name in (("fp32", "model-fp32.onnx"), ("int8", MODEL_FILE))}
    times: dict[str, list[float]] = {kind: [] for kind in sessions}
    for _ in range(repeats + 1):  # interleaved, the first call of each is a warm-up
        for kind, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"images": batch})
            times[kind].append(time.perf_counter() - start)
    result = {f"{kind}_ms": round(float(np.median(t[1:])) * 1000.0, 2) for kind, t in times.items()}
    result["speedup"] = round(result["fp32_ms"] / max(result["int8_ms"], 1e-9), 2)
    if not validation:
        result["validation"] = None
        return result
    for kind, name in (("fp32", "model-fp32.onnx"), ("int8", MODEL_FILE)):
        folder = os.path.join(staging, f".{kind}")
        os.makedirs(folder)
        os.link(os.path.join(staging, name), os.path.join(folder, MODEL_FILE))
        with open(os.path.join(folder, METADATA_FILE), "wb") as handle:
            handle.write(orjson.dumps({"classes": classes, "input_size": image_size, "score_threshold": 0.0}))
        result[f"{kind}_map"] = round(evaluate(folder, validation, coco=False).metrics.voc07_map, 4)
        shutil.rmtree(folder)
    result["validation"] = validation
    result["map_points_lost"] = round(100.0 * (result["fp32_map"] - result["int8_map"]), 2)
    return result


@dataclass
class ExportResult:
    """What ``export_run`` wrote and measured."""

    out_dir: str
    model_path: str
    metadata: dict
    verify: VerifyReport
    int8: dict | None = None


def export_run(run_dir: str, out_dir: str, *, which: str = "model", opset: int = DEFAULT_OPSET,
               nms_threshold: float | None = None, nms_topk: int | None = None,
               score_threshold: float | None = None, default_threshold: float = DEFAULT_THRESHOLD,
               verify_images: Sequence[str] | None = None, verify_count: int = 4,
               int8: bool = False, calibration: str | None = None, calibration_count: int = 32,
               name: str | None = None) -> ExportResult:
    """Export a trained run to ``out_dir`` (``model.onnx`` + ``model.json``), verified against PyTorch."""
    import torch

    from detforge.checkpoint import load_run_model

    if storage.is_remote(out_dir):
        raise ConfigError("export writes a local deploy folder; copy it to s3:// afterwards", field="--out")
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
    wrapper = deployable(model, image_size=size, nms_threshold=nms_threshold, nms_topk=nms_topk,
                         score_threshold=score_threshold)
    samples, sample_source = sample_images(run_dir, count=verify_count, image_size=size, images=verify_images)

    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        onnx_path = os.path.join(staging, MODEL_FILE)
        example = torch.from_numpy(np.stack([resize_rgb(s, size) for s in samples[:2]]))
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
        report = verify(model, onnx_path, samples, image_size=size)
        if not report.ok:
            raise ModelError("the ONNX model does not reproduce PyTorch on "
                             f"{sample_source}: {'; '.join(report.problems[:5])}", path=run_dir,
                             hint="nothing was written")
        int8_info = None
        if int8:
            if calibration:
                calib = manifest_images(calibration, calibration_count)
            else:
                calib, _ = sample_images(run_dir, count=calibration_count, image_size=size)
            if not calib:
                raise ConfigError("no calibration images", field="--calibration")
            int8_path = os.path.join(staging, "model-int8.onnx")
            quantize_int8(onnx_path, int8_path, calib, image_size=size)
            os.replace(onnx_path, os.path.join(staging, "model-fp32.onnx"))
            os.replace(int8_path, onnx_path)
            int8_info = {"calibration_images": len(calib), "fp32_model": "model-fp32.onnx",
                         **compare_int8(staging, samples[0], classes=list(info.classes), image_size=size,
                                        validation=_run_validation(run_dir))}
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
            "quantization": "int8" if int8 else "fp32",
            "int8": int8_info,
            "opset": int(opset),
            "source_run": os.path.abspath(run_dir),
            "epoch": info.epoch,
            "validation:mAP": (info.metrics or {}).get("validation:mAP"),
            "hyperparameters": info.hyperparams,
            "detforge_version": __version__,
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "verification": {**report.to_json(), "samples": sample_source},
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


