"""``detforge edge package``: an AWS IoT Greengrass v2 component that runs ``detforge edge`` on the device.

In here: ``package_component``, which writes the layout ``greengrass-cli`` and the Greengrass console use::

    OUT/recipes/<name>-<version>.yaml
    OUT/artifacts/<name>/<version>/detforge-edge.zip
        detforge-edge/deploy/model.onnx, model.json   the model
        detforge-edge/detforge/...                     this package's source (pure Python)
        detforge-edge/requirements.txt                 every package the runtime needs, pinned (name==version)
        detforge-edge/run.sh                           builds the command line from the component's settings

The recipe's Install step makes a virtualenv in the component's work folder and installs the pinned
requirements (no torch); Run starts ``python -m detforge edge`` with the component configuration
(source, broker, topics, fps, threshold, allowPath, TLS files, user name, password, MQTT version) passed
as environment variables. Not in here: the
runtime itself (``detforge.edge``), anything that talks to AWS. No torch.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from detforge.edge import DEFAULT_REQUEST_TOPIC, DEFAULT_STATUS_TOPIC, DEFAULT_TOPIC
from detforge.errors import ConfigError, ModelError, require
from detforge.storage import write_bytes, write_text

ARCHIVE = "detforge-edge"
RUN_SH = """#!/bin/sh
# Started by the Greengrass Run step; every setting comes from the component configuration.
set -e
set -- "$DETFORGE_HOME/deploy" --broker "$DETFORGE_BROKER" --topic "$DETFORGE_TOPIC" \\
    --request-topic "$DETFORGE_REQUEST_TOPIC" --status-topic "$DETFORGE_STATUS_TOPIC" \\
    --fps "$DETFORGE_FPS" --buffer-dir "$DETFORGE_BUFFER_DIR"
if [ -n "$DETFORGE_THRESHOLD" ]; then set -- "$@" --threshold "$DETFORGE_THRESHOLD"; fi
if [ -n "$DETFORGE_SOURCE" ]; then set -- "$@" --source "$DETFORGE_SOURCE"; fi
if [ -n "$DETFORGE_ALLOW_PATH" ]; then set -- "$@" --allow-path "$DETFORGE_ALLOW_PATH"; fi
if [ "$DETFORGE_TLS" = "true" ]; then set -- "$@" --tls; fi
if [ -n "$DETFORGE_CA_FILE" ]; then set -- "$@" --ca-file "$DETFORGE_CA_FILE"; fi
if [ -n "$DETFORGE_CERT_FILE" ]; then set -- "$@" --cert-file "$DETFORGE_CERT_FILE"; fi
if [ -n "$DETFORGE_KEY_FILE" ]; then set -- "$@" --key-file "$DETFORGE_KEY_FILE"; fi
if [ -n "$DETFORGE_USERNAME" ]; then set -- "$@" --username "$DETFORGE_USERNAME"; fi
if [ -n "$DETFORGE_MQTT_VERSION" ]; then set -- "$@" --mqtt-version "$DETFORGE_MQTT_VERSION"; fi
# the password, if any, reaches the runtime as DETFORGE_MQTT_PASSWORD (never on its command line)
PYTHONPATH="$DETFORGE_HOME${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
exec "$DETFORGE_VENV/bin/python" -m detforge edge "$@"
"""


@dataclass(frozen=True)
class Component:
    """The files ``package_component`` wrote."""

    name: str
    version: str
    recipe: str
    artifact: str


def edge_requirements() -> list[str]:
    """detforge's own dependencies plus its ``[edge]`` extra, as pip requirement lines."""
    try:
        declared = metadata.requires("detforge") or []
    except metadata.PackageNotFoundError as exc:
        raise ModelError("detforge's package metadata is missing", hint="install it with pip") from exc
    lines = []
    for requirement in declared:
        spec, _, marker = requirement.partition(";")
        marker = marker.replace("'", '"').replace(" ", "")
        if not marker or marker == 'extra=="edge"':
            lines.append(spec.strip())
    return lines


def pinned_requirements() -> list[str]:
    """``name==version`` for every package the edge runtime needs, its dependencies' dependencies too, at the
    versions installed here (the project's constraints when installed with ``make setup``), sorted.

    The component's Install step installs exactly these, so a device runs what was tested; markers are
    evaluated for this machine (a Linux device with the same Python minor version is what this fits).
    """
    requirements_mod = require("packaging.requirements", "edge")
    from packaging.utils import canonicalize_name

    done: dict[str, set[str]] = {}  # canonical name -> extras whose dependencies are followed ("" = none)
    todo: list[tuple[str, str]] = [(line, "") for line in edge_requirements()]
    while todo:
        line, extra = todo.pop()
        requirement = requirements_mod.Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        new = ({""} | set(requirement.extras)) - done.get(name, set())
        if not new:
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError as exc:
            raise ModelError(
                f"the edge runtime needs '{requirement.name}', which is not installed here",
                hint="pip install 'detforge[edge]' (with -c constraints.txt) before packaging",
            ) from exc
        done.setdefault(name, set()).update(new)
        todo += [(child, each) for child in dist.requires or [] for each in new]
    return [f"{name}=={metadata.version(name)}" for name in sorted(done)]


def _package_files() -> list[tuple[Path, str]]:
    root = Path(__file__).resolve().parents[1]  # the detforge package
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            files.append((path, f"{ARCHIVE}/detforge/{path.relative_to(root).as_posix()}"))
    return files


def build_archive(deploy_dir: str) -> bytes:
    """The artifact zip (model, detforge source, requirements, run.sh) as bytes."""
    from detforge.runtime import local_deploy

    deploy_dir = local_deploy(deploy_dir)  # an s3:// deploy folder: its cached copy
    model_files = [os.path.join(deploy_dir, name) for name in ("model.onnx", "model.json")]
    for path in model_files:
        if not os.path.isfile(path):
            raise ModelError(
                "missing from the deploy folder",
                path=path,
                hint="make it with `detforge export RUN --out DEPLOY`",
            )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in model_files:
            archive.write(path, f"{ARCHIVE}/deploy/{os.path.basename(path)}")
        for path, name in _package_files():
            archive.write(path, name)
        archive.writestr(f"{ARCHIVE}/requirements.txt", "\n".join(pinned_requirements()) + "\n")
        info = zipfile.ZipInfo(f"{ARCHIVE}/run.sh")
        info.external_attr = 0o755 << 16
        archive.writestr(info, RUN_SH)
    return buffer.getvalue()


def make_recipe(
    *,
    name: str,
    version: str,
    artifact_uri: str,
    source: str | None,
    broker: str,
    topic: str,
    request_topic: str,
    status_topic: str,
    fps: float,
    threshold: float | None,
    allow_path: str | None,
) -> dict:
    """The Greengrass v2 recipe (a dict to dump as YAML)."""
    home = "{artifacts:decompressedPath}/" + ARCHIVE
    return {
        "RecipeFormatVersion": "2020-01-25",
        "ComponentName": name,
        "ComponentVersion": version,
        "ComponentDescription": "detforge edge runtime: detects objects in camera/video frames with an ONNX "
        "model and publishes the detections over MQTT.",
        "ComponentPublisher": "detforge",
        "ComponentConfiguration": {
            "DefaultConfiguration": {
                "source": source or "",
                "broker": broker,
                "topic": topic,
                "requestTopic": request_topic,
                "statusTopic": status_topic,
                "fps": f"{fps:g}",
                "threshold": "" if threshold is None else f"{threshold:g}",  # "": model.json's default
                "allowPath": allow_path or "",
                "tls": "false",  # "true" for TLS (implied by an mqtts:// broker)
                "caFile": "",
                "certFile": "",
                "keyFile": "",
                "username": "",
                "password": "",  # handed to the runtime as DETFORGE_MQTT_PASSWORD
                "mqttVersion": "5",
            }
        },
        "Manifests": [
            {
                "Platform": {"os": "linux"},
                "Lifecycle": {
                    "Install": {
                        "Script": "python3 -m venv {work:path}/venv && "
                        f"{{work:path}}/venv/bin/pip install --quiet -r {home}/requirements.txt",
                        "Timeout": 1800,
                    },
                    "Run": {
                        "Setenv": {
                            "DETFORGE_HOME": home,
                            "DETFORGE_VENV": "{work:path}/venv",
                            "DETFORGE_BUFFER_DIR": "{work:path}/buffer",
                            "DETFORGE_SOURCE": "{configuration:/source}",
                            "DETFORGE_BROKER": "{configuration:/broker}",
                            "DETFORGE_TOPIC": "{configuration:/topic}",
                            "DETFORGE_REQUEST_TOPIC": "{configuration:/requestTopic}",
                            "DETFORGE_STATUS_TOPIC": "{configuration:/statusTopic}",
                            "DETFORGE_FPS": "{configuration:/fps}",
                            "DETFORGE_THRESHOLD": "{configuration:/threshold}",
                            "DETFORGE_ALLOW_PATH": "{configuration:/allowPath}",
                            "DETFORGE_TLS": "{configuration:/tls}",
                            "DETFORGE_CA_FILE": "{configuration:/caFile}",
                            "DETFORGE_CERT_FILE": "{configuration:/certFile}",
                            "DETFORGE_KEY_FILE": "{configuration:/keyFile}",
                            "DETFORGE_USERNAME": "{configuration:/username}",
                            "DETFORGE_MQTT_PASSWORD": "{configuration:/password}",
                            "DETFORGE_MQTT_VERSION": "{configuration:/mqttVersion}",
                        },
                        "Script": f"sh {home}/run.sh",
                    },
                },
                "Artifacts": [
                    {
                        "URI": artifact_uri,
                        "Unarchive": "ZIP",
                        "Permission": {"Read": "OWNER", "Execute": "OWNER"},
                    }
                ],
            }
        ],
    }


def package_component(
    deploy_dir: str,
    *,
    out_dir: str,
    name: str = "com.detforge.EdgeDetector",
    version: str = "1.0.0",
    artifact_uri: str | None = None,
    source: str | None = "camera:0",
    broker: str = "mqtt://127.0.0.1:1883",
    topic: str = DEFAULT_TOPIC,
    request_topic: str = DEFAULT_REQUEST_TOPIC,
    status_topic: str = DEFAULT_STATUS_TOPIC,
    fps: float = 5.0,
    threshold: float | None = None,
    allow_path: str | None = None,
) -> Component:
    """Write ``OUT/recipes/<name>-<version>.yaml`` and ``OUT/artifacts/<name>/<version>/detforge-edge.zip``.

    ``artifact_uri`` is where you will upload the zip for a cloud deployment (default
    ``s3://YOUR-BUCKET/<name>/<version>/detforge-edge.zip``; its file name must stay ``detforge-edge.zip``).
    """
    yaml = require("yaml", "edge")
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"must be MAJOR.MINOR.PATCH, got {version!r}", field="version")
    if not name or any(c.isspace() for c in name):
        raise ConfigError(f"a component name without spaces is needed, got {name!r}", field="name")
    artifact_uri = artifact_uri or f"s3://YOUR-BUCKET/{name}/{version}/{ARCHIVE}.zip"
    if not artifact_uri.endswith(f"/{ARCHIVE}.zip"):
        raise ConfigError(
            f"the artifact must be named {ARCHIVE}.zip, got {artifact_uri!r}", field="artifact_uri"
        )
    artifact = os.path.join(out_dir, "artifacts", name, version, f"{ARCHIVE}.zip")
    recipe_path = os.path.join(out_dir, "recipes", f"{name}-{version}.yaml")
    write_bytes(artifact, build_archive(deploy_dir))
    recipe = make_recipe(
        name=name,
        version=version,
        artifact_uri=artifact_uri,
        source=source,
        broker=broker,
        topic=topic,
        request_topic=request_topic,
        status_topic=status_topic,
        fps=fps,
        threshold=threshold,
        allow_path=allow_path,
    )
    write_text(recipe_path, yaml.safe_dump(recipe, sort_keys=False, width=110))
    return Component(name=name, version=version, recipe=recipe_path, artifact=artifact)
