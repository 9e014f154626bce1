"""``detforge serve`` against slow, greedy and vanishing clients: the real server (``detforge serve`` in a
subprocess, uvicorn on a free loopback port) and real sockets.

A body declared over the limit that never comes (413 at once, read by a client still sending it too);
unfinished headers, one byte at a time or not at all (408 at the header deadline, and one client cannot
take every connection: another client's ``/ping`` and ``/invocations`` are answered meanwhile); bodies
sent a few bytes at a time (408 at the body deadline, holding nothing another client needs); clients that
hang up mid-request (their own outcome: no 500, one log line each, ``status="disconnected"``); bursts
(queued up to ``--max-queue``, not shed).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import httpx
import pytest
from test_serve import png_bytes, start_server, stop_server

OTHER_CLIENT = "127.0.0.2"  # another client address on loopback: Linux answers all of 127/8


def other_client() -> httpx.Client:
    """An HTTP client whose connections come from ``OTHER_CLIENT``."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=OTHER_CLIENT), timeout=60)


def metric(url: str, name: str) -> float:
    """A value on /metrics, asked from ``OTHER_CLIENT`` (127.0.0.1 may be using all its connections)."""
    with other_client() as client:
        for line in client.get(f"{url}/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
    return 0.0  # a labelled counter not counted yet


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(port: int, head: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))
    sock.sendall(head)
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Read until the server closes: (status, headers, JSON body)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, json.loads(body)


def post_head(length: int, content_type: str = "image/png") -> bytes:
    return (
        f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    """A folder JSON Lines requests may name (``--allow-path``), holding a.png."""
    folder = tmp_path_factory.mktemp("allowed")
    (folder / "a.png").write_bytes(png_bytes(80, 60, seed=1))
    return folder


@pytest.fixture(scope="module")
def guarded(tiny_deploy):
    """A server with short deadlines and small connection limits, so the tests need not wait long."""
    process, url = start_server(
        tiny_deploy,
        "--header-timeout",
        "1",
        "--body-timeout",
        "6",
        "--max-client-connections",
        "8",
        "--max-connections",
        "24",
        "--max-body-mb",
        "1",
    )
    try:
        yield url, process
    finally:
        assert stop_server(process) == 0


def test_a_declared_oversized_body_gets_413_at_once(guarded):
    url, _ = guarded
    sock = connect(port_of(url), post_head(7 * 2**20))  # 7 MiB declared, not a byte of it sent
    status, headers, body = read_answer(sock)  # the server answers and closes: recv() ends
    assert (status, headers["connection"]) == (413, "close")
    assert body == {"error": "body of 7340032 bytes is over the limit of 1048576 bytes (--max-body-mb)"}
    # a client that writes its whole body before reading (urllib) still reads the 413, not a reset
    request = urllib.request.Request(
        f"{url}/invocations", data=b"\xff" * (7 * 2**20), headers={"Content-Type": "image/jpeg"}
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=60)
    assert answer.value.code == 413
    assert json.loads(answer.value.read()) == body
    assert httpx.get(f"{url}/ping").status_code == 200


def test_unfinished_headers_get_408_and_do_not_take_the_server(guarded):
    url, _ = guarded
    port = port_of(url)
    timeouts = metric(url, 'detforge_request_timeouts_total{phase="headers"}')
    stop = threading.Event()
    silent = [connect(port, b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(7)]
    dribbler = connect(port, b"P")  # slowloris: one more header byte every 50 ms never extends the deadline

    def dribble() -> None:
        for byte in b"OST /invocations HTTP/1.1\r\nX-Slow: " + b"a" * 10_000:
            if stop.wait(0.05):
                return
            try:
                dribbler.send(bytes([byte]))
            except OSError:
                return

    thread = threading.Thread(target=dribble)
    thread.start()
    try:
        refused = connect(port, b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # a 9th from this client
        status, headers, body = read_answer(refused)
        assert (status, headers["retry-after"]) == (503, "1")
        assert body == {
            "error": "the server is full (8 connections open from 127.0.0.1 "
            "(--max-client-connections)); retry after 1 s"
        }
        with other_client() as client:  # meanwhile another client is served, and /ping says so
            assert client.get(f"{url}/ping").json() == {"status": "ok"}
            answer = client.post(
                f"{url}/invocations", content=png_bytes(40, 30), headers={"Content-Type": "image/png"}
            )
            assert answer.status_code == 200 and isinstance(answer.json()["prediction"], list)
        for sock in [*silent, dribbler]:
            status, headers, body = read_answer(sock)
            assert (status, headers["connection"]) == (408, "close")
            assert body == {"error": "request headers not received within 1 s (--header-timeout)"}
    finally:
        stop.set()
        thread.join(30)
    assert metric(url, 'detforge_request_timeouts_total{phase="headers"}') == timeouts + 8
    assert metric(url, 'detforge_connections_refused_total{reason="client"}') >= 1
    # the deadline holds for the next request on a kept-alive connection too
    sock = connect(port, b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /ping HTTP/1.1\r\n", OTHER_CLIENT)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    first, _, rest = data.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 408 Request Timeout" in rest
    deadline = time.monotonic() + 30
    while True:  # all of 127.0.0.1's connections come back once the refused ones are closed
        try:
            if httpx.get(f"{url}/ping").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "127.0.0.1 still refused"
        time.sleep(0.05)


def test_slow_bodies_get_408_and_hold_nothing_another_client_needs(guarded):
    url, _ = guarded
    port = port_of(url)
    timeouts = metric(url, 'detforge_request_timeouts_total{phase="body"}')
    slow = [connect(port, post_head(1000) + b"0123456789") for _ in range(8)]  # 10 of 1000 bytes each
    with other_client() as client:
        deadline = time.monotonic() + 30
        while metric(url, "detforge_requests_in_progress") < 8:
            assert time.monotonic() < deadline, "the slow requests did not reach the server"
            time.sleep(0.02)
        assert client.get(f"{url}/ping").json() == {"status": "ok"}
        answer = client.post(
            f"{url}/invocations", content=png_bytes(40, 30), headers={"Content-Type": "image/png"}
        )
        assert answer.status_code == 200
    for sock in slow:  # still held, unanswered, while the other client was served
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
        sock.settimeout(60)
    for sock in slow:
        status, headers, body = read_answer(sock)
        assert (status, headers["connection"]) == (408, "close")
        assert re.fullmatch(
            r"body not received in time: 10 of 1000 bytes after \d+\.\d s "
            r"\(--body-timeout 6 s, then at least 64 KiB/s\)",
            body["error"],
        ), body
    assert metric(url, 'detforge_request_timeouts_total{phase="body"}') == timeouts + 8
    assert metric(url, "detforge_requests_in_progress") == 0


def test_a_client_disconnect_is_its_own_outcome(tiny_deploy):
    process, url = start_server(tiny_deploy, "--log-level", "info")
    port = port_of(url)
    try:
        for _ in range(32):  # the issue's 32: headers and half of a body, then gone
            sock = connect(port, post_head(1000) + b"x" * 500)
            sock.close()
        deadline = time.monotonic() + 30
        while metric(url, 'detforge_requests_total{endpoint="/invocations",status="disconnected"}') != 32:
            assert time.monotonic() < deadline, "the disconnects were not counted"
            time.sleep(0.02)
        page = httpx.get(f"{url}/metrics").text
        assert 'status="500"' not in page
        assert "detforge_request_errors_total 0.0" in page
        assert httpx.get(f"{url}/ping").status_code == 200
    finally:
        assert stop_server(process) == 0
    log = process.stdout.read().splitlines()
    disconnects = [line for line in log if "disconnected" in line]
    assert len(disconnects) == 32
    # the app may see the hang-up before or after the half body it came with
    said = re.compile(
        r"INFO: +client 127\.0\.0\.1 disconnected while sending its request "
        r"\((0|500) of 1000 body bytes received\): not answered"
    )
    assert all(said.fullmatch(line) for line in disconnects), disconnects[:3]
    assert not [line for line in log if "Traceback" in line or "ERROR" in line]


def test_a_burst_is_queued_not_shed(tiny_deploy, allowed):
    process, url = start_server(tiny_deploy, "--allow-path", str(allowed))  # default limits
    try:
        body = png_bytes(48, 36, seed=11)
        barrier = threading.Barrier(40)
        statuses: list[int] = []

        def one(wait: bool) -> None:
            with httpx.Client(timeout=120) as client:
                if wait:
                    barrier.wait()
                statuses.append(
                    client.post(
                        f"{url}/invocations", content=body, headers={"Content-Type": "image/png"}
                    ).status_code
                )

        threads = [threading.Thread(target=one, args=(True,)) for _ in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert statuses == [200] * 40  # the issue's burst of 40 got 24 x 503

        # a 64-image JSON Lines request and 12 single images beside it: 76 images, within the queue of 100
        line = json.dumps({"source-ref": str(allowed / "a.png")})
        big: list[httpx.Response] = []
        big_thread = threading.Thread(
            target=lambda: big.append(
                httpx.post(
                    f"{url}/invocations",
                    content="\n".join([line] * 64),
                    timeout=120,
                    headers={"Content-Type": "application/jsonlines"},
                )
            )
        )
        big_thread.start()
        singles = [threading.Thread(target=one, args=(False,)) for _ in range(12)]
        for thread in singles:
            thread.start()
        for thread in [big_thread, *singles]:
            thread.join(120)
        assert big[0].status_code == 200 and len(big[0].text.splitlines()) == 64
        assert statuses == [200] * 52  # the issue's 12 of 12 got 503
        assert metric(url, 'detforge_requests_total{endpoint="/invocations",status="200"}') == 53
    finally:
        assert stop_server(process) == 0
