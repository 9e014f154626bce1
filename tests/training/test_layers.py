"""freeze_layer_pattern takes SageMaker's MXNet layer names (vgg16-symbol.json, resnet-50-symbol.json) as
well as torch's; ``train --list-layers`` shows both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from detforge.errors import ConfigError  # noqa: E402
from detforge.models import build_model  # noqa: E402
from detforge.training.layers import layer_table, mxnet_names  # noqa: E402
from detforge.training.train import freeze  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_sagemakers_vgg_pattern_freezes_conv1_and_conv2():
    model = build_model("vgg-16", num_classes=2, image_size=64)
    frozen = freeze(model, "^(conv1_|conv2_).*", base_network="vgg-16")  # SageMaker's documented example
    assert frozen == [f"backbone.features.{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "backbone.features.10.weight" in trainable and not trainable & set(frozen)
    names = mxnet_names(model, "vgg-16")
    assert names["backbone.features.21.weight"] == "conv4_3_weight"
    assert names["backbone.extra.0.7.3.bias"] == "fc7_bias"
    assert names["backbone.scale_weight"] == "relu4_3_scale"


def test_resnet_names_follow_mxnets_stages_and_units():
    model = build_model("resnet-50", num_classes=2, image_size=64)
    names = mxnet_names(model, "resnet-50")
    assert names["backbone.stem.0.weight"] == "conv0_weight" and names["backbone.stem.1.bias"] == "bn0_beta"
    assert names["backbone.stem.4.0.conv1.weight"] == "stage1_unit1_conv1_weight"
    assert names["backbone.stem.4.0.downsample.0.weight"] == "stage1_unit1_sc_weight"
    assert names["backbone.stem.6.5.bn3.weight"] == "stage3_unit6_bn3_gamma"
    assert names["backbone.layer4.2.conv3.weight"] == "stage4_unit3_conv3_weight"
    frozen = freeze(model, "^(conv0|bn0|stage1_)", base_network="resnet-50")
    # stem conv (no bias) + bn (2); 3 units x (3 convs + 3 bns x 2); the shortcut's conv + bn
    assert len(frozen) == 3 + 3 * 9 + 3
    assert all(n.startswith(("backbone.stem.0.", "backbone.stem.1.", "backbone.stem.4.")) for n in frozen)


def test_torch_names_still_work_and_a_pattern_matching_nothing_says_where_to_look():
    model = build_model("mobilenet-v3", num_classes=2, image_size=64)
    assert freeze(model, r"^backbone\.features\.0\.0\.", base_network="mobilenet-v3")
    assert all(mx == "" for _, mx, _ in layer_table(model, "mobilenet-v3"))
    vgg = build_model("vgg-16", num_classes=2, image_size=64)
    with pytest.raises(ConfigError) as info:
        freeze(vgg, "^conv9_", base_network="vgg-16")
    assert "'backbone.scale_weight' or, as SageMaker's MXNet network names them, 'conv1_1_weight'" in str(
        info.value
    )
    assert "--list-layers" in info.value.hint


def test_cli_list_layers():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "detforge",
            "train",
            "--list-layers",
            "--set",
            "base_network=vgg-16",
            "--set",
            "image_shape=64",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["parameter", "(torch)", "MXNet", "name", "shape"]
    assert lines[2].split() == ["backbone.features.0.weight", "conv1_1_weight", "64x3x3x3"]
    assert lines[-1] == "vgg-16 at 64 px: freeze_layer_pattern (re.search) matches either name"
