"""``detforge serve``: a real-time HTTP endpoint that answers like a SageMaker object-detection endpoint.

In here: the Starlette app (``GET /ping``, ``POST /invocations``, ``GET /metrics``, ``GET /model``), safe
image decoding (body limit, decompression-bomb check before decoding), the dynamic batcher that folds
concurrent requests into one ``Predictor.predict`` call, back-pressure (bounded images per request, queued
images, requests in flight and connections; ``503`` with ``Retry-After`` when full, never a growing memory),
what a front end does against slow clients (``GuardedH11Protocol``: connections bounded in all and per
client, a deadline for request headers, a lingering close so a refused client reads its answer; the app
adds a body deadline and answers ``413`` from ``Content-Length`` before reading), client disconnects as
their own outcome, Prometheus metrics (``prometheus_client``, summed over ``--workers``), and ``serve()``
which runs it under uvicorn with a graceful SIGTERM. Answers never carry local paths or exception text.
Not in here: the model itself (``detforge.runtime``), the allowed-path rule for files named in
requests (``detforge.edge.sources.resolve_allowed_path``). No torch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import h11
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from detforge import images
from detforge.errors import ConfigError, DetforgeError
from detforge.storage import resolve_allowed_path

IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "application/x-image"})
JSONLINES_TYPES = frozenset({"application/jsonlines", "application/jsonl", "application/x-jsonlines"})
ACCEPTED = frozenset({"", "*/*", "application/*", "application/json", "application/jsonlines"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONFIG_ENV = "DETFORGE_SERVE_CONFIG"  # how `--workers N` hands the config to each worker process
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where `--workers N` processes write their metrics
BODY_MIN_RATE = 64 * 1024  # bytes a second: each one received adds 1/BODY_MIN_RATE s to the body deadline
LINGER_S = 2.0  # after an answer given before the request was read, its rest is read and dropped this long
METRICS_STATE = "detforge.metrics"  # the lifespan state key that hands the metrics to the connections
# What GET /model shows (model.json also holds local paths, the training run and every hyperparameter).
PUBLIC_MODEL_FIELDS = (
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
)
log = logging.getLogger("detforge.deploy.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Everything the endpoint needs; frozen once built from the command line."""

    deploy_dir: str
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_body_bytes: int = 6 * 1024 * 1024  # SageMaker's own invocation payload limit
    max_pixels: int = 40_000_000
    threads: int | None = None
    threshold: float | None = None
    allow_paths: tuple[str, ...] = ()
    decode_threads: int = 2
    max_images: int = 64  # images one JSON Lines request may name
    max_queue: int = 100  # images accepted and not yet answered, all requests together (TorchServe's 100)
    max_in_flight: int = 128  # /invocations requests between their headers and their answer
    max_connections: int = 256  # open connections, all clients together
    max_client_connections: int = 64  # open connections from one client address
    header_timeout_s: float = 10.0  # from connecting (or the last answer) to a request's complete headers
    body_timeout_s: float = 10.0  # to receive a body, plus 1 s for every BODY_MIN_RATE bytes received
    retry_after_s: int = 1  # the Retry-After of a 503
    tile: int | None = None  # tiled inference (detforge.tiling); None: as model.json says, 0: off
    overlap: float | None = None
    tile_full_pass: bool | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_images",
            "max_queue",
            "max_in_flight",
            "max_connections",
            "max_client_connections",
            "retry_after_s",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, name)}", field=name)
        if self.max_images > self.max_queue:  # such a request could never be accepted
            raise ConfigError(
                f"must be at most max_queue ({self.max_queue}), got {self.max_images}", field="max_images"
            )
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"must be more than 0, got {getattr(self, name)}", field=name)
        if self.max_batch < 1:
            raise ConfigError(f"must be at least 1, got {self.max_batch}", field="max_batch")
        if self.max_wait_ms < 0:
            raise ConfigError(f"must be 0 or more, got {self.max_wait_ms}", field="max_wait_ms")
        if self.max_body_bytes < 1:
            raise ConfigError(f"must be at least 1, got {self.max_body_bytes}", field="max_body_bytes")
        if self.max_pixels < 1:
            raise ConfigError(f"must be at least 1, got {self.max_pixels}", field="max_pixels")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"must be within [0, 1], got {self.threshold}", field="threshold")
        for path in self.allow_paths:
            if not os.path.isdir(path):
                raise ConfigError("not a folder", path=path, field="allow_path")


class BadInput(Exception):
    """A request the server refuses: becomes a 4xx JSON error ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Busy(Exception):
    """The server is full (``what``: requests or queue): becomes 503 with ``Retry-After``."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode image bytes to an ``HxWx3`` uint8 RGB array, checking the size before decoding pixels.

    Raises BadInput: 400 for empty/unreadable/truncated data, 413 for more than ``max_pixels`` pixels
    (a decompression bomb is refused from its header, before any pixel memory is allocated).
    """
    if not data:
        raise BadInput(400, "empty body: send the image bytes")
    try:
        return images.decode(data, name="body", max_pixels=max_pixels)
    except images.ImageError as exc:
        if exc.too_large:
            raise BadInput(413, f"{exc.message} (--max-pixels)") from None
        raise BadInput(400, f"{exc.message} (send JPEG, PNG, WebP or BMP)") from None


class Metrics:
    """The Prometheus metrics of the endpoint (``prometheus_client``).

    One process: the metrics live in this app's own registry. Several workers (``--workers N``, or any
    server that sets ``PROMETHEUS_MULTIPROC_DIR``): every worker writes its values to files in that folder
    and each scrape, whichever worker answers it, adds up all of them.
    """

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        # in multiprocess mode the values go to files; registering them here too would count them twice
        registry = None if self.multiprocess_dir else CollectorRegistry()
        self.registry = registry
        self.requests = Counter(
            "detforge_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.errors = Counter(
            "detforge_request_errors", "Requests answered with a 4xx or 5xx status.", registry=registry
        )
        self.rejected = Counter(
            "detforge_requests_rejected",
            "Requests answered 503 because the server was full, by what was full.",
            ["reason"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "detforge_connections_refused",
            "Connections answered 503 and closed at once, by what was full (connections or client).",
            ["reason"],
            registry=registry,
        )
        self.timeouts = Counter(
            "detforge_request_timeouts",
            "Requests answered 408 because their headers or body did not arrive in time, by phase.",
            ["phase"],
            registry=registry,
        )
        self.in_progress = Gauge(
            "detforge_requests_in_progress",
            "/invocations requests being received or answered.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.latency = Histogram(
            "detforge_request_latency_seconds",
            "Time from receiving an /invocations request to its answer.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference = Histogram(
            "detforge_inference_seconds",
            "Time of one batched model run.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "detforge_batch_size", "Images per model run.", buckets=BATCH_BUCKETS, registry=registry
        )

    def count(self, endpoint: str, status: int | str, seconds: float | None = None) -> None:
        """Record one finished request (``status`` "disconnected": the client left before its answer)."""
        self.requests.labels(endpoint, str(status)).inc()
        if isinstance(status, int) and status >= 400:
            self.errors.inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def render(self) -> bytes:
        """The metrics page (Prometheus text format 0.0.4)."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)

    def process_ended(self) -> None:
        """Tell the multiprocess files this worker is gone (its in-progress gauge stops counting)."""
        if self.multiprocess_dir is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(os.getpid(), path=self.multiprocess_dir)


@dataclass
class _Job:
    image: np.ndarray
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Folds concurrent requests into one predictor call.

    A batch starts as soon as the model is free and one image waits. It takes every image already
    queued (up to ``max_batch`` model inputs: a tiled photo counts its tiles) and, only while other
    requests are still arriving (being received or decoded), waits up to ``max_wait_ms`` for them. A lone
    request therefore never waits, and under load batches fill up. The model runs in one worker thread,
    so runs never overlap.
    """

    def __init__(
        self, predictor, *, max_batch: int, max_wait_ms: float, threshold: float | None, metrics: Metrics
    ) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.threshold = threshold
        self.metrics = metrics
        self.arriving = 0  # requests started but not yet queued (or failed)
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detforge-model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Answer everything queued, then stop."""
        while not self._queue.empty():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def predict(self, image: np.ndarray):
        """Queue one decoded image; returns its ``Detections``."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(image, future))
        return await future

    async def _collect(self) -> list[_Job]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while self._work(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.monotonic()
            if self.arriving <= 0 or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    def _work(self, batch: list[_Job]) -> int:
        """Model inputs in ``batch``: a tiled model's photo counts its tiles (``Predictor.work``)."""
        work = getattr(self.predictor, "work", None)
        return sum(work(job.image) for job in batch) if work else len(batch)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor,
                    lambda b=batch: self.predictor.predict([j.image for j in b], threshold=self.threshold),
                )
            except Exception as exc:  # the model failed: every waiting request gets a 500, the server lives
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            self.metrics.inference.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch))
            for job, detections in zip(batch, results, strict=True):
                if not job.future.done():
                    job.future.set_result(detections)


def _json(payload, status: int = 200) -> Response:
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
    )


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


@dataclass
class _Progress:
    """How far one /invocations request got: its body, and whether it still counts as arriving."""

    received: int = 0  # body bytes received
    body_read: bool = False  # the whole body was read (else the answer closes the connection)
    arriving: bool = True  # counted in ``Batcher.arriving`` by the request (not yet by its images)


async def read_body(request: Request, limit: int, *, timeout_s: float, progress: _Progress) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) without keeping the excess in memory.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read. The body
    must arrive within ``timeout_s`` plus 1 s for every ``BODY_MIN_RATE`` bytes received (what Apache's
    mod_reqtimeout does), else 408: a client sending a few bytes a second cannot hold a request slot.
    Raises ``ClientDisconnect`` when the client goes away meanwhile.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise BadInput(400, f"bad Content-Length header {declared!r}") from exc
        if size > limit:
            raise BadInput(413, f"body of {size} bytes is over the limit of {limit} bytes (--max-body-mb)")
    chunks = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(started + timeout_s) as deadline:
            async for chunk in request.stream():
                progress.received += len(chunk)
                if progress.received > limit:
                    raise BadInput(413, f"body is over the limit of {limit} bytes (--max-body-mb)")
                chunks.append(chunk)
                deadline.reschedule(started + timeout_s + progress.received / BODY_MIN_RATE)
    except TimeoutError:
        of = f" of {declared}" if declared is not None else ""
        raise BadInput(
            408,
            f"body not received in time: {progress.received}{of} bytes after {loop.time() - started:.1f} s "
            f"(--body-timeout {timeout_s:g} s, then at least {BODY_MIN_RATE // 1024} KiB/s)",
        ) from None
    progress.body_read = True
    return b"".join(chunks)


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def public_model_info(metadata: dict, *, threshold: float) -> dict:
    """What ``GET /model`` tells anyone who asks: the model's identity and contract, nothing local."""
    info = {key: metadata[key] for key in PUBLIC_MODEL_FIELDS if key in metadata}
    info["threshold"] = threshold
    return info


def create_app(config: ServeConfig, predictor=None) -> Starlette:
    """The endpoint as an ASGI app; loads the model (``predictor`` may be given) before returning."""
    if predictor is None:
        from detforge.runtime import Predictor

        predictor = Predictor(
            config.deploy_dir,
            threads=config.threads,
            tile=config.tile,
            overlap=config.overlap,
            full_pass=config.tile_full_pass,
        )
    _warm_up(predictor)
    metrics = Metrics()
    batcher = Batcher(
        predictor,
        max_batch=config.max_batch,
        max_wait_ms=config.max_wait_ms,
        threshold=config.threshold,
        metrics=metrics,
    )
    decode_pool = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="detforge-decode")
    threshold = float(predictor.threshold if config.threshold is None else config.threshold)
    model_json = orjson.dumps(
        public_model_info(dict(predictor.metadata), threshold=threshold), option=orjson.OPT_SERIALIZE_NUMPY
    )
    # decoded images held (being decoded, waiting for the model or in it), whatever the queue and requests
    decoded = asyncio.Semaphore(2 * config.max_batch)
    state = {"ready": False, "in_flight": 0, "queued": 0}  # queued: images accepted and not yet answered

    def full() -> str | None:
        """What is full (``requests`` or ``queue``), or None if a one-image request would be accepted."""
        if state["in_flight"] >= config.max_in_flight:
            return "requests"
        return "queue" if state["queued"] >= config.max_queue else None

    async def ping(request: Request) -> Response:
        """200 while a request would be accepted: 503 while starting, stopping or full (with Retry-After)."""
        if not state["ready"]:
            metrics.count("/ping", 503)
            return _json({"status": "starting"}, 503)
        what = full()
        if what is not None:
            metrics.count("/ping", 503)
            response = _json({"status": "full", "full": what}, 503)
            response.headers["Retry-After"] = str(config.retry_after_s)
            return response
        metrics.count("/ping", 200)
        return _json({"status": "ok"})

    async def model(request: Request) -> Response:
        metrics.count("/model", 200)
        return Response(model_json, media_type="application/json")

    async def metrics_page(request: Request) -> Response:
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

        metrics.count("/metrics", 200)
        return Response(metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    def enqueue(images: int) -> None:
        """Count ``images`` into the queue, or refuse the request (503) if they do not all fit."""
        if state["queued"] + images > config.max_queue:
            raise Busy("queue")
        state["queued"] += images

    async def detect(read) -> object:
        """Read (``read()`` -> bytes, in the decode pool), decode and run one accepted image, holding a
        decoded-image slot from decoding to its answer."""
        loop = asyncio.get_running_loop()
        try:
            batcher.arriving += 1
            arrived = False
            try:
                async with decoded:
                    data = await loop.run_in_executor(decode_pool, read)
                    image = await loop.run_in_executor(
                        decode_pool, lambda: decode_image(data, max_pixels=config.max_pixels)
                    )
                    batcher.arriving -= 1
                    arrived = True
                    data = b""  # the encoded bytes are not needed while the image waits for the model
                    return await batcher.predict(image)
            finally:
                if not arrived:
                    batcher.arriving -= 1
        finally:
            state["queued"] -= 1

    async def answer(request: Request, progress: _Progress) -> Response:
        """The answer to one /invocations request; sets ``progress.arriving`` False once its images count
        themselves in ``batcher.arriving``."""
        accept = request.headers.get("accept", "")
        if not {a.split(";", 1)[0].strip().lower() for a in accept.split(",")} & ACCEPTED:
            raise BadInput(406, f"cannot answer in {accept!r}: ask for application/json")
        content_type = request.headers.get("content-type")
        kind = _media_type(content_type)
        if not kind:
            raise BadInput(
                415,
                "missing Content-Type: send image/jpeg, image/png, application/x-image "
                "or application/jsonlines",
            )
        if kind in JSONLINES_TYPES:
            if not config.allow_paths:
                raise BadInput(
                    403,
                    "reading files named in a request is off; start the server with "
                    "--allow-path DIR to allow files under DIR",
                )
            body = await read_body(
                request, config.max_body_bytes, timeout_s=config.body_timeout_s, progress=progress
            )
            refs = _parse_jsonlines(body, max_images=config.max_images)
            paths = [_allowed_path(ref, number, config) for number, ref in refs]  # refusals in line order
            enqueue(len(paths))
            batcher.arriving -= 1  # from here each image counts itself while it is read and decoded
            progress.arriving = False
            outcomes = await asyncio.gather(
                *(detect(lambda p=path: _read_file(p)) for path in paths), return_exceptions=True
            )
            for outcome in outcomes:  # the first failure in line order decides the answer
                if isinstance(outcome, BaseException):
                    raise outcome
            lines = [
                orjson.dumps(
                    {"source-ref": ref, "prediction": det.to_sagemaker()}, option=orjson.OPT_SERIALIZE_NUMPY
                )
                for (_, ref), det in zip(refs, outcomes, strict=True)
            ]
            return Response(b"\n".join(lines) + b"\n", media_type="application/jsonlines")
        if kind in IMAGE_TYPES:
            body = await read_body(
                request, config.max_body_bytes, timeout_s=config.body_timeout_s, progress=progress
            )
            enqueue(1)
            batcher.arriving -= 1  # no await before detect() counts it again: the batcher sees no gap
            progress.arriving = False
            detections = await detect(lambda: body)
            return _json({"prediction": detections.to_sagemaker()})
        raise BadInput(
            415,
            f"unsupported Content-Type {content_type!r}: send image/jpeg, image/png, "
            "application/x-image or application/jsonlines",
        )

    async def invocations(request: Request) -> Response:
        started = time.perf_counter()
        if state["in_flight"] >= config.max_in_flight:
            metrics.rejected.labels("requests").inc()
            response = _busy(config, "requests")
            response.headers["Connection"] = "close"  # answered before the body: the rest is dropped
            metrics.count("/invocations", response.status_code, time.perf_counter() - started)
            return response
        state["in_flight"] += 1
        metrics.in_progress.inc()
        batcher.arriving += 1
        progress = _Progress()
        try:
            response = await answer(request, progress)
        except BadInput as exc:
            response = _error(exc.status, exc.message)
            if exc.status == 408:
                metrics.timeouts.labels("body").inc()
        except Busy as exc:
            metrics.rejected.labels(exc.what).inc()
            response = _busy(config, exc.what)
        except ClientDisconnect:
            response = None
        except Exception as exc:  # keep serving; the details go to the log, not to the client
            error_id = uuid.uuid4().hex[:12]
            log.error("request %s failed: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
            response = _error(500, f"internal error {error_id}: the server's log has the details")
        finally:
            state["in_flight"] -= 1
            metrics.in_progress.dec()
            if progress.arriving:
                batcher.arriving -= 1
        seconds = time.perf_counter() - started
        if response is None or (progress.body_read and await request.is_disconnected()):
            # the client went away: nobody reads an answer, and it is no server error (one line, no trace)
            client = request.client.host if request.client else "?"
            declared = request.headers.get("content-length")
            if response is None:
                log.info(
                    "client %s disconnected while sending its request (%d of %s body bytes received): "
                    "not answered",
                    client,
                    progress.received,
                    declared or "unknown",
                )
            else:
                log.info(
                    "client %s disconnected before its answer (%d after %.0f ms): not delivered",
                    client,
                    response.status_code,
                    seconds * 1000,
                )
            metrics.count("/invocations", "disconnected")
            return Response(status_code=204)  # uvicorn sends nothing to a gone client
        if not progress.body_read:
            response.headers["Connection"] = "close"  # answered before the body: the rest is dropped
        metrics.count("/invocations", response.status_code, seconds)
        return response

    async def http_error(request: Request, exc: HTTPException) -> Response:
        metrics.count(request.url.path if exc.status_code != 404 else "other", exc.status_code)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        state["ready"] = True
        try:
            yield {METRICS_STATE: metrics}  # what GuardedH11Protocol counts its refusals and timeouts in
        finally:
            state["ready"] = False
            await batcher.stop()
            decode_pool.shutdown(wait=True)
            metrics.process_ended()

    routes = [
        Route("/ping", ping, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/model", model, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.metrics = metrics
    app.state.batcher = batcher
    return app


def _busy(config: ServeConfig, what: str) -> Response:
    """503 with Retry-After (what SageMaker answers when an endpoint is overloaded)."""
    limits = {
        "requests": f"{config.max_in_flight} requests in flight (--max-in-flight)",
        "queue": f"{config.max_queue} images queued (--max-queue)",
    }
    response = _error(503, f"the server is full ({limits[what]}); retry after {config.retry_after_s} s")
    response.headers["Retry-After"] = str(config.retry_after_s)
    return response


def _warm_up(predictor) -> None:
    """One run on a blank image so the first request does not pay ONNX Runtime's start-up cost."""
    size = predictor.metadata.get("input_size") or predictor.metadata.get("image_shape") or 64
    side = int(size[0] if isinstance(size, list | tuple) else size)
    predictor.predict([np.zeros((side, side, 3), dtype=np.uint8)])


def _parse_jsonlines(body: bytes, *, max_images: int) -> list[tuple[int, str]]:
    refs = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise BadInput(400, f"line {number}: not JSON ({exc})") from exc
        ref = record.get("source-ref") if isinstance(record, dict) else None
        if not isinstance(ref, str) or not ref:
            raise BadInput(400, f'line {number}: needs a "source-ref" string')
        refs.append((number, ref))
        if len(refs) > max_images:
            raise BadInput(
                413, f"line {number}: more than {max_images} images in one request (--max-images); split it"
            )
    if not refs:
        raise BadInput(400, 'empty body: send one {"source-ref": ...} JSON object per line')
    return refs


def _allowed_path(ref: str, number: int, config: ServeConfig) -> str:
    """The local path a JSON Lines ref names, if it is allowed and not too big (403/413 otherwise)."""
    try:
        path = resolve_allowed_path(ref, config.allow_paths)
    except DetforgeError as exc:
        raise BadInput(403, f"line {number}: {exc}") from exc
    if os.path.getsize(path) > config.max_body_bytes:
        raise BadInput(413, f"line {number}: {ref} is over the limit of {config.max_body_bytes} bytes")
    return path


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


@dataclass
class ConnectionGuard:
    """The open connections of one server process, all together and per client address, and the limits
    ``GuardedH11Protocol`` holds them to. Picklable, so ``--workers N`` hands each worker its own."""

    max_connections: int
    max_client_connections: int
    header_timeout_s: float
    retry_after_s: int
    total: int = 0
    by_client: collections.Counter = field(default_factory=collections.Counter)

    @classmethod
    def of(cls, config: ServeConfig) -> ConnectionGuard:
        return cls(
            config.max_connections,
            config.max_client_connections,
            config.header_timeout_s,
            config.retry_after_s,
        )

    def admit(self, client: str) -> tuple[str, str] | None:
        """Count a new connection from ``client``; or (reason, message) when it must be refused."""
        if self.total >= self.max_connections:
            return "connections", f"{self.max_connections} connections open (--max-connections)"
        if self.by_client[client] >= self.max_client_connections:
            return "client", (
                f"{self.max_client_connections} connections open from {client} (--max-client-connections)"
            )
        self.total += 1
        self.by_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]


class _LingeringTransport:
    """The connection's transport, whose ``close()`` lingers while the client may still be sending.

    Closing a socket with unread data makes the kernel send a reset, and a client still writing its body
    (urllib, curl, most HTTP libraries) then loses the answer it was sent. So, like nginx's lingering
    close, the write side is shut after the answer and what still arrives is read and dropped, for at
    most ``LINGER_S``, before the socket closes. Everything else goes to the real transport.
    """

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._protocol.lingering:
            return  # it closes when the client is done, or after LINGER_S
        if self._protocol.client_may_be_sending():
            self._protocol.linger()
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with what a front end does against slow and greedy clients.

    uvicorn alone has no deadline for request headers (its keep-alive timer starts after an answer), and
    its ``limit_concurrency`` answers every request 503, ``/ping`` included and on connections it already
    holds, once that many connections are open: 256 connections sending half a header each would take the
    whole server for as long as they like. Here a new connection is refused (503 + ``Retry-After``, then
    closed) when ``--max-connections`` are open or its client address holds ``--max-client-connections``;
    a request whose headers are not complete ``--header-timeout`` seconds after the connection opened or
    the previous answer was sent gets 408 and the connection closes. Request headers are bounded in size
    by h11 itself (16 KiB, 400 above). The body deadline is the app's (``read_body``).
    """

    def __init__(self, config, server_state, app_state, _loop=None, *, guard: ConnectionGuard) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard = guard
        self.address = ""
        self.admitted = False
        self.lingering = False
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self.address = self.client[0] if self.client else ""
        refusal = self.guard.admit(self.address)
        if refusal is not None:
            reason, message = refusal
            self._count("connections_refused", reason)
            self._answer_and_close(
                503,
                f"the server is full ({message}); retry after {self.guard.retry_after_s} s",
                f"retry-after: {self.guard.retry_after_s}\r\n",
            )
            return
        self.admitted = True
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted:
            self.admitted = False
            self.guard.release(self.address)
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the answer is sent: what the client still sends is dropped
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers are complete
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the next request on this connection has --header-timeout to arrive

    def client_may_be_sending(self) -> bool:
        """True while a request has arrived in part: headers not complete (h11 holds their bytes), or a
        body not received whole."""
        return bool(self.conn.trailing_data[0]) or self.conn.their_state is h11.SEND_BODY

    def linger(self) -> None:
        """Shut the write side once the answer is out, drop what arrives, close within ``LINGER_S``."""
        self.lingering = True
        self._cancel_header_timer()
        self._unset_keepalive_if_required()
        real = self.transport._transport  # type: ignore[attr-defined]
        if real.can_write_eof():
            real.write_eof()
        real.resume_reading()
        self.loop.call_later(LINGER_S, real.close)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.guard.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if not self.client_may_be_sending():  # idle and kept alive: closed quietly, as uvicorn's timer does
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()
            return
        self._count("timeouts", "headers")
        self._answer_and_close(
            408, f"request headers not received within {self.guard.header_timeout_s:g} s (--header-timeout)"
        )

    def _answer_and_close(self, status: int, message: str, extra_headers: str = "") -> None:
        """Write a JSON error outside any request cycle (before or between requests), then linger."""
        body = orjson.dumps({"error": message})
        head = (
            f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n{extra_headers}\r\n"
        )
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.write(head.encode() + body)
        self.linger()

    def _count(self, counter: str, label: str) -> None:
        metrics = self.app_state.get(METRICS_STATE)
        if metrics is not None:
            getattr(metrics, counter).labels(label).inc()


def app_from_environment() -> Starlette:
    """App factory for `--workers N` uvicorn processes; the config is in ``DETFORGE_SERVE_CONFIG``."""
    values = json.loads(os.environ[CONFIG_ENV])
    values["allow_paths"] = tuple(values.get("allow_paths", ()))
    return create_app(ServeConfig(**values))


def log_config(log_level: str) -> dict:
    """uvicorn's logging setup, with this module's log (one line a disconnect, a 500's traceback) on its
    stream at the same level."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    level = "DEBUG" if log_level.lower() == "trace" else log_level.upper()
    config["loggers"][log.name] = {"handlers": ["default"], "level": level, "propagate": False}
    return config


def serve(
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    graceful_timeout: int = 30,
    log_level: str = "info",
) -> None:
    """Run the endpoint until SIGTERM/SIGINT; requests in flight are answered before it returns."""
    import uvicorn

    if workers < 1:
        raise ConfigError(f"must be at least 1, got {workers}", field="workers")
    options = dict(
        host=host,
        port=port,
        log_level=log_level,
        log_config=log_config(log_level),
        timeout_graceful_shutdown=graceful_timeout,
        access_log=False,
        lifespan="on",
        # connections are bounded by GuardedH11Protocol (uvicorn's limit_concurrency would refuse every
        # request, /ping included, on connections already open once that many are)
        http=functools.partial(GuardedH11Protocol, guard=ConnectionGuard.of(config)),
    )
    if workers > 1:
        # each worker is a fresh process that reads these two at start; they are removed on the way out
        metrics_dir = tempfile.mkdtemp(prefix="detforge-metrics-")
        saved = {key: os.environ.get(key) for key in (CONFIG_ENV, MULTIPROC_ENV)}
        os.environ[CONFIG_ENV] = json.dumps(asdict(config))
        os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            # uvicorn replaces a worker that does not answer its health check in time; its 5 s default
            # also counts a new worker's imports, which take longer than that on a busy machine
            uvicorn.run(
                "detforge.deploy.serve:app_from_environment",
                factory=True,
                workers=workers,
                timeout_worker_healthcheck=30,
                **options,
            )
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return
    server = uvicorn.Server(uvicorn.Config(create_app(config), **options))
    # uvicorn re-raises the signal after its graceful shutdown; a no-op handler turns that into exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM,)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
