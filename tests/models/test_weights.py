"""``detforge weights``: nothing downloads unless asked; the error for a missing file names the command;
a download lands in the torch hub cache with its sha256 prefix checked, or leaves nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from detforge import models  # noqa: E402
from detforge.errors import ModelError  # noqa: E402
from detforge.models import weights  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_missing_weights_name_the_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError) as info:
        models.build_model("resnet-50", num_classes=2, image_size=64, pretrained_backbone=True)
    assert "`detforge weights download resnet-50`" in str(info.value)
    assert info.value.field == "use_pretrained_model"
    assert not (tmp_path / "hub").exists()  # nothing downloaded


def test_download_checks_the_hash_and_lands_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    content = b"not really weights, but bytes with a known sha256"
    prefix = hashlib.sha256(content).hexdigest()[:8]
    good = tmp_path / f"weights-{prefix}.pth"
    good.write_bytes(content)
    bad = tmp_path / "weights-deadbeef.pth"
    bad.write_bytes(content)
    target = Path(models.backbone_weights_file("mobilenet-v3"))
    with pytest.raises(ModelError, match="not the expected file"):
        weights.download_backbone("mobilenet-v3", url=bad.as_uri(), progress=False)
    assert not target.exists() and os.listdir(target.parent) == []
    status = weights.download_backbone("mobilenet-v3", url=good.as_uri(), progress=False)
    assert status.cached and status.path == str(target) and target.read_bytes() == content
    assert weights.download_backbone("mobilenet-v3", url=bad.as_uri()).cached  # cached: no download


def test_cli_lists_and_refuses_unknown_networks(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path), "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "detforge", "weights", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["vgg-16", "missing"],
        ["resnet-50", "missing"],
        ["mobilenet-v3", "missing"],
        ["shufflenet-v2", "missing"],
    ]
    assert str(tmp_path / "hub" / "checkpoints" / "mobilenet_v3_large-8738ca79.pth") in lines[2]
    assert str(tmp_path / "hub" / "checkpoints" / "shufflenetv2_x1-5666bf0f80.pth") in lines[3]
    done = subprocess.run(
        [sys.executable, "-m", "detforge", "weights", "download", "vgg-19"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and "unknown base_network 'vgg-19'" in done.stderr
