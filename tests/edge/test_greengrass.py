"""``detforge edge package``: the Greengrass v2 recipe parses, names files that exist in the artifact, and the
component's Run step (played here the way the Greengrass nucleus would: placeholders filled in, the zip
unpacked) starts the edge runtime from the packaged copy of detforge. Nothing talks to AWS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from conftest import missing
from test_edge import secure_broker  # noqa: F401  (a fixture: mosquitto with TLS, a password, an ACL)

from detforge.edge.greengrass import edge_requirements, package_component, pinned_requirements
from detforge.errors import ConfigError, ModelError

REPO = Path(__file__).resolve().parents[2]
NAME, VERSION = "com.example.Detector", "1.2.3"


@pytest.fixture
def component(tiny_deploy, tmp_path):
    return package_component(
        str(tiny_deploy),
        out_dir=str(tmp_path / "component"),
        name=NAME,
        version=VERSION,
        source="camera:0",
        broker="mqtt://127.0.0.1:1883",
        fps=7,
        threshold=0.4,
    )


def test_recipe_parses_and_names_existing_files(component, tiny_deploy, tmp_path):
    out = tmp_path / "component"
    assert Path(component.recipe) == out / "recipes" / f"{NAME}-{VERSION}.yaml"
    recipe = yaml.safe_load(Path(component.recipe).read_text())
    assert recipe["RecipeFormatVersion"] == "2020-01-25"
    assert (recipe["ComponentName"], recipe["ComponentVersion"]) == (NAME, VERSION)
    assert recipe["ComponentConfiguration"]["DefaultConfiguration"] == {
        "source": "camera:0",
        "broker": "mqtt://127.0.0.1:1883",
        "topic": "detforge/infer/output",
        "requestTopic": "detforge/infer/input",
        "statusTopic": "detforge/infer/status",
        "fps": "7",
        "threshold": "0.4",
        "allowPath": "",
        "tls": "false",
        "caFile": "",
        "certFile": "",
        "keyFile": "",
        "username": "",
        "password": "",
        "mqttVersion": "5",
    }
    (manifest,) = recipe["Manifests"]
    (artifact,) = manifest["Artifacts"]
    assert artifact["URI"] == f"s3://YOUR-BUCKET/{NAME}/{VERSION}/detforge-edge.zip"
    assert artifact["Unarchive"] == "ZIP"
    # greengrass-cli --artifactDir layout: artifacts/<name>/<version>/<file name of the URI>
    local = out / "artifacts" / NAME / VERSION / artifact["URI"].rsplit("/", 1)[1]
    assert local == Path(component.artifact) and local.is_file()
    names = set(zipfile.ZipFile(local).namelist())
    lifecycle = manifest["Lifecycle"]
    scripts = (
        lifecycle["Install"]["Script"]
        + " "
        + lifecycle["Run"]["Script"]
        + " "
        + " ".join(lifecycle["Run"]["Setenv"].values())
    )
    referenced = set(re.findall(r"\{artifacts:decompressedPath\}/([\w./-]+)", scripts))
    assert referenced == {"detforge-edge", "detforge-edge/requirements.txt", "detforge-edge/run.sh"}
    for path in referenced - {"detforge-edge"}:
        assert path in names, path
    for name in (
        "deploy/model.onnx",
        "deploy/model.json",
        "detforge/__init__.py",
        "detforge/__main__.py",
        "detforge/edge/__init__.py",
        "detforge/edge/buffer.py",
        "detforge/edge/sources.py",
        "detforge/cli/edge.py",
    ):
        assert f"detforge-edge/{name}" in names, name
    assert not any("__pycache__" in n for n in names)
    with zipfile.ZipFile(local) as archive:
        assert archive.read("detforge-edge/deploy/model.onnx") == (tiny_deploy / "model.onnx").read_bytes()
        requirements = archive.read("detforge-edge/requirements.txt").decode().split()
        assert archive.getinfo("detforge-edge/run.sh").external_attr >> 16 == 0o755
    assert requirements == pinned_requirements()
    pins = dict(line.split("==") for line in requirements)  # every package pinned, to what runs here
    packages = set(pins)
    assert {"onnxruntime", "paho-mqtt", "numpy", "pillow", "pyyaml"} <= packages
    assert all(metadata.version(name) == version for name, version in pins.items())
    direct = {re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower() for line in edge_requirements()}
    assert direct < packages  # their own dependencies are pinned too
    assert not packages & {"torch", "torchvision", "fastapi"}
    # every configuration key the Run step reads exists
    keys = set(re.findall(r"\{configuration:/(\w+)\}", scripts))
    assert keys == set(recipe["ComponentConfiguration"]["DefaultConfiguration"])


def test_component_run_step_starts_the_runtime(component, mqtt_broker, tmp_path):
    from test_edge import OUTPUT, Recorder, write_video

    recipe = yaml.safe_load(Path(component.recipe).read_text())
    unpacked, work = tmp_path / "unpacked", tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(component.artifact) as archive:
        archive.extractall(unpacked)
    video = write_video(tmp_path / "clip.avi", frames=3, fps=3.0)
    configuration = {
        **recipe["ComponentConfiguration"]["DefaultConfiguration"],
        "source": str(video),
        "broker": mqtt_broker.url,
        "fps": "3",
    }

    def fill(text: str) -> str:  # what the nucleus does with recipe variables
        text = text.replace("{artifacts:decompressedPath}", str(unpacked)).replace("{work:path}", str(work))
        return re.sub(r"\{configuration:/(\w+)\}", lambda m: configuration[m.group(1)], text)

    run = recipe["Manifests"][0]["Lifecycle"]["Run"]
    env = {**os.environ, **{k: fill(v) for k, v in run["Setenv"].items()}}
    env["DETFORGE_VENV"] = sys.prefix  # the Install step would have made this virtualenv
    recorder = Recorder(mqtt_broker.port).connect()
    try:
        result = subprocess.run(
            fill(run["Script"]), shell=True, env=env, capture_output=True, text=True, timeout=120, cwd=work
        )
        messages = recorder.wait_for(OUTPUT, 3, timeout=10)
    finally:
        recorder.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 frames, 0 requests, 3 results published" in result.stdout
    assert [m["frame"] for m in messages] == [0, 1, 2]
    assert (work / "buffer" / ".last-seq").read_text() == "3"


@pytest.mark.slow  # the Install step builds a real virtualenv: about 50 s
def test_install_step_then_run_step_over_tls_with_a_password(component, secure_broker, tmp_path):  # noqa: F811
    """The recipe's Install step as the nucleus runs it (a fresh virtualenv, the pinned requirements), then
    its Run step with TLS, a user name and a password from the component configuration."""
    from test_edge import OUTPUT, Recorder, write_video

    recipe = yaml.safe_load(Path(component.recipe).read_text())
    unpacked, work = tmp_path / "unpacked", tmp_path / "work"
    work.mkdir()
    with zipfile.ZipFile(component.artifact) as archive:
        archive.extractall(unpacked)
    video = write_video(tmp_path / "clip.avi", frames=3, fps=3.0)
    configuration = {
        **recipe["ComponentConfiguration"]["DefaultConfiguration"],
        "source": str(video),
        "broker": f"mqtts://127.0.0.1:{secure_broker.port}",
        "fps": "3",
        "caFile": secure_broker.ca_file,
        "username": "dev",
        "password": "s3cret",
    }

    def fill(text: str) -> str:  # what the nucleus does with recipe variables
        text = text.replace("{artifacts:decompressedPath}", str(unpacked)).replace("{work:path}", str(work))
        return re.sub(r"\{configuration:/(\w+)\}", lambda m: configuration[m.group(1)], text)

    lifecycle = recipe["Manifests"][0]["Lifecycle"]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        fill(lifecycle["Install"]["Script"]),
        shell=True,
        env=clean,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=work,
    )
    if install.returncode != 0 and "No matching distribution" in install.stderr + install.stdout:
        missing("pip cannot reach a package index for the Install step")
    assert install.returncode == 0, install.stdout + install.stderr
    venv = work / "venv"
    frozen = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean,
    ).stdout.split()
    pinned = (unpacked / "detforge-edge" / "requirements.txt").read_text().split()
    normal = lambda line: line.lower().replace("_", "-")  # noqa: E731
    assert {normal(x) for x in pinned} <= {normal(x) for x in frozen}  # exactly the pinned versions
    assert not any(normal(x).startswith(("torch==", "torchvision==")) for x in frozen)
    run = lifecycle["Run"]
    env = {**clean, **{k: fill(v) for k, v in run["Setenv"].items()}}
    recorder = Recorder(
        secure_broker.port,
        ("detforge/infer/#",),
        ca_file=secure_broker.ca_file,
        username="dev",
        password="s3cret",
    ).connect()
    try:
        result = subprocess.run(
            fill(run["Script"]), shell=True, env=env, capture_output=True, text=True, timeout=120, cwd=work
        )
        messages = recorder.wait_for(OUTPUT, 3, timeout=10)
    finally:
        recorder.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 frames, 0 requests, 3 results published" in result.stdout
    assert [m["frame"] for m in messages] == [0, 1, 2]
    assert "s3cret" not in result.stdout + result.stderr


def test_package_refuses_bad_input(tiny_deploy, tmp_path):
    with pytest.raises(ModelError, match="model.onnx: missing from the deploy folder"):
        package_component(str(tmp_path), out_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="must be MAJOR.MINOR.PATCH, got '1.0'"):
        package_component(str(tiny_deploy), out_dir=str(tmp_path / "out"), version="1.0")
    with pytest.raises(ConfigError, match="detforge-edge.zip"):
        package_component(str(tiny_deploy), out_dir=str(tmp_path / "out"), artifact_uri="s3://b/other.zip")
    assert not (tmp_path / "out").exists()


def test_cli_package(tiny_deploy, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "detforge",
            "edge",
            "package",
            str(tiny_deploy),
            "--out",
            str(tmp_path / "c"),
            "--artifact-uri",
            "s3://my-bucket/x/detforge-edge.zip",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    recipe = tmp_path / "c" / "recipes" / "com.detforge.EdgeDetector-1.0.0.yaml"
    assert result.stdout.splitlines()[0] == f"recipe {recipe}"
    parsed = yaml.safe_load(recipe.read_text())
    assert parsed["Manifests"][0]["Artifacts"][0]["URI"] == "s3://my-bucket/x/detforge-edge.zip"
    assert (
        tmp_path / "c" / "artifacts" / "com.detforge.EdgeDetector" / "1.0.0" / "detforge-edge.zip"
    ).is_file()
