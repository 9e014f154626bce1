"""Shared fixtures: the real data beside the checkout, a real S3 server (moto), a real MQTT broker
(mosquitto), the Chromium binary. Servers start on free loopback ports and stop after use.

A binary that is missing makes its tests skip with a reason, except under CI (CI=true), where
they fail: CI must exercise the real servers. Likewise a Python package that ``pytest.importorskip``
does not find (torch, onnxruntime, cv2) fails its module or test under CI (``_fail_under_ci``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
UNDER_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# The suite runs as 2 pytest-xdist workers on 2 cores: one compute thread per process (and per subprocess
# it starts). Two OpenMP threads per worker oversubscribe the cores and make torch up to ~17x slower
# (measured: one tiny training epoch 8.8 s with 1 thread, 153 s with 2 on the loaded machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see detforge/cli/__init__.py


def missing(reason: str) -> None:
    """Skip the test, or fail it under CI where everything must be there."""
    if UNDER_CI:
        pytest.fail(f"{reason} (CI must have it: see `make system`)")
    pytest.skip(reason)


IMPORT_SKIP = "could not import"  # how pytest.importorskip words its skip


def _importorskip_reason(report) -> str | None:
    """The reason of a skip made by ``pytest.importorskip`` (module level, fixture or test), else None."""
    if not report.skipped:
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    reason = reason.removeprefix("Skipped: ")
    return reason if reason.startswith(IMPORT_SKIP) else None


def _fail_under_ci(report) -> None:
    """Under CI, a test or module skipped for a missing Python package (torch, onnxruntime, cv2: a broken
    ``[training]`` or ``[edge]`` install) fails instead: CI must not go green by skipping."""
    reason = _importorskip_reason(report) if UNDER_CI else None
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = f"{reason} (CI=true: a missing package fails; install with `make setup`)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_under_ci(outcome.get_result())


def need_binary(name: str, *candidates: str) -> str:
    """The path of a program, or skip/fail naming it."""
    for candidate in (name, *candidates):
        found = shutil.which(candidate) or (candidate if os.path.isfile(candidate) else None)
        if found:
            return found
    missing(f"'{name}' is not installed (Debian package; `make system` installs it)")
    raise AssertionError("unreachable")


def http(url: str, *, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
    """(status, body, headers) of one HTTP request to a test server; error statuses are returned."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    """Block until something listens on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real Ground Truth manifests, frames, hyperparameters); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it sits beside a developer's checkout, not a user's clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1; sets the AWS variables botocore/s3fs read.

    Yields the endpoint URL. Create buckets with ``make_bucket``.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def make_bucket(s3_server):
    """Create a fresh bucket on the moto server and return its name."""
    import uuid

    import boto3

    def create(name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
        import fsspec

        fsspec.filesystem("s3").invalidate_cache()
        return name

    return create


class Broker:
    """A mosquitto broker on a loopback port that tests can stop and start again."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.host = "127.0.0.1"
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


@pytest.fixture
def mqtt_broker(tmp_path):
    """A running mosquitto broker (``.url``, ``.port``, ``.stop()``, ``.start()``)."""
    binary = need_binary("mosquitto", "/usr/sbin/mosquitto")
    broker = Broker(binary, tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium for Playwright (``executable_path``); never a downloaded browser."""
    return need_binary("chromium", "/usr/bin/chromium")


# -- a tiny trained + exported model (shared by predict, serve, edge tests) ---------------------------
TINY_CLASSES = ["blue box", "yellow box"]
TINY_HP = {
    "num_classes": "2",
    "base_network": "mobilenet-v3",
    "use_pretrained_model": "0",
    "epochs": "6",
    "mini_batch_size": "4",
    "image_shape": "64",
    "workers": "0",
    "learning_rate": "0.002",
    "optimizer": "adam",
    "augmentation": "none",
    "deterministic": "1",
}


def make_tiny_set(
    folder: Path,
    count: int,
    seed: int,
    size: int = 64,
    *,
    classes=("red", "blue"),
    colors=((220, 30, 30), (30, 30, 220)),
    background: int = 128,
    prefix: str = "img",
) -> Path:
    """``count`` gray PNGs ``<prefix>_<seed>_<i>.png`` with one box of class ``i % 2`` in that class's colour,
    a manifest and classes.json (the training, tuning and deploy tests' data)."""
    import json

    import numpy as np
    from PIL import Image

    from detforge.data.groundtruth import make_record, write_manifest

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        pixels = np.full((size, size, 3), background, np.uint8)
        class_id = i % 2
        w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
        x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        pixels[y : y + h, x : x + w] = colors[class_id]
        name = f"{prefix}_{seed}_{i:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        records.append(
            make_record(
                name,
                width=size,
                height=size,
                boxes_xyxy=[[x, y, x + w, y + h]],
                class_ids=[class_id],
                class_map=dict(enumerate(classes)),
                creation_date="2024-01-01T00:00:00",
            )
        )
    write_manifest(folder / "data.manifest", records)
    (folder / "classes.json").write_text(json.dumps(list(classes)))
    return folder / "data.manifest"


def make_box_images(folder: Path, count: int, seed: int) -> Path:
    """The tiny deploy model's data: blue (class 0) and yellow (class 1) boxes on darker gray."""
    return make_tiny_set(
        folder,
        count,
        seed,
        classes=TINY_CLASSES,
        colors=((40, 70, 210), (230, 200, 40)),
        background=110,
        prefix="box",
    )


@pytest.fixture(scope="session")
def tiny_deploy(tmp_path_factory) -> Path:
    """A deploy folder (model.onnx + model.json) of a mobilenet-v3 SSD at 64 px trained for a few seconds.

    Built once per test run: pytest-xdist workers share it through a lock file in the common temp root.
    Its ``default_threshold`` is 0.05 so that even this barely trained model answers with detections.
    """
    import fcntl

    pytest.importorskip("torch")
    # Under xdist the workers' temp folders share a parent made for this run; without xdist that parent
    # is pytest-of-<user>/, which outlives the run and would hand a later run a model from older code.
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-deploy"
    root.mkdir(exist_ok=True)
    deploy = root / "deploy"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (deploy / "model.json").exists():
            import torch

            from detforge.deploy.export import export_run
            from detforge.training.train import TrainConfig, train

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train_manifest = make_box_images(root / "train", 16, 1)
                validation = make_box_images(root / "validation", 4, 2)
                train(
                    TrainConfig(
                        train=str(train_manifest),
                        validation=str(validation),
                        out=str(root / "run"),
                        hyperparameters=TINY_HP,
                        progress=False,
                    )
                )
                export_run(str(root / "run"), str(deploy), default_threshold=0.05, name="tiny")
            finally:
                torch.set_num_threads(threads)
    return deploy


@pytest.fixture(scope="session")
def tiny_run(tiny_deploy) -> Path:
    """The run folder ``tiny_deploy`` was exported from (its validation images: ``../validation``)."""
    return tiny_deploy.parent / "run"
