"""The loopback server's Host check (``detforge.label.server``, behind ``label`` and ``review``): every
spelling of a loopback Host is accepted, with or without a port, IPv6 in brackets included; anything else,
a malformed one included, is refused with 403. Real server on a free loopback port, raw HTTP requests."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from detforge.label.server import LocalServer, TokenHandler


class Echo(TokenHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self._authorized({}):
            self._json(200, {"ok": True})


@pytest.fixture
def server():
    srv = LocalServer(Echo, host="127.0.0.1", port=0, token="secret-token")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def ask(port: int, host: str) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"GET / HTTP/1.1\r\nHost: {host}\r\nX-Detforge-Token: secret-token\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


@pytest.mark.parametrize(
    "host",
    [
        "[::1]",
        "[::1]:8080",
        "127.0.0.1",
        "127.0.0.1:8080",
        "localhost",
        "localhost:8080",
        "LOCALHOST",
        "127.0.0.2:80",
        "[0:0:0:0:0:0:0:1]:1",
    ],
)
def test_loopback_hosts_are_accepted(server, host):
    assert ask(server, host) == (200, {"ok": True})


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:80",
        "[::1",
        "[::1]x",
        "[evil.example]",
        "10.0.0.1:80",
        "[::2]",
        "",
        "127.0.0.1.evil.example",
        "x@127.0.0.1",
        "127.0.0.1:80:80",
    ],
)
def test_other_hosts_are_refused(server, host):
    assert ask(server, host) == (403, {"error": "wrong Host header"})
