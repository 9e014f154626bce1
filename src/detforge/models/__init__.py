"""The detectors, by ``detector`` (the family) and ``base_network`` (the backbone): one factory table.

``build_model(base_network, *, detector="ssd", num_classes, image_size, ...)`` returns a model with the
torchvision detectors' contract: train mode ``model(images, targets)`` -> loss dict, eval mode
``model(images)`` -> ``[{"boxes", "scores", "labels"}]``; images are float ``CHW`` tensors in [0, 1]
(any size: the model resizes to ``image_size`` x ``image_size`` and maps boxes back).
Model label = class id + 1 (0 is background for SSD); ``labels_to_class_ids`` converts back. Every
family also has the detector contract (``models.contract``: ``input_spec``, ``dense_predictions``, ``head``)
that export, verification and int8 use, and shares its NMS with the ONNX graph (``models.postprocess``).
A new family is one module here plus its rows in ``MODEL_TABLE``.

- ``detector=ssd`` (default; SageMaker's algorithm, ``ssd``): torchvision SSD on ``vgg-16``,
  ``resnet-50`` or SSDLite on ``mobilenet-v3``.
- ``detector=gfl`` (``gfl``): the anchor-free detector (PAN neck, GFL head, task-aligned assignment)
  on ``shufflenet-v2``, ``mobilenet-v3`` or ``resnet-50``.

``MODEL_TABLE`` lists every (detector, base_network) pair that builds. ``nms_topk`` is the number of
candidates per class kept before NMS and the most detections per image after it; ``score_threshold``
drops lower-scoring detections. Pretrained backbones: ``pretrained`` (torch hub cache only).

Not here: loading runs (``checkpoint``), training (``train``), ONNX (``export``).
"""

from __future__ import annotations

from collections.abc import Callable

from detforge.errors import ConfigError
from detforge.models.pretrained import BACKBONE_WEIGHTS, backbone_weights, backbone_weights_file
from detforge.models.ssd import (
    MIN_IMAGE_SIZE,
    SSD_FACTORIES,
    _vgg_map_sizes,
    build_mobilenet_v3,
    build_resnet50,
    build_vgg16,
)

BASE_NETWORKS = ("vgg-16", "resnet-50", "mobilenet-v3", "shufflenet-v2")
DETECTORS = ("ssd", "gfl")
DEFAULT_DETECTOR = "ssd"
GFL_BACKBONES = ("shufflenet-v2", "mobilenet-v3", "resnet-50")
MODEL_FACTORIES: dict[str, Callable] = dict(SSD_FACTORIES)  # SSD by base_network (as before)
MODEL_TABLE: tuple[tuple[str, str], ...] = tuple(
    [("ssd", b) for b in SSD_FACTORIES] + [("gfl", b) for b in GFL_BACKBONES]
)


def _build_gfl(base_network: str, **kwargs):
    from detforge.models.gfl import build_gfl

    return build_gfl(base_network, **kwargs)


def _post(nms_threshold: float, nms_topk: int, score_threshold: float, nms_candidates: int = 0) -> dict:
    """Post-processing settings: ``nms_topk`` detections per image; ``nms_candidates`` per class before NMS
    (0: ``nms_topk``, SageMaker's one knob for both)."""
    return {
        "score_thresh": float(score_threshold),
        "nms_thresh": float(nms_threshold),
        "detections_per_img": int(nms_topk),
        "topk_candidates": int(nms_candidates or nms_topk),
    }


def build_model(
    base_network: str,
    *,
    num_classes: int,
    image_size: int,
    detector: str = DEFAULT_DETECTOR,
    pretrained_backbone: bool = False,
    nms_threshold: float = 0.45,
    nms_topk: int = 400,
    score_threshold: float = 0.01,
    nms_candidates: int = 0,
):
    """A ``detector`` on ``base_network`` for ``num_classes`` classes at ``image_size`` x ``image_size``."""
    if detector not in DETECTORS:
        raise ConfigError(
            f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}", field="detector"
        )
    if base_network not in BASE_NETWORKS:
        raise ConfigError(
            f"unknown base_network {base_network!r}; choose one of {', '.join(BASE_NETWORKS)}",
            field="base_network",
        )
    if (detector, base_network) not in MODEL_TABLE:
        raise ConfigError(
            f"detector={detector} has no {base_network} backbone; choose one of "
            f"{', '.join(b for d, b in MODEL_TABLE if d == detector)}",
            field="base_network",
        )
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}", field="num_classes")
    if int(image_size) < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"image_shape must be at least {MIN_IMAGE_SIZE}, got {image_size}", field="image_shape"
        )
    factory = (
        MODEL_FACTORIES[base_network] if detector == "ssd" else (lambda **kw: _build_gfl(base_network, **kw))
    )
    return factory(
        num_classes=int(num_classes),
        image_size=int(image_size),
        pretrained_backbone=bool(pretrained_backbone),
        **_post(nms_threshold, nms_topk, score_threshold, nms_candidates),
    )


def set_postprocess(
    model, *, nms_threshold: float, nms_topk: int, score_threshold: float, nms_candidates: int = 0
) -> None:
    """Change a built model's NMS IoU, candidate/detection count and score threshold in place (``_post``)."""
    for key, value in _post(nms_threshold, nms_topk, score_threshold, nms_candidates).items():
        setattr(model, key, value)


def labels_to_class_ids(labels):
    """Model labels -> dataset class ids."""
    return labels - 1


__all__ = [
    "BACKBONE_WEIGHTS",
    "BASE_NETWORKS",
    "DETECTORS",
    "MIN_IMAGE_SIZE",
    "MODEL_FACTORIES",
    "MODEL_TABLE",
    "_vgg_map_sizes",
    "backbone_weights",
    "backbone_weights_file",
    "build_mobilenet_v3",
    "build_model",
    "build_resnet50",
    "build_vgg16",
    "labels_to_class_ids",
    "set_postprocess",
]
