"""ImageNet backbone weights for ``use_pretrained_model=1``: torchvision's weights API, local cache only.

A missing file is a ``ModelError`` naming it and ``detforge weights download`` (``models.weights``, the one
place that downloads, and only when asked); this module never downloads.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from detforge.errors import ModelError

# ImageNet backbone weights per architecture: (torchvision weights enum name, member)
BACKBONE_WEIGHTS = {
    "vgg-16": ("VGG16_Weights", "IMAGENET1K_FEATURES"),
    "resnet-50": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "mobilenet-v3": ("MobileNet_V3_Large_Weights", "IMAGENET1K_V1"),
    "shufflenet-v2": ("ShuffleNet_V2_X1_0_Weights", "IMAGENET1K_V1"),
}


def backbone_weights(base_network: str):
    """The torchvision weights enum member used for ``use_pretrained_model=1``."""
    import torchvision.models as tvm

    enum_name, member = BACKBONE_WEIGHTS[base_network]
    return getattr(getattr(tvm, enum_name), member)


def backbone_weights_file(base_network: str) -> str:
    """Where torchvision keeps (or would download) the ImageNet backbone weights: the torch hub cache."""
    import torch

    url = backbone_weights(base_network).url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def pretrained_weights(base_network: str, pretrained: bool):
    """The weights enum to pass to torchvision, or None; ModelError when the file is not cached."""
    if not pretrained:
        return None
    path = backbone_weights_file(base_network)
    if not os.path.exists(path):
        raise ModelError(
            f"the ImageNet weights for the {base_network} backbone are not in the torch hub cache "
            f"(expected {path}; folder {os.path.dirname(path)})",
            field="use_pretrained_model",
            hint=f"fetch it with `detforge weights download {base_network}` (or put the file from "
            f"{backbone_weights(base_network).url} there, or set TORCH_HOME), or train with "
            "use_pretrained_model=0 or start from a detforge model with --weights",
        )
    return backbone_weights(base_network)
