"""Online augmentation for training: named presets built on ``torchvision.transforms.v2``.

Contract (what ``dataset.py`` calls; the preset comes from the detforge hyperparameter ``augmentation``,
default ``"ssd"``, checked with ``check_preset``)::

    transform = build_transform(preset, image_size=image_shape, train=True)
    image, boxes, labels = transform(image, boxes_xyxy, labels)

- ``image``: a ``PIL.Image`` or a ``uint8`` ``H x W x 3`` (or ``H x W``) numpy array, RGB.
- ``boxes_xyxy``: ``(N, 4)`` pixel corners of that image (a Record's ``boxes``); ``labels``: ``(N,)`` ints.
- Returns a float32 ``3 x image_size x image_size`` tensor in ``[0, 1]``, float32 ``(M, 4)`` ``xyxy`` boxes
  in the resized image's pixels, and int64 ``(M,)`` labels; ``M <= N`` because boxes that leave the
  image or shrink below 1 px are dropped together with their labels (``SanitizeBoundingBoxes``).

Presets (``PRESETS``), in training mode; ``train=False`` is always "resize only" and keeps every box:

- ``none``: resize to ``image_size x image_size`` (always last, with the runtime's ``resize_rgb``:
  every stage of detforge sees the same pixels; ``RuntimeResize``).
- ``flip``: random horizontal flip, resize.
- ``ssd``: the SSD paper's recipe: photometric distortion, zoom out (up to 4x, mean-colour fill),
  min-IoU random crop, random horizontal flip, resize.
- ``ssd+rot``: ``ssd`` plus random vertical flip and a random turn by 0/90/180/270° (a camera looking
  down at storage boxes sees them in any orientation).
- ``flip+hsv``: ``flip`` plus a random colour change of the resized image (``RandomHSV``: hue turned by up to
  ±``HSV_GAINS[0]`` of the colour circle, saturation and value scaled by 1 ± ``HSV_GAINS[1:]``, YOLO's
  default strengths); the small-data recipe's preset, applied to mosaic images too.

Randomness comes from torch's global generator (seed it per worker as usual). Not here: offline copies
of images on disk (``detforge.data.augment``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detforge import boxes as box_ops
from detforge.errors import ConfigError

PRESETS = ("none", "flip", "ssd", "ssd+rot", "flip+hsv")
# hue shift (a fraction of the colour circle), saturation gain, value gain: each drawn uniformly in +-gain
HSV_GAINS = (0.015, 0.7, 0.4)
DEFAULT_PRESET = "ssd"
HYPERPARAMETER = "augmentation"
# ImageNet mean in 0..255: the fill of zoom-out, as in the SSD recipe.
_MEAN_FILL = (124, 116, 104)


def check_preset(name: str) -> str:
    """The preset name, or a ConfigError naming the ``augmentation`` hyperparameter."""
    if name not in PRESETS:
        raise ConfigError(
            f"unknown augmentation preset {name!r}",
            field=HYPERPARAMETER,
            hint=f"choose one of {', '.join(PRESETS)}",
        )
    return name


class RandomRot90(v2.Transform):
    """Turn the image by a random multiple of 90° (each equally likely); boxes via ``detforge.boxes``."""

    def make_params(self, flat_inputs: list) -> dict:
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt, params: dict):
        k = params["k"]
        if k == 0:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            height, width = inpt.canvas_size
            xyxy = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.XYXY)
            b = xyxy.as_subclass(torch.Tensor).double().numpy()
            # torch.rot90 with k > 0 turns counter-clockwise on (H, W).
            turned = {
                1: lambda: box_ops.rotate_ccw_xyxy(b, width=width),
                2: lambda: box_ops.rotate_180_xyxy(b, width=width, height=height),
                3: lambda: box_ops.rotate_cw_xyxy(b, height=height),
            }[k]()
            canvas = (height, width) if k == 2 else (width, height)
            out = tv_tensors.BoundingBoxes(
                torch.from_numpy(turned).to(inpt.dtype), format="XYXY", canvas_size=canvas
            )
            return F.convert_bounding_box_format(out, new_format=inpt.format)
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask, tv_tensors.Video)):
            return tv_tensors.wrap(torch.rot90(inpt.as_subclass(torch.Tensor), k, dims=(-2, -1)), like=inpt)
        return inpt


class RandomHSV(v2.Transform):
    """A random hue shift and saturation / value gains of a uint8 RGB image (boxes untouched).

    Draws ``u ~ U(-1, 1)^3`` from torch's generator: the hue turns by ``u0 * gains[0]`` of the colour circle,
    the saturation (chroma) is scaled by ``1 + u1 * gains[1]`` and the value (every channel) by
    ``1 + u2 * gains[2]``; clipped to 0..255. The three are one linear map of RGB, done in YIQ (luma and two
    chroma axes: a hue turn is a rotation of the chroma plane, a saturation gain its scaling), so it costs one
    3 x 3 product per pixel (~2 ms at 320 px on one thread, against ~13 ms through Pillow's HSV mode)."""

    # RGB -> YIQ (NTSC)
    _YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])

    def __init__(self, gains: tuple[float, float, float] = HSV_GAINS) -> None:
        super().__init__()
        self.gains = tuple(float(g) for g in gains)

    def make_params(self, flat_inputs: list) -> dict:
        return {"u": (torch.rand(3) * 2 - 1).tolist()}

    def matrix(self, u) -> np.ndarray:
        """The 3 x 3 RGB -> RGB map of the draw ``u``."""
        angle = 2 * np.pi * u[0] * self.gains[0]
        sat, val = 1 + u[1] * self.gains[1], 1 + u[2] * self.gains[2]
        turn = np.array(
            [
                [1.0, 0.0, 0.0],
                [0.0, sat * np.cos(angle), -sat * np.sin(angle)],
                [0.0, sat * np.sin(angle), sat * np.cos(angle)],
            ]
        )
        return val * np.linalg.inv(self._YIQ) @ turn @ self._YIQ

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        m = torch.from_numpy(self.matrix(params["u"])).float()
        pixels = inpt.as_subclass(torch.Tensor).float()
        out = (m @ pixels.reshape(3, -1)).reshape(pixels.shape).round_().clamp_(0, 255).to(torch.uint8)
        return tv_tensors.wrap(out, like=inpt)


class RuntimeResize(v2.Transform):
    """Resize to ``size x size`` with the deployed runtime's own function (``images.resize_rgb``: PIL
    bilinear, antialiased), so that training, validation, ``evaluate`` and the ONNX runtime see the same
    pixels; boxes scale with the image."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = int(size)

    def transform(self, inpt, params: dict):
        from detforge.images import resize_rgb

        if isinstance(inpt, tv_tensors.Image):
            pixels = resize_rgb(inpt.permute(1, 2, 0).numpy(), self.size)
            return tv_tensors.wrap(torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), like=inpt)
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            height, width = inpt.canvas_size
            scale = torch.tensor([self.size / width, self.size / height] * 2, dtype=inpt.dtype)
            return tv_tensors.wrap(
                inpt.as_subclass(torch.Tensor) * scale, like=inpt, canvas_size=(self.size, self.size)
            )
        return inpt


def _to_image(image) -> tv_tensors.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image array, got {image.dtype}")
        array = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 image array, got shape {image.shape}")
        return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous())
    return tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))


def build_transform(preset: str, *, image_size: int, train: bool) -> Callable:
    """The callable ``(image, boxes_xyxy, labels) -> (image, boxes, labels)`` of a preset (see above)."""
    check_preset(preset)
    if image_size < 1:
        raise ConfigError(f"image size must be positive, got {image_size}", field="image_shape")
    finish = [RuntimeResize(image_size), v2.ClampBoundingBoxes()]
    if train and preset == "flip+hsv":  # on the resized image: the cheapest place, the same draw
        finish.append(RandomHSV())
    if train:
        finish.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    finish.append(v2.ToDtype(torch.float32, scale=True))

    before_crop, crop, after_crop = [], [], []
    if train and preset in ("ssd", "ssd+rot"):
        before_crop = [
            v2.RandomPhotometricDistort(p=0.5),
            v2.RandomZoomOut(fill={tv_tensors.Image: _MEAN_FILL, "others": 0}, side_range=(1.0, 4.0), p=0.5),
        ]
        crop = [v2.RandomIoUCrop(), v2.SanitizeBoundingBoxes(min_size=1.0)]
    if train and preset != "none":
        after_crop.append(v2.RandomHorizontalFlip(p=0.5))
    if train and preset == "ssd+rot":
        after_crop += [v2.RandomVerticalFlip(p=0.5), RandomRot90()]
    with_boxes = v2.Compose(before_crop + crop + after_crop + finish)
    # RandomIoUCrop needs at least one box to measure overlaps; images without boxes skip the crop.
    without_boxes = v2.Compose(before_crop + after_crop + finish)

    def transform(image, boxes_xyxy, labels):
        img = _to_image(image)
        height, width = img.shape[-2:]
        b = box_ops.as_boxes(boxes_xyxy)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.as_tensor(b, dtype=torch.float32), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1)),
        }
        if len(target["labels"]) != len(b):
            raise ValueError(f"{len(b)} boxes but {len(target['labels'])} labels")
        out_img, out = (with_boxes if len(b) else without_boxes)(img, target)
        return (
            out_img.as_subclass(torch.Tensor),
            out["boxes"].as_subclass(torch.Tensor).float(),
            out["labels"].long(),
        )

    return transform
