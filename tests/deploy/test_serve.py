"""Tests for ``detforge serve``: the real server in a subprocess on a free loopback port, real HTTP.

Every endpoint; detections identical to ``Predictor`` on the same image; every bad input (empty, not an
image, truncated, a 20000x20000 PNG bomb, oversized, wrong/missing content type) answered with a 4xx JSON
error while the server stays up with bounded memory; random-bytes fuzzing; dynamic batching folding four
requests into one model run; SIGTERM while a request is half received (it is still answered, exit 0).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from functools import lru_cache
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def png_bytes(width: int, height: int, *, seed: int = 0) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int, height: int, *, seed: int = 0) -> bytes:
    image = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@lru_cache(maxsize=4)
def bilevel_png(width: int, height: int) -> bytes:
    """A valid black 1-bit PNG: tiny on the wire, huge once decoded (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def start_server(deploy: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "detforge",
            "serve",
            str(deploy),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # a busy machine starts two workers slowly
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(f"{url}/ping", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not answer /ping within 180 s")


def stop_server(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "a.png").write_bytes(png_bytes(80, 60, seed=1))
    (folder / "b.jpg").write_bytes(jpeg_bytes(64, 64, seed=2))
    return folder


@pytest.fixture(scope="module")
def server(tiny_deploy, allowed):
    process, url = start_server(
        tiny_deploy,
        "--max-batch",
        "4",
        "--max-wait-ms",
        "3000",
        "--max-body-mb",
        "1",
        "--max-pixels",
        "4000000",
        "--allow-path",
        str(allowed),
    )
    try:
        yield url, process
    finally:
        assert stop_server(process) == 0


@pytest.fixture(scope="module")
def predictor(tiny_deploy):
    from detforge.runtime import Predictor

    return Predictor(str(tiny_deploy), threads=1)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    raise AssertionError(f"{name} not in /metrics")


def test_ping_model_and_metrics(server, tiny_deploy):
    url, _ = server
    ping = httpx.get(f"{url}/ping")
    assert (ping.status_code, ping.json()) == (200, {"status": "ok"})
    model = httpx.get(f"{url}/model")
    assert model.status_code == 200 and model.headers["content-type"] == "application/json"
    full = json.loads((tiny_deploy / "model.json").read_text())
    public = [
        "name",
        "format",
        "classes",
        "base_network",
        "input_size",
        "input",
        "outputs",
        "nms_threshold",
        "nms_topk",
        "nms_candidates",
        "score_threshold",
        "default_threshold",
        "quantization",
        "opset",
        "detforge_version",
        "exported_at",
        "sha256",
    ]
    assert model.json() == {**{key: full[key] for key in public}, "threshold": 0.05}
    assert str(tiny_deploy.parent) not in model.text and "hyperparameters" not in model.text
    assert "source_run" in full and "hyperparameters" in full  # what it leaves out is there to leave out
    page = httpx.get(f"{url}/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in (
        "detforge_requests_total",
        "detforge_request_errors_total",
        "detforge_requests_in_progress",
        'detforge_request_latency_seconds_bucket{le="+Inf"}',
        "detforge_batch_size_count",
        "detforge_inference_seconds_sum",
    ):
        assert name in page.text
    assert 'detforge_requests_total{endpoint="/ping",status="200"}' in page.text


@pytest.mark.parametrize(
    ("content_type", "make"),
    [("image/jpeg", jpeg_bytes), ("image/png", png_bytes), ("application/x-image", png_bytes)],
)
def test_invocations_give_the_predictors_detections(server, predictor, content_type, make):
    url, _ = server
    body = make(120, 90, seed=7)
    before = metric(url, "detforge_batch_size_count")
    response = httpx.post(
        f"{url}/invocations",
        content=body,
        headers={"Content-Type": content_type, "Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    expected = predictor.predict([np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))])[0]
    assert response.json() == {"prediction": json.loads(json.dumps(expected.to_sagemaker()))}
    assert len(response.json()["prediction"]) > 0
    for row in response.json()["prediction"]:
        assert len(row) == 6 and 0 <= row[0] < len(predictor.class_names)
        assert all(0.0 <= v <= 1.0 for v in row[1:])
    assert metric(url, "detforge_batch_size_count") == before + 1  # a lone request is a batch of one


def test_jsonlines_reads_allowed_files_only(server, predictor, allowed):
    url, _ = server
    lines = "\n".join(json.dumps({"source-ref": str(allowed / name)}) for name in ("a.png", "b.jpg"))
    response = httpx.post(
        f"{url}/invocations", content=lines, headers={"Content-Type": "application/jsonlines"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/jsonlines"
    got = [json.loads(line) for line in response.text.splitlines()]
    assert [g["source-ref"] for g in got] == [str(allowed / "a.png"), str(allowed / "b.jpg")]
    for name, answer in zip(("a.png", "b.jpg"), got, strict=True):
        expected = predictor.predict([np.asarray(Image.open(allowed / name).convert("RGB"))])[0]
        np.testing.assert_allclose(
            np.asarray(answer["prediction"], dtype=float).reshape(-1, 6),
            np.asarray(expected.to_sagemaker(), dtype=float).reshape(-1, 6),
            atol=1e-5,
        )
    refused = {
        "/etc/passwd": (403, "line 1: /etc/passwd: not inside an allowed folder (--allow-path), refused"),
        str(allowed / ".." / "etc" / "passwd"): (403, "not inside an allowed folder"),
        "../../../../etc/passwd": (403, "not inside an allowed folder"),
        str(allowed / "missing.png"): (403, "no such file"),
    }
    for ref, (status, message) in refused.items():
        answer = httpx.post(
            f"{url}/invocations",
            content=json.dumps({"source-ref": ref}),
            headers={"Content-Type": "application/jsonlines"},
        )
        assert answer.status_code == status and message in answer.json()["error"], (ref, answer.text)
    bad = httpx.post(
        f"{url}/invocations",
        content=b'{"source-ref": "a.png"}\nnot json\n',
        headers={"Content-Type": "application/jsonlines"},
    )
    assert bad.status_code == 400 and bad.json()["error"].startswith("line 2: not JSON")
    missing = httpx.post(
        f"{url}/invocations", content=b'{"image": "a.png"}', headers={"Content-Type": "application/jsonlines"}
    )
    assert missing.status_code == 400 and missing.json() == {"error": 'line 1: needs a "source-ref" string'}


def test_invocations_match_detforge_predict(server, tiny_deploy, allowed, tmp_path):
    """The endpoint and `detforge predict` (batch 1) give identical detections for the same files."""
    url, _ = server
    out = tmp_path / "predictions.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "detforge",
            "predict",
            str(tiny_deploy),
            str(allowed),
            "--out",
            str(out),
            "--batch-size",
            "1",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    predicted = {
        Path(json.loads(line)["image"]).name: json.loads(line)["prediction"]
        for line in out.read_text().splitlines()
    }
    assert sorted(predicted) == ["a.png", "b.jpg"]
    for name, content_type in (("a.png", "image/png"), ("b.jpg", "image/jpeg")):
        answer = httpx.post(
            f"{url}/invocations",
            content=(allowed / name).read_bytes(),
            headers={"Content-Type": content_type},
        )
        assert answer.status_code == 200
        assert answer.json()["prediction"] == predicted[name], name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # starlette's TestClient on httpx
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_jsonlines_refused_without_allow_path(tiny_deploy, predictor):
    from starlette.testclient import TestClient

    from detforge.deploy.serve import ServeConfig, create_app

    app = create_app(ServeConfig(deploy_dir=str(tiny_deploy)), predictor=predictor)
    with TestClient(app) as client:
        answer = client.post(
            "/invocations",
            content=b'{"source-ref": "/etc/passwd"}',
            headers={"Content-Type": "application/jsonlines"},
        )
        assert answer.status_code == 403
        assert answer.json() == {
            "error": "reading files named in a request is off; start the server with "
            "--allow-path DIR to allow files under DIR"
        }
        assert client.get("/ping").status_code == 200


BAD_INPUTS = [
    ("empty body", b"", "image/jpeg", 400, "empty body: send the image bytes"),
    ("not an image", b"hello, not an image" * 10, "image/png", 400, "not a JPEG/PNG/WEBP/BMP image"),
    ("truncated jpeg", jpeg_bytes(200, 150)[:1500], "image/jpeg", 400, "image data is truncated or corrupt"),
    ("too many pixels", None, "image/png", 413, "image is 3000x2000 = 6000000 pixels, more than the limit"),
    ("20000x20000 bomb", None, "image/png", 413, "pixels"),
    ("oversized body", b"\xff" * (1024 * 1024 + 1), "image/jpeg", 413, "over the limit of 1048576 bytes"),
    ("wrong content type", png_bytes(32, 32), "text/plain", 415, "unsupported Content-Type 'text/plain'"),
    ("missing content type", png_bytes(32, 32), None, 415, "missing Content-Type"),
]


@pytest.mark.parametrize(
    ("name", "body", "content_type", "status", "message"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_gets_a_4xx_json_error(server, name, body, content_type, status, message):
    url, process = server
    if name == "too many pixels":
        body = bilevel_png(3000, 2000)
    elif name == "20000x20000 bomb":
        body = bilevel_png(20000, 20000)
        assert len(body) < 100_000  # small on the wire: 1.2 GB as RGB pixels
    rss_before = psutil.Process(process.pid).memory_info().rss
    headers = {"Content-Type": content_type} if content_type else {}
    request = httpx.Request("POST", f"{url}/invocations", content=body, headers=headers)
    if content_type is None:
        request.headers.pop("Content-Type", None)
    response = httpx.Client().send(request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]
    assert httpx.get(f"{url}/ping").status_code == 200
    assert psutil.Process(process.pid).memory_info().rss - rss_before < 100 * 2**20


def test_wrong_accept_method_and_path(server):
    url, _ = server
    accept = httpx.post(
        f"{url}/invocations",
        content=png_bytes(32, 32),
        headers={"Content-Type": "image/png", "Accept": "text/html"},
    )
    assert accept.status_code == 406 and "ask for application/json" in accept.json()["error"]
    method = httpx.get(f"{url}/invocations")
    assert method.status_code == 405 and method.json()["error"].startswith("GET /invocations")
    missing = httpx.get(f"{url}/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"].startswith("GET /nothing-here")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.binary(min_size=0, max_size=4096),
    content_type=st.sampled_from(["image/jpeg", "image/png", "application/x-image"]),
    prefix=st.sampled_from([b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n"]),
)
def test_fuzz_random_bytes_never_break_the_server(server, body, content_type, prefix):
    url, _ = server
    response = httpx.post(f"{url}/invocations", content=prefix + body, headers={"Content-Type": content_type})
    assert response.status_code in (200, 400, 413), response.text
    payload = response.json()
    assert ("prediction" in payload) if response.status_code == 200 else isinstance(payload["error"], str)


def _raw_request(port: int, body: bytes, content_type: str = "image/png") -> tuple[socket.socket, bytes]:
    """Open a connection and send the headers and all of the body but its last byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + body[:-1])
    return sock, body[-1:]


def _read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def _wait_in_progress(url: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while metric(url, "detforge_requests_in_progress") != count:
        assert time.monotonic() < deadline, "requests did not reach the server"
        time.sleep(0.02)


def test_concurrent_requests_are_batched_into_one_model_run(server, predictor):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    bodies = [png_bytes(100 + 10 * i, 80, seed=20 + i) for i in range(4)]
    runs, images = metric(url, "detforge_batch_size_count"), metric(url, "detforge_batch_size_sum")
    pending = [_raw_request(port, body) for body in bodies]
    _wait_in_progress(url, 4)  # all four are being received: the batcher will wait for them
    for sock, last in pending:
        sock.sendall(last)
    answers = [_read_response(sock) for sock, _ in pending]
    assert metric(url, "detforge_batch_size_count") == runs + 1  # one model run ...
    assert metric(url, "detforge_batch_size_sum") == images + 4  # ... for four images
    for body, (status, payload) in zip(bodies, answers, strict=True):
        assert status == 200
        expected = predictor.predict([np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))])[0]
        np.testing.assert_allclose(
            np.asarray(payload["prediction"], dtype=float).reshape(-1, 6),
            np.asarray(expected.to_sagemaker(), dtype=float).reshape(-1, 6),
            atol=1e-5,
        )


def test_many_clients_at_once_all_get_answers(server):
    url, _ = server
    body = png_bytes(64, 48, seed=5)
    results: list[int] = []

    def client() -> None:
        with httpx.Client() as session:
            for _ in range(3):
                results.append(
                    session.post(
                        f"{url}/invocations", content=body, headers={"Content-Type": "image/png"}
                    ).status_code
                )

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [200] * 24


def test_sigterm_lets_the_request_in_flight_finish(tiny_deploy):
    process, url = start_server(tiny_deploy)
    port = int(url.rsplit(":", 1)[1])
    try:
        body = png_bytes(90, 70, seed=9)
        sock, last = _raw_request(port, body)
        _wait_in_progress(url, 1)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server stops listening at once ...
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("still accepting connections after SIGTERM")
        assert process.poll() is None  # ... but waits for the request it is receiving
        sock.sendall(last)
        status, payload = _read_response(sock)
        assert status == 200 and isinstance(payload["prediction"], list)
        assert process.wait(30) == 0
    finally:
        stop_server(process)


def test_serve_refuses_bad_settings(tiny_deploy, tmp_path):
    from detforge.deploy.serve import ServeConfig
    from detforge.errors import ConfigError

    for kwargs, message in [
        ({"max_batch": 0}, "field 'max_batch': must be at least 1, got 0"),
        ({"max_wait_ms": -1}, "field 'max_wait_ms': must be 0 or more, got -1"),
        ({"threshold": 1.5}, "field 'threshold': must be within [0, 1], got 1.5"),
        ({"allow_paths": (str(tmp_path / "no"),)}, f"{tmp_path / 'no'}, field 'allow_path': not a folder"),
        ({"max_images": 101}, "field 'max_images': must be at most max_queue (100), got 101"),
        ({"max_client_connections": 0}, "field 'max_client_connections': must be at least 1, got 0"),
        ({"header_timeout_s": 0}, "field 'header_timeout_s': must be more than 0, got 0"),
        ({"body_timeout_s": -1}, "field 'body_timeout_s': must be more than 0, got -1"),
    ]:
        with pytest.raises(ConfigError) as caught:
            ServeConfig(deploy_dir=str(tiny_deploy), **kwargs)
        assert str(caught.value) == message
    # the command refuses before it listens: one line, no traceback, exit 2, nothing on the port
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "detforge",
            "serve",
            str(tiny_deploy),
            "--port",
            str(port),
            "--max-batch",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr) == (2, "error: field 'max_batch': must be at least 1, got 0\n")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


# -- back-pressure, errors that tell nothing, metrics over several workers -----------------------------


class GatedPredictor:
    """The real predictor behind a gate: ``predict`` waits while the gate is shut (a slow model), or
    raises when ``fail`` is set (a model that breaks)."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.metadata = predictor.metadata
        self.threshold = predictor.threshold
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.fail: str | None = None

    def predict(self, images, *, threshold=None):
        self.entered.release()
        assert self.gate.wait(60)
        if self.fail:
            raise RuntimeError(self.fail)
        return self.predictor.predict(images, threshold=threshold)


@pytest.fixture
def gated_server(tiny_deploy, predictor, allowed):
    """The app with a gated model under uvicorn in a thread: (url, GatedPredictor, log records)."""
    import logging

    import uvicorn

    from detforge.deploy.serve import ServeConfig, create_app

    gated = GatedPredictor(predictor)
    config = ServeConfig(
        deploy_dir=str(tiny_deploy),
        max_batch=1,
        max_queue=3,
        max_in_flight=2,
        max_images=3,
        allow_paths=(str(allowed),),
        retry_after_s=2,
    )
    app = create_app(config, predictor=gated)
    gated.entered = threading.Semaphore(0)  # forget the warm-up run
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("detforge.deploy.serve")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # as serve()'s log_config sets it at the default --log-level
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield url, gated, records
    finally:
        gated.gate.set()
        server.should_exit = True
        thread.join(30)
        logger.removeHandler(handler)
        logger.setLevel(level)


def _post_in_thread(url: str, body: bytes, content_type: str = "image/png") -> tuple[threading.Thread, list]:
    out: list = []

    def send() -> None:
        out.append(
            httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": content_type}, timeout=60)
        )

    thread = threading.Thread(target=send)
    thread.start()
    return thread, out


def test_a_full_server_answers_503_with_retry_after_and_recovers(gated_server, predictor, allowed):
    url, gated, _ = gated_server
    port = int(url.rsplit(":", 1)[1])
    body = png_bytes(64, 48, seed=3)
    assert httpx.get(f"{url}/ping").json() == {"status": "ok"}
    gated.gate.clear()
    line = json.dumps({"source-ref": str(allowed / "a.png")})
    first, first_out = _post_in_thread(url, "\n".join([line] * 3).encode(), "application/jsonlines")
    assert gated.entered.acquire(timeout=30)  # its 3 images fill the queue of 3: one in the model
    queue_full = httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": "image/png"})
    assert queue_full.status_code == 503 and queue_full.headers["retry-after"] == "2"
    assert queue_full.json() == {
        "error": "the server is full (3 images queued (--max-queue)); retry after 2 s"
    }
    ping = httpx.get(f"{url}/ping")  # /ping says what /invocations would answer
    assert (ping.status_code, ping.json(), ping.headers["retry-after"]) == (
        503,
        {"status": "full", "full": "queue"},
        "2",
    )
    sock, last = _raw_request(port, body)  # a second request in flight, still being received
    _wait_in_progress(url, 2)
    too_many = httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": "image/png"})
    assert too_many.status_code == 503 and too_many.headers["retry-after"] == "2"
    assert "2 requests in flight (--max-in-flight)" in too_many.json()["error"]
    assert too_many.headers["connection"] == "close"  # answered before its body was read
    assert httpx.get(f"{url}/ping").json() == {"status": "full", "full": "requests"}
    gated.gate.set()
    first.join(30)
    sock.sendall(last)
    status, payload = _read_response(sock)
    expected = predictor.predict([np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))])[0].to_sagemaker()
    expected_a = predictor.predict([np.asarray(Image.open(allowed / "a.png").convert("RGB"))])[0]
    assert first_out[0].status_code == 200
    assert [json.loads(x)["prediction"] for x in first_out[0].text.splitlines()] == [
        json.loads(json.dumps(expected_a.to_sagemaker()))
    ] * 3
    assert status == 200 and payload["prediction"] == json.loads(json.dumps(expected))
    again = httpx.post(f"{url}/invocations", content=body, headers={"Content-Type": "image/png"})
    assert again.status_code == 200  # nothing stays stuck once the load is gone
    assert httpx.get(f"{url}/ping").json() == {"status": "ok"}
    assert metric(url, 'detforge_requests_rejected_total{reason="queue"}') == 1
    assert metric(url, 'detforge_requests_rejected_total{reason="requests"}') == 1
    assert metric(url, 'detforge_requests_total{endpoint="/invocations",status="503"}') == 2
    assert metric(url, 'detforge_requests_total{endpoint="/ping",status="503"}') == 2
    assert metric(url, "detforge_requests_in_progress") == 0


def test_jsonlines_images_per_request_are_bounded(gated_server, allowed):
    url, _, _ = gated_server
    line = json.dumps({"source-ref": str(allowed / "a.png")})
    ok = httpx.post(
        f"{url}/invocations",
        content="\n".join([line] * 3),
        headers={"Content-Type": "application/jsonlines"},
        timeout=60,
    )
    assert ok.status_code == 200 and len(ok.text.splitlines()) == 3
    for count in (4, 5000):  # one over the limit, and thousands of refs
        answer = httpx.post(
            f"{url}/invocations",
            content="\n".join([line] * count),
            headers={"Content-Type": "application/jsonlines"},
        )
        assert answer.status_code == 413
        assert answer.json() == {
            "error": "line 4: more than 3 images in one request (--max-images); split it"
        }


def test_a_failing_model_gets_500_without_its_exception_text(gated_server):
    url, gated, records = gated_server
    gated.fail = "cannot open /home/alice/secret-model/model.onnx"
    answer = httpx.post(
        f"{url}/invocations", content=png_bytes(32, 32), headers={"Content-Type": "image/png"}
    )
    assert answer.status_code == 500
    error = answer.json()["error"]
    assert error.startswith("internal error ") and error.endswith(": the server's log has the details")
    assert "alice" not in answer.text and "RuntimeError" not in answer.text
    error_id = error.split()[2].rstrip(":")
    logged = [r for r in records if error_id in r.getMessage()]
    assert len(logged) == 1 and "RuntimeError: cannot open /home/alice" in logged[0].getMessage()
    gated.fail = None
    assert (
        httpx.post(
            f"{url}/invocations", content=png_bytes(32, 32), headers={"Content-Type": "image/png"}
        ).status_code
        == 200
    )


def test_metrics_add_up_over_several_workers(tiny_deploy):
    process, url = start_server(tiny_deploy, "--workers", "2")
    try:
        workers = psutil.Process(process.pid).children(recursive=True)
        folders = {w.environ().get("PROMETHEUS_MULTIPROC_DIR") for w in workers} - {None}
        assert len(folders) == 1
        folder = folders.pop()
        body = png_bytes(40, 30, seed=4)
        for _ in range(8):  # a new connection each: the kernel hands them to either worker
            with httpx.Client() as client:
                assert (
                    client.post(
                        f"{url}/invocations", content=body, headers={"Content-Type": "image/png"}
                    ).status_code
                    == 200
                )
        pids = {name.rsplit("_", 1)[1] for name in os.listdir(folder) if name.startswith("histogram")}
        assert len(pids) == 2  # both workers write their values there
        for _ in range(6):  # whichever worker answers the scrape, it counts both
            with httpx.Client() as client:
                page = client.get(f"{url}/metrics").text
            assert 'detforge_requests_total{endpoint="/invocations",status="200"} 8.0' in page
            assert "detforge_batch_size_count 8.0" in page
    finally:
        assert stop_server(process) == 0
    assert not os.path.exists(folder)  # removed on the way out


def test_a_client_gone_before_its_answer_is_counted_once_not_as_an_error(gated_server):
    url, gated, records = gated_server
    port = int(url.rsplit(":", 1)[1])
    gated.gate.clear()
    sock, last = _raw_request(port, png_bytes(40, 30, seed=8))
    sock.sendall(last)
    assert gated.entered.acquire(timeout=30)  # the whole request is in the model ...
    sock.close()  # ... when its client hangs up
    gated.gate.set()
    deadline = time.monotonic() + 30
    gone = 'detforge_requests_total{endpoint="/invocations",status="disconnected"}'
    while gone not in (page := httpx.get(f"{url}/metrics").text):
        assert time.monotonic() < deadline, "the disconnect was not counted"
        time.sleep(0.02)
    assert f"{gone} 1.0" in page and 'endpoint="/invocations",status="200"' not in page
    assert "detforge_request_errors_total 0.0" in page
    said = [r.getMessage() for r in records]
    assert len(said) == 1, said
    assert said[0].startswith("client 127.0.0.1 disconnected before its answer (200 after ")
    assert said[0].endswith(" ms): not delivered") and records[0].exc_info is None
