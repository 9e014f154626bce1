"""``pip install 'detforge[edge]'`` alone (no torch) is enough to run the edge runtime.

A virtualenv with only the edge extra is built once and cached under
``~/.cache/detforge-test/edge-venv-<hash of pyproject.toml + constraints.txt>`` (the dependencies change
rarely); detforge itself is reinstalled into it (``--no-deps``) whenever its source changes. In it:
torch must not be importable, ``detforge edge --help`` works, the Predictor gives the same detections
as in the full environment, and ``detforge edge`` publishes a video's frames to a real broker.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DETFORGE_TEST_CACHE", Path.home() / ".cache" / "detforge-test"))


def _digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _pip(venv: Path, *args: str) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{result.stderr[-3000:]}")


@pytest.fixture(scope="module")
def edge_venv() -> Path:
    """The cached edge-only virtualenv, with the current detforge source installed (not editable)."""
    return build_edge_venv()


def build_edge_venv() -> Path:
    """Build (or reuse) the edge-only virtualenv; also used by benchmarks/bench_edge.py.

    A fresh build takes about 20 s with a warm pip cache (detforge is built once, with its dependencies);
    a source change costs one ``--no-deps`` reinstall (about 3 s). A lock keeps a test and a benchmark
    from building the same folder at once.
    """
    import fcntl

    venv = CACHE / f"edge-venv-{_digest([REPO / 'pyproject.toml', REPO / 'constraints.txt'])}"
    CACHE.mkdir(parents=True, exist_ok=True)
    source = _digest(
        sorted(
            p for p in (REPO / "src" / "detforge").rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    )
    stamp = venv / ".detforge-source"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
            _pip(venv, "-c", "constraints.txt", ".[edge]")
            stamp.write_text(source)
            (venv / ".complete").write_text("ok\n")
        elif not stamp.exists() or stamp.read_text() != source:
            _pip(venv, "--no-deps", "--force-reinstall", ".")
            stamp.write_text(source)
    return venv


def _run(venv: Path, *args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=venv, **kwargs
    )


def test_torch_is_absent_and_the_cli_works(edge_venv):
    python = str(edge_venv / "bin" / "python")
    probe = _run(
        edge_venv,
        python,
        "-c",
        "import importlib.util as u, detforge, sys; "
        "print(u.find_spec('torch') is None, u.find_spec('torchvision') is None, detforge.__file__)",
    )
    assert probe.returncode == 0, probe.stderr
    no_torch, no_torchvision, location = probe.stdout.split()
    assert (no_torch, no_torchvision) == ("True", "True")
    assert location.startswith(str(edge_venv))  # the installed copy, not the checkout
    help_text = _run(edge_venv, str(edge_venv / "bin" / "detforge"), "edge", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "package" in help_text.stdout and "run" in help_text.stdout
    run_help = _run(edge_venv, str(edge_venv / "bin" / "detforge"), "edge", "run", "--help")
    assert run_help.returncode == 0 and "--broker" in run_help.stdout and "--allow-path" in run_help.stdout


def test_inference_without_torch_matches_the_full_install(edge_venv, tiny_deploy, tmp_path):
    from detforge.runtime import Predictor

    image = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    script = (
        "import json, sys; from detforge.runtime import Predictor; "
        "d = Predictor(sys.argv[1]).predict([sys.argv[2]], threshold=0.0)[0]; "
        "print(json.dumps(d.to_sagemaker())); "
        "print('torch' in sys.modules)"
    )
    result = _run(edge_venv, str(edge_venv / "bin" / "python"), "-c", script, str(tiny_deploy), str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "False"
    expected = Predictor(str(tiny_deploy)).predict([str(path)], threshold=0.0)[0].to_sagemaker()
    got = json.loads(lines[0])
    assert len(got) == len(expected) > 0
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(expected, dtype=float), atol=1e-5)


def test_edge_runtime_publishes_from_the_edge_only_install(edge_venv, tiny_deploy, mqtt_broker, tmp_path):
    from test_edge import Recorder, write_video

    video = write_video(tmp_path / "clip.avi", frames=4, fps=4.0)
    recorder = Recorder(mqtt_broker.port).connect()
    try:
        result = _run(
            edge_venv,
            str(edge_venv / "bin" / "detforge"),
            "edge",
            str(tiny_deploy),
            "--source",
            str(video),
            "--broker",
            mqtt_broker.url,
            "--fps",
            "4",
            "--buffer-dir",
            str(tmp_path / "b"),
        )
        messages = recorder.wait_for("detforge/infer/output", 4, timeout=10)
    finally:
        recorder.close()
    assert result.returncode == 0, result.stderr
    assert [m["frame"] for m in messages] == [0, 1, 2, 3]
    assert all(isinstance(m["prediction"], list) for m in messages)
