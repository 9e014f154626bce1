"""``detforge review``: look at every labeled box in a browser and reject images into a discard list.

In here: loading manifests (+ optional SageMaker predictions) into compact review items with their
warning flags (empty, tiny boxes, boxes at the edge, disagreement with the model), the discard file and
its ``<discard>.review.json`` sidecar (read on start, rewritten atomically after every decision; one
session a discard file, held by ``<discard>.lock``), and a small stdlib HTTP server bound to loopback that
serves the page (``static/review.*``), the items, the images (only those the manifests reference, by
index) and the discard list, all behind a random token.
Not in here: applying the discard list (``detforge prepare --discard``). No torch.

Discard file format (what ``prepare --discard`` reads): UTF-8 text, ``#`` lines are comments, blank
lines are ignored, every other line is ``<image id>`` or ``<image id><TAB><reason>``; the image id is
the file stem of the image (``record.image_id``).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import functools
import mimetypes
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from detforge import boxes as box_ops
from detforge import storage
from detforge.data.groundtruth import read_class_names, read_discard, resolve_source_ref
from detforge.data.sources import read_source
from detforge.errors import ConfigError, DetforgeError, FormatError
from detforge.evaluation.evaluate import iter_predictions, prediction_rows
from detforge.label.server import (
    LocalServer,
    TokenHandler,
    inline_page,
    open_in_browser,
    remove_redirect,
)

TINY_FRACTION = 0.02  # a box narrower or lower than 2% of the image side is "tiny"
EDGE_PIXELS = 1.0  # a box within 1 px of the border "touches the edge"
MATCH_IOU = 0.3  # a prediction and a label of the same class at this IoU or more are the same object
GOOD_IOU = 0.7  # a matched label below this IoU with its prediction is "low IoU"
THUMB_SIZE = 256
DECISIONS = ("reject", "keep", "clear")
MAX_BODY = 65536  # one decision with its reason


@dataclass
class ReviewItem:
    """One labeled image as the page sees it (boxes in pixels, class names not ids)."""

    index: int
    image_id: str
    source_ref: str
    job: str
    width: int
    height: int
    boxes: list[list[float]]  # [x1, y1, x2, y2] pixels
    classes: list[str]
    tiny: int = 0
    edge: int = 0
    predictions: list[list] | None = None  # [class name, score, x1, y1, x2, y2] pixels
    missed: int = 0  # confident predictions no label matches: an object the labeler may have missed
    extra: int = 0  # labels no prediction matches: a box that may be wrong
    low_iou: int = 0  # labels matched loosely (MATCH_IOU <= IoU < GOOD_IOU)
    suspicion: float = 0.0

    def to_json(self) -> dict:
        """The compact form sent to the page."""
        data = {
            "i": self.index,
            "id": self.image_id,
            "name": storage.basename(self.source_ref),
            "job": self.job,
            "w": self.width,
            "h": self.height,
            "boxes": [
                [round(v, 1) for v in box] + [name]
                for box, name in zip(self.boxes, self.classes, strict=True)
            ],
            "tiny": self.tiny,
            "edge": self.edge,
            "suspicion": round(self.suspicion, 3),
        }
        if self.predictions is not None:
            data.update(pred=self.predictions, missed=self.missed, extra=self.extra, lowiou=self.low_iou)
        return data


# ----------------------------------------------------------------------------- discard file + sidecar


def clean_reason(reason: str | None) -> str:
    """A reason fit for one discard line: no tabs or newlines, spaces collapsed."""
    return re.sub(r"\s+", " ", reason or "").strip()


def format_discard(rejected: dict[str, str], *, total: int | None = None) -> str:
    """The text of a discard file (comment header, then ``id[<TAB>reason]`` lines, sorted by id)."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    lines = [
        "# detforge discard list: one image id (file stem) a line, optionally <TAB>reason",
        f"# written by detforge review at {now}: {len(rejected)} rejected"
        + (f" of {total} images" if total is not None else ""),
    ]
    for image_id in sorted(rejected):
        reason = clean_reason(rejected[image_id])
        lines.append(f"{image_id}\t{reason}" if reason else image_id)
    return "\n".join(lines) + "\n"


def sidecar_path(discard: str | os.PathLike) -> str:
    """Where the "reviewed" state lives: ``<discard>.review.json``."""
    return os.fspath(discard) + ".review.json"


# ----------------------------------------------------------------------------- predictions


def read_predictions(path: str | os.PathLike) -> dict[str, list[list[float]]]:
    """Image stem -> SageMaker prediction rows ``[class_id, score, x1, y1, x2, y2]`` (normalized), read and
    checked by evaluate's parser (the same errors as ``detforge evaluate`` gives for the same file)."""
    path = os.fspath(path)
    found: dict[str, list[list[float]]] = {}
    for number, entry in iter_predictions(path):
        name = entry.get("image") or entry.get("source-ref")
        if not isinstance(name, str):
            raise FormatError(
                'expected {"image": NAME, "prediction": [[class_id, score, xmin, ymin, xmax, ymax], ...]}',
                path=path,
                line=number,
                field="image",
            )
        found[storage.stem(name)] = prediction_rows(entry, path=path, line=number)
    return found


def compare_with_predictions(
    item: ReviewItem, rows: list[list[float]], *, class_names: Sequence[str] | None, score_threshold: float
) -> None:
    """Fill ``item``'s prediction fields: missed objects, extra boxes, low-IoU boxes and a suspicion score.

    Without ``class_names`` the prediction classes cannot be named, so matching ignores classes.
    """
    keep = [r for r in rows if r[1] >= score_threshold]
    norm = np.array([r[2:] for r in keep], dtype=np.float64).reshape(-1, 4)
    pred_boxes = np.clip(
        box_ops.xyxy_norm_to_xyxy(norm, width=item.width, height=item.height),
        0,
        [item.width, item.height, item.width, item.height],
    )

    def name(class_id: float) -> str:
        cid = int(class_id)
        return class_names[cid] if class_names and 0 <= cid < len(class_names) else f"class {cid}"

    pred_names = [name(r[0]) for r in keep]
    item.predictions = [
        [n, round(r[1], 3), *[round(float(v), 1) for v in b]]
        for n, r, b in zip(pred_names, keep, pred_boxes, strict=True)
    ]
    iou = box_ops.iou_xyxy(np.array(item.boxes, dtype=np.float64).reshape(-1, 4), pred_boxes)
    if class_names:
        same = np.array([[g == p for p in pred_names] for g in item.classes], dtype=bool).reshape(iou.shape)
        iou = np.where(same, iou, 0.0)
    best_for_label = iou.max(axis=1) if iou.shape[1] else np.zeros(iou.shape[0])
    best_for_pred = iou.max(axis=0) if iou.shape[0] else np.zeros(iou.shape[1])
    missed = best_for_pred < MATCH_IOU
    item.missed = int(missed.sum())
    item.extra = int((best_for_label < MATCH_IOU).sum())
    loose = (best_for_label >= MATCH_IOU) & (best_for_label < GOOD_IOU)
    item.low_iou = int(loose.sum())
    scores = np.array([r[1] for r in keep], dtype=np.float64)
    item.suspicion = float(scores[missed].sum() + item.extra + (1.0 - best_for_label[loose]).sum())


# ----------------------------------------------------------------------------- the session


@dataclass
class ReviewSession:
    """The loaded items and the decisions; every decision is written through at once (thread-safe)."""

    items: list[ReviewItem]
    discard: str
    has_predictions: bool = False
    rejected: dict[str, str] = field(default_factory=dict)  # image id -> reason
    kept: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thumbs: collections.OrderedDict = field(default_factory=collections.OrderedDict, repr=False)
    thumb_cache_size: int = 2000

    @functools.cached_property
    def image_ids(self) -> set[str]:
        """Every image id of the loaded manifests."""
        return {item.image_id for item in self.items}

    def progress(self) -> dict:
        """Reviewed / rejected / kept / total counts over the loaded images (by image id)."""
        ids = self.image_ids
        rejected = sum(1 for i in ids if i in self.rejected)
        kept = sum(1 for i in ids if i in self.kept and i not in self.rejected)
        return {"reviewed": rejected + kept, "rejected": rejected, "kept": kept, "total": len(ids)}

    def decisions(self) -> dict[str, dict]:
        """Image id -> {"decision", "reason"} for every reviewed image."""
        out = {i: {"decision": "keep", "reason": ""} for i in self.kept}
        out.update({i: {"decision": "reject", "reason": r} for i, r in self.rejected.items()})
        return out

    def decide(self, image_id: str, decision: str, reason: str = "") -> dict:
        """Record a decision (``reject``, ``keep`` or ``clear``) and save both files atomically."""
        if decision not in DECISIONS:
            raise ConfigError(f"unknown decision {decision!r}; expected one of {', '.join(DECISIONS)}")
        if image_id not in self.image_ids:
            raise ConfigError(f"image id {image_id!r} is not in the loaded manifests")
        with self._lock:
            self.rejected.pop(image_id, None)
            self.kept.discard(image_id)
            if decision == "reject":
                self.rejected[image_id] = clean_reason(reason)
            elif decision == "keep":
                self.kept.add(image_id)
            self.save()
            return self.progress()

    def save(self) -> None:
        """Write the discard file, then the sidecar (both atomic; the discard file is the truth)."""
        storage.write_text(self.discard, format_discard(self.rejected, total=len(self.image_ids)))
        sidecar = {
            "version": 1,
            "discard": storage.basename(self.discard),
            "kept": sorted(self.kept),
            "rejected": sorted(self.rejected),
        }
        storage.write_bytes(sidecar_path(self.discard), orjson.dumps(sidecar, option=orjson.OPT_INDENT_2))

    def image_bytes(self, index: int, *, thumb: bool) -> tuple[bytes, str]:
        """(bytes, content type) of item ``index``'s image; thumbnails are JPEGs cached in memory."""
        item = self.items[index]
        if not thumb:
            content_type = mimetypes.guess_type(storage.basename(item.source_ref))[0] or "image/jpeg"
            return storage.read_bytes(item.source_ref), content_type
        with self._lock:
            if index in self._thumbs:
                self._thumbs.move_to_end(index)
                return self._thumbs[index], "image/jpeg"
        data = make_thumbnail(storage.read_bytes(item.source_ref))
        with self._lock:
            self._thumbs[index] = data
            while len(self._thumbs) > self.thumb_cache_size:
                self._thumbs.popitem(last=False)
        return data, "image/jpeg"


def make_thumbnail(data: bytes, size: int = THUMB_SIZE) -> bytes:
    """A JPEG no larger than ``size`` on its long side (the aspect ratio kept)."""
    from detforge import images

    return images.thumbnail_jpeg(data, size=size)


def load_review(
    manifests: Iterable[str | os.PathLike],
    *,
    discard: str | os.PathLike,
    predictions: str | os.PathLike | None = None,
    label_attribute: str | None = None,
    classes: str | os.PathLike | None = None,
    score_threshold: float = 0.5,
    images: str | None = None,
    on_error: str = "stop",
    report=None,
) -> ReviewSession:
    """Read manifests (streaming), predictions and earlier decisions into a ReviewSession.

    ``images``, ``on_error``, ``report``: as in every reader (``data.sources.read_source``): the image folder
    of VOC/COCO/labelme inputs, and whether a bad line/box/file stops or is skipped and counted in
    ``report`` (a ``groundtruth.ReadReport``).
    """
    manifests = [os.fspath(m) for m in manifests]
    if not manifests:
        raise ConfigError("give at least one manifest to review")
    preds = read_predictions(predictions) if predictions is not None else None
    class_names = read_class_names(classes) if classes is not None else None
    items: list[ReviewItem] = []
    for manifest in manifests:
        _, _, records = read_source(
            manifest, label_attribute=label_attribute, images=images, on_error=on_error, report=report
        )
        for record in records:
            boxes = record.boxes
            w, h = record.width, record.height
            widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
            tiny = (widths < TINY_FRACTION * w) | (heights < TINY_FRACTION * h)
            edge = (
                (boxes[:, 0] <= EDGE_PIXELS)
                | (boxes[:, 1] <= EDGE_PIXELS)
                | (boxes[:, 2] >= w - EDGE_PIXELS)
                | (boxes[:, 3] >= h - EDGE_PIXELS)
            )
            item = ReviewItem(
                index=len(items),
                image_id=record.image_id,
                source_ref=resolve_source_ref(record.source_ref, manifest),
                job=record.job_name or storage.basename(manifest),
                width=w,
                height=h,
                boxes=boxes.tolist(),
                classes=record.class_names,
                tiny=int(tiny.sum()),
                edge=int(edge.sum()),
            )
            if preds is not None:
                compare_with_predictions(
                    item,
                    preds.get(item.image_id, []),
                    class_names=class_names,
                    score_threshold=score_threshold,
                )
            items.append(item)
    session = ReviewSession(items=items, discard=os.fspath(discard), has_predictions=preds is not None)
    session.rejected = read_discard(session.discard)
    sidecar = sidecar_path(session.discard)
    if storage.exists(sidecar):
        try:
            state = orjson.loads(storage.read_bytes(sidecar))
            session.kept = {i for i in state.get("kept", []) if i not in session.rejected}
        except (orjson.JSONDecodeError, AttributeError):
            pass  # a damaged sidecar only loses "kept" marks; the discard file is the truth
    return session


# ----------------------------------------------------------------------------- the HTTP server


class ReviewServer(LocalServer):
    """The review server: a ReviewSession behind a token, on a loopback address."""

    command = "detforge review"

    def __init__(
        self, session: ReviewSession, *, host: str = "127.0.0.1", port: int = 8765, token: str | None = None
    ) -> None:
        self.session = session
        super().__init__(_Handler, host=host, port=port, token=token)


class _Handler(TokenHandler):
    server: ReviewServer
    server_version = "detforge-review"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path, query = self._parse()
        if not self._authorized(query):
            return
        session = self.server.session
        try:
            if path in ("/", "/index.html"):
                self._send(
                    200,
                    inline_page("review", self.server.token),
                    "text/html; charset=utf-8",
                    {"Cache-Control": "no-store"},
                )
            elif path == "/api/items":
                self._json(
                    200,
                    {
                        "items": [item.to_json() for item in session.items],
                        "predictions": session.has_predictions,
                        "discard": session.discard,
                        "decisions": session.decisions(),
                        "progress": session.progress(),
                        "thresholds": {
                            "tiny_fraction": TINY_FRACTION,
                            "edge_pixels": EDGE_PIXELS,
                            "match_iou": MATCH_IOU,
                            "good_iou": GOOD_IOU,
                        },
                    },
                )
            elif path == "/api/progress":
                self._json(200, session.progress())
            elif path.startswith("/api/image/"):
                self._image(path[len("/api/image/") :], thumb=(query.get("size") or [""])[0] == "thumb")
            elif path == "/api/discard":
                name = storage.basename(session.discard) or "discard.txt"
                text = format_discard(session.rejected, total=len(session.image_ids)).encode("utf-8")
                headers = {
                    "Content-Disposition": f'attachment; filename="{name}"',
                    "Cache-Control": "no-store",
                }
                self._send(200, text, "text/plain; charset=utf-8", headers)
            else:
                self._error(404, "not found")
        except DetforgeError as exc:
            self._error(502, str(exc))

    def _image(self, key: str, *, thumb: bool) -> None:
        session = self.server.session
        index = self._item_index(key, len(session.items), "images")
        if index is None:
            return
        data, content_type = session.image_bytes(index, thumb=thumb)
        self._send(200, data, content_type, {"Cache-Control": "private, max-age=3600"})

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        path, query = self._parse()
        if not self._authorized(query):
            return
        if path != "/api/decide":
            self._error(404, "not found")
            return
        data = self._read_body(MAX_BODY)
        if data is None:
            return
        try:
            body = orjson.loads(data or b"{}")
            progress = self.server.session.decide(
                str(body.get("id", "")), str(body.get("decision", "")), str(body.get("reason") or "")
            )
        except (orjson.JSONDecodeError, AttributeError):
            self._error(400, 'expected JSON {"id": ..., "decision": "reject"|"keep"|"clear", "reason": ...}')
            return
        except ConfigError as exc:
            self._error(400, str(exc))
            return
        except DetforgeError as exc:
            self._error(500, f"could not save the decision: {exc}")
            return
        self._json(
            200,
            {
                "progress": progress,
                "decisions": {
                    body["id"]: self.server.session.decisions().get(
                        body["id"], {"decision": "none", "reason": ""}
                    )
                },
            },
        )


def review(
    manifests: Sequence[str | os.PathLike],
    *,
    discard: str | os.PathLike,
    predictions: str | os.PathLike | None = None,
    label_attribute: str | None = None,
    classes: str | os.PathLike | None = None,
    score_threshold: float = 0.5,
    host: str = "127.0.0.1",
    port: int = 8765,
    open_browser: bool = True,
    images: str | None = None,
    on_error: str = "stop",
    report=None,
    on_ready: Callable[[ReviewServer], None] | None = None,
) -> ReviewSession:
    """Load the manifests and serve the review page until interrupted; returns the session at the end.

    ``on_ready(server)`` is called once the server listens (the CLI prints ``server.url`` there). A local
    discard file has one session at a time (``<discard>.lock``, as ``detforge label``'s output): a second
    one is refused instead of the last writer silently dropping the other's rejections.
    """
    with discard_lock(discard):
        session = load_review(
            manifests,
            discard=discard,
            predictions=predictions,
            images=images,
            on_error=on_error,
            report=report,
            label_attribute=label_attribute,
            classes=classes,
            score_threshold=score_threshold,
        )
        try:
            server = ReviewServer(session, host=host, port=port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                field="--port",
                hint="choose another --port",
            ) from None
        redirect = None
        try:
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
    return session


@contextlib.contextmanager
def discard_lock(discard: str | os.PathLike) -> Iterator[None]:
    """Hold ``<discard>.lock`` while a session may write the discard file; ConfigError naming the other
    session's pid when it is taken. An ``s3://`` discard file has no lock."""
    discard = os.fspath(discard)
    if storage.is_remote(discard):
        yield
        return
    lock = storage.FileLock(os.path.abspath(discard) + ".lock")
    holder = lock.acquire()
    if holder is not None:
        raise ConfigError(
            f"another detforge review is writing this discard list ({holder})",
            path=discard,
            field="--discard",
            hint="stop it first, or give another --discard",
        )
    try:
        yield
    finally:
        lock.release()
