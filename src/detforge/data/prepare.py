"""``detforge prepare``: labels in from any tool, joined, discarded, verified, classes set, split leak-free.

Inputs are Ground Truth output manifests and any other format ``data.sources`` reads (YOLO
``data.yaml``, VOC ``Annotations/``, COCO JSON); the other formats are first streamed into a
temporary manifest, so every input then goes through the same two streaming passes:

1. every line is checked (``groundtruth.parse_record``) and only a compact summary is kept per image
   (its place, image id, split and class names); verification jobs' answers are collected by image id;
2. the kept lines are streamed again and written to ``train.manifest`` / ``validation.manifest``
   (``test.manifest`` when the source had one) with every unknown field kept; only ``class_id``,
   ``class-map`` and relative ``source-ref`` values are rewritten (the latter so that the outputs find
   their images from their own folder).

Class ids: ``--classes "a,b"`` gives them in that order; otherwise the class names found (from the
``--class-from`` template or the jobs' class maps) are sorted by name and numbered from 0.

Split (``--group-by``, default ``auto``): lines are grouped — ``video`` (every frame of one
``<video>_<frame>`` stem), ``block:N`` (runs of N consecutive frame numbers), ``none`` or
``regex:PATTERN`` — and whole groups go to validation, drawn per stratum (the rarest class of the
group) with the seed until the stratum's share is reached. ``auto`` splits by video when there are
enough videos (validation gets at least ``MIN_VALIDATION_VIDEOS`` whole ones), else by blocks, and
image by image when no id looks like a video frame. With
blocks, training frames within ``--gap`` frames of a validation frame of the same video are left out
(neighbouring frames are near copies: keeping them would grade the model on what it trained on).
``--keep-splits`` keeps the split a YOLO/VOC/COCO source gave its images.

Not here: reading/writing single records (``groundtruth``), other formats (``convert``).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import random
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import orjson

from detforge import storage
from detforge.data.groundtruth import (
    ADJUSTED_PREFIX,
    DEFAULT_REJECT_LABELS,
    SPLIT_FIELD,
    ReadReport,
    find_label_attribute,
    find_verification,
    parse_record,
    read_discard,
    ref_from,
    resolve_source_ref,
    write_manifest,
)
from detforge.data.sources import detect_format, read_source
from detforge.errors import ConfigError, ManifestError

DEFAULT_BLOCK = 10
DEFAULT_GROUP_BY = "auto"
# ``auto`` splits by whole videos when validation can get at least this many of them
MIN_VALIDATION_VIDEOS = 2
FRAME_STEM = re.compile(r"^(?P<video>.+)_(?P<frame>\d+)$")
_DROP, _TRAIN, _VAL = 0, 1, 2
_TEMPLATE_FIELD = re.compile(r"{([^{}:!]*)")


@dataclass
class PrepareSummary:
    """What ``prepare`` did, also written as ``summary.json``."""

    out: str
    lines: dict[str, int] = field(default_factory=dict)  # per input manifest
    jobs: dict[str, int] = field(default_factory=dict)  # per job-name
    formats: dict[str, str] = field(default_factory=dict)  # per input: manifest, yolo, voc, coco
    discarded: list[str] = field(default_factory=list)  # image ids from the discard list
    rejected_by_verification: list[str] = field(default_factory=list)
    verification: dict[str, str] = field(default_factory=dict)  # image id -> the worker's chosen label
    verification_comments: dict[str, list[str]] = field(default_factory=dict)  # image id -> comments
    reject_labels: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # "id: kept path:line, dropped path:line"
    skipped: list[str] = field(default_factory=list)  # bad lines/images passed over with on_error=skip
    skipped_boxes: list[str] = field(default_factory=list)  # bad boxes left out with on_error=skip
    dropped_empty: int = 0
    empty_images: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    train: int = 0
    validation: int = 0
    test: int = 0
    group_by: str = ""  # the grouping used (``auto`` resolved)
    groups: int = 0
    dropped_for_gap: int = 0  # training frames left out next to validation frames
    kept_splits: bool = False
    max_boxes_per_image: int = 0

    def to_json(self) -> dict:
        """The summary as a JSON-ready dict."""
        return asdict(self)


def block_size(spec: str) -> int | None:
    """N of a ``block:N`` grouping (``block`` alone: the default), None for any other grouping."""
    spec = (spec or "").strip()
    if not spec.startswith("block"):
        return None
    try:
        return int(spec.split(":", 1)[1]) if ":" in spec else DEFAULT_BLOCK
    except ValueError:
        return 0


def parse_group_by(spec: str):
    """A function image id -> group key for ``block:N``, ``video``, ``none`` or ``regex:PATTERN``.

    With ``regex:`` the key is the named group ``group`` or else the first capture group;
    ids that do not match form a group of their own.
    """
    spec = (spec or "").strip()
    if spec == "none":
        return lambda image_id: image_id
    if spec == "video":
        return lambda image_id: (m.group("video") if (m := FRAME_STEM.match(image_id)) else image_id)
    if spec.startswith("block"):
        size = DEFAULT_BLOCK
        if ":" in spec:
            try:
                size = int(spec.split(":", 1)[1])
            except ValueError:
                size = 0
        if size <= 0:
            raise ConfigError(f"--group-by {spec!r}: block size must be a positive whole number",
                              hint="e.g. --group-by block:10")

        def block(image_id: str) -> str:
            m = FRAME_STEM.match(image_id)
            return f"{m.group('video')}#{int(m.group('frame')) // size}" if m else image_id
        return block
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as exc:
            raise ConfigError(f"--group-by: bad regular expression: {exc}") from None

        def by_regex(image_id: str) -> str:
            m = pattern.search(image_id)
            if not m:
                return image_id
            if "group" in pattern.groupindex:
                return m.group("group")
            return m.group(1) if pattern.groups else m.group(0)
        return by_regex
    raise ConfigError(f"--group-by {spec!r} is not one of block:N, video, none, regex:PATTERN")


def _template_fields(template: str) -> list[str]:
    return [name for name in _TEMPLATE_FIELD.findall(template) if name]


def _template_name(template: str, obj: dict, path: str, line: int) -> str:
    values = {}
    for name in _template_fields(template):
        value = obj.get(name)
        if value is None or isinstance(value, (dict, list)):
            raise ManifestError(f"template field '{name}' is missing or not a plain value", path=path,
                                line=line, field=name, hint=f"--class-from {template!r} uses it")
        values[name] = value
    try:
        return template.format_map(values).strip()
    except (KeyError, ValueError, IndexError) as exc:
        raise ConfigError(f"--class-from {template!r} is not a valid template: {exc}") from None


def _attribute(obj: dict, label_attribute: str | None) -> str:
    if label_attribute is None:
        return find_label_attribute(obj)
    adjusted = ADJUSTED_PREFIX + label_attribute
    return adjusted if isinstance(obj.get(adjusted), dict) else label_attribute


def _materialize(source: str, kind: str, folder: str, *, images: str | None, on_error: str,
                 summary: PrepareSummary) -> str:
    """A temporary manifest of a YOLO/VOC/COCO source (image references resolved), its errors counted."""
    report = ReadReport()
    _, _, records = read_source(source, images=images, on_error=on_error, report=report, kind=kind)
    path = os.path.join(folder, f"{len(os.listdir(folder))}.manifest")
    write_manifest(path, (r.replace(source_ref=r.source_ref if storage.is_remote(r.source_ref)
                                    else os.path.abspath(r.source_ref)) for r in records))
    summary.skipped.extend(message for _, _, message in report.skipped)
    summary.skipped_boxes.extend(report.skipped_boxes)
    return path


def prepare(manifests: list[str], out: str, *, discard: list[str] = (), class_from: str | None = None,
            classes: list[str] | None = None, label_attribute: str | None = None, drop_empty: bool = False,
            validation_fraction: float = 0.1, seed: int = 0, group_by: str = DEFAULT_GROUP_BY,
            gap: int | None = None, keep_splits: bool = False, images: str | None = None,
            reject_labels: list[str] | None = None, on_error: str = "stop") -> PrepareSummary:
    """Join labeled inputs, drop discarded/rejected/duplicate images, set classes, split; write into ``out``.

    ``manifests``: Ground Truth manifests or any input ``data.sources`` reads (``images``: the image folder
    of VOC/COCO inputs). ``discard`` items are discard files (when they exist) or image ids (comma
    separated allowed). ``reject_labels``: a verification job's answers that reject an image (default
    ``DEFAULT_REJECT_LABELS``). ``gap``: with block grouping, training frames within this many frame
    numbers of a validation frame are left out (default: the block size). Writes ``train.manifest``,
    ``validation.manifest`` (``test.manifest`` when kept splits have one), ``classes.json`` and
    ``summary.json``; nothing is written when a bad line stops it (``on_error='stop'``).
    """
    if not manifests:
        raise ConfigError("no manifest given")
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"--on-error must be stop or skip, got {on_error!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    if gap is not None and gap < 0:
        raise ConfigError(f"--gap must be 0 or more frames, got {gap}")
    if class_from is not None:
        try:
            class_from.format_map({name: "x" for name in _template_fields(class_from)})
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError(f"--class-from {class_from!r} is not a valid template: {exc}") from None
    if group_by != "auto":
        parse_group_by(group_by)  # a bad spec fails before any reading
    rejecting = tuple(reject_labels) if reject_labels is not None else DEFAULT_REJECT_LABELS
    discard_ids: set[str] = set()
    for item in discard or ():
        if storage.exists(item) and not is_id_like(item):
            discard_ids |= set(read_discard(item))
        else:
            discard_ids |= {part.strip() for part in str(item).split(",") if part.strip()}

    summary = PrepareSummary(out=os.fspath(out), reject_labels=list(rejecting), kept_splits=keep_splits)
    temp = tempfile.mkdtemp(prefix="detforge-prepare-")
    try:
        inputs = []  # (name shown, manifest path read)
        for source in manifests:
            source = os.fspath(source)
            kind = detect_format(source)
            summary.formats[source] = kind
            inputs.append((source, source if kind == "manifest" else _materialize(
                source, kind, temp, images=images, on_error=on_error, summary=summary)))
        return _prepare(inputs, out, summary, discard_ids=discard_ids, class_from=class_from, classes=classes,
                        label_attribute=label_attribute, drop_empty=drop_empty,
                        validation_fraction=validation_fraction, seed=seed, group_by=group_by, gap=gap,
                        keep_splits=keep_splits, rejecting=rejecting, on_error=on_error)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _prepare(inputs, out, summary, *, discard_ids, class_from, classes, label_attribute, drop_empty,
             validation_fraction, seed, group_by, gap, keep_splits, rejecting, on_error) -> PrepareSummary:
    seen: dict[str, tuple] = {}  # image id -> (input index, line, split, class names) of the kept copy
    verdicts: dict[str, object] = {}  # image id -> Verification (the last answer wins)
    names_found: Counter = Counter()

    # pass 1: check every line, keep compact facts
    for index, (name, path) in enumerate(inputs):
        summary.lines[name] = 0
        for number, raw in storage.iter_lines(path):
            if not raw.strip():
                continue
            summary.lines[name] += 1
            try:
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise ManifestError(f"not valid JSON: {exc}", path=name, line=number) from None
                boxes_skipped: list[str] = []
                try:
                    record = parse_record(obj, path=name, line=number, label_attribute=label_attribute,
                                          skipped_boxes=boxes_skipped if on_error == "skip" else None)
                except ManifestError:
                    # only a line that cannot be a record is checked for a bare verification answer
                    if isinstance(obj, dict) and label_attribute is None and _verification_only(obj):
                        verdicts[storage.stem(str(obj.get("source-ref", "")))] = find_verification(obj)
                        continue
                    raise
                if class_from is not None:
                    names = [_template_name(class_from, obj, name, number)] * len(record.class_ids)
                else:
                    names = record.class_names
            except ManifestError as exc:
                if on_error == "stop":
                    raise ManifestError(exc.message, path=name, line=exc.line, field=exc.field,
                                        hint=exc.hint) from None
                summary.skipped.append(str(exc))
                continue
            summary.skipped_boxes.extend(boxes_skipped)
            job = record.job_name or storage.stem(name)
            summary.jobs[job] = summary.jobs.get(job, 0) + 1
            image_id = record.image_id
            if record.verification is not None:
                verdicts[image_id] = record.verification
            if image_id in discard_ids:
                summary.discarded.append(image_id)
                continue
            if image_id in seen:
                first = seen[image_id]
                summary.duplicates.append(f"{image_id}: kept {inputs[first[0]][0]}:{first[1]}, "
                                          f"dropped {name}:{number}")
                continue
            if not names and drop_empty:
                summary.dropped_empty += 1
                continue
            if classes is not None:
                unknown = sorted(set(names) - set(classes))
                if unknown:
                    error = ManifestError(f"class {unknown[0]!r} is not in --classes {classes}", path=name,
                                          line=number)
                    if on_error == "stop":
                        raise error
                    summary.skipped.append(str(error))
                    continue
            seen[image_id] = (index, number, record.split if keep_splits else None, tuple(names))

    for image_id, verdict in sorted(verdicts.items()):
        summary.verification[image_id] = verdict.class_name
        if verdict.comments:
            summary.verification_comments[image_id] = list(verdict.comments)
        if image_id in seen and verdict.rejects(rejecting):
            summary.rejected_by_verification.append(image_id)
            del seen[image_id]

    # the kept images: classes, groups, the split
    decisions = [dict() for _ in inputs]  # line -> split name, per input
    groups: dict[str, list] = {}
    for index, number, split, names in seen.values():
        if not names:
            summary.empty_images += 1
        names_found.update(names)
        summary.max_boxes_per_image = max(summary.max_boxes_per_image, len(names))
        if split is not None:
            decisions[index][number] = split
            continue
        decisions[index][number] = None
    spec = _resolve_group_by(group_by, [i for i, v in seen.items() if v[2] is None], validation_fraction)
    summary.group_by = spec
    group_of = parse_group_by(spec)
    for image_id, (_, _, split, names) in seen.items():
        if split is None:
            entry = groups.setdefault(group_of(image_id), [0, Counter()])
            entry[0] += 1
            entry[1].update(set(names) or {""})

    class_list = list(classes) if classes is not None else sorted(names_found)
    class_id = {n: i for i, n in enumerate(class_list)}
    summary.classes = class_list
    summary.boxes_per_class = {n: names_found.get(n, 0) for n in class_list}
    summary.groups = len(groups)
    validation_groups = _split(groups, names_found, validation_fraction, seed)
    size = block_size(spec)
    too_near = (_near_validation(seen, group_of, validation_groups, size if gap is None else gap)
                if size else set())

    # pass 2: stream the kept lines to their split
    storage.makedirs(out)
    counts = Counter()
    targets = ["train", "validation"] + (["test"] if any(v[2] == "test" for v in seen.values()) else [])
    with contextlib.ExitStack() as stack:
        handles = {t: stack.enter_context(storage.atomic_writer(storage.join(out, f"{t}.manifest"), "wb"))
                   for t in targets}
        for index, (_, path) in enumerate(inputs):
            decision = decisions[index]
            for number, raw in storage.iter_lines(path):
                if number not in decision:
                    continue
                obj = orjson.loads(raw)
                image_id = storage.stem(obj["source-ref"])
                target = decision[number]
                if target is None:
                    # the group key is computed again from the id rather than kept per line
                    target = "validation" if group_of(image_id) in validation_groups else "train"
                    if target == "train" and image_id in too_near:
                        summary.dropped_for_gap += 1
                        continue
                attr = _attribute(obj, label_attribute)
                _set_classes(obj, attr, class_from, class_id, label_attribute)
                obj["source-ref"] = ref_from(resolve_source_ref(obj["source-ref"], path), out)
                obj.pop(SPLIT_FIELD, None)
                handles[target].write(orjson.dumps(obj) + b"\n")
                counts[target] += 1
    summary.train, summary.validation, summary.test = counts["train"], counts["validation"], counts["test"]
    storage.write_bytes(storage.join(out, "classes.json"),
                        orjson.dumps(class_list, option=orjson.OPT_INDENT_2))
    storage.write_bytes(storage.join(out, "summary.json"),
                        orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2))
    return summary


def _verification_only(obj: dict) -> bool:
    """A line that carries a verification answer but no bounding-box labels."""
    try:
        return find_label_attribute(obj) is None and find_verification(obj) is not None
    except ManifestError:
        return False


def _resolve_group_by(spec: str, image_ids: list[str], fraction: float) -> str:
    """``auto`` -> ``video`` when validation can hold ``MIN_VALIDATION_VIDEOS`` whole videos, else blocks."""
    if spec != "auto":
        return spec
    videos = {m.group("video") for i in image_ids if (m := FRAME_STEM.match(i))}
    if not videos:
        return "none"  # no video frames (e.g. photos): every image is its own group
    return "video" if len(videos) * fraction >= MIN_VALIDATION_VIDEOS else f"block:{DEFAULT_BLOCK}"


def _near_validation(seen: dict, group_of, validation_groups: set[str], gap: int) -> set[str]:
    """Training image ids whose frame number is within ``gap`` of a validation frame of the same video."""
    if gap <= 0:
        return set()
    frames: dict[str, list[tuple[int, bool, str]]] = defaultdict(list)
    for image_id, (_, _, split, _) in seen.items():
        m = FRAME_STEM.match(image_id)
        if m and split is None:
            frames[m.group("video")].append((int(m.group("frame")), group_of(image_id) in validation_groups,
                                             image_id))
    near = set()
    for items in frames.values():
        val = sorted(frame for frame, is_val, _ in items if is_val)
        if not val:
            continue
        for frame, is_val, image_id in items:
            if not is_val:
                k = bisect.bisect_left(val, frame)
                if min(abs(frame - val[j]) for j in (k - 1, k) if 0 <= j < len(val)) <= gap:
                    near.add(image_id)
    return near


def is_id_like(item: str) -> bool:
    """True for a value that names image ids rather than a file (has a comma)."""
    return "," in str(item)


def _set_classes(obj: dict, attr: str, class_from: str | None, class_id: dict[str, int],
                 label_attribute: str | None) -> None:
    label = obj[attr]
    meta = obj.get(f"{attr}-metadata")
    if not isinstance(meta, dict) and label_attribute:
        meta = obj.get(f"{label_attribute}-metadata")
    old_map = {int(k): str(v) for k, v in (meta.get("class-map") or {}).items()}
    annotations = label.get("annotations") or []
    new_map = {}
    for ann in annotations:
        name = (class_from.format_map({n: obj[n] for n in _template_fields(class_from)}).strip()
                if class_from is not None else old_map[int(ann["class_id"])])
        ann["class_id"] = class_id[name]
        new_map[class_id[name]] = name
    if annotations or meta.get("class-map"):
        meta["class-map"] = {str(k): v for k, v in sorted(new_map.items())}


def _split(groups: dict[str, list], names_found: Counter, fraction: float, seed: int) -> set[str]:
    """The group keys drawn for validation: per stratum (rarest class of the group), seeded."""
    if fraction <= 0 or not groups:
        return set()
    strata: dict[str, list[str]] = defaultdict(list)
    for key in sorted(groups):
        present = [name for name in groups[key][1] if name]
        stratum = min(present, key=lambda n: (names_found[n], n)) if present else ""
        strata[stratum].append(key)
    rng = random.Random(seed)
    chosen: set[str] = set()
    for stratum in sorted(strata):
        keys = strata[stratum]
        rng.shuffle(keys)
        total = sum(groups[k][0] for k in keys)
        target = round(total * fraction)
        taken = 0
        for key in keys:
            if taken >= target:
                break
            size = groups[key][0]
            # take a group when it brings the count nearer to the target
            if abs(taken + size - target) <= abs(taken - target) or taken == 0:
                chosen.add(key)
                taken += size
    return chosen
