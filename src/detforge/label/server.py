"""What the two browser apps (``label``, ``review``) share: a loopback-only HTTP server behind a token.

``LocalServer`` listens on a loopback address only and makes a random token; ``TokenHandler`` checks
every request's ``Host`` (a loopback name: no DNS rebinding) and token, reads bodies within a cap (a
``Content-Length`` that is not a whole number is a 400, one over the cap a 413, and no more than it is read)
and has the small send helpers. ``inline_page`` serves a page with its CSS and JS inlined (one request,
works offline). ``open_in_browser`` opens the page through a private redirect file, as Jupyter does, so the
token never appears on a browser's command line (which every local user can read in the process list).
Not here: the apps' routes and data (``label.app``, ``label.review``).
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import os
import pathlib
import re
import secrets
import tempfile
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


def open_in_browser(url: str) -> str:
    """Open ``url`` in the default browser through a redirect file readable by this user only; returns its
    path (remove it when the server stops). The browser's command line names the file, not the token."""
    import webbrowser

    folder = tempfile.mkdtemp(prefix="detforge-")  # 0700
    path = os.path.join(folder, "open.html")
    quoted = html.escape(url, quote=True)
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="0;url={quoted}"><title>opening detforge</title></head>'
        f'<body><p>Opening <a href="{quoted}">the page</a>...</p></body></html>'
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(page)
    webbrowser.open(pathlib.Path(path).as_uri())
    return path


def remove_redirect(path: str | None) -> None:
    """Delete what ``open_in_browser`` wrote (a no-op for None)."""
    if path is None:
        return
    for remove, target in ((os.remove, path), (os.rmdir, os.path.dirname(path))):
        try:
            remove(target)
        except OSError:
            pass


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

    def __init__(
        self, handler: type[BaseHTTPRequestHandler], *, host: str, port: int, token: str | None = None
    ) -> None:
        if not is_loopback(host):
            raise ConfigError(
                f"the `{self.command}` server listens on loopback only, not {host!r}",
                field="--host",
                hint="use 127.0.0.1 and an SSH tunnel from another machine",
            )
        self.token = token or secrets.token_urlsafe(24)
        super().__init__((host, port), handler)

    @property
    def url(self) -> str:
        """The page's address, token included."""
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/?token={self.token}"


class TokenHandler(BaseHTTPRequestHandler):
    """Request handler base: token and Host checks, capped bodies, JSON and error answers, quiet logging."""

    server: LocalServer
    timeout = 30  # seconds a connection may stay silent (a client that never finishes cannot hold a thread)

    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's name
        pass  # the terminal is for the summary, not one line per thumbnail

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
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

    def _item_index(self, key: str, count: int, what: str) -> int | None:
        """The index a URL segment names, or None after answering 400 (not a whole number in ASCII digits:
        ``²`` and ``٣`` pass ``str.isdigit`` but are no index) or 404 (not below ``count``)."""
        if not (key.isascii() and key.isdigit()):
            self._error(400, f"{what} are fetched by their index, a whole number, not {key[:40]!r}")
            return None
        index = int(key)
        if index >= count:
            self._error(404, f"no {what[:-1]} {index}: there are {count}")
            return None
        return index

    def _read_body(self, limit: int) -> bytes | None:
        """The request body, at most ``limit`` bytes; None after answering 400/411/413 when it cannot be read.

        The cap holds for what is read, whatever is declared: a negative or non-numeric ``Content-Length``
        is a 400 (a ``-1`` would read to the end of the stream), one above ``limit`` a 413 before anything
        is read, and a chunked body (not decoded by this server) a 411. Any of these closes the connection,
        as the unread rest must not be taken for the next request.
        """
        declared = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(411, "send the body with a Content-Length")
            return None
        if declared is None:
            return b""
        declared = declared.strip()
        if not (declared.isascii() and declared.isdigit()):
            self.close_connection = True
            self._error(400, f"Content-Length must be a whole number of bytes, got {declared[:40]!r}")
            return None
        length = int(declared)
        if length > limit:
            self.close_connection = True
            self._error(413, f"request too large ({length} bytes; at most {limit})")
            return None
        try:
            body = self.rfile.read(length)
        except OSError:  # the client went silent past ``timeout`` or away: nothing to answer
            self.close_connection = True
            return None
        if len(body) < length:
            self.close_connection = True
            self._error(400, f"the body ended after {len(body)} of {length} bytes")
            return None
        return body

    def _parse(self) -> tuple[str, dict[str, list[str]]]:
        url = urllib.parse.urlsplit(self.path)
        return urllib.parse.unquote(url.path), urllib.parse.parse_qs(url.query)

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self.do_GET()
