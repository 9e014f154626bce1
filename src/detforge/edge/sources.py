"""Where the edge runtime's frames come from.

In here: ``parse_source`` (``camera:0``, a video file, ``rtsp://``/``http://`` streams, ``watch:DIR``),
the three frame sources (a video file sampled at the target rate; a live camera/stream read by a thread
that keeps only the newest frame, so stale frames are dropped instead of queued; a watched folder), and
``mask_credentials`` (from ``storage``: what a source URL may show, never its password). Not in here: the
model, MQTT, the main loop (``detforge.edge``). OpenCV is imported only when a camera/video/stream source
is opened. No torch.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from detforge.errors import ConfigError, StorageError
from detforge.storage import IMAGE_SUFFIXES, is_remote, mask_credentials, resolve_allowed_path  # noqa: F401

STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--source``: ``kind`` is camera, video, stream or watch; ``target`` the index/path/URL."""

    kind: str
    target: str | int


@dataclass
class Frame:
    """One image to run the model on: RGB ``HxWx3`` uint8, its index (or file name) and capture times."""

    image: np.ndarray = field(repr=False)
    index: int | str
    captured: float  # time.time() when the frame was read (for the message timestamp)
    captured_mono: float  # time.monotonic() at the same moment (for latency)
    error: str | None = None  # why ``image`` is empty (a watched file that cannot be decoded)


def parse_source(text: str) -> SourceSpec:
    """Parse ``camera:N``, ``watch:DIR``, a stream URL or a video file path (which must exist)."""
    if not text:
        raise ConfigError(
            "empty source", field="source", hint="use camera:0, a video file, rtsp://... or watch:DIR"
        )
    if text.startswith("camera:"):
        index = text[len("camera:") :]
        if not index.isdigit():
            raise ConfigError(
                f"camera index must be a number, got {index!r}", field="source", hint="e.g. camera:0"
            )
        return SourceSpec("camera", int(index))
    if text.startswith("watch:"):
        folder = text[len("watch:") :]
        if not os.path.isdir(folder):
            raise ConfigError("the folder to watch does not exist", path=folder, field="source")
        return SourceSpec("watch", folder)
    if text.lower().startswith(STREAM_SCHEMES):
        return SourceSpec("stream", text)
    if is_remote(text):
        raise ConfigError(
            f"cannot read frames from {mask_credentials(text)}",
            field="source",
            hint="use camera:0, a local video file, rtsp://... or watch:DIR",
        )
    if not os.path.isfile(text):
        raise ConfigError(
            "no such video file",
            path=text,
            field="source",
            hint="use camera:0, a video file, rtsp://... or watch:DIR",
        )
    return SourceSpec("video", text)


def open_source(text: str, *, fps: float):
    """Open a frame source: ``next_frame(timeout) -> Frame | None``, ``finished``, ``close()``."""
    if fps <= 0:
        raise ConfigError(f"must be above 0, got {fps}", field="fps")
    spec = parse_source(text)
    if spec.kind == "video":
        return VideoFileSource(str(spec.target), fps=fps)
    if spec.kind == "watch":
        return WatchSource(str(spec.target))
    return LiveSource(spec.target, fps=fps)


def _capture(target: str | int):
    import cv2

    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        raise StorageError(
            "OpenCV cannot open this source",
            path=mask_credentials(str(target)),
            hint="check the camera index, the file or the stream URL",
        )
    return capture


def _rgb(bgr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(bgr[:, :, ::-1])


class VideoFileSource:
    """A video file sampled at ``fps`` by its own timeline, every sample kept, read as fast as the model runs.

    Frame ``i`` of a ``F``-fps video is taken when its time ``i/F`` reaches the next sample time ``k/fps``;
    a 10-frame 10-fps video at ``--fps 5`` gives frames 0, 2, 4, 6, 8. ``frame`` is the index in the file.
    """

    def __init__(self, path: str, *, fps: float) -> None:
        import cv2

        self.path = path
        self.capture = _capture(path)
        self.video_fps = self.capture.get(cv2.CAP_PROP_FPS) or 30.0
        self.period = 1.0 / fps
        self.finished = False
        self.dropped = 0
        self._index = -1
        self._next_time = 0.0

    def next_frame(self, timeout: float = 0.0) -> Frame | None:
        """The next sampled frame, or None at the end of the file (then ``finished`` is True)."""
        while not self.finished:
            ok, bgr = self.capture.read()
            if not ok:
                self.finished = True
                self.capture.release()
                return None
            self._index += 1
            t = self._index / self.video_fps
            if t + 1e-9 < self._next_time:
                continue
            while self._next_time <= t + 1e-9:
                self._next_time += self.period
            return Frame(_rgb(bgr), self._index, time.time(), time.monotonic())
        return None

    def close(self) -> None:
        """Release the file."""
        self.capture.release()


class LiveSource:
    """A camera or network stream: a thread reads continuously and keeps only the newest frame.

    ``next_frame`` hands out at most ``fps`` frames a second, always the newest; the frames read in
    between are dropped (counted in ``dropped``), so a slow model never builds a backlog. When the
    stream breaks, the thread reopens it with a growing pause (up to 10 s).
    """

    def __init__(self, target: str | int, *, fps: float) -> None:
        self.target = target
        self.period = 1.0 / fps
        self.finished = False
        self.dropped = 0
        self.read_count = 0
        self._capture = _capture(target)
        self._condition = threading.Condition()
        self._latest: Frame | None = None
        self._handed = -1
        self._next_tick = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="detforge-frames", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pause = 0.5
        while not self._stop.is_set():
            ok, bgr = self._capture.read() if self._capture is not None else (False, None)
            if not ok:
                if self._capture is not None:
                    self._capture.release()
                    self._capture = None
                self._stop.wait(pause)
                pause = min(pause * 2, 10.0)
                try:
                    self._capture = _capture(self.target)
                    pause = 0.5
                except StorageError:
                    pass
                continue
            frame = Frame(_rgb(bgr), self.read_count, time.time(), time.monotonic())
            with self._condition:
                if self._latest is not None and self._latest.index != self._handed:
                    self.dropped += 1
                self._latest = frame
                self.read_count += 1
                self._condition.notify_all()

    def next_frame(self, timeout: float = 0.1) -> Frame | None:
        """The newest frame once the next tick of the target rate is due, or None within ``timeout``."""
        now = time.monotonic()
        if now < self._next_tick:
            time.sleep(min(timeout, self._next_tick - now))
            if time.monotonic() < self._next_tick:
                return None
        with self._condition:
            fresh = self._condition.wait_for(
                lambda: self._latest is not None and self._latest.index != self._handed, timeout
            )
            if not fresh:
                return None
            frame = self._latest
            self._handed = frame.index
        self._next_tick = max(self._next_tick + self.period, time.monotonic())
        return frame

    def close(self) -> None:
        """Stop the reader thread and release the device."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self._capture is not None:
            self._capture.release()


class WatchSource:
    """New image files in a folder, oldest first, each picked up once its size has stopped changing.

    Files already there when watching starts, hidden files (``.name``) and non-image suffixes are ignored.
    Writers should write under a hidden or temporary name and rename into place. ``frame`` is the path
    relative to the folder. An unreadable image comes back as a frame with an empty ``image`` and the
    reason in ``error``.
    """

    def __init__(self, folder: str, *, poll_s: float = 0.1) -> None:
        self.folder = folder
        self.poll_s = poll_s
        self.finished = False
        self.dropped = 0
        self._seen = set(self._listing())
        self._sizes: dict[str, tuple[int, int]] = {}
        self._ready: list[str] = []
        self._last_poll = 0.0

    def _listing(self) -> list[str]:
        found = []
        for root, dirs, files in os.walk(self.folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                    found.append(os.path.relpath(os.path.join(root, name), self.folder))
        return found

    def _poll(self) -> None:
        candidates = []
        for name in self._listing():
            if name in self._seen:
                continue
            try:
                stat = os.stat(os.path.join(self.folder, name))
            except OSError:
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if stat.st_size > 0 and self._sizes.get(name) == signature:
                candidates.append((stat.st_mtime_ns, name))
                self._seen.add(name)
                self._sizes.pop(name, None)
            else:
                self._sizes[name] = signature
        self._ready.extend(name for _, name in sorted(candidates))

    def next_frame(self, timeout: float = 0.1) -> Frame | None:
        """The next new image, or None when none appeared within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            wait = self._last_poll + self.poll_s - time.monotonic()
            if wait > 0:
                if time.monotonic() + wait > deadline:
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    return None
                time.sleep(wait)
            self._last_poll = time.monotonic()
            self._poll()
            if not self._ready and time.monotonic() >= deadline:
                return None
        name = self._ready.pop(0)
        captured, captured_mono = time.time(), time.monotonic()
        try:
            return Frame(load_rgb(os.path.join(self.folder, name)), name, captured, captured_mono)
        except StorageError as exc:
            return Frame(
                np.zeros((0, 0, 3), dtype=np.uint8), name, captured, captured_mono, error=exc.message
            )

    def close(self) -> None:
        """Nothing to release."""


def load_rgb(path: str) -> np.ndarray:
    """Decode an image file to RGB ``HxWx3`` uint8, or raise StorageError saying why not."""
    from detforge import images

    if not os.path.exists(path):
        raise StorageError("no such file", path=path)
    try:
        return images.read(path)
    except images.ImageError as exc:
        raise StorageError(f"not a readable image: {exc.message}", path=path) from None
