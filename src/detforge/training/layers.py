"""Parameter names for ``freeze_layer_pattern``: torch's, and SageMaker's MXNet names where they exist.

SageMaker matches ``freeze_layer_pattern`` against the layer names of its MXNet base networks
(``vgg16-symbol.json``, ``resnet-50-symbol.json``), e.g. ``^(conv1_|conv2_).*``. ``mxnet_names(model,
base_network)`` gives each backbone parameter of detforge's ``vgg-16`` and ``resnet-50`` the MXNet
parameter name of the same layer (layer name + ``_weight``/``_bias``, ``_gamma``/``_beta`` for
BatchNorm), so a SageMaker pattern freezes the same layers:

- ``vgg-16``: ``conv1_1`` ... ``conv5_3``, ``fc6``, ``fc7`` (convolutions in order) and ``relu4_3_scale``
  (the conv4_3 L2-normalisation scale);
- ``resnet-50``: ``conv0``/``bn0`` (stem), ``stage{S}_unit{U}_conv{K}``/``_bn{K}`` (bottleneck K of unit
  U of stage S; MXNet's ResNet is pre-activation, so its ``bnK`` precedes ``convK`` while detforge's
  follows it: same unit, same number), ``stage{S}_unit{U}_sc`` (projection shortcut) and
  ``stage{S}_unit{U}_sc_bn`` (its BatchNorm, which MXNet's network does not have).

``mobilenet-v3`` (not a SageMaker network), the SSD extra layers and the heads have torch names only.
``detforge train --list-layers`` prints both.
"""

from __future__ import annotations

import re

VGG_LAYERS = [
    f"conv{block}_{k}" for block, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for k in range(1, n + 1)
] + ["fc6", "fc7"]


def _suffix(kind: str, parameter: str) -> str:
    if kind == "bn":
        return {"weight": "gamma", "bias": "beta"}.get(parameter, parameter)
    return parameter


def mxnet_names(model, base_network: str) -> dict[str, str]:
    """torch parameter name -> SageMaker's MXNet parameter name, for the parameters that have one."""
    import torch.nn as nn

    backbone = model.backbone
    layers: dict[str, tuple[str, str]] = {}  # torch module name (under backbone) -> (MXNet layer, kind)
    if base_network == "vgg-16":
        convs = [name for name, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
        layers = {name: (mx, "conv") for name, mx in zip(convs, VGG_LAYERS, strict=False)}
    elif base_network == "resnet-50":
        stage, unit, stem_done = 0, 0, False
        for name, module in backbone.named_modules():
            if type(module).__name__ == "Bottleneck":
                stem_done = True
                stage, unit = (stage + 1, 1) if module.downsample is not None else (stage, unit + 1)
                prefix = f"stage{stage}_unit{unit}"
                for child, _ in module.named_modules():
                    match = re.fullmatch(r"(conv|bn)(\d)", child)
                    if match:
                        layers[f"{name}.{child}"] = (f"{prefix}_{child}", match.group(1))
                    elif child == "downsample.0":
                        layers[f"{name}.{child}"] = (f"{prefix}_sc", "conv")
                    elif child == "downsample.1":
                        layers[f"{name}.{child}"] = (f"{prefix}_sc_bn", "bn")
            elif not stem_done and isinstance(module, nn.Conv2d):
                layers[name] = ("conv0", "conv")
            elif not stem_done and isinstance(module, nn.BatchNorm2d):
                layers[name] = ("bn0", "bn")
    names: dict[str, str] = {}
    for module_name, (mx, kind) in layers.items():
        for parameter, _ in backbone.get_submodule(module_name).named_parameters(recurse=False):
            names[f"backbone.{module_name}.{parameter}"] = f"{mx}_{_suffix(kind, parameter)}"
    if base_network == "vgg-16" and hasattr(backbone, "scale_weight"):
        names["backbone.scale_weight"] = "relu4_3_scale"
    return names


def layer_table(model, base_network: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(torch name, MXNet name or "", shape)`` of every parameter, in the model's order."""
    mx = mxnet_names(model, base_network)
    return [(name, mx.get(name, ""), tuple(p.shape)) for name, p in model.named_parameters()]


def matching_parameters(model, base_network: str, pattern: str) -> list[str]:
    """torch names of the parameters whose torch or MXNet name ``pattern`` matches (``re.search``)."""
    regex = re.compile(pattern)
    mx = mxnet_names(model, base_network)
    return [
        name
        for name, _ in model.named_parameters()
        if regex.search(name) or (name in mx and regex.search(mx[name]))
    ]
