"""The anchor-free detector (``detector=gfl``): a light one-stage detector for CPUs and edge devices.

Written for detforge from the papers, in the NanoDet-Plus / RTMDet family:

- **Backbone** (``base_network``, ``BACKBONES``): ShuffleNetV2 1.0x (``stage2..4`` of torchvision's
  ``shufflenet_v2_x1_0``), MobileNetV3-Large (stride 8/16/32 outputs of ``mobilenet_v3_large``) or ResNet-50
  (``layer2..4``); ImageNet weights with ``use_pretrained_model=1``.
- **Neck**: a path-aggregation network (PAN, Liu et al. 2018) on strides 8/16/32 with ``NECK_CHANNELS``
  channels: 1x1 lateral convolutions, a top-down pass (nearest upsampling, add) and a bottom-up pass
  (depthwise-separable stride-2 convolutions, add).
- **Head**: one small tower per level (two depthwise-separable 3x3 convolutions) whose last 1x1
  convolution gives, per point, ``C`` class logits and ``4 x (REG_MAX + 1)`` logits of the distance
  distributions of the box's left/top/right/bottom sides (GFL, Li et al. 2020), in stride units.
- **Assignment**: ``assign.task_aligned_assign`` (TOOD), recomputed from the predictions at every step.
- **Losses** (``gfl_losses``): quality focal loss (the class score learns the aligned IoU quality),
  distribution focal loss on the side distributions and GIoU loss (Rezatofighi et al. 2019) on the boxes,
  all weighted by the soft targets and normalised by their sum.

The model follows the torchvision detectors' contract: it takes a list of float ``CHW`` images in
[0, 1]; train mode ``model(images, targets)`` returns the loss dict (``quality_focal``, ``giou``,
``distribution_focal``); eval mode ``model(images)`` returns ``[{"boxes", "scores", "labels"}]`` per
image in that image's pixels (labels = class id + 1). Eval resizes every image to
``image_size x image_size`` (bilinear, antialiased: within one grey level of the PIL resize that training,
``evaluate`` and the runtime use); train mode keeps a batch whose images share one size divisible by 32
(multi-scale training) and resizes the others. Post-processing is torchvision SSD's: per class, scores above
``score_thresh``, the ``topk_candidates`` best, NMS at ``nms_thresh``, the ``detections_per_img`` best.

The detector contract (``models.contract``): ``input_spec`` (``image_size``, ImageNet mean/std) and
``dense_predictions(x)`` (normalised ``N x 3 x S x S`` input) -> boxes ``N x A x 4`` in input pixels and
class probabilities ``N x A x C``, one per point; eval mode selects from them with ``models.postprocess``.

Not here: SSD (``ssd``), the assigner (``assign``), the name -> factory table (``detforge.models``).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from detforge.errors import ConfigError
from detforge.models.assign import box_iou, task_aligned_assign
from detforge.models.contract import InputSpec
from detforge.models.postprocess import select_detections
from detforge.models.pretrained import pretrained_weights

STRIDES = (8, 16, 32)
NECK_CHANNELS = 96
REG_MAX = 7  # distances 0..7 strides per side, as NanoDet-Plus
PRIOR_PROB = 0.01
LOSS_WEIGHTS = {"quality_focal": 1.0, "giou": 2.0, "distribution_focal": 0.25}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_bn_act(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Convolution (no bias), BatchNorm, Hardswish."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.Hardswish(inplace=True),
    )


def dw_separable(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1 (MobileNet's separable convolution)."""
    return nn.Sequential(conv_bn_act(cin, cin, 3, stride, groups=cin), conv_bn_act(cin, cout, 1))


class Backbone(nn.Module):
    """Three stages whose outputs have strides 8, 16 and 32."""

    def __init__(self, stages: list[nn.Module], channels: tuple[int, int, int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.channels = channels

    def forward(self, x):
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[-3:]


def mobilenet_v3_backbone(*, pretrained: bool) -> Backbone:
    """MobileNetV3-Large blocks 0-6 (stride 8, 40 ch), 7-12 (16, 112 ch), 13-15 (32, 160 ch)."""
    import torchvision

    weights = pretrained_weights("mobilenet-v3", pretrained)
    # BatchNorm momentum 0.1 (not SSDLite's 0.03): short CPU runs of a few hundred steps must end with
    # running statistics that fit the weights (at 0.03, 50 steps leave 22 % of the initial 0/1 statistics
    # and the eval-mode scores collapse to the prior; measured on the tiny synthetic set)
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)
    net = torchvision.models.mobilenet_v3_large(weights=weights, progress=False, norm_layer=norm)
    features = net.features
    return Backbone([features[:7], features[7:13], features[13:16]], (40, 112, 160))


def shufflenet_v2_backbone(*, pretrained: bool) -> Backbone:
    """ShuffleNetV2 1.0x (Ma et al., 2018): stem + ``stage2`` (stride 8, 116 ch), ``stage3`` (16, 232),
    ``stage4`` (32, 464); its last 1x1 convolution (1024 ch) is left out.

    The stem reaches stride 4 in two layers (3x3 stride 2, max-pool), so little is computed at high
    resolution: on one CPU thread it trains ~1.7x as many 320 px images per second as mobilenet-v3 and
    runs ~0.8x its ONNX latency (measured; docs/training.md)."""
    import torchvision

    weights = pretrained_weights("shufflenet-v2", pretrained)
    net = torchvision.models.shufflenet_v2_x1_0(weights=weights, progress=False)
    return Backbone(
        [nn.Sequential(net.conv1, net.maxpool, net.stage2), net.stage3, net.stage4], (116, 232, 464)
    )


def resnet50_backbone(*, pretrained: bool) -> Backbone:
    """ResNet-50 stem + ``layer1..2`` (stride 8, 512 ch), ``layer3`` (16, 1024), ``layer4`` (32, 2048)."""
    import torchvision

    weights = pretrained_weights("resnet-50", pretrained)
    r = torchvision.models.resnet50(weights=weights, progress=False)
    stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2)
    return Backbone([stem, r.layer3, r.layer4], (512, 1024, 2048))


class PAN(nn.Module):
    """Path aggregation on 3 levels: lateral 1x1, top-down (upsample + add), bottom-up (stride 2 + add)."""

    def __init__(self, channels: tuple[int, int, int], out: int = NECK_CHANNELS) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_bn_act(c, out, 1) for c in channels)
        self.top_down = nn.ModuleList(dw_separable(out, out) for _ in range(2))
        self.down = nn.ModuleList(dw_separable(out, out, stride=2) for _ in range(2))
        self.bottom_up = nn.ModuleList(dw_separable(out, out) for _ in range(2))

    def forward(self, features):
        c3, c4, c5 = (lat(f) for lat, f in zip(self.lateral, features, strict=True))
        p4 = self.top_down[0](c4 + F.interpolate(c5, size=c4.shape[-2:], mode="nearest"))
        p3 = self.top_down[1](c3 + F.interpolate(p4, size=c3.shape[-2:], mode="nearest"))
        n4 = self.bottom_up[0](p4 + _fit(self.down[0](p3), p4))
        n5 = self.bottom_up[1](c5 + _fit(self.down[1](n4), c5))
        return [p3, n4, n5]


def _fit(x, like):
    """Crop ``x`` to the spatial size of ``like`` (odd input sizes make stride-2 maps one larger)."""
    return x[..., : like.shape[-2], : like.shape[-1]]


class Head(nn.Module):
    """Per level: two separable 3x3 convolutions, then 1x1 to ``C + 4 (REG_MAX + 1)`` outputs per point."""

    def __init__(self, num_classes: int, channels: int = NECK_CHANNELS, levels: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.towers = nn.ModuleList(
            nn.Sequential(dw_separable(channels, channels), dw_separable(channels, channels))
            for _ in range(levels)
        )
        self.cls_out = nn.ModuleList(nn.Conv2d(channels, num_classes, 1) for _ in range(levels))
        self.reg_out = nn.ModuleList(nn.Conv2d(channels, 4 * (REG_MAX + 1), 1) for _ in range(levels))
        for conv in list(self.cls_out) + list(self.reg_out):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 0.0)
        for conv in self.cls_out:  # every point starts as background with probability 1 - PRIOR_PROB
            nn.init.constant_(conv.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))

    def forward(self, features):
        """Class logits ``N x A x C`` and side-distribution logits ``N x A x 4 x (REG_MAX + 1)``."""
        cls, reg = [], []
        for tower, cls_out, reg_out, f in zip(self.towers, self.cls_out, self.reg_out, features, strict=True):
            x = tower(f)
            cls.append(cls_out(x).flatten(2).transpose(1, 2))
            reg.append(reg_out(x).flatten(2).transpose(1, 2))
        reg_logits = torch.cat(reg, 1)
        return torch.cat(cls, 1), reg_logits.reshape(reg_logits.shape[0], -1, 4, REG_MAX + 1)


def grid_points(shapes: list[tuple[int, int]], strides=STRIDES, *, device=None):
    """Point centres ``A x 2`` ((col + 0.5) x stride, (row + 0.5) x stride) and their strides ``A``."""
    points, point_strides = [], []
    for (height, width), stride in zip(shapes, strides, strict=True):
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
        point_strides.append(torch.full((height * width,), float(stride), device=device))
    return torch.cat(points), torch.cat(point_strides)


def distances(reg_logits):
    """Expected side distances (stride units) of the distributions: ``... x 4``."""
    project = torch.arange(REG_MAX + 1, dtype=reg_logits.dtype, device=reg_logits.device)
    return (F.softmax(reg_logits, dim=-1) * project).sum(-1)


def distances_to_boxes(points, dist):
    """xyxy boxes from centres and left/top/right/bottom distances (pixels)."""
    return torch.cat([points - dist[..., :2], points + dist[..., 2:]], dim=-1)


def giou_loss(pred, target):
    """``1 - GIoU`` of matching xyxy rows."""
    lt = torch.maximum(pred[:, :2], target[:, :2])
    rb = torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(1)
    area_t = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(1)
    union = (area_p + area_t - inter).clamp(min=1e-9)
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).prod(1)
    return 1 - (inter / union - (hull - union) / hull.clamp(min=1e-9))


def quality_focal_loss(logits, targets, *, beta: float = 2.0):
    """GFL's QFL: BCE towards the soft target, scaled by ``|target - sigmoid|^beta``; summed."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (bce * (prob - targets).abs().pow(beta)).sum()


def distribution_focal_loss(reg_logits, target_dist):
    """GFL's DFL: cross-entropy to the two integers around each target distance, linearly weighted.

    ``reg_logits`` P x 4 x (REG_MAX + 1), ``target_dist`` P x 4 in stride units -> P (mean of the sides).
    """
    target = target_dist.clamp(min=0, max=REG_MAX - 0.01)
    left = target.floor().long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    logp = F.log_softmax(reg_logits, dim=-1)
    loss = -(
        logp.gather(-1, left[..., None])[..., 0] * w_left
        + logp.gather(-1, right[..., None])[..., 0] * w_right
    )
    return loss.mean(-1)


class GFLDetector(nn.Module):
    """Backbone + PAN + GFL head; see the module docstring for the contract."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        image_size: int,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        topk_candidates: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = PAN(backbone.channels)
        self.head = Head(num_classes)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.topk_candidates = int(topk_candidates)

    # ------------------------------------------------------------ shared
    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(self.image_size, IMAGENET_MEAN, IMAGENET_STD)

    def raw_outputs(self, x):
        """Class logits, side logits, points and strides for a normalised batch ``x``."""
        features = self.neck(self.backbone(x))
        cls_logits, reg_logits = self.head(features)
        points, strides = grid_points([tuple(f.shape[-2:]) for f in features], device=x.device)
        return cls_logits, reg_logits, points, strides

    def dense_predictions(self, x):
        """Boxes ``N x A x 4`` (clipped to the input) and class probabilities ``N x A x C``."""
        cls_logits, reg_logits, points, strides = self.raw_outputs(x)
        boxes = distances_to_boxes(points, distances(reg_logits) * strides[:, None])
        size = torch.tensor([x.shape[-1], x.shape[-2]] * 2, dtype=boxes.dtype, device=boxes.device)
        return torch.minimum(boxes.clamp(min=0), size), cls_logits.sigmoid()

    def _batch(self, images, targets=None):
        """Stack images (resized to image_size unless a train batch already shares a /32 size)."""
        sizes = [tuple(img.shape[-2:]) for img in images]
        keep = self.training and len(set(sizes)) == 1 and sizes[0][0] % 32 == 0 and sizes[0][1] % 32 == 0
        if keep:
            batch = torch.stack(list(images))
        else:
            # antialiased, as training's resize (PIL bilinear) is: a 1024 px photo shrunk to 320 px without
            # it is a different image to the model (0.156 vs 0.169 AP50-95 on Aquarium's valid split); the
            # exported graph calls dense_predictions on the runtime's antialiased resize, never this
            batch = torch.cat(
                [
                    F.interpolate(
                        img[None],
                        size=(self.image_size, self.image_size),
                        mode="bilinear",
                        align_corners=False,
                        antialias=True,
                    )
                    for img in images
                ]
            )
        scales = []
        for height, width in sizes:
            sx, sy = (1.0, 1.0) if keep else (self.image_size / width, self.image_size / height)
            scales.append(torch.tensor([sx, sy, sx, sy], device=batch.device))
        scaled = None
        if targets is not None:
            scaled = [t["boxes"].to(batch.device).float() * s for t, s in zip(targets, scales, strict=True)]
        batch = (batch - self.mean) / self.std
        # NHWC in PyTorch: oneDNN's depthwise convolutions and BatchNorm run ~1.25x faster per training
        # step on one CPU thread (measured on mobilenet-v3 and shufflenet-v2)
        batch = batch.contiguous(memory_format=torch.channels_last)
        return batch, scales, scaled

    def forward(self, images, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("targets are needed in training mode")
            x, _, gt_boxes = self._batch(images, targets)
            return self.loss(x, gt_boxes, [t["labels"].to(x.device) - 1 for t in targets])
        x, scales, _ = self._batch(images)
        boxes, scores = self.dense_predictions(x)
        return [self.postprocess(b / s, p) for b, p, s in zip(boxes, scores, scales, strict=True)]

    # ------------------------------------------------------------ training
    def loss(self, x, gt_boxes: list, gt_labels: list) -> dict:
        """QFL + GIoU + DFL of a normalised batch against xyxy boxes (input pixels) and 0-based labels."""
        cls_logits, reg_logits, points, strides = self.raw_outputs(x)
        pred_dist = distances(reg_logits.float())  # stride units
        pred_boxes = distances_to_boxes(points, pred_dist * strides[:, None])
        cls_targets = torch.zeros_like(cls_logits, dtype=torch.float32)
        pos_pred, pos_gt, pos_logits, pos_dist, pos_weight = [], [], [], [], []
        with torch.no_grad():
            probs = cls_logits.detach().float().sigmoid()
        for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=True)):
            assigned, soft = task_aligned_assign(
                probs[i], pred_boxes[i].detach(), points, strides, boxes, labels
            )
            positive = assigned >= 0
            if not bool(positive.any()):
                continue
            idx = torch.nonzero(positive).squeeze(1)
            target_boxes = boxes[assigned[idx]]
            cls_targets[i, idx, labels[assigned[idx]]] = soft[idx]
            pos_pred.append(pred_boxes[i, idx])
            pos_gt.append(target_boxes)
            pos_logits.append(reg_logits[i, idx].float())
            side = torch.cat([points[idx] - target_boxes[:, :2], target_boxes[:, 2:] - points[idx]], 1)
            pos_dist.append(side / strides[idx, None])
            pos_weight.append(soft[idx])
        normalizer = max(float(cls_targets.sum()), 1.0)
        qfl = quality_focal_loss(cls_logits.float(), cls_targets) / normalizer
        if pos_pred:
            weight = torch.cat(pos_weight)
            giou = (giou_loss(torch.cat(pos_pred), torch.cat(pos_gt)) * weight).sum() / normalizer
            dfl = distribution_focal_loss(torch.cat(pos_logits), torch.cat(pos_dist))
            dfl = (dfl * weight).sum() / normalizer
        else:  # no boxes in the batch: zero box losses that still depend on the head (DDP needs every grad)
            giou = dfl = reg_logits.sum() * 0.0
        return {
            "quality_focal": LOSS_WEIGHTS["quality_focal"] * qfl,
            "giou": LOSS_WEIGHTS["giou"] * giou,
            "distribution_focal": LOSS_WEIGHTS["distribution_focal"] * dfl,
        }

    # ------------------------------------------------------------ inference
    def postprocess(self, boxes, scores) -> dict:
        """Per-class score threshold, top-k candidates and NMS (torchvision SSD's rules) for one image."""
        return select_detections(
            boxes,
            scores,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            topk_candidates=self.topk_candidates,
            detections_per_img=self.detections_per_img,
        )


BACKBONES = {
    "shufflenet-v2": shufflenet_v2_backbone,
    "mobilenet-v3": mobilenet_v3_backbone,
    "resnet-50": resnet50_backbone,
}


def build_gfl(
    base_network: str,
    *,
    num_classes: int,
    image_size: int,
    pretrained_backbone: bool = False,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    topk_candidates: int,
) -> GFLDetector:
    """The anchor-free detector on ``base_network`` (see the module docstring)."""
    if base_network not in BACKBONES:
        raise ConfigError(
            f"detector=gfl has no {base_network} backbone; choose one of {', '.join(BACKBONES)}",
            field="base_network",
        )
    backbone = BACKBONES[base_network](pretrained=pretrained_backbone)
    return GFLDetector(
        backbone,
        num_classes=num_classes,
        image_size=image_size,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        topk_candidates=topk_candidates,
    )


__all__ = [
    "GFLDetector",
    "box_iou",
    "build_gfl",
    "giou_loss",
    "quality_focal_loss",
    "distribution_focal_loss",
    "grid_points",
]
