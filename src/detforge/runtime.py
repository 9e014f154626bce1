"""The deployed model without torch: ``Predictor`` over ONNX Runtime, for every stage that runs a deploy
folder (evaluate, label's proposals, predict, serve, edge, demo). A leaf: it imports only the other leaves
(``errors``, ``storage``, ``boxes``, ``images``, ``tiling``), so any stage may use it without an import
running back up the stages.

``Predictor(deploy_dir, *, threads=None, providers=None)`` loads ``deploy_dir/model.onnx`` and
``model.json`` (written by ``deploy.export``), checks the ONNX file's sha256 against the metadata, and
``predictor.predict(images, *, threshold=None)`` returns one ``Detections`` per image, for image paths
(local or ``s3://``), encoded bytes, PIL images or ``HxWx3`` uint8 RGB arrays. Images are resized to the
model's input size here (PIL bilinear with antialiasing, as the training pipeline does), batched, run
in one session call, and the boxes mapped back to each image's own pixels. Tiled (``tile``, ``overlap``,
``full_pass``, by default ``model.json``'s ``tiling``; ``tile=0``: off): each photo's windows are one
session call, merged by ``detforge.tiling``; ``predictor.tiling`` says which.

Needs numpy, Pillow and onnxruntime only (the ``edge`` extra). Not here: exporting (``export``),
reading folders/manifests and writing reports (``predict``, ``report``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from detforge import boxes as boxmath
from detforge import images, storage, tiling
from detforge.errors import ConfigError, ModelError, StorageError, require
from detforge.images import resize_rgb  # noqa: F401 - part of the runtime's API

MODEL_FILE = "model.onnx"
METADATA_FILE = "model.json"
# Preferred execution providers, best first; the first ones present in this onnxruntime build are used.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# A decompression bomb guard for every image the runtime decodes (pixels).
MAX_IMAGE_PIXELS = images.MAX_PIXELS


@dataclass
class Detections:
    """Detections of one image in its own pixels: ``boxes_xyxy`` (K, 4), ``scores``, ``class_ids`` (K,)."""

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    width: int
    height: int

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def above(self, threshold: float) -> Detections:
        """Only the detections scoring at least ``threshold``."""
        keep = self.scores >= threshold
        return Detections(
            self.boxes_xyxy[keep], self.scores[keep], self.class_ids[keep], self.width, self.height
        )

    def to_sagemaker(self) -> list[list[float]]:
        """``[[class_id, score, xmin, ymin, xmax, ymax], ...]``, corners as fractions of the image size."""
        normalized = boxmath.xyxy_to_xyxy_norm(self.boxes_xyxy, width=self.width, height=self.height)
        return [
            [float(c), round(float(s), 6), *(round(float(v), 6) for v in box)]
            for c, s, box in zip(self.class_ids.tolist(), self.scores.tolist(), normalized, strict=True)
        ]


def load_image(source) -> np.ndarray:
    """An upright ``HxWx3`` uint8 RGB array from a path/URI, encoded bytes, a PIL image or an array
    (``images.from_any``: the one decoder; ``images.ImageError`` saying why not)."""
    return images.from_any(source, max_pixels=MAX_IMAGE_PIXELS)


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def deploy_cache_dir() -> str:
    """``$XDG_CACHE_HOME/detforge/deploy`` (``~/.cache/detforge/deploy``): remote deploy folders land here."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "detforge", "deploy")


def local_deploy(deploy_dir: str) -> str:
    """The deploy folder on local disk: itself, or, for an ``s3://`` (any fsspec URL) folder, its
    ``model.json`` and ``model.onnx`` copied into ``deploy_cache_dir()`` (``storage.local_copy``: fetched
    again when the object changed) -- what predict, evaluate, serve, edge and the Greengrass component
    load. A missing file is the same error as for a local folder."""
    deploy_dir = os.fspath(deploy_dir)
    if not storage.is_remote(deploy_dir):
        return deploy_dir
    deploy_dir = deploy_dir.rstrip("/")
    folder = None
    missing_files = {
        METADATA_FILE: "not a deploy folder (no model.json; make one with `detforge export RUN --out DIR`)",
        MODEL_FILE: "missing model.onnx",
    }
    for name, missing in missing_files.items():
        uri = storage.join(deploy_dir, name)
        try:  # one request per file and process (local_copy); a cached copy serves when offline
            local = storage.local_copy(uri, deploy_cache_dir())
        except StorageError:
            if storage.exists(uri):
                raise
            raise ModelError(missing, path=deploy_dir) from None
        if os.path.basename(local) != name or folder not in (None, os.path.dirname(local)):
            raise ModelError("a deploy folder URI cannot have '..' segments", path=deploy_dir)
        folder = os.path.dirname(local)
    return folder


def read_metadata(deploy_dir: str) -> dict:
    """``model.json`` of a deploy folder; ModelError naming the file and field when it is not usable."""
    deploy_dir = local_deploy(deploy_dir)
    path = os.path.join(deploy_dir, METADATA_FILE)
    if not os.path.exists(path):
        raise ModelError(
            "not a deploy folder (no model.json; make one with `detforge export RUN --out DIR`)",
            path=deploy_dir,
        )
    try:
        metadata = orjson.loads(storage.read_bytes(path))
    except orjson.JSONDecodeError as exc:
        raise ModelError(f"not valid JSON: {exc}", path=path) from None
    for key in ("classes", "input_size", "score_threshold"):
        if key not in metadata:
            raise ModelError("missing", path=path, field=key)
    return metadata


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """The execution providers to use: ``requested`` (checked) or the best ones this onnxruntime has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ConfigError(
                f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)})",
                field="providers",
            )
        return list(requested)
    return [p for p in PREFERRED_PROVIDERS if p in available] or list(available)


class Predictor:
    """A deploy folder loaded into an ONNX Runtime session; ``predict`` is thread-safe."""

    def __init__(
        self,
        deploy_dir: str | os.PathLike,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        tile: int | None = None,
        overlap: float | None = None,
        full_pass: bool | None = None,
    ) -> None:
        ort = require("onnxruntime", "edge")
        deploy_dir = os.fspath(deploy_dir)
        if deploy_dir.endswith(MODEL_FILE):
            deploy_dir = os.path.dirname(deploy_dir) or "."
        self.deploy_dir = deploy_dir  # as given (an s3:// folder stays one in names and messages)
        local = local_deploy(deploy_dir)
        self.metadata = read_metadata(local)
        model_path = os.path.join(local, MODEL_FILE)
        if not os.path.exists(model_path):
            raise ModelError("missing model.onnx", path=deploy_dir)
        expected = self.metadata.get("sha256")
        if expected and file_sha256(model_path) != expected:
            raise ModelError(
                "model.onnx does not match the sha256 in model.json (a partial copy?)", path=model_path
            )
        if threads is not None and int(threads) < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}", field="threads")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                model_path, sess_options=options, providers=choose_providers(providers)
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load the model: {exc}", path=model_path) from None
        self.input_name = self.session.get_inputs()[0].name
        self.class_names: list[str] = [str(c) for c in self.metadata["classes"]]
        self.input_size = int(self.metadata["input_size"])
        self.threshold = float(self.metadata.get("default_threshold", 0.3))
        self.max_batch = int(self.metadata.get("max_batch", 8))
        # tiled inference (detforge.tiling): model.json's ``tiling`` unless the caller's options say else
        self.tiling = tiling.deploy_tiling(
            self.metadata,
            path=os.path.join(local, METADATA_FILE),
            tile=tile,
            overlap=overlap,
            full_pass=full_pass,
        )

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def work(self, image: np.ndarray) -> int:
        """Model inputs one ``H x W x 3`` photo costs: its tiles (and full pass) when tiled, else 1."""
        if self.tiling is None:
            return 1
        return len(tiling.passes(image.shape[1], image.shape[0], self.tiling))

    def run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Raw outputs for an ``N x S x S x 3`` uint8 batch: boxes, scores, classes, num_detections."""
        boxes, scores, classes, counts = self.session.run(None, {self.input_name: batch})
        return boxes, scores, classes, counts

    def predict(
        self, images: Iterable, *, threshold: float | None = None, batch_size: int | None = None
    ) -> list[Detections]:
        """One ``Detections`` per image, scores >= ``threshold`` (default: model.json's default_threshold)."""
        threshold = self.threshold if threshold is None else float(threshold)
        arrays = [load_image(image) for image in images]
        size = self.input_size
        step = max(1, int(batch_size or self.max_batch))
        results: list[Detections] = []
        if self.tiling is not None:  # each photo's windows are one batch
            return [
                Detections(
                    *tiling.detect_tiled(
                        a, self.tiling, input_size=size, run_batch=self.run_batch, threshold=threshold
                    ),
                    a.shape[1],
                    a.shape[0],
                )
                for a in arrays
            ]
        for start in range(0, len(arrays), step):
            chunk = arrays[start : start + step]
            batch = np.stack([resize_rgb(a, size) for a in chunk])
            boxes, scores, classes, counts = self.run_batch(batch)
            for i, array in enumerate(chunk):
                height, width = array.shape[:2]
                n = int(counts[i])
                keep = scores[i, :n] >= threshold
                found = boxes[i, :n][keep].astype(np.float64)
                found[:, 0::2] *= width / size
                found[:, 1::2] *= height / size
                found = boxmath.clip_xyxy(found, width=width, height=height)
                results.append(
                    Detections(
                        found,
                        scores[i, :n][keep].astype(np.float64),
                        classes[i, :n][keep].astype(np.int64),
                        width,
                        height,
                    )
                )
        return results
