"""SageMaker's SSD (``detector=ssd``, the default): one factory function per ``base_network``.

``build_model(base_network, *, num_classes, image_size, ...)`` returns an ``SSDDetector``, a torchvision
``SSD`` with the detector contract (``models.contract``): train mode ``model(images, targets)`` -> loss
dict (``bbox_regression``, ``classification``), eval mode ``model(images)`` -> ``[{"boxes", "scores",
"labels"}]``; images are float ``CHW`` tensors in [0, 1] (any size: the model resizes to ``image_size`` x
``image_size`` and maps boxes back). Model label = class id + 1 (0 is background); ``labels_to_class_ids``
converts back. ``dense_predictions(x)``: every anchor's box, decoded as torchvision's ``BoxCoder`` does
(batched) and clipped to the input, and its softmax class scores without the background column; eval
mode selects from the same scores and boxes with ``models.postprocess``.

- ``vgg-16``: torchvision's SSD300-VGG16 (conv4_3 L2-norm + fc6/fc7 + extra blocks); at 300 exactly
  torchvision's anchors, at 512 the SSD512 paper's 7 maps, at other sizes the extra blocks that fit.
- ``resnet-50``: SSD on ResNet-50 ``layer3``/``layer4`` plus 1x1/3x3-stride-2 extras (512, 512, 256,
  256 filters), GluonCV's ``ssd_512_resnet50_v1`` design; anchors relative to the image size.
- ``mobilenet-v3``: torchvision's SSDLite320-MobileNetV3-Large design (full tail, so a model's shape
  never depends on whether it started from ImageNet weights) at any ``image_size``.

``nms_topk`` is the number of candidates per class kept before NMS and the most detections per
image after it; ``score_threshold`` drops lower-scoring detections.

Pretrained backbones come from ``detforge.models.pretrained`` (the local torch hub cache only; a missing
file is a ``ModelError`` naming it and ``detforge weights download``).

Not here: the anchor-free detector (``gfl``), the name -> factory table (``detforge.models``), NMS
(``models.postprocess``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import cache

from detforge.errors import ConfigError
from detforge.models.contract import InputSpec
from detforge.models.pretrained import pretrained_weights as _pretrained

MIN_IMAGE_SIZE = 32


@cache
def _detector_class():
    """``SSDDetector`` (made on first use: importing ``detforge.models`` must not import torch)."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.ssd import SSD
    from torchvision.ops import boxes as box_ops

    from detforge.models.postprocess import select_detections

    class SSDDetector(SSD):
        """torchvision's SSD with the detector contract (``models.contract``); same weights, same outputs."""

        @property
        def input_spec(self) -> InputSpec:
            size = self.transform.fixed_size
            return InputSpec(
                int(size[0]),
                tuple(float(m) for m in self.transform.image_mean),
                tuple(float(s) for s in self.transform.image_std),
            )

        def anchors_for(self, x, features):
            """The anchors (``A x 4``, input pixels) of an input of ``x``'s size, computed once per size."""
            key = (tuple(int(v) for v in x.shape[-2:]), x.device, x.dtype)
            cached = getattr(self, "_anchor_cache", None)
            if cached is None or cached[0] != key:
                with torch.no_grad():
                    image_list = ImageList(x[:1], [key[0]])
                    anchors = self.anchor_generator(image_list, [f[:1] for f in features])[0]
                self._anchor_cache = cached = (key, anchors)
            return cached[1]

        def decode(self, codes, anchors):
            """``BoxCoder.decode_single`` on a batch: codes ``N x A x 4`` -> xyxy boxes ``N x A x 4``."""
            wx, wy, ww, wh = (float(w) for w in self.box_coder.weights)
            clip = float(self.box_coder.bbox_xform_clip)
            widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
            cx, cy = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
            dx, dy = codes[..., 0] / wx, codes[..., 1] / wy
            dw = torch.clamp(codes[..., 2] / ww, max=clip)
            dh = torch.clamp(codes[..., 3] / wh, max=clip)
            px, py = dx * widths + cx, dy * heights + cy
            half_w, half_h = 0.5 * torch.exp(dw) * widths, 0.5 * torch.exp(dh) * heights
            return torch.stack([px - half_w, py - half_h, px + half_w, py + half_h], dim=-1)

        def dense_predictions(self, x):
            """Boxes ``N x A x 4`` (clipped to the input) and class probabilities ``N x A x C``."""
            features = list(self.backbone(x).values())
            head = self.head(features)
            boxes = self.decode(head["bbox_regression"], self.anchors_for(x, features))
            boxes = boxes.clamp(min=0.0, max=float(x.shape[-1]))  # the input is square
            return boxes, F.softmax(head["cls_logits"], dim=-1)[..., 1:]

        def postprocess_detections(self, head_outputs, image_anchors, image_shapes):
            """torchvision's decoding and clipping per image, then ``select_detections`` (its rules)."""
            scores = F.softmax(head_outputs["cls_logits"], dim=-1)
            detections = []
            for codes, image_scores, anchors, shape in zip(
                head_outputs["bbox_regression"], scores, image_anchors, image_shapes, strict=True
            ):
                boxes = box_ops.clip_boxes_to_image(self.box_coder.decode_single(codes, anchors), shape)
                detections.append(
                    select_detections(
                        boxes,
                        image_scores[:, 1:],
                        score_thresh=self.score_thresh,
                        nms_thresh=self.nms_thresh,
                        topk_candidates=self.topk_candidates,
                        detections_per_img=self.detections_per_img,
                    )
                )
            return detections

    return SSDDetector


def _anchors(
    aspect_ratios: list[list[int]], scales: list[float] | None = None, steps: list[int] | None = None
):
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

    if scales is None:
        return DefaultBoxGenerator(aspect_ratios, min_ratio=0.1, max_ratio=0.9)
    return DefaultBoxGenerator(aspect_ratios, scales=scales, steps=steps)


# ---------------------------------------------------------------- vgg-16


def _vgg_map_sizes(image_size: int) -> list[int]:
    """Feature map sizes of conv4_3, fc7 and each extra block that still gives at least 1x1."""
    c4 = math.ceil((image_size // 2 // 2) / 2)  # pool3 has ceil_mode
    sizes = [c4, c4 // 2]
    for kind in ("s2", "s2", "k3", "k3", "k4"):
        x = sizes[-1]
        nxt = (x - 1) // 2 + 1 if kind == "s2" else x - (2 if kind == "k3" else 3)
        if x < 1 or nxt < 1:
            break
        sizes.append(nxt)
    return sizes


def build_vgg16(*, num_classes: int, image_size: int, pretrained_backbone: bool = False, **post):
    """SSD with a VGG-16 backbone (torchvision's SSD300 design; extra blocks and anchors fit the size)."""
    import torch.nn as nn
    import torchvision
    from torchvision.models.detection.ssd import SSDFeatureExtractorVGG

    weights = _pretrained("vgg-16", pretrained_backbone)
    # only the convolutional part: building VGG's 120M-parameter classifier just to drop it is slow
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=False)
    if weights is not None:
        state = weights.get_state_dict(progress=True)
        features.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("features.")})
    else:
        for layer in features.modules():  # VGG's own initialisation
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(layer.bias, 0)
    backbone = SSDFeatureExtractorVGG(features, highres=True)
    sizes = _vgg_map_sizes(image_size)
    if len(sizes) < 2 or sizes[1] < 1:
        raise ConfigError(
            f"vgg-16 needs image_shape >= {MIN_IMAGE_SIZE}, got {image_size}", field="image_shape"
        )
    backbone.extra = nn.ModuleList(list(backbone.extra)[: len(sizes) - 1])
    n = len(sizes)
    if image_size == 300 and n == 6:
        anchors = _anchors(
            [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
            [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
            [8, 16, 32, 64, 100, 300],
        )
    elif image_size == 512 and n == 7:
        anchors = _anchors(
            [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
            [0.04, 0.1, 0.26, 0.42, 0.58, 0.74, 0.9, 1.06],
            [8, 16, 32, 64, 128, 256, 512],
        )
    else:
        anchors = _anchors(([[2]] + [[2, 3]] * max(0, n - 3) + [[2]] * 2)[:n])
    return _detector_class()(
        backbone,
        anchors,
        (image_size, image_size),
        num_classes + 1,
        image_mean=[0.48235, 0.45882, 0.40784],
        image_std=[1.0 / 255.0] * 3,
        **post,
    )


# ---------------------------------------------------------------- resnet-50


def _resnet_extractor(resnet, image_size: int):
    import torch.nn as nn

    class ResNetSSDFeatures(nn.Module):
        """ResNet-50 ``layer3`` and ``layer4`` outputs followed by stride-2 extra blocks (GluonCV's SSD)."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                resnet.conv1,
                resnet.bn1,
                resnet.relu,
                resnet.maxpool,
                resnet.layer1,
                resnet.layer2,
                resnet.layer3,
            )
            self.layer4 = resnet.layer4
            size = math.ceil(math.ceil(image_size / 16) / 2)
            extras, channels = [], 2048
            for filters in (512, 512, 256, 256):
                if size <= 1:
                    break
                extras.append(
                    nn.Sequential(
                        nn.Conv2d(channels, filters // 2, 1, bias=False),
                        nn.BatchNorm2d(filters // 2),
                        nn.ReLU(inplace=True),
                        nn.Conv2d(filters // 2, filters, 3, stride=2, padding=1, bias=False),
                        nn.BatchNorm2d(filters),
                        nn.ReLU(inplace=True),
                    )
                )
                channels, size = filters, (size - 1) // 2 + 1
            self.extra = nn.ModuleList(extras)

        def forward(self, x):
            x = self.stem(x)
            out = [x]
            x = self.layer4(x)
            out.append(x)
            for block in self.extra:
                x = block(x)
                out.append(x)
            return OrderedDict((str(i), v) for i, v in enumerate(out))

    return ResNetSSDFeatures()


def build_resnet50(*, num_classes: int, image_size: int, pretrained_backbone: bool = False, **post):
    """SSD on ResNet-50 features as GluonCV's ssd_512_resnet50_v1 (6 maps at 512; fewer when smaller)."""
    import torchvision

    weights = _pretrained("resnet-50", pretrained_backbone)
    backbone = _resnet_extractor(torchvision.models.resnet50(weights=weights, progress=False), image_size)
    n_maps = 2 + len(backbone.extra)
    ratios = ([[2]] + [[2, 3]] * 3 + [[2]] * 2) if n_maps == 6 else [[2, 3]] * (n_maps - 2) + [[2]] * 2
    # GluonCV's sizes [51.2, 102.4, 189.4, 276.4, 363.52, 450.6, 492] at 512, as fractions of the image
    scales = [0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 0.961] if n_maps == 6 else None
    anchors = _anchors(ratios[:n_maps], scales)
    return _detector_class()(
        backbone,
        anchors,
        (image_size, image_size),
        num_classes + 1,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        **post,
    )


# ---------------------------------------------------------------- mobilenet-v3


def build_mobilenet_v3(*, num_classes: int, image_size: int, pretrained_backbone: bool = False, **post):
    """SSDLite with a MobileNetV3-Large backbone (torchvision's ssdlite320 design at ``image_size``)."""
    from functools import partial

    import torch.nn as nn
    import torchvision
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.ssdlite import SSDLiteHead, _mobilenet_extractor, _normal_init

    weights = _pretrained("mobilenet-v3", pretrained_backbone)
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    mobilenet = torchvision.models.mobilenet_v3_large(
        weights=weights, progress=False, norm_layer=norm_layer, reduced_tail=False
    )
    if weights is None:
        _normal_init(mobilenet)
    backbone = _mobilenet_extractor(mobilenet, 6, norm_layer)
    size = (image_size, image_size)
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = det_utils.retrieve_out_channels(backbone, size)
    head = SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_classes + 1, norm_layer)
    return _detector_class()(
        backbone,
        anchors,
        size,
        num_classes + 1,
        head=head,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        **post,
    )


SSD_FACTORIES = {
    "vgg-16": build_vgg16,
    "resnet-50": build_resnet50,
    "mobilenet-v3": build_mobilenet_v3,
}
