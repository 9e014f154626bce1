"""``detforge edge``: run the model on frames, publish detections over MQTT (what the Greengrass Lambda did).

In here: ``EdgeConfig`` and ``run_edge``, the main loop: take a frame from the source (or a request from
the input topic), run the ``Predictor``, publish one JSON message per frame at QoS 1::

    {"timestamp": "2026-11-24T02:45:43.123456Z", "source": "video.mp4", "frame": 12,
     "prediction": [[class_id, score, xmin, ymin, xmax, ymax], ...], "latency_ms": 31.2, "seq": 13}

``latency_ms`` runs from the moment the frame was read to the message being handed to MQTT. A request
``{"filepath": ...}`` on the input topic (optionally with an ``"id"`` echoed back) is answered on the output
topic with ``"source": "request"``, or with an ``"error"`` when the file is not inside ``--allow-path``.
A retained status (model, fps, frames, last error) is refreshed every ``heartbeat_s``; the last will says
``offline``. SIGTERM/SIGINT: the current frame finishes, results are flushed, the client disconnects.
Not in here: frame sources (``edge_sources``), buffering and reconnects (``edge_buffer``), the
Greengrass component (``greengrass``). No torch.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import queue
import re
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import orjson

from detforge.edge.buffer import DiskBuffer, Publisher, parse_broker
from detforge.edge.sources import Frame, load_rgb, mask_credentials, open_source, resolve_allowed_path
from detforge.errors import ConfigError, DetforgeError

log = logging.getLogger("detforge.edge")
DEFAULT_TOPIC = "detforge/infer/output"
DEFAULT_REQUEST_TOPIC = "detforge/infer/input"
DEFAULT_STATUS_TOPIC = "detforge/infer/status"


@dataclass(frozen=True)
class EdgeConfig:
    """Everything ``detforge edge`` needs; built once from the command line."""

    deploy_dir: str
    broker: str
    source: str | None = None
    topic: str = DEFAULT_TOPIC
    request_topic: str = DEFAULT_REQUEST_TOPIC
    status_topic: str = DEFAULT_STATUS_TOPIC
    fps: float = 5.0
    threshold: float | None = None  # None: the deploy folder's default_threshold (as predict and serve)
    allow_paths: tuple[str, ...] = ()
    buffer_dir: str | None = None
    buffer_max: int = 10000
    save_every: int = 0
    save_dir: str = "edge-frames"
    heartbeat_s: float = 10.0
    drain_timeout_s: float = 10.0
    reconnect_max_s: float = 30.0
    client_id: str | None = None
    threads: int | None = None
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    mqtt_version: str = "5"
    tile: int | None = None  # tiled inference (detforge.tiling); None: as model.json says, 0: off
    overlap: float | None = None
    tile_full_pass: bool | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"must be within [0, 1], got {self.threshold}", field="threshold")
        if self.fps <= 0:
            raise ConfigError(f"must be above 0, got {self.fps}", field="fps")
        if self.save_every < 0:
            raise ConfigError(f"must be 0 (off) or more, got {self.save_every}", field="save_every")
        for path in self.allow_paths:
            if not os.path.isdir(path):
                raise ConfigError("not a folder", path=path, field="allow_path")

    @property
    def public_source(self) -> str | None:
        """The source as messages, the status and logs show it: without credentials."""
        return mask_credentials(self.source) if self.source else None


@dataclass
class EdgeStats:
    """What a run did (also the body of the status messages)."""

    frames: int = 0
    requests: int = 0
    refused: int = 0
    errors: int = 0
    published: int = 0
    saved: int = 0
    dropped_frames: int = 0
    dropped_results: int = 0
    lost_results: int = 0  # neither written to the buffer (a full disk) nor sent
    buffered_at_exit: int = 0
    last_error: str | None = None
    started: float = field(default_factory=time.monotonic)
    recent: list[float] = field(default_factory=list)

    def fps(self) -> float:
        """Frames a second over the last 30 frames."""
        if len(self.recent) < 2:
            return 0.0
        span = self.recent[-1] - self.recent[0]
        return round((len(self.recent) - 1) / span, 3) if span > 0 else 0.0


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (a password sent there in plain text stays on the
    machine)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plaintext_password_warning(broker) -> str | None:
    """What to warn about when a password would cross the network unencrypted (plain MQTT, a host that is
    not loopback), else None."""
    if broker.password and not broker.tls and not is_loopback(broker.host):
        return (
            f"the password for {broker.username} goes to {broker.host}:{broker.port} in plain text; "
            "use mqtts:// (TLS)"
        )
    return None


def utc_timestamp(seconds: float) -> str:
    """ISO 8601 UTC with microseconds and a Z, e.g. ``2026-11-24T02:45:43.123456Z``."""
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def default_client_id() -> str:
    """``detforge-edge-<host>-<6 hex>``: unique per process so two runtimes never kick each other off."""
    return f"detforge-edge-{socket.gethostname()[:24]}-{uuid.uuid4().hex[:6]}"


def default_buffer_dir(config: EdgeConfig) -> str:
    """``~/.cache/detforge/edge-buffer/<source name, no credentials>`` unless ``--buffer-dir`` is given."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", (config.public_source or "requests").replace("://", "_"))[-80:]
    return os.path.join(os.path.expanduser("~/.cache/detforge/edge-buffer"), name or "default")


def run_edge(config: EdgeConfig, *, stop: threading.Event | None = None, predictor=None) -> EdgeStats:
    """Run until the source ends (a video file), ``stop`` is set, or SIGTERM/SIGINT; returns the counts.

    Results still unacknowledged after ``drain_timeout_s`` stay in the buffer folder and go out first on
    the next run.
    """
    if predictor is None:
        from detforge.runtime import Predictor

        predictor = Predictor(
            config.deploy_dir,
            threads=config.threads,
            tile=config.tile,
            overlap=config.overlap,
            full_pass=config.tile_full_pass,
        )
    broker = parse_broker(
        config.broker,
        tls=config.tls,
        ca_file=config.ca_file,
        cert_file=config.cert_file,
        key_file=config.key_file,
        username=config.username,
        password=config.password or os.environ.get("DETFORGE_MQTT_PASSWORD"),
        mqtt_version=config.mqtt_version,
    )
    warning = plaintext_password_warning(broker)
    if warning:
        log.warning("MQTT: %s", warning)
    # the folder is taken before the source is opened: a refused second runtime leaves the camera alone
    buffer = DiskBuffer(config.buffer_dir or default_buffer_dir(config), max_messages=config.buffer_max)
    try:
        source = open_source(config.source, fps=config.fps) if config.source else None
    except BaseException:
        buffer.close()
        raise
    stop = stop or threading.Event()
    stats = EdgeStats()
    requests: queue.Queue[bytes] = queue.Queue(maxsize=256)
    model_name = str(predictor.metadata.get("name") or os.path.basename(os.path.abspath(config.deploy_dir)))
    threshold = float(predictor.threshold if config.threshold is None else config.threshold)

    def on_message(topic: str, payload: bytes) -> None:
        try:
            requests.put_nowait(payload)
        except queue.Full:
            stats.refused += 1
            stats.last_error = "request queue full, request dropped"

    def status() -> dict:
        return {
            "model": model_name,
            "source": config.public_source,
            "threshold": threshold,
            "fps": stats.fps(),
            "frames": stats.frames,
            "requests": stats.requests,
            "errors": stats.errors,
            "last_error": mask_credentials(stats.last_error) if stats.last_error else None,
            "mqtt_error": publisher.last_error,
            "dropped_frames": getattr(source, "dropped", 0),
            "dropped_results": buffer.dropped,
            "uptime_s": round(time.monotonic() - stats.started, 1),
        }

    publisher = Publisher(
        broker,
        buffer,
        client_id=config.client_id or default_client_id(),
        status_topic=config.status_topic,
        status=status,
        subscribe=(config.request_topic,),
        on_message=on_message,
        heartbeat_s=config.heartbeat_s,
        backoff=(min(0.5, config.reconnect_max_s), config.reconnect_max_s),
    )
    restore = _stop_on_signals(stop)
    publisher.start()
    try:
        while not stop.is_set():
            while not requests.empty():
                _answer_request(requests.get_nowait(), config, predictor, publisher, stats)
            if source is None or source.finished:
                if source is not None:
                    break  # the video file is done
                try:
                    _answer_request(requests.get(timeout=0.1), config, predictor, publisher, stats)
                except queue.Empty:
                    pass
                continue
            frame = source.next_frame(timeout=0.1)
            if frame is not None:
                _process_frame(frame, config, predictor, publisher, stats)
    finally:
        restore()
        if source is not None:
            source.close()
            stats.dropped_frames = getattr(source, "dropped", 0)
        publisher.close(config.drain_timeout_s)
        buffer.close()
        stats.buffered_at_exit = len(buffer)
        stats.dropped_results = buffer.dropped
        stats.lost_results = publisher.lost
    return stats


def _process_frame(
    frame: Frame, config: EdgeConfig, predictor, publisher: Publisher, stats: EdgeStats
) -> None:
    message = {
        "timestamp": utc_timestamp(frame.captured),
        "source": config.public_source,
        "frame": frame.index,
    }
    if frame.error is not None:  # a watched file that could not be decoded
        error = mask_credentials(frame.error)
        stats.errors += 1
        stats.last_error = f"{frame.index}: {error}"
        publisher.publish(config.topic, {**message, "error": error})
        stats.published += 1
        return
    try:
        detections = predictor.predict([frame.image], threshold=config.threshold)[0]
    except Exception as exc:  # keep running; the dashboard sees the error
        stats.errors += 1
        stats.last_error = mask_credentials(f"{type(exc).__name__}: {exc}")
        publisher.publish(config.topic, {**message, "error": stats.last_error})
        return
    message["prediction"] = detections.to_sagemaker()
    message["latency_ms"] = round((time.monotonic() - frame.captured_mono) * 1000.0, 3)
    publisher.publish(config.topic, message)
    stats.frames += 1
    stats.published += 1
    stats.recent = (stats.recent + [frame.captured_mono])[-30:]
    if config.save_every and stats.frames % config.save_every == 0:
        save_annotated(frame, detections, config.save_dir, predictor.class_names)
        stats.saved += 1


def _answer_request(
    payload: bytes, config: EdgeConfig, predictor, publisher: Publisher, stats: EdgeStats
) -> None:
    """Run one ``{"filepath": ...}`` request, or publish why it is refused."""
    started, started_mono = time.time(), time.monotonic()
    stats.requests += 1
    answer: dict = {"timestamp": utc_timestamp(started), "source": "request"}
    try:
        request = orjson.loads(payload)
    except orjson.JSONDecodeError:
        request = None
    if isinstance(request, dict) and isinstance(request.get("id"), str | int):
        answer["id"] = request["id"]  # lets the caller match the answer to its request
    if not isinstance(request, dict) or "filepath" not in request:
        stats.refused += 1
        publisher.publish(config.topic, {**answer, "error": 'a request is a JSON object {"filepath": "..."}'})
        return
    answer["frame"] = request["filepath"] if isinstance(request["filepath"], str) else None
    try:
        path = resolve_allowed_path(request["filepath"], config.allow_paths)
        image = load_rgb(path)
        detections = predictor.predict([image], threshold=config.threshold)[0]
    except DetforgeError as exc:
        stats.refused += 1
        stats.last_error = mask_credentials(str(exc))
        publisher.publish(config.topic, {**answer, "error": stats.last_error})
        return
    except Exception as exc:
        stats.errors += 1
        stats.last_error = mask_credentials(f"{type(exc).__name__}: {exc}")
        publisher.publish(config.topic, {**answer, "error": stats.last_error})
        return
    answer["prediction"] = detections.to_sagemaker()
    answer["latency_ms"] = round((time.monotonic() - started_mono) * 1000.0, 3)
    publisher.publish(config.topic, answer)
    stats.published += 1


def save_annotated(frame: Frame, detections, folder: str, class_names: list[str]) -> str:
    """Write the frame as JPEG with its boxes drawn (``<folder>/frame_<index>.jpg``); returns the path."""
    import cv2

    image = np.ascontiguousarray(frame.image[:, :, ::-1])
    for box, score, class_id in zip(
        np.asarray(detections.boxes_xyxy),
        np.asarray(detections.scores),
        np.asarray(detections.class_ids),
        strict=True,
    ):
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(image, (x0, y0), (x1, y1), (0, 200, 255), 2)
        name = class_names[int(class_id)] if 0 <= int(class_id) < len(class_names) else str(int(class_id))
        cv2.putText(
            image,
            f"{name} {float(score):.2f}",
            (x0, max(12, y0 - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (0, 200, 255),
            1,
            cv2.LINE_AA,
        )
    os.makedirs(folder, exist_ok=True)
    stem = f"{frame.index:06d}" if isinstance(frame.index, int) else str(frame.index).replace(os.sep, "_")
    path = os.path.join(folder, f"frame_{stem}.jpg")
    ok, data = cv2.imencode(".jpg", image)
    if ok:
        from detforge.storage import write_bytes

        write_bytes(path, data.tobytes())
    return path


def _stop_on_signals(stop: threading.Event):
    """SIGTERM/SIGINT set ``stop`` (only possible from the main thread); returns a function that undoes it."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
