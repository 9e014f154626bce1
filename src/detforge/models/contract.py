"""What every detector family gives the stages after it (export, verification, int8, evaluate).

A family is one module in ``models/`` whose factory returns an ``nn.Module`` with:

- ``model.input_spec`` -> ``InputSpec``: the square input size and the normalisation of [0, 1] pixels.
- ``model.dense_predictions(x)``: ``x`` normalised ``N x 3 x S x S`` -> boxes ``N x A x 4`` (xyxy input
  pixels, clipped to the input) and class probabilities ``N x A x C`` (no background column) for every
  anchor or point, before NMS. Traceable: the ONNX graph is this plus ``models.postprocess``.
- ``model.head``: the network's last module; int8 quantizes everything that feeds it, and what its outputs
  become in ``dense_predictions`` (box decoding, softmax/sigmoid) stays in float.
- eval mode ``model(images)`` -> ``[{"boxes", "scores", "labels"}]`` (``models.postprocess.select_detections``
  on ``dense_predictions``, boxes in each image's pixels, labels = class id + 1); train mode
  ``model(images, targets)`` -> loss dict; ``nms_thresh``, ``score_thresh``, ``topk_candidates``,
  ``detections_per_img`` (``models.set_postprocess``).

Nothing downstream asks which family a model is. Not here: the families, the factory table (``models``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class InputSpec:
    """A detector's input: ``size`` x ``size`` pixels, normalised as ``(pixel / 255 - mean) / std``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Detector(Protocol):
    """The interface above (for type checkers and readers; nothing checks it at run time)."""

    head: Any

    @property
    def input_spec(self) -> InputSpec: ...

    def dense_predictions(self, x) -> tuple[Any, Any]: ...
