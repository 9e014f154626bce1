"""Hostile requests against the two real browser-app servers (``label`` and ``review``) on loopback: an index
that ``str.isdigit`` accepts but ``int`` refuses, bodies whose ``Content-Length`` is not a whole number or
is above the cap, a chunked body, a client that goes silent. Each gets its answer (400/404/411/413), the
cap holds for what is read, no traceback is logged and the server goes on serving."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detforge.data.groundtruth import make_record, write_manifest
from detforge.label import app, jobs, review
from detforge.label.server import TokenHandler

TOKEN = "secret-token"


def make_manifests(folder: Path) -> tuple[Path, Path]:
    """(an input manifest for label, a Ground Truth output manifest for review) over two small PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs, records = [], []
    for i in range(2):
        path = folder / f"frame_{i}.png"
        Image.fromarray(np.full((30, 40, 3), 60 * i, np.uint8)).save(path)
        inputs.append(json.dumps({"source-ref": str(path)}) + "\n")
        records.append(
            make_record(
                str(path),
                width=40,
                height=30,
                boxes_xyxy=[[1, 2, 20, 20]],
                class_ids=[0],
                class_map={0: "box"},
                job_name="labeling-job/j",
            )
        )
    (folder / "input.manifest").write_text("".join(inputs))
    write_manifest(folder / "job.manifest", records)
    return folder / "input.manifest", folder / "job.manifest"


@pytest.fixture(params=["label", "review"])
def target(request, tmp_path):
    """(port, the app's POST path, a valid body for it) of a real server running in a thread."""
    label_manifest, review_manifest = make_manifests(tmp_path / "data")
    if request.param == "label":
        job = jobs.open_job(label_manifest, out=tmp_path / "out.manifest", classes=["box"])
        srv = app.LabelServer(job, port=0, token=TOKEN)
        post, body = "/api/item/0", b'{"boxes": [[1, 2, 10, 12, 0, null]]}'
    else:
        session = review.load_review([review_manifest], discard=tmp_path / "discard.txt")
        srv = review.ReviewServer(session, port=0, token=TOKEN)
        post, body = "/api/decide", b'{"id": "frame_0", "decision": "reject"}'
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1], post, body
    finally:
        srv.shutdown()
        srv.server_close()


def exchange(port: int, request: bytes) -> tuple[int | None, dict, bool]:
    """Send ``request`` raw and read to the end; (status or None when the server answered nothing, the JSON
    body, whether the server closed the connection within 10 s). The servers speak HTTP/1.0: one request a
    connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data, closed = b"", False
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            data += chunk
    if not data.startswith(b"HTTP/"):
        return None, {}, closed
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(rest) if rest.startswith(b"{") else {}, closed


def post(path: str, headers: str, body: bytes = b"") -> bytes:
    return (f"POST {path}?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n").encode() + body


def test_bad_indexes_are_answered_not_crashed(target, capfd):
    port, _, _ = target
    for key, status in (
        ("%C2%B2", 400),
        ("%D9%A3", 400),
        ("-1", 400),
        ("1.0", 400),
        ("frame_0.png", 400),
        ("..%2F..%2Fetc%2Fpasswd", 400),
        ("99999999999999999999999", 404),
        ("2", 404),
    ):
        answer = exchange(
            port, f"GET /api/image/{key}?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert answer[0] == status, (key, answer)
    code, body, _ = exchange(
        port, f"GET /api/image/%C2%B2?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    )
    assert (code, body["error"].endswith("by their index, a whole number, not '²'")) == (400, True)
    assert (
        exchange(port, f"GET /api/image/1?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())[0]
        == 200
    )
    assert "Traceback" not in capfd.readouterr().err


def test_a_body_is_read_within_the_cap_whatever_is_declared(target, capfd):
    port, path, good = target
    cap = app.MAX_BODY if path.startswith("/api/item") else review.MAX_BODY
    # not a whole number, or negative: 400 at once (a -1 used to read the stream to its end, past the cap)
    for declared in ("abc", "-1", "1e3", "+5", "0x10", "²"):
        code, body, closed = exchange(port, post(path, f"Content-Length: {declared}\r\n"))
        assert (code, closed) == (400, True), declared
        assert body["error"].startswith("Content-Length must be a whole number of bytes")
    # above the cap: 413 from the header alone, before any of the body is sent
    code, body, closed = exchange(port, post(path, f"Content-Length: {cap + 1}\r\n"))
    assert (code, closed, body["error"]) == (413, True, f"request too large ({cap + 1} bytes; at most {cap})")
    # 3 MiB sent under a declared 20 bytes: 20 are read (a 400: not JSON), the rest is never taken as a body
    code, _, _ = exchange(port, post(path, "Content-Length: 20\r\n", b"x" * (3 << 20)))
    assert code == 400
    chunked = b"5\r\nhello\r\n0\r\n\r\n"
    code, body, closed = exchange(port, post(path, "Transfer-Encoding: chunked\r\n", chunked))
    assert (code, closed) == (411, True)
    code, _, _ = exchange(port, post(path, f"Content-Length: {len(good)}\r\n", good))
    assert code == 200  # and the server still does its work
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_that_goes_silent_mid_body_is_let_go(target, monkeypatch, capfd):
    port, path, _ = target
    monkeypatch.setattr(TokenHandler, "timeout", 0.3)
    code, _, closed = exchange(port, post(path, "Content-Length: 100\r\n", b'{"boxes"'))
    assert (code, closed) == (None, True)  # dropped after the silence, nothing half-done
    assert "Traceback" not in capfd.readouterr().err
