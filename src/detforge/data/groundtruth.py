"""Ground Truth bounding-box manifests (JSON Lines) as typed records, read and written as streams.

A ``Record`` holds what the tools work on (image reference and size, ``xyxy`` boxes, class ids,
class map, confidences, job name) plus ``fields``: the whole line as it was read, so that writing a
record back gives the same JSON except for what a step changed. Format: see docs/DESIGN.md.

Not here: joining jobs, discarding, splitting (``prepare``), other formats (``formats_*``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import orjson

from detforge import boxes as box_ops
from detforge import storage
from detforge.errors import FormatError, ManifestError

DETECTION_TYPES = ("groundtruth/object-detection", "groundtruth/object_detection")
VERIFICATION_TYPES = ("groundtruth/label-verification", "groundtruth/label_verification")
ADJUSTED_PREFIX = "adjusted-"
# Where an import from YOLO/VOC/COCO notes the split the source gave an image (``--keep-splits``).
SPLIT_FIELD = "detforge-split"
# What a verification job's worker answer (its metadata ``class-name``) must be for the image to be
# rejected, compared case-insensitively: the names AWS's examples and the console's templates use.
DEFAULT_REJECT_LABELS = (
    "bad",
    "incorrect",
    "invalid",
    "no",
    "not correct",
    "reject",
    "rejected",
    "wrong",
    "needs adjustment",
    "poor",
    "false",
)
_BOX_KEYS = ("left", "top", "width", "height")


@dataclass(frozen=True)
class Verification:
    """A label-verification job's answer for one image: the label the worker chose and their comments."""

    attribute: str
    class_name: str
    job_name: str | None = None
    comments: tuple[str, ...] = ()

    def rejects(self, reject_labels) -> bool:
        """True when the chosen label is one of ``reject_labels`` (case-insensitive)."""
        return self.class_name.strip().lower() in {str(x).strip().lower() for x in reject_labels}


@dataclass
class Record:
    """One labeled image of a manifest."""

    source_ref: str
    width: int
    height: int
    depth: int
    boxes: np.ndarray  # (N, 4) float64 xyxy pixels
    class_ids: np.ndarray  # (N,) int64
    class_map: dict[int, str]
    confidences: np.ndarray  # (N,) float64, NaN where the line has none
    label_attribute: str = "bb"
    job_name: str | None = None
    verification: Verification | None = None  # a verification job's answer on this line, if any
    fields: dict = field(default_factory=dict, repr=False)  # the line as read
    origin: str | None = None  # "path:line" for messages
    difficult: np.ndarray | None = None  # (N,) bool: VOC "difficult" / COCO "iscrowd"; None = none
    split: str | None = None  # "train", "validation" or "test" when the source says so

    def __post_init__(self) -> None:
        if self.difficult is None:
            self.difficult = np.zeros(len(self.class_ids), dtype=bool)

    @property
    def image_id(self) -> str:
        """The file stem of the image, e.g. ``blue_box_1_000043``: the id used for discards and splits."""
        return storage.stem(self.source_ref)

    @property
    def class_names(self) -> list[str]:
        """The class name of each box."""
        return [self.class_map[int(c)] for c in self.class_ids]

    def replace(self, **changes) -> Record:
        """A copy with some attributes changed (``fields`` is shared, never mutated)."""
        return dataclasses.replace(self, **changes)


@dataclass
class ReadReport:
    """What a lenient read (``on_error='skip'``) passed over: whole lines and single boxes."""

    lines: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # (path, line, message)
    skipped_boxes: list[str] = field(default_factory=list)  # the error message of each box left out
    corrected: list[str] = field(default_factory=list)  # what a reader corrected, e.g. an EXIF-swapped size
    notes: list[str] = field(default_factory=list)  # what a reader left out, e.g. labelme polygons


def box_problem(
    left: float, top: float, width: float, height: float, *, image_width: int, image_height: int
) -> str | None:
    """Why a ``ltwh`` pixel box cannot be used in an image of that size, or None when it can.

    The one rule for every input format (manifest, YOLO, VOC, COCO) and every command.
    """
    if not width > 0 or not height > 0:
        return f"box has non-positive size {width:g}x{height:g}"
    if left < 0 or top < 0 or left + width > image_width or top + height > image_height:
        return (
            f"box (left={left:g}, top={top:g}, width={width:g}, height={height:g}) lies outside "
            f"the {image_width}x{image_height} image"
        )
    return None


def find_verification(obj: dict) -> Verification | None:
    """The label-verification answer of a line, found by its metadata ``type`` whatever the attribute's name.

    The attribute's own value is only the index of the chosen label in the job's list; what it means is
    the metadata's ``class-name`` (AWS: ``"verify-bounding-box": "1"`` with ``"class-name": "bad"``).
    """
    for key, meta in obj.items():
        if key.endswith("-metadata") and isinstance(meta, dict) and meta.get("type") in VERIFICATION_TYPES:
            name = meta.get("class-name")
            if not isinstance(name, str) or not name.strip():
                raise ManifestError(
                    "a label-verification result without its 'class-name'", field=f"{key}.class-name"
                )
            feedback = meta.get("worker-feedback")
            comments = (
                tuple(
                    str(item["comment"])
                    for item in feedback or ()
                    if isinstance(item, dict) and item.get("comment")
                )
                if isinstance(feedback, list)
                else ()
            )
            return Verification(
                attribute=key[: -len("-metadata")],
                class_name=name.strip(),
                job_name=meta.get("job-name"),
                comments=comments,
            )
    return None


def find_label_attribute(obj: dict) -> str | None:
    """The name of the bounding-box label attribute of a line, found by its metadata ``type``.

    An adjustment job's ``adjusted-<attr>`` wins over ``<attr>``. None when there is none;
    a ManifestError (without location) when several unrelated ones make the choice ambiguous.
    """
    found = [
        key
        for key, value in obj.items()
        if not key.endswith("-metadata")
        and isinstance(obj.get(f"{key}-metadata"), dict)
        and obj[f"{key}-metadata"].get("type") in DETECTION_TYPES
        and isinstance(value, dict)
    ]
    if not found:
        return None
    adjusted = [k for k in found if k.startswith(ADJUSTED_PREFIX)]
    bases = {k[len(ADJUSTED_PREFIX) :] if k.startswith(ADJUSTED_PREFIX) else k for k in found}
    if len(bases) > 1:
        raise ManifestError(
            f"several bounding-box label attributes {sorted(found)}", hint="choose one with --label-attribute"
        )
    return adjusted[0] if adjusted else found[0]


def _int_field(value, where: str, path: str, line: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ManifestError(f"expected a number, got {value!r}", path=path, line=line, field=where)
    if float(value) != int(value):
        raise ManifestError(
            f"expected a whole number of pixels, got {value!r}", path=path, line=line, field=where
        )
    return int(value)


def parse_record(
    obj,
    *,
    path: str = "<memory>",
    line: int = 0,
    label_attribute: str | None = None,
    skipped_boxes: list[str] | None = None,
) -> Record:
    """Check one decoded manifest line and turn it into a Record (ManifestError naming the field).

    A box that cannot be used (``box_problem``) stops with an error, or, when ``skipped_boxes`` is a
    list, is left out and its message appended there (``--on-error skip``).
    """
    if not isinstance(obj, dict):
        raise ManifestError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    source_ref = obj.get("source-ref")
    if not isinstance(source_ref, str) or not source_ref:
        raise ManifestError("missing or empty", path=path, line=line, field="source-ref")
    if label_attribute is None:
        try:
            attr = find_label_attribute(obj)
        except ManifestError as exc:
            raise ManifestError(exc.message, path=path, line=line, hint=exc.hint) from None
        if attr is None:
            raise ManifestError(
                "no bounding-box label attribute (a field whose '-metadata' has type "
                "'groundtruth/object-detection')",
                path=path,
                line=line,
                hint="name it with --label-attribute",
            )
    else:
        adjusted = ADJUSTED_PREFIX + label_attribute
        attr = adjusted if isinstance(obj.get(adjusted), dict) else label_attribute
        if not isinstance(obj.get(attr), dict):
            raise ManifestError("label attribute missing on this line", path=path, line=line, field=attr)
    label = obj[attr]
    meta = obj.get(f"{attr}-metadata")
    if not isinstance(meta, dict):
        meta = obj.get(f"{label_attribute}-metadata") if label_attribute else None
        if not isinstance(meta, dict):
            raise ManifestError("missing", path=path, line=line, field=f"{attr}-metadata")

    sizes = label.get("image_size")
    if not isinstance(sizes, list) or not sizes or not isinstance(sizes[0], dict):
        raise ManifestError(
            "missing or not a list of {width, height, depth}",
            path=path,
            line=line,
            field=f"{attr}.image_size",
        )
    width = _int_field(sizes[0].get("width"), f"{attr}.image_size.width", path, line)
    height = _int_field(sizes[0].get("height"), f"{attr}.image_size.height", path, line)
    depth = _int_field(sizes[0].get("depth", 3), f"{attr}.image_size.depth", path, line)
    if width <= 0 or height <= 0:
        raise ManifestError(
            f"image size must be positive, got {width}x{height}",
            path=path,
            line=line,
            field=f"{attr}.image_size",
        )

    raw_map = meta.get("class-map", {})
    if not isinstance(raw_map, dict):
        raise ManifestError(
            "expected an object of id -> name", path=path, line=line, field=f"{attr}-metadata.class-map"
        )
    class_map: dict[int, str] = {}
    for key, name in raw_map.items():
        try:
            class_map[int(key)] = str(name)
        except (TypeError, ValueError):
            raise ManifestError(
                f"class id {key!r} is not a whole number",
                path=path,
                line=line,
                field=f"{attr}-metadata.class-map",
            ) from None

    annotations = label.get("annotations")
    if not isinstance(annotations, list):
        raise ManifestError("missing or not a list", path=path, line=line, field=f"{attr}.annotations")
    # plain Python per box, one numpy array per record at the end (numpy on tiny arrays is slow)
    xyxy_rows: list[tuple[int, int, int, int]] = []
    ids: list[int] = []
    difficult: list[bool] = []
    kept: list[int] = []
    for i, ann in enumerate(annotations):
        where = f"{attr}.annotations[{i}]"
        if not isinstance(ann, dict):
            raise ManifestError("expected an object", path=path, line=line, field=where)
        left, top, w, h = (_int_field(ann.get(key), f"{where}.{key}", path, line) for key in _BOX_KEYS)
        cid = _int_field(ann.get("class_id"), f"{where}.class_id", path, line)
        if cid not in class_map:
            raise ManifestError(
                f"class_id {cid} is not in the class map {raw_map}",
                path=path,
                line=line,
                field=f"{where}.class_id",
            )
        problem = box_problem(left, top, w, h, image_width=width, image_height=height)
        if problem is not None:
            error = ManifestError(problem, path=path, line=line, field=where)
            if skipped_boxes is None:
                raise error
            skipped_boxes.append(str(error))
            continue
        ids.append(cid)
        kept.append(i)
        difficult.append(bool(ann.get("difficult")) or bool(ann.get("iscrowd")))
        xyxy_rows.append((left, top, left + w, top + h))
    boxes = np.array(xyxy_rows, dtype=np.float64).reshape(-1, 4)
    class_ids = np.array(ids, dtype=np.int64)

    objects = meta.get("objects")
    conf_values = [np.nan] * len(kept)
    if isinstance(objects, list) and len(objects) == len(annotations):
        for j, i in enumerate(kept):
            item = objects[i]
            value = item.get("confidence") if isinstance(item, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                conf_values[j] = float(value)
    confidences = np.array(conf_values, dtype=np.float64)
    try:
        verification = find_verification(obj)
    except ManifestError as exc:
        raise ManifestError(exc.message, path=path, line=line, field=exc.field) from None
    split = obj.get(SPLIT_FIELD)

    return Record(
        source_ref=source_ref,
        width=width,
        height=height,
        depth=depth,
        boxes=boxes,
        class_ids=class_ids,
        class_map=class_map,
        confidences=confidences,
        label_attribute=attr,
        job_name=meta.get("job-name"),
        verification=verification,
        fields=obj,
        origin=f"{path}:{line}",
        difficult=np.array(difficult, dtype=bool),
        split=split if isinstance(split, str) else None,
    )


def read_manifest(
    path: str | os.PathLike,
    *,
    label_attribute: str | None = None,
    on_error: str = "stop",
    report: ReadReport | None = None,
) -> Iterator[Record]:
    """Stream the records of a Ground Truth manifest (local or any fsspec URL).

    ``on_error='stop'`` raises a ManifestError naming file and line for the first bad line;
    ``'skip'`` passes over bad lines and lists them in ``report``. Blank lines are ignored.
    """
    if on_error not in ("stop", "skip"):
        raise ValueError("on_error must be 'stop' or 'skip'")
    path = os.fspath(path)
    for number, raw in storage.iter_lines(path):
        if not raw.strip():
            continue
        if report is not None:
            report.lines += 1
        try:
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ManifestError(f"not valid JSON: {exc}", path=path, line=number) from None
            yield parse_record(
                obj,
                path=path,
                line=number,
                label_attribute=label_attribute,
                skipped_boxes=None if on_error == "stop" or report is None else report.skipped_boxes,
            )
        except ManifestError as exc:
            if on_error == "stop":
                raise
            if report is not None:
                report.skipped.append((path, number, str(exc)))


class ClassMaps:
    """The one merge of manifest lines' class maps (``convert``, ``stats``, ``evaluate``): id -> name, where
    an id that means two names is an error naming both lines (run ``prepare`` to merge by name)."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self._first: dict[int, str] = {}  # id -> "path:line" where its name was first seen

    def add(self, record: Record, manifest: str | os.PathLike | None = None) -> None:
        """Merge one record's class map (ManifestError when an id already means another name)."""
        origin = record.origin or os.fspath(manifest or "<memory>")
        for cid, name in record.class_map.items():
            known = self.names.setdefault(cid, name)
            self._first.setdefault(cid, origin)
            if known != name:
                path, _, line = origin.rpartition(":")
                raise ManifestError(
                    f"class id {cid} means {known!r} at {self._first[cid]} and {name!r} here",
                    path=path or origin,
                    line=int(line) if line.isdigit() else None,
                    field=f"{record.label_attribute}-metadata.class-map",
                    hint="run `detforge prepare` first to merge the class maps by name",
                )

    def by_id(self) -> list[str]:
        """The names in id order (an id no line names is named by its number)."""
        return [self.names.get(i, str(i)) for i in range(max(self.names) + 1)] if self.names else []


def checked_local_image(record: Record, manifest: str | os.PathLike) -> None:
    """Check that a manifest line's image exists and has the size the line says, when it is local (a
    header probe, not a decode: the same check every format's reader makes); a ManifestError naming the
    manifest, line and ``source-ref`` when not. Images on an object store are not probed here (one
    request per line); training reads them and names a missing one."""
    from detforge import images

    image = resolve_source_ref(record.source_ref, manifest)
    if storage.is_remote(image):
        return
    path, _, line = (record.origin or f"{os.fspath(manifest)}:0").rpartition(":")
    where = {"path": path or os.fspath(manifest), "line": int(line) if line.isdigit() else None}
    try:
        width, height = images.probe(image)
    except images.ImageError as exc:
        raise ManifestError(exc.message, **where, field="source-ref") from None
    if (width, height) != (record.width, record.height):
        raise ManifestError(
            f"the line says the image is {record.width}x{record.height} but {image} is "
            f"{width}x{height} (upright)",
            **where,
            field=f"{record.label_attribute}.image_size",
        )


def record_to_json(record: Record) -> dict:
    """The manifest line of a record: its original fields with the label attribute brought up to date."""
    obj = dict(record.fields)
    attr = record.label_attribute
    label = copy.deepcopy(obj.get(attr)) if isinstance(obj.get(attr), dict) else {}
    meta = copy.deepcopy(obj.get(f"{attr}-metadata")) if isinstance(obj.get(f"{attr}-metadata"), dict) else {}

    ltwh = box_ops.xyxy_to_ltwh_int(record.boxes)
    old = label.get("annotations") if isinstance(label.get("annotations"), list) else []
    annotations = []
    for i in range(len(ltwh)):
        ann = dict(old[i]) if len(old) == len(ltwh) and isinstance(old[i], dict) else {}
        ann["class_id"] = int(record.class_ids[i])
        for j, key in enumerate(_BOX_KEYS):
            ann[key] = int(ltwh[i, j])
        ann.pop("iscrowd", None)
        if record.difficult is not None and i < len(record.difficult) and record.difficult[i]:
            ann["difficult"] = 1
        else:
            ann.pop("difficult", None)
        annotations.append(ann)
    label["annotations"] = annotations
    sizes = label.get("image_size")
    sizes = sizes if isinstance(sizes, list) and sizes else [{}]
    size = dict(sizes[0])
    size.update(width=int(record.width), height=int(record.height), depth=int(record.depth))
    label["image_size"] = [size] + list(sizes[1:])

    used = {int(c) for c in record.class_ids}
    keep_all = bool(meta.get("class-map")) or used
    meta["class-map"] = {str(k): v for k, v in sorted(record.class_map.items())} if keep_all else {}
    old_objects = meta.get("objects") if isinstance(meta.get("objects"), list) else []
    objects = []
    for i in range(len(annotations)):
        item = (
            dict(old_objects[i])
            if len(old_objects) == len(annotations) and isinstance(old_objects[i], dict)
            else {}
        )
        conf = record.confidences[i] if i < len(record.confidences) else np.nan
        if conf == conf:
            item["confidence"] = float(conf)
        objects.append(item)
    meta["objects"] = objects
    meta.setdefault("type", DETECTION_TYPES[0])
    if record.job_name is not None:
        meta["job-name"] = record.job_name
    obj["source-ref"] = record.source_ref
    obj[attr] = label
    obj[f"{attr}-metadata"] = meta
    return obj


def dumps_line(obj: dict) -> bytes:
    """One JSON Lines line (with its newline)."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def write_manifest(path: str | os.PathLike, records: Iterable[Record | dict]) -> int:
    """Write records (or ready JSON objects) as a manifest, atomically; returns the line count."""
    count = 0
    with storage.atomic_writer(path, "wb") as handle:
        for item in records:
            handle.write(dumps_line(record_to_json(item) if isinstance(item, Record) else item))
            count += 1
    return count


def make_record(
    source_ref: str,
    *,
    width: int,
    height: int,
    boxes_xyxy,
    class_ids,
    class_map: dict[int, str],
    depth: int = 3,
    label_attribute: str = "bb",
    job_name: str | None = None,
    confidences=None,
    metadata: dict | None = None,
    creation_date: str | None = None,
    human_annotated: str = "yes",
    difficult=None,
    split: str | None = None,
) -> Record:
    """A new record with Ground Truth's full set of fields (for synthetic data and format imports).

    ``metadata`` adds per-line fields such as ``{"color": "blue", "object": "box"}``.
    """
    boxes = box_ops.as_boxes(boxes_xyxy)
    ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)
    conf = np.full(len(ids), np.nan) if confidences is None else np.asarray(confidences, dtype=np.float64)
    fields = {"source-ref": source_ref, **(metadata or {})}
    fields[label_attribute] = {
        "annotations": [],
        "image_size": [{"width": width, "height": height, "depth": depth}],
    }
    fields[f"{label_attribute}-metadata"] = {
        **({"job-name": job_name} if job_name else {}),
        "class-map": {},
        "human-annotated": human_annotated,
        "objects": [],
        "creation-date": creation_date or _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None).isoformat(),
        "type": DETECTION_TYPES[0],
    }
    record = Record(
        source_ref=source_ref,
        width=int(width),
        height=int(height),
        depth=int(depth),
        boxes=boxes,
        class_ids=ids,
        class_map=dict(class_map),
        confidences=conf,
        label_attribute=label_attribute,
        job_name=job_name,
        fields=fields,
        difficult=None if difficult is None else np.asarray(difficult, dtype=bool).reshape(-1),
        split=split,
    )
    if split is not None:
        record.fields[SPLIT_FIELD] = split
    record.fields = record_to_json(record)
    return record


def is_relative_ref(source_ref: str) -> bool:
    """True for a relative image reference (neither a URI nor an absolute path)."""
    return not (storage.is_remote(source_ref) or os.path.isabs(source_ref))


def read_discard(path: str | os.PathLike) -> dict[str, str]:
    """Image id -> reason ("" when none) of a discard list, {} when the file does not exist: the one
    parser, for ``prepare --discard`` and ``review`` (which writes them). A line is ``id`` or
    ``id<TAB>reason``; an id may hold spaces (``IMG 1234``); ``#`` starts a comment at the start of a line
    or after a space in the id part (``c_3  # trailing``)."""
    path = os.fspath(path)
    if not storage.exists(path):
        return {}
    found: dict[str, str] = {}
    for _, raw in storage.iter_lines(path):
        line = raw.decode("utf-8", errors="replace")
        image_id, _, reason = line.partition("\t")
        image_id = _TRAILING_COMMENT.sub("", image_id).strip()
        if image_id and not image_id.startswith("#"):
            found[image_id] = reason.strip()
    return found


_TRAILING_COMMENT = re.compile(r"(^|\s)#.*$")


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The class names of a ``classes.json`` (a JSON list: index = class id) or of a ``model.json`` (its
    ``classes``): the one reader of class files for training, evaluation, labeling and review."""
    path = os.fspath(path)
    try:
        data = orjson.loads(storage.read_bytes(path))
    except orjson.JSONDecodeError as exc:
        raise FormatError(f"not valid JSON: {exc}", path=path) from None
    if isinstance(data, dict):
        data = data.get("classes", data.get("class_names"))
    if not isinstance(data, list) or not data or not all(isinstance(name, str) for name in data):
        raise FormatError(
            "expected a non-empty JSON list of class names (index = class id), or an object with 'classes'",
            path=path,
        )
    return data


def classes_beside(manifest: str | os.PathLike, classes: str | os.PathLike | None = None) -> list[str] | None:
    """``read_class_names(classes)`` when given, else that of ``classes.json`` beside the manifest (what
    ``prepare`` and ``convert`` write), else None."""
    if classes is not None:
        return read_class_names(classes)
    folder = os.path.dirname(os.fspath(manifest).rstrip("/")) or "."
    path = storage.join(folder, "classes.json")
    return read_class_names(path) if storage.exists(path) else None


def resolve_source_ref(source_ref: str, manifest: str | os.PathLike) -> str:
    """Where a manifest line's image is, the one rule of every command: a URI or an absolute path as given,
    a relative reference beside the manifest (never the current directory)."""
    if not is_relative_ref(source_ref):
        return source_ref
    manifest = os.fspath(manifest)
    folder = manifest.rstrip("/").rsplit("/", 1)[0] if "/" in manifest.rstrip("/") else "."
    if storage.is_remote(manifest):
        return storage.join(folder, source_ref)
    return os.path.normpath(os.path.join(folder, source_ref))


def ref_from(image: str, folder: str | os.PathLike) -> str:
    """How a manifest written into ``folder`` refers to ``image`` (a resolved path or URI): relative when
    both are local and share a top folder (they can move together), else the full URI or absolute path."""
    folder = os.fspath(folder)
    if storage.is_remote(image) or storage.is_remote(folder):
        return image
    image, folder = os.path.abspath(image), os.path.abspath(folder)
    common = os.path.commonpath([image, folder])
    if common == os.path.dirname(common):  # nothing in common but the root
        return image
    return os.path.relpath(image, folder)


def read_image_refs(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Stream (line, object) of any JSON Lines manifest, e.g. a labeling *input* manifest."""
    path = os.fspath(path)
    for number, raw in storage.iter_lines(path):
        if raw.strip():
            try:
                yield number, orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ManifestError(f"not valid JSON: {exc}", path=path, line=number) from None


def checked_boxes(
    boxes_xyxy,
    *,
    width: int,
    height: int,
    where: list[tuple[str, int | None, str | None]],
    skipped_boxes: list[str] | None,
) -> np.ndarray:
    """Indices of the ``xyxy`` boxes that a manifest can hold, checked as ``parse_record`` checks a line.

    Boxes are taken as Ground Truth will store them (corners rounded to whole pixels). ``where`` gives
    each box's (path, line, field) for the message. A bad box raises a ManifestError, or, when
    ``skipped_boxes`` is a list, is left out with its message appended there.
    """
    ltwh = box_ops.xyxy_to_ltwh_int(boxes_xyxy)
    keep = []
    for i, (left, top, w, h) in enumerate(ltwh.tolist()):
        problem = box_problem(left, top, w, h, image_width=width, image_height=height)
        if problem is None:
            keep.append(i)
            continue
        path, line, fld = where[i]
        error = ManifestError(problem, path=path, line=line, field=fld)
        if skipped_boxes is None:
            raise error
        skipped_boxes.append(str(error))
    return np.asarray(keep, dtype=np.int64)
