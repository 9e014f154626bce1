"""What the two browser apps (``label``, ``review``) share: a loopback-only HTTP server behind a token.

``LocalServer`` listens on a loopback address only and makes a random token; ``TokenHandler`` checks
every request's ``Host`` (a loopback name: no DNS rebinding) and token, and has the small send helpers.
``inline_page`` serves a page with its CSS and JS inlined (one request, works offline).
Not here: the apps' routes and data (``label.app``, ``label.review``).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import orjson

from detforge.errors import ConfigError

TOKEN_HEADER = "X-Detforge-Token"
# a Host header: a bracketed IPv6 address or a name/IPv4 address, then an optional port
HOST_HEADER = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::\d{1,5})?|([^:\[\]@/?#\s]+)(?::\d{1,5})?")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def inline_page(name: str, token: str) -> bytes:
    """``static/<name>.html`` with ``/*<NAME>_CSS*/`` and ``/*<NAME>_JS*/`` replaced by the files."""
    static = resources.files("detforge.label") / "static"
    html = (static / f"{name}.html").read_text(encoding="utf-8")
    for suffix in ("css", "js"):
        text = (static / f"{name}.{suffix}").read_text(encoding="utf-8")
        html = html.replace(f"/*{name.upper()}_{suffix.upper()}*/", text)
    return html.replace("__TOKEN__", token).encode("utf-8")


class LocalServer(ThreadingHTTPServer):
    """A threading HTTP server on a loopback address with a random token; ``command`` names the app."""

    daemon_threads = True
    command = "detforge"

    def __init__(self, handler: type[BaseHTTPRequestHandler], *, host: str, port: int,
                 token: str | None = None) -> None:
        if not is_loopback(host):
            raise ConfigError(f"the `{self.command}` server listens on loopback only, not {host!r}",
                              field="--host", hint="use 127.0.0.1 and an SSH tunnel from another machine")
        self.token = token or secrets.token_urlsafe(24)
        super().__init__((host, port), handler)

    @property
    def url(self) -> str:
        """The page's address, token included."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/?token={self.token}"


class TokenHandler(BaseHTTPRequestHandler):
    """Request handler base: token and Host checks, JSON and error answers, quiet logging."""

    server: LocalServer

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's name
        pass  # the terminal is for the summary, not one line per thumbnail

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, orjson.dumps(obj), headers={"Cache-Control": "no-store"})

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _authorized(self, query: dict[str, list[str]]) -> bool:
        # The Host check stops DNS-rebinding pages from talking to us; the token stops everyone else.
        # "[::1]", "[::1]:8080", "localhost", "127.0.0.1:80"; anything else ("[::1", "x@127.0.0.1") is refused
        match = HOST_HEADER.fullmatch(self.headers.get("Host") or "")
        if match is None or not is_loopback((match[1] or match[2]).lower()):
            self._error(403, "wrong Host header")
            return False
        given = self.headers.get(TOKEN_HEADER) or (query.get("token") or [""])[0]
        if not given:
            self._error(401, f"missing token: open the URL printed by `{self.server.command}`")
            return False
        if not hmac.compare_digest(given.encode(), self.server.token.encode()):
            self._error(403, "wrong token")
            return False
        return True

    def _parse(self) -> tuple[str, dict[str, list[str]]]:
        url = urllib.parse.urlsplit(self.path)
        return urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self.do_GET()
