"""Videos to labeling input: JPEG frames, a Ground Truth *input* manifest and a contact sheet.

``extract_frames(videos, out, every=N | fps=F, metadata={...})`` decodes each video with OpenCV and writes
``<video-stem>_<NNNNNN>.jpg`` (NNNNNN = the frame's index in its video) to ``out``, ``out/input.manifest``
(one ``{"source-ref": ..., **metadata}`` line per frame, ready for a labeling job) and
``out/contact-sheet.jpg`` (a grid of frames sampled evenly over everything extracted, with their names).
``out`` may be a local folder or an ``s3://`` prefix; videos may be local or remote (downloaded first).

Not here: labeling, the synthetic dataset (``synth``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from detforge import storage
from detforge.data.groundtruth import dumps_line
from detforge.errors import ConfigError, DetforgeError, FormatError

MANIFEST_NAME = "input.manifest"
SHEET_NAME = "contact-sheet.jpg"
SHEET_CELLS = 24
THUMB_WIDTH = 240


@dataclass
class FramesSummary:
    """What ``extract_frames`` wrote."""

    out: str
    manifest: str
    contact_sheet: str | None
    frames: int = 0
    per_video: dict[str, int] = field(default_factory=dict)  # video path -> frames written
    failed: dict[str, str] = field(default_factory=dict)  # video path -> error message (on_error='skip')
    warnings: dict[str, str] = field(default_factory=dict)  # video path -> e.g. "ended early"


def parse_metadata(items: Sequence[str]) -> dict[str, str]:
    """``["color=blue", "object=box"]`` -> ``{"color": "blue", "object": "box"}`` (ConfigError otherwise)."""
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected key=value, got {item!r}", field="meta")
        if key == "source-ref":
            raise ConfigError("'source-ref' is written by detforge, not a metadata field", field="meta")
        metadata[key] = value
    return metadata


def _keep_indices(
    every: int | None, fps: float | None, source_fps: float, video: str
) -> Callable[[int], bool]:
    if every is not None:
        return lambda i: i % every == 0
    if fps is not None:
        if not source_fps or source_fps != source_fps or source_fps <= 0:
            raise FormatError(
                "the video does not say its frame rate, so --fps cannot be applied",
                path=video,
                hint="use --every N instead",
            )
        ratio = fps / source_fps
        if ratio >= 1:
            return lambda i: True
        # frame i is kept when it is the first one of a new 1/fps time slot
        return lambda i: i == 0 or int(i * ratio + 1e-9) > int((i - 1) * ratio + 1e-9)
    return lambda i: True


class _Sampler:
    """Keeps evenly spaced thumbnails of a stream of unknown length in bounded memory."""

    def __init__(self, cells: int) -> None:
        self.cells, self.stride, self.seen = cells, 1, 0
        self.items: list[tuple[str, Image.Image]] = []

    def offer(self, name: str, frame_bgr: np.ndarray) -> None:
        if self.seen % self.stride == 0:
            height, width = frame_bgr.shape[:2]
            thumb = Image.fromarray(frame_bgr[:, :, ::-1]).resize(
                (THUMB_WIDTH, max(1, round(THUMB_WIDTH * height / width))), Image.Resampling.BILINEAR
            )
            self.items.append((name, thumb))
            if len(self.items) >= 2 * self.cells:
                self.items = self.items[::2]
                self.stride *= 2
        self.seen += 1

    def picked(self) -> list[tuple[str, Image.Image]]:
        if len(self.items) <= self.cells:
            return self.items
        idx = np.linspace(0, len(self.items) - 1, self.cells).round().astype(int)
        return [self.items[i] for i in idx]


def contact_sheet(items: Sequence[tuple[str, Image.Image]], *, columns: int = 6) -> Image.Image:
    """A grid of thumbnails, each with its name under it."""
    columns = max(1, min(columns, len(items)))
    rows = (len(items) + columns - 1) // columns
    cell_h = max(t.height for _, t in items)
    caption = 16
    size = (columns * (THUMB_WIDTH + 4) + 4, rows * (cell_h + caption + 4) + 4)
    sheet = Image.new("RGB", size, (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for k, (name, thumb) in enumerate(items):
        x = 4 + (k % columns) * (THUMB_WIDTH + 4)
        y = 4 + (k // columns) * (cell_h + caption + 4)
        sheet.paste(thumb, (x, y))
        draw.text((x + 2, y + cell_h + 2), name, fill=(235, 235, 235))
    return sheet


def _extract_one(
    video: str, out: str, *, every, fps, max_frames, quality, handle, metadata, sampler, progress, warnings
) -> int:
    import cv2

    with tempfile.TemporaryDirectory(prefix="detforge-frames-") as cache:
        local = storage.local_copy(video, cache) if storage.is_remote(video) else video
        if not os.path.isfile(local):
            raise FormatError("no such video file", path=video)
        capture = cv2.VideoCapture(local)
        try:
            if not capture.isOpened():
                raise FormatError("OpenCV cannot open this video (corrupt or an unknown format)", path=video)
            total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
            keep = _keep_indices(every, fps, capture.get(cv2.CAP_PROP_FPS), video)
            stem = storage.stem(video)
            written, index = 0, 0
            while max_frames is None or written < max_frames:
                if not capture.grab():
                    break
                if keep(index):
                    ok, frame = capture.retrieve()
                    if not ok or frame is None:
                        raise FormatError(f"frame {index} cannot be decoded", path=video)
                    name = f"{stem}_{index:06d}.jpg"
                    ok, data = cv2.imencode(".jpg", frame, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
                    if not ok:
                        raise FormatError(f"frame {index} cannot be encoded as JPEG", path=video)
                    ref = storage.join(out, name)
                    storage.write_bytes(ref, data.tobytes())
                    handle.write(dumps_line({"source-ref": ref, **metadata}))
                    sampler.offer(name[:-4], frame)
                    written += 1
                index += 1
                if progress is not None:
                    progress(video, index, total)
            if index == 0:
                raise FormatError("no frame could be read (corrupt or empty video)", path=video)
            if max_frames is None and total and index < total - 1:
                # headers may round the count by one; more missing means a truncated or damaged file
                warnings[video] = f"only {index} of the {total} frames its header announces could be read"
            return written
        finally:
            capture.release()


def extract_frames(
    videos: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    every: int | None = None,
    fps: float | None = None,
    metadata: dict[str, str] | None = None,
    max_frames: int | None = None,
    on_error: str = "stop",
    quality: int = 95,
    sheet: bool = True,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> FramesSummary:
    """Extract frames of videos into ``out`` with a labeling input manifest and a contact sheet.

    ``every``: keep every Nth frame; ``fps``: keep about F frames per second of video (not both).
    ``max_frames``: at most M frames per video. ``on_error='skip'`` records a bad video in
    ``summary.failed`` and goes on; ``'stop'`` raises the error naming it.
    ``progress(video, frames_read, frame_count_or_None)`` is called as frames are read.
    """
    if every is not None and fps is not None:
        raise ConfigError("give --every or --fps, not both", field="every")
    if every is not None and every < 1:
        raise ConfigError(f"every must be at least 1, got {every}", field="every")
    if fps is not None and not fps > 0:
        raise ConfigError(f"fps must be positive, got {fps}", field="fps")
    if max_frames is not None and max_frames < 1:
        raise ConfigError(f"max-frames must be at least 1, got {max_frames}", field="max-frames")
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"on-error must be 'stop' or 'skip', got {on_error!r}", field="on-error")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be within 1..100, got {quality}", field="quality")
    videos = [os.fspath(v) for v in videos]
    if not videos:
        raise ConfigError("no video given", field="VIDEO")
    stems: dict[str, str] = {}
    for video in videos:
        other = stems.setdefault(storage.stem(video), video)
        if other != video:
            raise ConfigError(
                f"{other} and {video} have the same name, so their frames would collide",
                field="VIDEO",
                hint="rename one, or extract them into different folders",
            )
    out = os.fspath(out)
    if not storage.is_remote(out):
        out = os.path.abspath(out)
    storage.makedirs(out)
    require_cv2()
    summary = FramesSummary(out=out, manifest=storage.join(out, MANIFEST_NAME), contact_sheet=None)
    sampler = _Sampler(SHEET_CELLS)
    with storage.atomic_writer(summary.manifest, "wb") as handle:
        for video in videos:
            try:
                count = _extract_one(
                    video,
                    out,
                    every=every,
                    fps=fps,
                    max_frames=max_frames,
                    quality=quality,
                    handle=handle,
                    metadata=dict(metadata or {}),
                    sampler=sampler,
                    progress=progress,
                    warnings=summary.warnings,
                )
            except DetforgeError as exc:
                if on_error == "stop":
                    raise
                summary.failed[video] = str(exc)
                continue
            summary.per_video[video] = count
            summary.frames += count
    picked = sampler.picked()
    if sheet and picked:
        import io

        buffer = io.BytesIO()
        contact_sheet(picked).save(buffer, "JPEG", quality=88)
        summary.contact_sheet = storage.join(out, SHEET_NAME)
        storage.write_bytes(summary.contact_sheet, buffer.getvalue())
    return summary


def require_cv2():
    """OpenCV, or an error naming the extra that installs it."""
    from detforge.errors import require

    return require("cv2", "edge")
