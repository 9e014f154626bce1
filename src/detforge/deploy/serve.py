"""``detforge serve``: a real-time HTTP endpoint that answers like a SageMaker object-detection endpoint.

In here: the Starlette app (``GET /ping``, ``POST /invocations``, ``GET /metrics``, ``GET /model``), safe
image decoding (body limit, decompression-bomb check before decoding), the dynamic batcher that folds
concurrent requests into one ``Predictor.predict`` call, back-pressure (bounded images per request, queued
images, requests in flight and connections; ``503`` with ``Retry-After`` when full, never a growing memory),
Prometheus metrics (``prometheus_client``, summed over ``--workers``), and ``serve()`` which runs it under
uvicorn with a graceful SIGTERM. Answers never carry local paths or exception text. Not in here: the model
itself (``detforge.runtime``), the allowed-path rule for files named in requests
(``detforge.edge.sources.resolve_allowed_path``). No torch.
"""

from __future__ import annotations

import asyncio
import contextlib
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

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

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
# What GET /model shows (model.json also holds local paths, the training run and every hyperparameter).
PUBLIC_MODEL_FIELDS = (
    "name", "format", "classes", "base_network", "input_size", "input", "outputs", "nms_threshold",
    "nms_topk", "score_threshold", "default_threshold", "quantization", "opset", "detforge_version",
    "exported_at", "sha256",
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
    max_queue: int = 16  # images being read, decoded, queued or in the model, all requests together
    max_in_flight: int = 32  # /invocations requests being handled at once
    max_connections: int = 256  # open connections (uvicorn's limit; beyond it uvicorn answers 503 itself)
    retry_after_s: int = 1  # the Retry-After of a 503
    tile: int | None = None  # tiled inference (detforge.tiling); None: as model.json says, 0: off
    overlap: float | None = None
    tile_full_pass: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_images", "max_queue", "max_in_flight", "max_connections", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, name)}", field=name)
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
            "detforge_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"],
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
        self.in_progress = Gauge(
            "detforge_requests_in_progress", "/invocations requests being received or answered.",
            multiprocess_mode="livesum", registry=registry,
        )
        self.latency = Histogram(
            "detforge_request_latency_seconds", "Time from receiving an /invocations request to its answer.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.inference = Histogram(
            "detforge_inference_seconds", "Time of one batched model run.", buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "detforge_batch_size", "Images per model run.", buckets=BATCH_BUCKETS, registry=registry
        )

    def count(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        """Record one finished request."""
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) without keeping the excess in memory."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as exc:
            raise BadInput(400, f"bad Content-Length header {declared!r}") from exc
        if size > limit:
            await _drain(request, 16 * limit)
            raise BadInput(413, f"body of {size} bytes is over the limit of {limit} bytes (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, 16 * limit)
            raise BadInput(413, f"body is over the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, cap: int) -> None:
    """Read and drop the rest of an oversized body, so the client reads our 413 instead of a reset."""
    seen = 0
    with contextlib.suppress(Exception):
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > cap:
                break


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

        predictor = Predictor(config.deploy_dir, threads=config.threads, tile=config.tile,
                              overlap=config.overlap, full_pass=config.tile_full_pass)
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
    slots = asyncio.Semaphore(config.max_queue)  # bounds decoded images held, whatever the requests
    state = {"ready": False, "in_flight": 0}

    async def ping(request: Request) -> Response:
        status = 200 if state["ready"] else 503
        metrics.count("/ping", status)
        return _json({"status": "ok" if status == 200 else "starting"}, status)

    async def model(request: Request) -> Response:
        metrics.count("/model", 200)
        return Response(model_json, media_type="application/json")

    async def metrics_page(request: Request) -> Response:
        from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

        metrics.count("/metrics", 200)
        return Response(metrics.render(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    async def detect(read) -> object:
        """Read (``read()`` -> bytes, in the decode pool), decode and run one image, holding a queue slot."""
        loop = asyncio.get_running_loop()
        async with slots:
            batcher.arriving += 1
            try:
                data = await loop.run_in_executor(decode_pool, read)
                image = await loop.run_in_executor(
                    decode_pool, lambda: decode_image(data, max_pixels=config.max_pixels)
                )
            finally:
                batcher.arriving -= 1
            data = b""  # the encoded bytes are not needed while the image waits for the model
            return await batcher.predict(image)

    async def answer(request: Request, arriving: list[bool]) -> Response:
        """The answer to one /invocations request; sets ``arriving[0]`` False once its images count
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
                await _drain(request, config.max_body_bytes)
                raise BadInput(
                    403,
                    "reading files named in a request is off; start the server with "
                    "--allow-path DIR to allow files under DIR",
                )
            body = await read_body(request, config.max_body_bytes)
            refs = _parse_jsonlines(body, max_images=config.max_images)
            paths = [_allowed_path(ref, number, config) for number, ref in refs]  # refusals in line order
            if slots.locked():
                raise Busy("queue")
            batcher.arriving -= 1  # from here each image counts itself while it is read and decoded
            arriving[0] = False
            outcomes = await asyncio.gather(
                *(detect(lambda p=path: _read_file(p)) for path in paths), return_exceptions=True
            )
            for outcome in outcomes:  # the first failure in line order decides the answer
                if isinstance(outcome, BaseException):
                    raise outcome
            lines = [
                orjson.dumps({"source-ref": ref, "prediction": det.to_sagemaker()},
                             option=orjson.OPT_SERIALIZE_NUMPY)
                for (_, ref), det in zip(refs, outcomes, strict=True)
            ]
            return Response(b"\n".join(lines) + b"\n", media_type="application/jsonlines")
        if kind in IMAGE_TYPES:
            body = await read_body(request, config.max_body_bytes)
            if slots.locked():
                raise Busy("queue")
            batcher.arriving -= 1  # no await before detect() counts it again: the batcher sees no gap
            arriving[0] = False
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
            await _drain(request, config.max_body_bytes)
            response = _busy(config, "requests")
            metrics.count("/invocations", response.status_code, time.perf_counter() - started)
            return response
        state["in_flight"] += 1
        metrics.in_progress.inc()
        batcher.arriving += 1
        arriving = [True]
        try:
            response = await answer(request, arriving)
        except BadInput as exc:
            response = _error(exc.status, exc.message)
        except Busy as exc:
            metrics.rejected.labels(exc.what).inc()
            response = _busy(config, exc.what)
        except Exception as exc:  # keep serving; the details go to the log, not to the client
            error_id = uuid.uuid4().hex[:12]
            log.error("request %s failed: %s: %s", error_id, type(exc).__name__, exc, exc_info=exc)
            response = _error(500, f"internal error {error_id}: the server's log has the details")
        finally:
            state["in_flight"] -= 1
            metrics.in_progress.dec()
            if arriving[0]:
                batcher.arriving -= 1
        metrics.count("/invocations", response.status_code, time.perf_counter() - started)
        return response

    async def http_error(request: Request, exc: HTTPException) -> Response:
        metrics.count(request.url.path if exc.status_code != 404 else "other", exc.status_code)
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        state["ready"] = True
        try:
            yield
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
    limits = {"requests": f"{config.max_in_flight} requests in flight (--max-in-flight)",
              "queue": f"{config.max_queue} images queued (--max-queue)"}
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


def app_from_environment() -> Starlette:
    """App factory for `--workers N` uvicorn processes; the config is in ``DETFORGE_SERVE_CONFIG``."""
    values = json.loads(os.environ[CONFIG_ENV])
    values["allow_paths"] = tuple(values.get("allow_paths", ()))
    return create_app(ServeConfig(**values))


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
        timeout_graceful_shutdown=graceful_timeout,
        access_log=False,
        lifespan="on",
        limit_concurrency=config.max_connections,
    )
    if workers > 1:
        # each worker is a fresh process that reads these two at start; they are removed on the way out
        metrics_dir = tempfile.mkdtemp(prefix="detforge-metrics-")
        saved = {key: os.environ.get(key) for key in (CONFIG_ENV, MULTIPROC_ENV)}
        os.environ[CONFIG_ENV] = json.dumps(asdict(config))
        os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            uvicorn.run("detforge.deploy.serve:app_from_environment", factory=True, workers=workers,
                        **options)
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
