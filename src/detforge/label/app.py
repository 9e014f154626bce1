"""``detforge label``'s local server: the labeling page and a small JSON API over a ``LabelJob``.

A stdlib HTTP server bound to loopback, every request checked for a loopback ``Host`` and the random
token printed in the URL. Items go to the page in pages (``/api/items?offset=&limit=``), one image's
boxes and proposals at a time (``/api/item/<i>``), images by index only. Every change the page sends
(``POST /api/item/<i>``) is written to the output manifest before the answer, so stopping the server
(Ctrl+C) loses nothing. Not here: the job's data and its output format (``label.jobs``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import orjson

from detforge.errors import ConfigError, DetforgeError
from detforge.label.jobs import PROPOSAL_FLOOR, LabelJob, open_job
from detforge.label.server import (
    LocalServer,
    TokenHandler,
    inline_page,
    open_in_browser,
    remove_redirect,
)

MAX_PAGE = 500  # items per /api/items answer
MAX_BODY = 1 << 20


class LabelServer(LocalServer):
    """A LabelJob behind a token, on a loopback address."""

    command = "detforge label"

    def __init__(
        self,
        job: LabelJob,
        *,
        host: str = "127.0.0.1",
        port: int = 8766,
        token: str | None = None,
        threshold: float = 0.5,
    ) -> None:
        self.job = job
        self.threshold = threshold
        super().__init__(_Handler, host=host, port=port, token=token)

    def job_info(self) -> dict:
        job = self.job
        start = job.next_todo(0)
        return {
            "classes": [[cid, name] for cid, name in sorted(job.class_map.items())],
            "adjust": job.adjust,
            "attribute": job.attribute,
            "job": job.job_name,
            "manifest": job.manifest,
            "out": job.out,
            "total": len(job.items),
            "order": job.order_name,
            "model": job.predictor is not None,
            "threshold": self.threshold,
            "floor": PROPOSAL_FLOOR,
            "progress": job.progress(),
            "start": 0 if start is None else start,
        }


def _int(query: dict[str, list[str]], key: str, default: int) -> int:
    value = (query.get(key) or [""])[0]
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"{key} must be a whole number, got {value!r}") from None


class _Handler(TokenHandler):
    server: LabelServer
    server_version = "detforge-label"

    def _index(self, key: str) -> int | None:
        return self._item_index(key, len(self.server.job.items), "items")

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path, query = self._parse()
        if not self._authorized(query):
            return
        job = self.server.job
        try:
            if path in ("/", "/index.html"):
                self._send(
                    200,
                    inline_page("label", self.server.token),
                    "text/html; charset=utf-8",
                    {"Cache-Control": "no-store"},
                )
            elif path == "/api/job":
                self._json(200, self.server.job_info())
            elif path == "/api/items":
                limit = min(max(_int(query, "limit", 100), 0), MAX_PAGE)
                self._json(200, {"items": job.page(_int(query, "offset", 0), limit), "total": len(job.items)})
            elif path == "/api/next":
                pos = job.next_todo(_int(query, "from", 0), -1 if _int(query, "step", 1) < 0 else 1)
                self._json(200, {"pos": pos})
            elif path.startswith("/api/item/"):
                index = self._index(path[len("/api/item/") :])
                if index is not None:
                    self._json(200, job.detail(index))
            elif path.startswith("/api/image/"):
                index = self._index(path[len("/api/image/") :])
                if index is not None:
                    thumb = (query.get("size") or [""])[0] == "thumb"
                    data, content_type = job.image_bytes(index, thumb=thumb)
                    self._send(200, data, content_type, {"Cache-Control": "private, max-age=3600"})
            else:
                self._error(404, "not found")
        except ConfigError as exc:
            self._error(400, str(exc))
        except DetforgeError as exc:
            self._error(502, str(exc))

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        path, query = self._parse()
        if not self._authorized(query):
            return
        if not path.startswith("/api/item/"):
            self._error(404, "not found")
            return
        index = self._index(path[len("/api/item/") :])
        if index is None:
            return
        data = self._read_body(MAX_BODY)
        if data is None:
            return
        try:
            body = orjson.loads(data or b"{}")
            if not isinstance(body, dict):
                raise ConfigError('expected JSON {"boxes": [[x1, y1, x2, y2, class_id, score|null], ...]}')
            done = body.get("done", True) is not False
            summary = self.server.job.update(index, body.get("boxes"), done=done)
        except orjson.JSONDecodeError:
            self._error(400, 'expected JSON {"boxes": [[x1, y1, x2, y2, class_id, score|null], ...]}')
            return
        except ConfigError as exc:
            self._error(400, str(exc))
            return
        except DetforgeError as exc:
            self._error(500, f"could not save: {exc}")
            return
        self._json(200, {"item": summary, "progress": self.server.job.progress()})


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``OUT.lock`` (an exclusive ``flock``) while a job writes its output: a second ``detforge label``
    on the same local output is refused instead of the two overwriting each other's boxes. The lock goes
    with the process (also when it is killed); an ``s3://`` output and systems without ``flock`` have none.
    """
    from detforge import storage

    out = os.fspath(out)
    if storage.is_remote(out):
        yield
        return
    lock = storage.FileLock(os.path.abspath(out) + ".lock")
    holder = lock.acquire()
    if holder is not None:
        raise ConfigError(
            f"another detforge label is writing this output ({holder})",
            path=out,
            field="--out",
            hint="stop it first, or write to another --out",
        )
    try:
        yield
    finally:
        lock.release()


def label(
    manifest: str | os.PathLike,
    *,
    out: str | os.PathLike,
    classes: str | Sequence[str] | None = None,
    adjust: bool = False,
    label_attribute: str | None = None,
    job_name: str | None = None,
    model: str | os.PathLike | None = None,
    order: str = "manifest",
    threshold: float | None = None,
    host: str = "127.0.0.1",
    port: int = 8766,
    open_browser: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    on_ready: Callable[[LabelServer], None] | None = None,
    tiling: dict | None = None,
) -> LabelJob:
    """Open the job (resuming its output) and serve the labeling page until interrupted; returns the job.

    ``model``: a deploy folder whose detections are offered as proposals; ``threshold`` is where the
    page's slider starts (default: the model's ``default_threshold``). ``on_progress(done, total)``
    follows the model's pass over every image for ``order="uncertainty"``; ``on_ready(server)`` is called
    once the server listens (the CLI prints ``server.url`` there). ``tiling``: the model's ``tile``,
    ``overlap``, ``full_pass`` (``runtime.Predictor``; default: its model.json's tiling).
    """
    with output_lock(out):
        return _label(
            manifest,
            out=out,
            classes=classes,
            adjust=adjust,
            label_attribute=label_attribute,
            job_name=job_name,
            model=model,
            order=order,
            threshold=threshold,
            host=host,
            port=port,
            open_browser=open_browser,
            on_progress=on_progress,
            on_ready=on_ready,
            tiling=tiling,
        )


def _label(
    manifest,
    *,
    out,
    classes,
    adjust,
    label_attribute,
    job_name,
    model,
    order,
    threshold,
    host,
    port,
    open_browser,
    on_progress,
    on_ready,
    tiling=None,
) -> LabelJob:
    predictor = None
    if model is not None:
        from detforge.runtime import Predictor

        predictor = Predictor(model, **(tiling or {}))
    job = open_job(
        manifest,
        out=out,
        classes=classes,
        adjust=adjust,
        label_attribute=label_attribute,
        job_name=job_name,
        predictor=predictor,
        order=order,
        on_progress=on_progress,
    )
    if threshold is None:
        threshold = predictor.threshold if predictor is not None else 0.5
    if not PROPOSAL_FLOOR <= threshold <= 1:
        raise ConfigError(
            f"the threshold must be between {PROPOSAL_FLOOR} and 1, got {threshold}", field="--threshold"
        )
    try:
        server = LabelServer(job, host=host, port=port, threshold=max(threshold, PROPOSAL_FLOOR))
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            field="--port",
            hint="choose another --port",
        ) from None
    redirect = None
    try:  # Ctrl+C at any moment from here on is a normal stop: every change is already saved
        if on_ready is not None:
            on_ready(server)
        if open_browser:
            redirect = open_in_browser(server.url)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        remove_redirect(redirect)
    return job
