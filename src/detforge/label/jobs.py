"""A labeling job on disk: the input manifest's items, their boxes, and Ground Truth's bounding-box output.

In here: reading the job's input (a labeling *input* manifest, or for ``adjust`` an output manifest whose
boxes are corrected), resuming from an output manifest written earlier, the model's proposals and the
"least sure first" order, and writing the output after every change (atomically, the whole file, so a
killed process leaves the last saved state). Not in here: the HTTP server and the page (``label.app``).
No torch: proposals come from ``detforge.runtime.Predictor`` (ONNX Runtime).

Boxes travel as ``[x1, y1, x2, y2, class_id, score]`` in image pixels; ``score`` is the model's confidence
of a proposal accepted unchanged (or, when adjusting, the input box's own confidence while it is
unchanged) and ``None`` for a box a person drew or changed, written with confidence ``HUMAN_CONFIDENCE``.

Output line (Ground Truth's bounding-box job output; every other field of the input line is kept)::

    {"source-ref": ..., <input fields>...,
     "<attr>": {"annotations": [{"class_id", "left", "top", "width", "height"}...],
                "image_size": [{"width", "height", "depth"}]},
     "<attr>-metadata": {"job-name": "labeling-job/<name>", "class-map": {"0": "blue box"},
                         "human-annotated": "yes"|"no", "objects": [{"confidence": 0.93}...],
                         "creation-date": "2026-12-01T15:04:05.123456",
                         "type": "groundtruth/object-detection"}}

An adjustment job (``adjust=True``) writes ``adjusted-<attr>`` / ``adjusted-<attr>-metadata`` the same way,
with ``"adjustment-status": "adjusted"|"unadjusted"``, and keeps the original ``<attr>``.
"""

from __future__ import annotations

import collections
import datetime as _dt
import math
import mimetypes
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from detforge import boxes as box_ops
from detforge import images, storage
from detforge.data.groundtruth import (
    ADJUSTED_PREFIX,
    DETECTION_TYPES,
    find_label_attribute,
    parse_record,
    read_class_names,
    read_image_refs,
    ref_from,
    resolve_source_ref,
)
from detforge.errors import ConfigError, DetforgeError, ManifestError

HUMAN_CONFIDENCE = 1.0  # the confidence written for a box a person drew or changed
PROPOSAL_FLOOR = 0.05  # proposals below this score are never sent to the page (the slider's minimum)
THUMB_SIZE = 160
ORDERS = ("manifest", "uncertainty")
MAX_BOXES = 1000  # per image: a page that sends more is broken


# ----------------------------------------------------------------------------- classes


def parse_classes(value: str | Sequence[str] | None) -> list[str] | None:
    """Class names from ``"blue box,yellow box"``, a list, or a ``classes.json`` / ``model.json`` path."""
    if value is None:
        return None
    if not isinstance(value, str):
        names = [str(v).strip() for v in value]
    elif value.endswith(".json") or storage.exists(value):
        names = [name.strip() for name in read_class_names(value)]
    else:
        names = [name.strip() for name in value.split(",")]
    names = [name for name in names if name]
    if not names:
        raise ConfigError(
            "no class names given", field="--classes", hint='e.g. --classes "blue box,yellow box"'
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"a class is named twice in {names}", field="--classes")
    return names


def default_job_name(out: str) -> str:
    """``jobs/boxes-1.output.manifest`` -> ``boxes-1`` (the job and, by default, the label attribute)."""
    name = storage.basename(out)
    for suffix in (".manifest", ".jsonl", ".output"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name or "label"


def image_key(path: str) -> str:
    """One spelling of an image's location (absolute, normalized locally) to match lines by."""
    return path if storage.is_remote(path) else os.path.normpath(os.path.abspath(path))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------- the job


@dataclass
class LabelItem:
    """One image of the job."""

    index: int
    source_ref: str
    path: str  # where the image is read from (source_ref resolved against the manifest's folder)
    fields: dict  # the input line as read
    origin: str  # "manifest:line"
    width: int | None = None
    height: int | None = None
    depth: int = 3
    start: list[list] = field(default_factory=list)  # boxes before this job (adjust) or []
    boxes: list[list] | None = None  # boxes now; None while untouched
    done: bool = False
    changed_at: str | None = None
    proposals: list[list] | None = None  # [x1, y1, x2, y2, class_id, score], None until computed
    uncertainty: float = 0.0
    line: bytes | None = None  # the encoded output line while done

    @property
    def current(self) -> list[list]:
        return self.start if self.boxes is None else self.boxes

    @property
    def name(self) -> str:
        return storage.basename(self.source_ref)


def _box_from(values, *, class_map: dict[int, str], width: int, height: int, where: str) -> list:
    if not isinstance(values, list) or len(values) != 6:
        raise ConfigError(f"{where}: a box is [x1, y1, x2, y2, class_id, score|null], got {values!r}")
    coords = values[:4]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coords):
        raise ConfigError(f"{where}: box corners must be finite numbers, got {coords!r}")
    class_id, score = values[4], values[5]
    if isinstance(class_id, bool) or not isinstance(class_id, int) or class_id not in class_map:
        raise ConfigError(f"{where}: class_id {class_id!r} is not one of {sorted(class_map)}")
    if score is not None and (
        isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1
    ):
        raise ConfigError(f"{where}: score must be null or between 0 and 1, got {score!r}")
    x1, x2 = sorted((min(max(float(coords[0]), 0.0), width), min(max(float(coords[2]), 0.0), width)))
    y1, y2 = sorted((min(max(float(coords[1]), 0.0), height), min(max(float(coords[3]), 0.0), height)))
    ltwh = box_ops.xyxy_to_ltwh_int([[x1, y1, x2, y2]])[0]
    if ltwh[2] < 1 or ltwh[3] < 1:
        raise ConfigError(
            f"{where}: box {coords!r} is smaller than one pixel inside the {width}x{height} image"
        )
    return [x1, y1, x2, y2, int(class_id), None if score is None else float(score)]


def _annotations(boxes: list[list]) -> list[dict]:
    ltwh = box_ops.xyxy_to_ltwh_int([b[:4] for b in boxes]) if boxes else np.zeros((0, 4), np.int64)
    return [
        {"class_id": int(b[4]), "width": int(r[2]), "top": int(r[1]), "height": int(r[3]), "left": int(r[0])}
        for b, r in zip(boxes, ltwh, strict=True)
    ]


class LabelJob:
    """The items of one labeling job and its output manifest, written through after every change.

    Thread-safe: the server calls it from several threads.
    """

    def __init__(
        self,
        items: list[LabelItem],
        *,
        manifest: str,
        out: str,
        class_map: dict[int, str],
        attribute: str,
        job_name: str,
        adjust: bool,
        predictor=None,
        foreign: Sequence[bytes] = (),
    ) -> None:
        self.items = items
        self.manifest = manifest
        self.out = out
        self.class_map = dict(class_map)
        self.attribute = attribute  # the attribute written (``adjusted-...`` when adjusting)
        self.job_name = job_name
        self.adjust = adjust
        self.predictor = predictor
        self.foreign = list(foreign)  # output lines of images not in this input: kept as they were
        self.order = list(range(len(items)))
        self.order_name = "manifest"
        self._position = self.order[:]
        self._lock = threading.RLock()
        self._thumbs: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self.thumb_cache_size = 5000
        self.unreadable: list[str] = []  # images the model could not score (``set_order``), with why
        self._model_ids: dict[int, int] = {}
        if predictor is not None:
            by_name = {name: cid for cid, name in self.class_map.items()}
            self._model_ids = {
                i: by_name[name] for i, name in enumerate(predictor.class_names) if name in by_name
            }
            if not self._model_ids:
                raise ConfigError(
                    f"none of the model's classes {predictor.class_names} is one of the job's "
                    f"classes {sorted(self.class_map.values())}",
                    field="--model",
                )

    # -- order and pages
    def set_order(self, order: str, *, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Put the items in ``order``: ``manifest``, or ``uncertainty`` (the model's least sure first)."""
        if order not in ORDERS:
            raise ConfigError(
                f"unknown order {order!r}; expected one of {', '.join(ORDERS)}", field="--order"
            )
        if order == "uncertainty":
            if self.predictor is None:
                raise ConfigError(
                    "ordering by uncertainty needs the model", field="--order", hint="add --model DEPLOY_DIR"
                )
            self.unreadable = []
            cached = self.load_proposals()
            for count, item in enumerate(self.items, start=1):
                try:
                    self.proposals(item.index)
                except DetforgeError as exc:  # one bad frame must not block the job: it goes last
                    self.unreadable.append(str(exc))
                if on_progress is not None:
                    on_progress(count, len(self.items))
            if cached < len(self.items):
                self.save_proposals()
            self.order = sorted(range(len(self.items)), key=lambda i: (-self.items[i].uncertainty, i))
        else:
            self.order = list(range(len(self.items)))
        self.order_name = order
        self._position = [0] * len(self.items)
        for pos, index in enumerate(self.order):
            self._position[index] = pos

    # -- the model's pass over every image, kept beside the output so that a restart need not redo it
    @property
    def proposals_path(self) -> str:
        return self.out + ".proposals.json"

    def _model_key(self) -> str | None:
        sha = getattr(self.predictor, "metadata", {}).get("sha256")
        classes = sorted(self._model_ids.items())
        return f"{sha} {classes} {PROPOSAL_FLOOR}" if sha else None

    def load_proposals(self) -> int:
        """Take the proposals saved by an earlier run of the same model; returns how many images got some."""
        key = self._model_key()
        if key is None or not storage.exists(self.proposals_path):
            return 0
        try:
            saved = orjson.loads(storage.read_bytes(self.proposals_path))
        except orjson.JSONDecodeError:
            return 0  # a damaged cache is only work to redo
        if not isinstance(saved, dict) or saved.get("model") != key:
            return 0
        if not isinstance(saved.get("images"), dict):
            return 0
        found = 0
        for item in self.items:
            entry = saved["images"].get(image_key(item.path))
            if isinstance(entry, dict) and isinstance(entry.get("proposals"), list):
                item.proposals = entry["proposals"]
                item.uncertainty = float(entry.get("uncertainty", 0.0))
                item.width = item.width or entry.get("w")
                item.height = item.height or entry.get("h")
                found += 1
        return found

    def save_proposals(self) -> None:
        """Save every computed proposal (one file, atomically) for the next start of this job."""
        key = self._model_key()
        if key is None:
            return
        entries = {
            image_key(item.path): {
                "proposals": item.proposals,
                "uncertainty": item.uncertainty,
                "w": item.width,
                "h": item.height,
            }
            for item in self.items
            if item.proposals is not None
        }
        storage.write_bytes(self.proposals_path, orjson.dumps({"model": key, "images": entries}))

    def position(self, index: int) -> int:
        return self._position[index]

    def page(self, offset: int, limit: int) -> list[dict]:
        """Item summaries at positions ``offset .. offset+limit-1`` of the order."""
        with self._lock:
            return [
                self.summary(self.order[pos])
                for pos in range(max(0, offset), min(len(self.order), offset + limit))
            ]

    def summary(self, index: int) -> dict:
        item = self.items[index]
        return {
            "pos": self._position[index],
            "i": index,
            "name": item.name,
            "done": item.done,
            "n": len(item.current),
        }

    def next_todo(self, start: int, step: int = 1) -> int | None:
        """The first position from ``start`` (walking by ``step``) whose image is not done yet."""
        pos = start
        while 0 <= pos < len(self.order):
            if not self.items[self.order[pos]].done:
                return pos
            pos += step
        return None

    def progress(self) -> dict:
        done = sum(1 for item in self.items if item.done)
        return {"done": done, "total": len(self.items)}

    # -- one item
    def ensure_size(self, item: LabelItem) -> None:
        """Fill the item's width and height from its image header when the manifest does not give them."""
        if item.width is None or item.height is None:
            item.width, item.height = images.probe(item.path)

    def detail(self, index: int) -> dict:
        """Everything the page needs to edit one image."""
        item = self.items[index]
        self.ensure_size(item)
        proposals = self.proposals(index) if self.predictor is not None else []
        with self._lock:
            return {
                **self.summary(index),
                "w": item.width,
                "h": item.height,
                "boxes": item.current,
                "start": item.start,
                "proposals": proposals,
                "uncertainty": round(item.uncertainty, 4),
            }

    def proposals(self, index: int) -> list[list]:
        """The model's detections (score >= PROPOSAL_FLOOR, job class ids) of an item, computed once."""
        item = self.items[index]
        if self.predictor is None:
            return []
        if item.proposals is None:
            image = images.read_pil(item.path)
            if item.width is None or item.height is None:
                item.width, item.height = image.size
            # boxes in the manifest's pixels, should its image_size differ from the file's
            sx, sy = item.width / image.size[0], item.height / image.size[1]
            detections = self.predictor.predict([np.asarray(image)], threshold=PROPOSAL_FLOOR)[0]
            found = []
            for box, score, cid in zip(
                detections.boxes_xyxy.tolist(),
                detections.scores.tolist(),
                detections.class_ids.tolist(),
                strict=True,
            ):
                box = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
                if int(cid) in self._model_ids and box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                    found.append([round(v, 1) for v in box] + [self._model_ids[int(cid)], round(score, 4)])
            found.sort(key=lambda p: -p[5])
            # least sure = a detection nearest 0.5; an image the model is sure about has scores near 0 or 1
            item.uncertainty = max((1 - abs(2 * p[5] - 1) for p in found), default=0.0)
            item.proposals = found
        return item.proposals

    def update(self, index: int, boxes: list, *, done: bool = True) -> dict:
        """Replace an item's boxes (page order) and save the output; returns the item's summary."""
        if not 0 <= index < len(self.items):
            raise ConfigError(f"no item {index}")
        if not isinstance(boxes, list) or len(boxes) > MAX_BOXES:
            raise ConfigError(f"boxes must be a list of at most {MAX_BOXES} boxes")
        item = self.items[index]
        self.ensure_size(item)
        checked = [
            _box_from(b, class_map=self.class_map, width=item.width, height=item.height, where=f"box {n}")
            for n, b in enumerate(boxes)
        ]
        with self._lock:
            item.boxes = checked
            item.done = bool(done)
            item.changed_at = _now()
            item.line = self.encode(item) if item.done else None
            self.save()
            return self.summary(index)

    # -- output
    def line_object(self, item: LabelItem) -> dict:
        """The output manifest line of a done item."""
        boxes = item.current
        used = sorted({int(b[4]) for b in boxes})
        meta = {
            "job-name": f"labeling-job/{self.job_name}",
            "class-map": {str(cid): self.class_map[cid] for cid in used},
            "human-annotated": "yes"
            if self.adjust or not boxes or any(b[5] is None for b in boxes)
            else "no",
            "objects": [{"confidence": HUMAN_CONFIDENCE if b[5] is None else b[5]} for b in boxes],
            "creation-date": item.changed_at or _now(),
            "type": DETECTION_TYPES[0],
        }
        annotations = _annotations(boxes)
        if self.adjust:
            unchanged = annotations == _annotations(item.start)
            meta["adjustment-status"] = "unadjusted" if unchanged else "adjusted"
        obj = dict(item.fields)
        obj["source-ref"] = self.output_ref(item)
        obj[self.attribute] = {
            "annotations": annotations,
            "image_size": [{"width": item.width, "depth": item.depth, "height": item.height}],
        }
        obj[f"{self.attribute}-metadata"] = meta
        return obj

    def output_ref(self, item: LabelItem) -> str:
        """The item's ``source-ref`` as seen from the output manifest: a relative reference is rewritten
        to still name the same image when the output lies in another folder than the input."""
        ref = item.source_ref
        if storage.is_remote(ref) or os.path.isabs(ref):
            return ref
        folder = self.out if storage.is_remote(self.out) else os.path.dirname(os.path.abspath(self.out))
        return ref_from(item.path, folder)

    def encode(self, item: LabelItem) -> bytes:
        return orjson.dumps(self.line_object(item)) + b"\n"

    def save(self) -> None:
        """Write the output manifest (done items in input order, then lines of other images), atomically."""
        with self._lock:
            data = b"".join(item.line for item in self.items if item.done and item.line is not None)
            storage.write_bytes(self.out, data + b"".join(self.foreign))

    # -- images
    def image_bytes(self, index: int, *, thumb: bool) -> tuple[bytes, str]:
        """(bytes, content type) of an item's image; thumbnails are upright JPEGs kept in memory."""
        item = self.items[index]
        if not thumb:
            data = images.read_bytes(item.path)
            if images.orientation(data) == 1:
                return data, mimetypes.guess_type(item.name)[0] or "image/jpeg"
            # turned upright here, so the page shows exactly the pixels the boxes refer to
            upright = images.decode_pil(data, name=item.path)
            return images.encode(upright, item.name), mimetypes.guess_type(item.name)[0] or "image/jpeg"
        with self._lock:
            if index in self._thumbs:
                self._thumbs.move_to_end(index)
                return self._thumbs[index], "image/jpeg"
        data = images.thumbnail_jpeg(images.read_bytes(item.path), size=THUMB_SIZE)
        with self._lock:
            self._thumbs[index] = data
            while len(self._thumbs) > self.thumb_cache_size:
                self._thumbs.popitem(last=False)
        return data, "image/jpeg"


# ----------------------------------------------------------------------------- opening a job


def _boxes_of(record, class_ids: dict[str, int], *, where: str) -> list[list]:
    out = []
    for box, cid, conf in zip(
        record.boxes.tolist(), record.class_ids.tolist(), record.confidences.tolist(), strict=True
    ):
        name = record.class_map[int(cid)]
        if name not in class_ids:
            raise ConfigError(
                f"{where}: class {name!r} is not one of the job's classes {sorted(class_ids)}",
                field="--classes",
            )
        score = None if conf != conf or conf == HUMAN_CONFIDENCE else float(conf)
        out.append([*box, class_ids[name], score])
    return out


def open_job(
    manifest: str | os.PathLike,
    *,
    out: str | os.PathLike,
    classes: str | Sequence[str] | None = None,
    adjust: bool = False,
    label_attribute: str | None = None,
    job_name: str | None = None,
    predictor=None,
    order: str = "manifest",
    on_progress: Callable[[int, int], None] | None = None,
) -> LabelJob:
    """Read the job's input manifest and any output written before (resume) into a LabelJob.

    ``classes``: names (``"a,b"``, a list or a classes.json); when adjusting they may add classes to the
    input's class map, and with a model and no classes the model's classes are used.
    """
    manifest, out = os.fspath(manifest), os.fspath(out)
    if os.path.abspath(manifest) == os.path.abspath(out):
        raise ConfigError(
            "the output would overwrite the input manifest",
            field="--out",
            hint="write the job's output to a new file",
        )
    names = parse_classes(classes)
    if names is None and predictor is not None and not adjust:
        names = list(predictor.class_names)
    if names is None and not adjust:
        raise ConfigError(
            "name the classes to draw",
            field="--classes",
            hint='e.g. --classes "blue box,yellow box" (or a classes.json, or --model DEPLOY)',
        )
    job_name = job_name or default_job_name(out)
    class_map: dict[int, str] = dict(enumerate(names or []))
    base = label_attribute
    items: list[LabelItem] = []
    for line, obj in read_image_refs(manifest):
        where = f"{manifest}:{line}"
        if not isinstance(obj, dict) or not isinstance(obj.get("source-ref"), str) or not obj["source-ref"]:
            raise ManifestError("missing or empty", path=manifest, line=line, field="source-ref")
        ref = obj["source-ref"]
        item = LabelItem(
            index=len(items), source_ref=ref, path=resolve_source_ref(ref, manifest), fields=obj, origin=where
        )
        if adjust:
            if base is None:
                try:
                    found = find_label_attribute(obj)
                except ManifestError as exc:
                    raise ManifestError(exc.message, path=manifest, line=line, hint=exc.hint) from None
                if found is None:
                    raise ManifestError(
                        "no bounding-box labels to adjust",
                        path=manifest,
                        line=line,
                        hint="label it first: detforge label without --adjust",
                    )
                base = found[len(ADJUSTED_PREFIX) :] if found.startswith(ADJUSTED_PREFIX) else found
            record = parse_record(obj, path=manifest, line=line, label_attribute=base)
            item.width, item.height, item.depth = record.width, record.height, record.depth
            for cid, name in record.class_map.items():
                if class_map.get(cid, name) != name:
                    raise ManifestError(
                        f"class id {cid} is {name!r} here but {class_map[cid]!r} in "
                        "--classes or an earlier line",
                        path=manifest,
                        line=line,
                        field=f"{record.label_attribute}-metadata.class-map",
                    )
                class_map[cid] = name
            item.start = _boxes_of(record, {n: c for c, n in class_map.items()}, where=where)
        else:
            attribute = label_attribute or job_name
            if attribute in obj:
                raise ManifestError(
                    f"this line already has labels under {attribute!r}",
                    path=manifest,
                    line=line,
                    hint="correct them with --adjust, or name a new --label-attribute",
                )
        items.append(item)
    if not items:
        raise ManifestError("no images in the manifest", path=manifest)
    if adjust:
        for name in names or []:
            if name not in class_map.values():
                class_map[max(class_map, default=-1) + 1] = name
        attribute = ADJUSTED_PREFIX + base
    else:
        attribute = label_attribute or job_name
    job = LabelJob(
        items,
        manifest=manifest,
        out=out,
        class_map=class_map,
        attribute=attribute,
        job_name=job_name,
        adjust=adjust,
        predictor=predictor,
    )
    _resume(job)
    job.set_order(order, on_progress=on_progress)
    return job


def _resume(job: LabelJob) -> None:
    """Take the boxes of images already in the output manifest; keep its other lines as they are."""
    if not storage.exists(job.out):
        return
    waiting: dict[str, collections.deque[int]] = collections.defaultdict(collections.deque)
    for item in job.items:
        waiting[image_key(item.path)].append(item.index)
    class_ids = {name: cid for cid, name in job.class_map.items()}
    base = job.attribute[len(ADJUSTED_PREFIX) :] if job.adjust else job.attribute
    for line, raw in storage.iter_lines(job.out):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ManifestError(
                f"not valid JSON: {exc}",
                path=job.out,
                line=line,
                hint="fix or move the output file; it is the job's saved work",
            ) from None
        ref = obj.get("source-ref") if isinstance(obj, dict) else None
        queue = waiting.get(image_key(resolve_source_ref(ref, job.out))) if isinstance(ref, str) else None
        if not queue or job.attribute not in obj:
            job.foreign.append(raw + b"\n")
            continue
        item = job.items[queue.popleft()]
        try:
            record = parse_record(obj, path=job.out, line=line, label_attribute=base)
            item.boxes = _boxes_of(record, class_ids, where=f"{job.out}:{line}")
        except ManifestError as exc:
            raise ManifestError(
                f"cannot resume from this line: {exc.message}",
                path=job.out,
                line=line,
                hint="fix or move the output file; it is the job's saved work",
            ) from None
        item.width, item.height, item.depth = record.width, record.height, record.depth
        meta = obj.get(f"{job.attribute}-metadata") or {}
        item.changed_at = meta.get("creation-date") if isinstance(meta.get("creation-date"), str) else None
        item.done = True
        item.line = job.encode(item)
