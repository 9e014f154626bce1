"""``detforge serve``: a real-time HTTP endpoint that answers like a SageMaker object-detection endpoint.

In here: the Starlette app (``GET /ping``, ``POST /invocations``, ``GET /metrics``, ``GET /model``), safe
image decoding (body limit, decompression-bomb check before decoding), the dynamic batcher that folds
concurrent requests into one ``Predictor.predict`` call, Prometheus text metrics, and ``serve()`` which runs
it under uvicorn with a graceful SIGTERM. Not in here: the model itself (``detforge.runtime``), the
allowed-path rule for files named in requests (``detforge.edge_sources.resolve_allowed_path``). No torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
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
from detforge.edge_sources import resolve_allowed_path
from detforge.errors import ConfigError, DetforgeError

IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "application/x-image"})
JSONLINES_TYPES = frozenset({"application/jsonlines", "application/jsonl", "application/x-jsonlines"})
ACCEPTED = frozenset({"", "*/*", "application/*", "application/json", "application/jsonlines"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONFIG_ENV = "DETFORGE_SERVE_CONFIG"  # how `--workers N` hands the config to each worker process


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

    def __post_init__(self) -> None:
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
    """Counters and histograms rendered in the Prometheus text format (one process's view)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.in_progress = 0
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.inference = _Histogram(LATENCY_BUCKETS)
        self.batch_size = _Histogram(BATCH_BUCKETS)

    def count(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        """Record one finished request."""
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        if seconds is not None:
            self.latency.observe(seconds)

    def render(self) -> str:
        """The metrics page."""
        lines = [
            "# HELP detforge_requests_total HTTP requests by endpoint and status code.",
            "# TYPE detforge_requests_total counter",
        ]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'detforge_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        errors = sum(n for (_, status), n in self.requests.items() if status >= 400)
        lines += [
            "# HELP detforge_request_errors_total Requests answered with a 4xx or 5xx status.",
            "# TYPE detforge_request_errors_total counter",
            f"detforge_request_errors_total {errors}",
            "# HELP detforge_requests_in_progress /invocations requests being received or answered.",
            "# TYPE detforge_requests_in_progress gauge",
            f"detforge_requests_in_progress {self.in_progress}",
        ]
        lines += self.latency.render(
            "detforge_request_latency_seconds", "Time from receiving an /invocations request to its answer."
        )
        lines += self.inference.render("detforge_inference_seconds", "Time of one batched model run.")
        lines += self.batch_size.render("detforge_batch_size", "Images per model run.")
        return "\n".join(lines) + "\n"


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        self.counts[index] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=False):
            running += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        lines += [
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total:.6f}",
            f"{name}_count {self.n}",
        ]
        return lines


@dataclass
class _Job:
    image: np.ndarray
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Folds concurrent requests into one predictor call.

    A batch starts as soon as the model is free and one image waits. It takes every image already
    queued (up to ``max_batch``) and, only while other requests are still arriving (being received or
    decoded), waits up to ``max_wait_ms`` for them. A lone request therefore never waits, and under
    load batches fill up. The model runs in one worker thread, so runs never overlap.
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
        while len(batch) < self.max_batch:
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


def create_app(config: ServeConfig, predictor=None) -> Starlette:
    """The endpoint as an ASGI app; loads the model (``predictor`` may be given) before returning."""
    if predictor is None:
        from detforge.runtime import Predictor

        predictor = Predictor(config.deploy_dir, threads=config.threads)
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
    model_json = orjson.dumps(dict(predictor.metadata), option=orjson.OPT_SERIALIZE_NUMPY)
    state = {"ready": False}

    async def decode(data: bytes) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(
            decode_pool, lambda: decode_image(data, max_pixels=config.max_pixels)
        )

    async def ping(request: Request) -> Response:
        status = 200 if state["ready"] else 503
        metrics.count("/ping", status)
        return _json({"status": "ok" if status == 200 else "starting"}, status)

    async def model(request: Request) -> Response:
        metrics.count("/model", 200)
        return Response(model_json, media_type="application/json")

    async def metrics_page(request: Request) -> Response:
        metrics.count("/metrics", 200)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def invocations(request: Request) -> Response:
        started = time.perf_counter()
        metrics.in_progress += 1
        batcher.arriving += 1
        queued = False
        try:
            accept_all = {
                a.split(";", 1)[0].strip().lower() for a in request.headers.get("accept", "").split(",")
            }
            if not accept_all & ACCEPTED:
                raise BadInput(
                    406, f"cannot answer in {request.headers.get('accept')!r}: ask for application/json"
                )
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
                refs = _parse_jsonlines(body)
                loop = asyncio.get_running_loop()
                images = [
                    await decode(await loop.run_in_executor(decode_pool, _read_allowed, ref, number, config))
                    for number, ref in refs
                ]
                batcher.arriving -= 1
                queued = True
                results = await asyncio.gather(*(batcher.predict(image) for image in images))
                lines = [
                    orjson.dumps(
                        {"source-ref": ref, "prediction": det.to_sagemaker()},
                        option=orjson.OPT_SERIALIZE_NUMPY,
                    )
                    for (_, ref), det in zip(refs, results, strict=True)
                ]
                response = Response(b"\n".join(lines) + b"\n", media_type="application/jsonlines")
            elif kind in IMAGE_TYPES:
                body = await read_body(request, config.max_body_bytes)
                image = await decode(body)
                batcher.arriving -= 1
                queued = True
                detections = await batcher.predict(image)
                response = _json({"prediction": detections.to_sagemaker()})
            else:
                raise BadInput(
                    415,
                    f"unsupported Content-Type {content_type!r}: send image/jpeg, image/png, "
                    "application/x-image or application/jsonlines",
                )
        except BadInput as exc:
            response = _error(exc.status, exc.message)
        except DetforgeError as exc:
            response = _error(500, str(exc))
        except Exception as exc:  # keep serving; the client learns what failed
            response = _error(500, f"{type(exc).__name__}: {exc}")
        finally:
            if not queued:
                batcher.arriving -= 1
            metrics.in_progress -= 1
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


def _warm_up(predictor) -> None:
    """One run on a blank image so the first request does not pay ONNX Runtime's start-up cost."""
    size = predictor.metadata.get("input_size") or predictor.metadata.get("image_shape") or 64
    side = int(size[0] if isinstance(size, list | tuple) else size)
    predictor.predict([np.zeros((side, side, 3), dtype=np.uint8)])


def _parse_jsonlines(body: bytes) -> list[tuple[int, str]]:
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
    if not refs:
        raise BadInput(400, 'empty body: send one {"source-ref": ...} JSON object per line')
    return refs


def _read_allowed(ref: str, number: int, config: ServeConfig) -> bytes:
    try:
        path = resolve_allowed_path(ref, config.allow_paths)
    except DetforgeError as exc:
        raise BadInput(403, f"line {number}: {exc}") from exc
    if os.path.getsize(path) > config.max_body_bytes:
        raise BadInput(413, f"line {number}: {ref} is over the limit of {config.max_body_bytes} bytes")
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
    )
    if workers > 1:
        os.environ[CONFIG_ENV] = json.dumps(asdict(config))
        uvicorn.run("detforge.serve:app_from_environment", factory=True, workers=workers, **options)
        return
    server = uvicorn.Server(uvicorn.Config(create_app(config), **options))
    # uvicorn re-raises the signal after its graceful shutdown; a no-op handler turns that into exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM,)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
