"""A run folder -> a deploy folder: ``model.onnx`` (pre-processing, network, box decoding, NMS) and
``model.json``, on local disk or any fsspec URL (``s3://``).

``export_run(run_dir, out_dir, ...)`` wraps the trained detector in ``DeployableDetector`` and writes it
with torch's TorchScript-based ONNX exporter (``dynamo=False``: the dynamo exporter cannot follow the
data-dependent shapes of torchvision's detectors; this wrapper has none except the NMS, which is emitted
as ONNX's own ``NonMaxSuppression``). The wrapper needs only the detector contract (``models.contract``:
``input_spec`` and ``dense_predictions``); the NMS is ``models.postprocess``, the same rules as eval mode.

The ONNX graph takes ``images``: uint8 ``N x H x W x 3`` RGB (any N; H, W are resized inside, the runtime
feeds the model's input size) and returns, per image, the best ``K = min(nms_topk, classes x anchors)``
detections after per-class NMS: ``boxes`` ``N x K x 4`` (xyxy in input pixels), ``scores`` ``N x K``,
``classes`` ``N x K`` (0-based class ids, -1 for padding) and ``num_detections`` ``N``.

Every export is verified (``deploy.verify``) on real images (the run's validation images, or given ones);
otherwise nothing is written. Without real images the export stops unless ``allow_unverified`` (then
``model.json`` says it is unverified). ``int8`` adds ``deploy.quantize``: calibrated on the run's training
images, compared with fp32 on its validation images, kept (fp32 twin beside it as ``model-fp32.onnx``) only
within ``max_map_drop`` and ``min_speedup``; the kept int8 graph is verified itself.

The folder is staged locally and published whole: locally by renames, on an object store through a
temporary prefix; ``model.json`` (which holds ``model.onnx``'s sha256) always last.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import torch
import torch.nn as nn
import torch.nn.functional as F

from detforge import __version__, storage, tiling
from detforge.deploy import quantize
from detforge.deploy import verify as verification
from detforge.errors import ConfigError, DetforgeError, ModelError
from detforge.images import resize_rgb
from detforge.models.postprocess import class_candidates, padded_detections
from detforge.runtime import METADATA_FILE, MODEL_FILE, file_sha256

DEFAULT_OPSET = 17
DEFAULT_THRESHOLD = 0.3
FP32_FILE = "model-fp32.onnx"
OUTPUT_NAMES = ["boxes", "scores", "classes", "num_detections"]


class DeployableDetector(nn.Module):
    """uint8 NHWC images -> padded per-image detections (see the module docstring) of any detector with
    the contract of ``models.contract``; shares its weights. Its ONNX nodes are named ``/detector/...``
    (``quantize.HEAD_SCOPE``)."""

    def __init__(
        self, model, *, nms_threshold: float, nms_topk: int, score_threshold: float, nms_candidates: int = 0
    ) -> None:
        super().__init__()
        spec = model.input_spec
        self.detector = model.eval()
        self.size = int(spec.size)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.nms_threshold, self.nms_topk = float(nms_threshold), int(nms_topk)
        self.nms_candidates = int(nms_candidates or nms_topk)  # per class into NMS (0: nms_topk)
        self.score_threshold = float(score_threshold)
        with torch.no_grad():  # one eager call first: what a family computes once per size (SSD's anchors)
            model.dense_predictions(torch.zeros(1, 3, self.size, self.size))
        self.eval()  # the exporter restores this mode on the detector after tracing

    def forward(self, images):
        shape = torch._shape_as_tensor(images)
        height, width = shape[1].float(), shape[2].float()
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = (x - self.mean) / self.std
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        boxes, scores = self.detector.dense_predictions(x)
        boxes = boxes * (torch.stack([width, height, width, height]) / float(self.size))
        # N x C x A, each class's best nms_candidates, as torchvision's top-k
        scores = class_candidates(scores.transpose(1, 2), self.nms_candidates)
        return padded_detections(
            boxes,
            scores,
            nms_threshold=self.nms_threshold,
            nms_topk=self.nms_topk,
            score_threshold=self.score_threshold,
        )


def write_onnx(wrapper: DeployableDetector, path: str, example: np.ndarray, *, opset: int) -> None:
    """Trace ``wrapper`` on the uint8 ``example`` batch into ``path`` (dynamic batch, height, width)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapper,
            (torch.from_numpy(example),),
            path,
            dynamo=False,
            opset_version=int(opset),
            input_names=["images"],
            output_names=OUTPUT_NAMES,
            dynamic_axes={
                "images": {0: "batch", 1: "height", 2: "width"},
                **{name: {0: "batch"} for name in OUTPUT_NAMES},
            },
        )


def run_inputs(run_dir: str) -> tuple[str | None, str | None]:
    """The train and validation manifests a run was trained on (``inputs.json``; a run folder from before
    it: its resume state), ``(None, None)`` when it does not say."""
    from detforge.training.checkpoint import read_inputs

    try:
        inputs = read_inputs(run_dir)
    except DetforgeError:
        return None, None
    return inputs.train, inputs.validation


@dataclass
class ExportResult:
    """What ``export_run`` wrote and measured. ``verify``: the verification of the written ``model.onnx``
    (the int8 graph when int8 was kept); ``int8``: the quantization's figures (``accepted`` False when it
    was refused and the fp32 model was written instead)."""

    out_dir: str
    model_path: str
    metadata: dict
    verify: verification.VerifyReport
    int8: dict | None = None


def _check_gate(max_map_drop: float, min_speedup: float) -> None:
    if not 0.0 <= max_map_drop <= 100.0:
        raise ConfigError(f"must be in [0, 100] mAP points, got {max_map_drop}", field="--max-map-drop")
    if not min_speedup >= 0.0:
        raise ConfigError(f"must be 0 or more, got {min_speedup}", field="--min-speedup")


def _check_settings(
    nms_threshold: float, nms_topk: int, score_threshold: float, default_threshold: float
) -> None:
    for key, value in (
        ("nms_threshold", nms_threshold),
        ("score_threshold", score_threshold),
        ("default_threshold", default_threshold),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"must be in [0.0, 1.0], got {value}", field=key)
    if nms_topk < 1:
        raise ConfigError(f"must be at least 1, got {nms_topk}", field="nms_topk")


def _same_file(a: str, b: str) -> bool:
    return a == b or (
        not storage.is_remote(a) and not storage.is_remote(b) and os.path.abspath(a) == os.path.abspath(b)
    )


def _int8_sources(calibration: str | None, validation: str | None, train: str | None) -> str:
    """The calibration manifest of ``--int8``: ``calibration``, else the run's training manifest; never the
    validation manifest the comparison scores (ConfigError naming the option)."""
    if not validation:
        raise ConfigError(
            "--int8 compares the int8 model with fp32 on validation images: the run names "
            "no validation manifest, pass one with --validation",
            field="--validation",
        )
    calibration = calibration or train
    if not calibration:
        raise ConfigError(
            "--int8 calibrates on the run's training images: the run names no training "
            "manifest, pass one with --calibration",
            field="--calibration",
        )
    if _same_file(calibration, validation):
        raise ConfigError(
            f"{calibration} is also the validation manifest of the int8 comparison: "
            "calibrating on the images it measures would make the reported mAP drop "
            "optimistic; calibrate on training images",
            field="--calibration",
        )
    return calibration


def _try_int8(
    model,
    staging: str,
    samples: verification.Samples,
    *,
    classes: list[str],
    settings: dict,
    calibration: str,
    calibration_count: int,
    validation: str,
    max_map_drop: float,
    min_speedup: float,
) -> tuple[dict, verification.VerifyReport | None]:
    """Quantize ``staging/model.onnx``, compare, gate and verify the int8 graph; when it is kept it
    becomes ``model.onnx`` and fp32 moves to ``FP32_FILE``. Returns the int8 record and the int8 graph's
    verification (None when int8 was refused)."""
    images = verification.manifest_images(calibration, calibration_count)
    if not images:
        raise ConfigError(f"{calibration} has no images to calibrate on", field="--calibration")
    size = model.input_spec.size
    fp32_path, int8_path = os.path.join(staging, MODEL_FILE), os.path.join(staging, "model-int8.onnx")
    quantize.quantize_int8(fp32_path, int8_path, images, image_size=size)
    info = {
        "calibration_images": len(images),
        "calibration": calibration,
        **quantize.compare_int8(
            staging, samples.images[0], classes=classes, image_size=size, validation=validation
        ),
        "max_map_drop": float(max_map_drop),
        "min_speedup": float(min_speedup),
    }
    refused = quantize.refusals(info, max_map_drop=max_map_drop, min_speedup=min_speedup)
    report = None
    if not refused:
        report = verification.verify(
            model,
            int8_path,
            samples.images,
            real=samples.real,
            source=samples.source,
            quantized=True,
            **settings,
        )
        if not report.ok:
            refused.append(report.why_not())
    info["refused"], info["accepted"] = refused, not refused
    if refused:  # keep fp32: the int8 model is not written
        os.remove(int8_path)
        info["fp32_model"] = MODEL_FILE
        return info, None
    os.replace(fp32_path, os.path.join(staging, FP32_FILE))
    os.replace(int8_path, fp32_path)
    info["fp32_model"] = FP32_FILE
    return info, report


def publish(staging: str, out_dir: str) -> None:
    """Move the files of the local folder ``staging`` into ``out_dir`` (local or remote) so that a reader
    never sees half a deploy folder: an older ``model.json`` goes first (the folder is not a deploy folder
    until replaced), ``model.json`` comes last. Remote: everything is uploaded under a temporary prefix
    first, then moved into place (a failed upload leaves the folder as it was)."""
    names = sorted(n for n in os.listdir(staging) if n != METADATA_FILE) + [METADATA_FILE]
    old = storage.join(out_dir, METADATA_FILE)
    if not storage.is_remote(out_dir):
        if os.path.exists(old):
            os.remove(old)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
        return
    prefix = storage.join(out_dir, f".export-{uuid.uuid4().hex[:12]}")
    try:
        for name in names:
            storage.copy_file(os.path.join(staging, name), storage.join(prefix, name))
        if storage.exists(old):
            storage.remove(old)
        for name in names:
            storage.move(storage.join(prefix, name), storage.join(out_dir, name))
    finally:
        for name in names:  # what an interrupted upload left
            if storage.exists(storage.join(prefix, name)):
                storage.remove(storage.join(prefix, name))


def export_run(
    run_dir: str,
    out_dir: str,
    *,
    which: str = "model",
    opset: int = DEFAULT_OPSET,
    nms_threshold: float | None = None,
    nms_topk: int | None = None,
    score_threshold: float | None = None,
    default_threshold: float = DEFAULT_THRESHOLD,
    verify_images: Sequence[str] | None = None,
    verify_count: int = 4,
    validation: str | None = None,
    allow_unverified: bool = False,
    int8: bool = False,
    calibration: str | None = None,
    calibration_count: int = 32,
    max_map_drop: float = quantize.DEFAULT_MAX_MAP_DROP,
    min_speedup: float = quantize.DEFAULT_MIN_SPEEDUP,
    name: str | None = None,
) -> ExportResult:
    """Export a trained run to ``out_dir`` (``model.onnx`` + ``model.json``; local or ``s3://``), verified
    against PyTorch.

    Verification runs on ``verify_images``, else the first ``verify_count`` images of ``validation``
    (default: the run's validation manifest). Without real images the export stops (ModelError) unless
    ``allow_unverified``: then it verifies on random images and ``model.json`` says it is unverified.
    ``int8``: quantize (calibrated on ``calibration``, default the run's training images), compare with
    fp32 on every ``validation`` image and keep fp32 when int8 loses more than ``max_map_drop`` mAP points,
    is not ``min_speedup`` times as fast at batch 1, or its detections are not a valid NMS of its own
    scores (``model.json`` → ``int8.refused`` says which).
    """
    from detforge.models import set_postprocess
    from detforge.training.checkpoint import load_run_model

    _check_gate(max_map_drop, min_speedup)
    model, info = load_run_model(run_dir, which=which)
    thresholds = dict(info.thresholds or {})
    nms_threshold = float(thresholds.get("nms_threshold", 0.45) if nms_threshold is None else nms_threshold)
    nms_topk = int(thresholds.get("nms_topk", 400) if nms_topk is None else nms_topk)
    score_threshold = float(
        thresholds.get("score_threshold", 0.01) if score_threshold is None else score_threshold
    )
    _check_settings(nms_threshold, nms_topk, score_threshold, default_threshold)
    nms_candidates = int(thresholds.get("nms_candidates", 0))
    set_postprocess(
        model,
        nms_threshold=nms_threshold,
        nms_topk=nms_topk,
        score_threshold=score_threshold,
        nms_candidates=nms_candidates,
    )
    settings = {
        "nms_threshold": nms_threshold,
        "nms_topk": nms_topk,
        "score_threshold": score_threshold,
        "nms_candidates": nms_candidates,
    }
    size = int(model.input_spec.size)
    train, run_validation = run_inputs(run_dir)
    validation = validation or run_validation
    if int8:
        calibration = _int8_sources(calibration, validation, train)
    wrapper = DeployableDetector(model, **settings)
    samples = verification.sample_images(
        count=verify_count, image_size=size, images=verify_images, validation=validation
    )
    if not samples.real and not allow_unverified:
        raise ModelError(
            f"cannot verify the export: {samples.source.split(': ', 1)[1]}",
            path=run_dir,
            hint="or pass --allow-unverified to export unverified (model.json says so)",
        )

    remote = storage.is_remote(out_dir)
    if not remote:
        os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=None if remote else out_dir)
    try:
        onnx_path = os.path.join(staging, MODEL_FILE)
        try:
            write_onnx(
                wrapper, onnx_path, np.stack([resize_rgb(s, size) for s in samples.images[:2]]), opset=opset
            )
        except Exception as exc:  # the exporter's own errors: name the model, not torch's internals
            raise ModelError(
                f"ONNX export of the {info.base_network} model failed: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                path=run_dir,
            ) from exc
        report = verification.verify(
            model, onnx_path, samples.images, real=samples.real, source=samples.source, **settings
        )
        if not report.ok or (not report.verified and not allow_unverified):
            raise ModelError(
                f"the export could not be verified on {samples.source}: {report.why_not()}",
                path=run_dir,
                hint="nothing was written",
            )
        int8_info, written = None, report
        if int8:
            assert calibration is not None and validation is not None  # _int8_sources
            int8_info, int8_report = _try_int8(
                model,
                staging,
                samples,
                classes=list(info.classes),
                settings=settings,
                calibration=calibration,
                calibration_count=calibration_count,
                validation=validation,
                max_map_drop=max_map_drop,
                min_speedup=min_speedup,
            )
            written = int8_report or report
        record = written.to_json()
        if written is not report:  # int8 kept: its record, then what the fp32 twin's said
            record["fp32"] = report.to_json()
        metadata = {
            "name": name or os.path.basename(os.path.abspath(run_dir)),
            "format": "detforge-deploy/1",
            "classes": list(info.classes),
            "base_network": info.base_network,
            "detector": info.detector,
            "input_size": size,
            "input": {
                "name": "images",
                "dtype": "uint8",
                "layout": "NHWC",
                "channels": "RGB",
                "shape": ["batch", "height", "width", 3],
                "resize": "the runtime resizes to input_size x input_size (bilinear, antialiased)",
            },
            "outputs": {
                "boxes": "N x K x 4 xyxy input pixels",
                "scores": "N x K",
                "classes": "N x K (0-based, -1 pad)",
                "num_detections": "N",
            },
            **settings,
            "default_threshold": float(default_threshold),
            "quantization": "int8" if written is not report else "fp32",
            "int8": int8_info,
            "opset": int(opset),
            "source_run": os.path.abspath(run_dir),
            "epoch": info.epoch,
            "validation:mAP": (info.metrics or {}).get("validation:mAP"),
            "hyperparameters": info.hyperparams,
            "tiling": tiling.trained_tiling(info.hyperparams),  # what the runtime runs by default
            "detforge_version": __version__,
            "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "verification": record,
            "sha256": file_sha256(onnx_path),
        }
        with open(os.path.join(staging, METADATA_FILE), "wb") as handle:
            handle.write(orjson.dumps(metadata, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(
        out_dir=out_dir,
        model_path=storage.join(out_dir, MODEL_FILE),
        metadata=metadata,
        verify=written,
        int8=int8_info,
    )
