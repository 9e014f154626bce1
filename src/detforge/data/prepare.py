"""``detforge prepare``: labels in from any tool, joined, discarded, verified, classes set, split leak-free.

Inputs are Ground Truth output manifests and any other format ``data.sources`` reads (YOLO
``data.yaml``, VOC ``Annotations/``, COCO JSON); the other formats are first streamed into a
temporary manifest, so every input then goes through the same two streaming passes:

1. every line is checked (``groundtruth.parse_record``) and only a compact summary is kept per image
   (its place, image id, split and class names), keyed by the image's identity, its resolved path
   (``data.identity``); verification jobs' answers are collected by identity. Then local images are
   read once: the same bytes under another path are held out, numbered stems get a ``dhash``;
2. the kept lines are streamed again and written to ``train.manifest`` / ``validation.manifest``
   (``test.manifest`` when the source had one) with every unknown field kept; only ``class_id``,
   ``class-map``, boxes ``--on-error skip`` refused and relative ``source-ref`` values are rewritten
   (the latter so that the outputs find their images from their own folder).

Every image and box read is counted once in ``Accounting``: written to a split, held out or skipped,
each with its reason (the totals are checked before anything is written).

Class ids: ``--classes "a,b"`` gives them in that order; otherwise the class names found (from the
``--class-from`` template or the jobs' class maps) are sorted by name and numbered from 0.

Split (``--group-by``, default ``auto``): images are sorted into sequences — frames of one video by
their names (``identity.video_frame``), runs of numbered images whose neighbours are near copies by
content — and still photos. ``auto``: sequences whole when validation can get ``MIN_VALIDATION_VIDEOS``
of them (``video``), else one contiguous validation run per sequence of at least ``2 x gap`` frames,
placed to hold out the fewest training frames within ``--gap`` of it (``run``); still photos and
shorter sequences are drawn whole per stratum (the rarest class of the group) with the seed.
``block:N``, ``none`` and ``regex:PATTERN`` group by the image id as before. ``--keep-splits`` keeps
the split the inputs give (the record's own, ``INPUT=SPLIT``, or the file's name).

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

from detforge import images as image_io
from detforge import storage
from detforge.data.groundtruth import (
    ADJUSTED_PREFIX,
    DEFAULT_REJECT_LABELS,
    SPLIT_FIELD,
    ReadReport,
    box_problem,
    checked_local_image,
    find_label_attribute,
    find_verification,
    parse_record,
    read_discard,
    ref_from,
    resolve_source_ref,
    write_manifest,
)
from detforge.data.identity import (
    NEAR_DUPLICATE_BITS,
    DuplicateRule,
    dhash_bytes,
    hash_distance,
    identity,
    numbered,
    video_frame,
)
from detforge.data.output import check_free, whole_output
from detforge.data.sources import detect_format, read_source
from detforge.errors import ConfigError, ManifestError

DEFAULT_BLOCK = 10
DEFAULT_GROUP_BY = "auto"
# ``auto`` splits by whole videos when validation can get at least this many of them
MIN_VALIDATION_VIDEOS = 2
FRAME_STEM = re.compile(r"^(?P<video>.+)_(?P<frame>\d+)$")
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
    "testing": "test",
}
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
    split_given: dict[str, str] = field(default_factory=dict)  # input -> split named by INPUT=SPLIT
    split_by_name: dict[str, str] = field(default_factory=dict)  # input -> split its file name says
    videos: dict[str, int] = field(default_factory=dict)  # sequence -> frames (by name or near copies)
    stills: int = 0  # images that are no frame of a sequence
    gap: int = 0  # the gap applied, in frame numbers (positions for near-copy sequences)
    nearest_train_to_validation: dict[str, int] = field(default_factory=dict)  # per sequence holding both
    boxes_per_class_per_split: dict[str, dict[str, int]] = field(default_factory=dict)  # what was written
    accounting: dict = field(default_factory=dict)  # read / written / held_out / skipped, images and boxes
    warnings: list[str] = field(default_factory=list)

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
        return lambda image_id: m.group("video") if (m := FRAME_STEM.match(image_id)) else image_id
    if spec.startswith("block"):
        size = DEFAULT_BLOCK
        if ":" in spec:
            try:
                size = int(spec.split(":", 1)[1])
            except ValueError:
                size = 0
        if size <= 0:
            raise ConfigError(
                f"--group-by {spec!r}: block size must be a positive whole number",
                hint="e.g. --group-by block:10",
            )

        def block(image_id: str) -> str:
            m = FRAME_STEM.match(image_id)
            return f"{m.group('video')}#{int(m.group('frame')) // size}" if m else image_id

        return block
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:") :])
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
            raise ManifestError(
                f"template field '{name}' is missing or not a plain value",
                path=path,
                line=line,
                field=name,
                hint=f"--class-from {template!r} uses it",
            )
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


class Accounting:
    """Every image and box read, and where each went: written to a split, held out or skipped (why)."""

    SECTIONS = ("held_out", "skipped")

    def __init__(self) -> None:
        self.counts: dict = {"read": {"images": 0, "boxes": 0}, "written": {}, "held_out": {}, "skipped": {}}

    def read(self, images: int, boxes: int) -> None:
        self.counts["read"]["images"] += images
        self.counts["read"]["boxes"] += boxes

    def _add(self, section: str, key: str, images: int, boxes: int) -> None:
        entry = self.counts[section].setdefault(key, {"images": 0, "boxes": 0})
        entry["images"] += images
        entry["boxes"] += boxes

    def skip(self, reason: str, images: int, boxes: int) -> None:
        self._add("skipped", reason, images, boxes)

    def hold(self, reason: str, images: int, boxes: int) -> None:
        self._add("held_out", reason, images, boxes)

    def write(self, split: str, images: int, boxes: int) -> None:
        self._add("written", split, images, boxes)

    def totals(self) -> dict[str, dict[str, int]]:
        """Images and boxes per section (``read`` = the sum of the three others)."""
        return {
            section: {
                unit: sum(c[unit] for c in self.counts[section].values()) for unit in ("images", "boxes")
            }
            for section in ("written", *self.SECTIONS)
        }

    def check(self) -> None:
        """Raise if the counts do not add up (a bug, never the input's fault)."""
        totals = self.totals()
        for unit in ("images", "boxes"):
            parts = sum(t[unit] for t in totals.values())
            if parts != self.counts["read"][unit]:
                raise AssertionError(
                    f"accounting: {unit} read {self.counts['read'][unit]} != {parts} "
                    f"written + held out + skipped: {self.counts}"
                )

    def to_json(self) -> dict:
        return {**self.counts, "totals": self.totals()}


def split_of_name(source: str) -> str | None:
    """The split an input's file name says: ``instances_Train.json`` (CVAT), ``val.json``,
    ``validation.manifest`` (an earlier ``prepare``), ``test.output.manifest``, Roboflow's
    ``valid/_annotations.coco.json`` (its folder); else None."""
    source = os.fspath(source).rstrip("/").replace("\\", "/")
    name = storage.basename(source).lower()
    if name == "_annotations.coco.json" and "/" in source:
        return _SPLIT_NAMES.get(source.rsplit("/", 2)[-2].lower())
    for suffix in (".json", ".output.manifest", ".manifest"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        return None
    name = name.removeprefix("instances_").removeprefix("instances-")
    return _SPLIT_NAMES.get(name)


def parse_input(source: str) -> tuple[str, str | None]:
    """``INPUT=SPLIT`` -> (INPUT, split) (an input path that itself holds ``=`` is kept whole)."""
    source = os.fspath(source)
    path, sep, split = source.rpartition("=")
    if sep and path and split.lower() in _SPLIT_NAMES and not storage.exists(source):
        return path, _SPLIT_NAMES[split.lower()]
    return source, None


def _materialize(
    source: str,
    kind: str,
    folder: str,
    *,
    images: str | None,
    on_error: str,
    summary: PrepareSummary,
    acc: Accounting,
) -> str:
    """A temporary manifest of a YOLO/VOC/COCO source (image references resolved), its errors counted."""
    report = ReadReport()
    _, _, records = read_source(source, images=images, on_error=on_error, report=report, kind=kind)
    path = os.path.join(folder, f"{len(os.listdir(folder))}.manifest")
    write_manifest(
        path,
        (
            r.replace(
                source_ref=r.source_ref if storage.is_remote(r.source_ref) else os.path.abspath(r.source_ref)
            )
            for r in records
        ),
    )
    summary.skipped.extend(message for _, _, message in report.skipped)
    summary.skipped_boxes.extend(report.skipped_boxes)
    # what the reader passed over never reaches the temporary manifest: counted here
    acc.read(len(report.skipped), len(report.skipped_boxes))
    if report.skipped:
        acc.skip("bad line or image", len(report.skipped), 0)
    if report.skipped_boxes:
        acc.skip("bad box", 0, len(report.skipped_boxes))
    return path


def prepare(
    manifests: list[str],
    out: str,
    *,
    discard: list[str] = (),
    class_from: str | None = None,
    classes: list[str] | None = None,
    label_attribute: str | None = None,
    drop_empty: bool = False,
    validation_fraction: float = 0.1,
    seed: int = 0,
    group_by: str = DEFAULT_GROUP_BY,
    gap: int | None = None,
    keep_splits: bool = False,
    images: str | None = None,
    reject_labels: list[str] | None = None,
    on_error: str = "stop",
    split_of: dict[str, str] | None = None,
    content: bool = True,
    overwrite: bool = False,
) -> PrepareSummary:
    """Join labeled inputs, drop discarded/rejected/duplicate images, set classes, split; write into ``out``.

    ``manifests``: Ground Truth manifests or any input ``data.sources`` reads (``images``: the image folder
    of VOC/COCO inputs). ``discard`` items are discard files (when they exist) or image ids (comma
    separated allowed). ``reject_labels``: a verification job's answers that reject an image (default
    ``DEFAULT_REJECT_LABELS``). ``gap``: with block grouping, training frames within this many frame
    numbers of a validation frame are left out (default: the block size). Writes ``train.manifest``,
    ``validation.manifest`` (``test.manifest`` when kept splits have one), ``classes.json`` and
    ``summary.json``; nothing is written when a bad line stops it (``on_error='stop'``).
    An input ``PATH=SPLIT`` (or ``split_of={PATH: SPLIT}``) says the split of all its images for
    ``keep_splits``. ``content``: compare local images' bytes (exact duplicates) and thumbnails (near
    copies); off, only paths and names are used.
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
    if group_by not in ("auto", "run"):
        parse_group_by(group_by)  # a bad spec fails before any reading
    rejecting = tuple(reject_labels) if reject_labels is not None else DEFAULT_REJECT_LABELS
    discard_ids: set[str] = set()
    for item in discard or ():
        if storage.exists(item) and not is_id_like(item):
            discard_ids |= set(read_discard(item))
        else:
            discard_ids |= {part.strip() for part in str(item).split(",") if part.strip()}

    summary = PrepareSummary(out=os.fspath(out), reject_labels=list(rejecting))
    acc = Accounting()
    given: dict[str, str] = {}
    for path, split in (split_of or {}).items():
        if str(split).lower() not in _SPLIT_NAMES:
            raise ConfigError(f"--split-of {path}={split}: the split must be train, validation or test")
        given[os.fspath(path)] = _SPLIT_NAMES[str(split).lower()]
    check_free(out, overwrite=overwrite)  # an existing output is refused before anything is read
    temp = tempfile.mkdtemp(prefix="detforge-prepare-")
    try:
        inputs = []  # (name shown, manifest path read)
        for item in manifests:
            source, split = parse_input(item)
            if split is not None:
                given[source] = split
            if (by_name := split_of_name(source)) is not None:
                summary.split_by_name[source] = by_name
            kind = detect_format(source)
            summary.formats[source] = kind
            inputs.append(
                (
                    source,
                    source
                    if kind == "manifest"
                    else _materialize(
                        source, kind, temp, images=images, on_error=on_error, summary=summary, acc=acc
                    ),
                )
            )
        unknown = sorted(set(given) - {name for name, _ in inputs})
        if unknown:
            raise ConfigError(f"--split-of names {unknown[0]}, which is not one of the inputs")
        summary.split_given = given
        # written into a staging folder that becomes `out` whole (data.output): never half an output
        with whole_output(out, overwrite=overwrite, last=("summary.json",)) as staging:
            return _prepare(
                inputs,
                out,
                summary,
                acc,
                discard_ids=discard_ids,
                class_from=class_from,
                classes=classes,
                label_attribute=label_attribute,
                drop_empty=drop_empty,
                validation_fraction=validation_fraction,
                seed=seed,
                group_by=group_by,
                gap=gap,
                keep_splits=keep_splits,
                rejecting=rejecting,
                on_error=on_error,
                content=content,
                staging=staging,
            )
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _prepare(
    inputs,
    out,
    summary,
    acc,
    *,
    discard_ids,
    class_from,
    classes,
    label_attribute,
    drop_empty,
    validation_fraction,
    seed,
    group_by,
    gap,
    keep_splits,
    rejecting,
    on_error,
    content,
    staging,
) -> PrepareSummary:
    rule = DuplicateRule(content=content, listings={})
    seen, verdicts = _read_lines(
        inputs,
        summary,
        acc,
        rule,
        discard_ids=discard_ids,
        class_from=class_from,
        classes=classes,
        label_attribute=label_attribute,
        drop_empty=drop_empty,
        on_error=on_error,
    )
    for ref, verdict in sorted(verdicts.items()):
        image_id = storage.stem(ref)
        summary.verification[image_id] = verdict.class_name
        if verdict.comments:
            summary.verification_comments[image_id] = list(verdict.comments)
        if ref in seen and verdict.rejects(rejecting):
            summary.rejected_by_verification.append(image_id)
            acc.skip("failed verification", 1, len(seen.pop(ref).names))
    hashes = _content_checks(inputs, seen, summary, acc, rule, keep_splits=keep_splits) if content else {}
    if not seen:
        raise ConfigError(
            _nothing_usable(inputs, acc),
            hint="see the reasons above each count; "
            "--on-error skip passes over bad lines, it does not make them usable",
        )

    names_found: Counter = Counter()
    for kept in seen.values():
        names_found.update(kept.names)
        summary.max_boxes_per_image = max(summary.max_boxes_per_image, len(kept.names))
    class_list = list(classes) if classes is not None else sorted(names_found)
    class_id = {n: i for i, n in enumerate(class_list)}
    summary.classes = class_list

    given = {ref: kept.split for ref, kept in seen.items() if kept.split is not None} if keep_splits else {}
    if keep_splits:
        if not given:
            raise ConfigError(
                "--keep-splits: no input says which split its images belong to: "
                + ", ".join(name for name, _ in inputs),
                hint="name one per input as INPUT=train|validation|test (or --split-of INPUT=SPLIT), "
                "or leave out --keep-splits for the default split",
            )
        summary.kept_splits = True
        if len(given) < len(seen):
            summary.warnings.append(
                f"--keep-splits: {len(seen) - len(given)} images carry no split in "
                f"their input and were split by --group-by {group_by}"
            )
    targets = dict(given)
    targets.update(
        _draw_split(
            {ref: kept for ref, kept in seen.items() if ref not in given},
            summary,
            names_found,
            hashes,
            fraction=validation_fraction,
            seed=seed,
            group_by=group_by,
            gap=gap,
        )
    )
    held = [ref for ref, target in targets.items() if target is None]
    for ref in held:
        acc.hold("near a validation frame", 1, len(seen[ref].names))
    summary.dropped_for_gap = len(held)
    if held:
        summary.warnings.append(
            f"{len(held)} training frames held out: within {summary.gap} frames of a validation frame of "
            f"their video (near copies of what validation grades); --gap 0 keeps them in training"
        )
    decisions = [dict() for _ in inputs]  # line -> split name, per input
    for ref, target in targets.items():
        if target is not None:
            decisions[seen[ref].index][seen[ref].line] = target
    drawn = len(seen) - len(given)
    if "validation" not in targets.values() and (validation_fraction > 0 or not drawn):
        summary.warnings.append(
            f"validation is empty: {drawn} images x --validation-fraction {validation_fraction:g} rounds "
            "to no image; give a larger fraction or more images"
            if drawn
            else "validation is empty: the inputs' splits name no validation image"
        )

    # pass 2: stream the kept lines to their split
    counts = Counter()
    written: dict[str, Counter] = defaultdict(Counter)
    splits = ["train", "validation"] + (["test"] if "test" in targets.values() else [])
    with contextlib.ExitStack() as stack:
        handles = {
            t: stack.enter_context(storage.atomic_writer(storage.join(staging, f"{t}.manifest"), "wb"))
            for t in splits
        }
        for index, (_, path) in enumerate(inputs):
            decision = decisions[index]
            for number, raw in storage.iter_lines(path):
                target = decision.get(number)
                if target is None:
                    continue
                obj = orjson.loads(raw)
                attr = _attribute(obj, label_attribute)
                if on_error == "skip":
                    _drop_bad_boxes(obj, attr)
                _set_classes(obj, attr, class_from, class_id, label_attribute)
                obj["source-ref"] = ref_from(resolve_source_ref(obj["source-ref"], path), out)
                obj.pop(SPLIT_FIELD, None)
                handles[target].write(orjson.dumps(obj) + b"\n")
                counts[target] += 1
                annotations = obj[attr].get("annotations") or ()
                summary.empty_images += not annotations
                written[target].update(class_list[int(ann["class_id"])] for ann in annotations)
    summary.train, summary.validation, summary.test = counts["train"], counts["validation"], counts["test"]
    for target in splits:
        acc.write(target, counts[target], sum(written[target].values()))
    summary.boxes_per_class = {n: sum(written[t][n] for t in splits) for n in class_list}
    summary.boxes_per_class_per_split = {t: {n: written[t][n] for n in class_list} for t in splits}
    acc.check()
    summary.accounting = acc.to_json()
    storage.write_bytes(
        storage.join(staging, "classes.json"), orjson.dumps(class_list, option=orjson.OPT_INDENT_2)
    )
    storage.write_bytes(
        storage.join(staging, "summary.json"), orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2)
    )
    return summary


@dataclass(slots=True)
class _Kept:
    """What pass 1 keeps of an image it did not leave out."""

    index: int  # the input
    line: int
    split: str | None  # the split the input gives it, if any
    names: tuple[str, ...]  # class name per box


def _read_lines(
    inputs, summary, acc, rule, *, discard_ids, class_from, classes, label_attribute, drop_empty, on_error
) -> tuple[dict[str, _Kept], dict[str, object]]:
    """Pass 1: every line checked; the kept images by identity, the verification answers by identity."""
    seen: dict[str, _Kept] = rule.listings
    verdicts: dict[str, object] = {}  # identity -> Verification (the last answer wins)
    for index, (name, path) in enumerate(inputs):
        summary.lines[name] = 0
        given, by_name = summary.split_given.get(name), summary.split_by_name.get(name)
        for number, raw in storage.iter_lines(path):
            if not raw.strip():
                continue
            summary.lines[name] += 1
            obj, reason = None, "bad line or image"
            try:
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise ManifestError(f"not valid JSON: {exc}", path=name, line=number) from None
                boxes_skipped: list[str] = []
                try:
                    record = parse_record(
                        obj,
                        path=name,
                        line=number,
                        label_attribute=label_attribute,
                        skipped_boxes=boxes_skipped if on_error == "skip" else None,
                    )
                except ManifestError:
                    # only a line that cannot be a record is checked for a bare verification answer
                    if isinstance(obj, dict) and label_attribute is None and _verification_only(obj):
                        ref = identity(resolve_source_ref(str(obj.get("source-ref", "")), path))
                        verdicts[ref] = find_verification(obj)
                        acc.read(1, 0)
                        acc.skip("verification answer only (no boxes)", 1, 0)
                        continue
                    raise
                if class_from is not None:
                    names = [_template_name(class_from, obj, name, number)] * len(record.class_ids)
                else:
                    names = record.class_names
                if name == path:  # a manifest input: its local image probed (other readers probe theirs)
                    reason = "image missing or unreadable"
                    checked_local_image(record, path)
                if classes is not None and (unknown := sorted(set(names) - set(classes))):
                    reason = "class not in --classes"
                    raise ManifestError(
                        f"class {unknown[0]!r} is not in --classes {classes}", path=name, line=number
                    )
            except ManifestError as exc:
                if on_error == "stop":
                    raise ManifestError(
                        exc.message, path=name, line=exc.line, field=exc.field, hint=exc.hint
                    ) from None
                boxes = _box_count(obj)
                acc.read(1, boxes)
                acc.skip(reason, 1, boxes)
                summary.skipped.append(str(exc))
                continue
            acc.read(1, len(names) + len(boxes_skipped))
            if boxes_skipped:
                acc.skip("bad box", 0, len(boxes_skipped))
                summary.skipped_boxes.extend(boxes_skipped)
            job = record.job_name or storage.stem(name)
            summary.jobs[job] = summary.jobs.get(job, 0) + 1
            ref = identity(resolve_source_ref(record.source_ref, path))
            if record.verification is not None:
                verdicts[ref] = record.verification
            image_id = record.image_id
            if image_id in discard_ids:
                summary.discarded.append(image_id)
                acc.skip("discarded (--discard)", 1, len(names))
                continue
            if not names and drop_empty:
                summary.dropped_empty += 1
                acc.skip("no boxes (--drop-empty)", 1, 0)
                continue
            split = _SPLIT_NAMES.get(str(record.split).lower()) if record.split else None
            kept = _Kept(index, number, given or split or by_name, tuple(names))
            # the rule's table of first listings is `seen` itself: a new image is stored there by it
            if (first := rule.same_image(ref, kept)) is not None:
                summary.duplicates.append(
                    f"{ref}: labeled again at {name}:{number}; kept {inputs[first.index][0]}:{first.line}"
                )
                acc.hold("same image listed again", 1, len(names))
    return seen, verdicts


def _box_count(obj) -> int:
    """The boxes a line that cannot be used lists (0 when it lists none readably)."""
    if not isinstance(obj, dict):
        return 0
    try:
        attr = find_label_attribute(obj)
    except ManifestError:
        return 0
    annotations = obj.get(attr, {}).get("annotations") if attr else None
    return len(annotations) if isinstance(annotations, list) else 0


def _content_checks(
    inputs, seen: dict[str, _Kept], summary, acc, rule: DuplicateRule, *, keep_splits: bool
) -> dict[str, int]:
    """Exact duplicates (same bytes, another path) left out; the ``dhash`` of every numbered local image
    the split will draw (not those whose kept split is given)."""
    hashes: dict[str, int] = {}
    by_origin = {(kept.index, kept.line): ref for ref, kept in seen.items() if not storage.is_remote(ref)}
    for ref in list(seen):
        if storage.is_remote(ref):
            continue
        try:
            data = image_io.read_bytes(ref)
        except image_io.ImageError:
            continue  # a missing image is the readers' to report
        first = rule.same_content(ref, (seen[ref].index, seen[ref].line), data)
        if first is not None:
            kept = seen.pop(ref)
            summary.duplicates.append(
                f"{ref} ({inputs[kept.index][0]}:{kept.line}) has the same bytes as {by_origin[first]} "
                f"({inputs[first[0]][0]}:{first[1]}); kept the first"
            )
            acc.hold("same content as another image", 1, len(kept.names))
            continue
        if keep_splits and seen[ref].split is not None:
            continue
        if video_frame(storage.stem(ref)) is None and numbered(storage.stem(ref)) is not None:
            value = dhash_bytes(data, ref)
            if value is not None:
                hashes[ref] = value
    return hashes


def _nothing_usable(inputs, acc) -> str:
    read = acc.counts["read"]["images"]
    reasons = ", ".join(
        f"{reason} {c['images']}"
        for section in ("skipped", "held_out")
        for reason, c in acc.counts[section].items()
        if c["images"]
    )
    names = ", ".join(name for name, _ in inputs)
    if not read:
        return f"nothing to prepare: no labeled image in {names}"
    return f"nothing to prepare: none of the {read} lines/images of {names} is usable ({reasons})"


def _drop_bad_boxes(obj: dict, attr: str) -> None:
    """Leave out of a line the boxes ``groundtruth.box_problem`` refuses (pass 1 counted them)."""
    label = obj[attr]
    size = label["image_size"][0]
    annotations = label.get("annotations") or []
    keep = [
        i
        for i, a in enumerate(annotations)
        if box_problem(
            a["left"],
            a["top"],
            a["width"],
            a["height"],
            image_width=int(size["width"]),
            image_height=int(size["height"]),
        )
        is None
    ]
    if len(keep) == len(annotations):
        return
    label["annotations"] = [annotations[i] for i in keep]
    meta = obj.get(f"{attr}-metadata")
    objects = meta.get("objects") if isinstance(meta, dict) else None
    if isinstance(objects, list) and len(objects) == len(annotations):
        meta["objects"] = [objects[i] for i in keep]


def _sequences(refs: list[str], seen: dict[str, _Kept], hashes: dict[str, int]):
    """(sequences: key -> [(position, identity)] sorted, stills: [identity]).

    A sequence is a video by its frames' names (``identity.video_frame``), or a run of numbered images
    of one input whose neighbours in number order are near copies by content (positions 0, 1, ...).
    """
    videos: dict[str, list[tuple[int, str]]] = defaultdict(list)
    numbered_items: dict[tuple, list[tuple[int, str]]] = defaultdict(list)
    stills = []
    for ref in refs:
        kept = seen[ref]
        frame = video_frame(storage.stem(ref))
        if frame is not None:
            videos[frame[0]].append((frame[1], ref))
        elif ref in hashes:
            prefix, number = numbered(storage.stem(ref))
            numbered_items[(kept.index, prefix)].append((number, ref))
        else:
            stills.append(ref)
    sequences = {f"video {name}": sorted(items) for name, items in videos.items()}
    for items in numbered_items.values():
        items.sort()
        run = [items[0][1]]
        for (_, a), (_, b) in zip(items, items[1:], strict=False):
            if hash_distance(hashes[a], hashes[b]) <= NEAR_DUPLICATE_BITS:
                run.append(b)
                continue
            _close_run(run, sequences, stills)
            run = [b]
        _close_run(run, sequences, stills)
    return sequences, stills


def _close_run(run: list[str], sequences: dict, stills: list) -> None:
    if len(run) == 1:
        stills.append(run[0])
    else:
        sequences[f"near copies {run[0]}"] = list(enumerate(run))


def _draw_split(
    seen: dict[str, _Kept],
    summary,
    names_found: Counter,
    hashes: dict[str, int],
    *,
    fraction: float,
    seed: int,
    group_by: str,
    gap: int | None,
) -> dict[str, str | None]:
    """identity -> "train" / "validation", or None for a training frame held out next to validation."""
    if not seen:
        return {}
    refs = list(seen)
    targets: dict[str, str | None] = {}
    if group_by.startswith(("block", "regex:")) or group_by == "none":
        group_of = parse_group_by(group_by)
        groups = _groups({ref: group_of(storage.stem(ref)) for ref in refs}, seen)
        validation = _split(groups, names_found, fraction, seed)
        summary.group_by, summary.groups = group_by, len(groups)
        size = block_size(group_by)
        summary.gap = (size if gap is None else gap) if size else 0
        near = _near_validation(seen, group_of, validation, summary.gap) if size else set()
        for ref in refs:
            in_validation = group_of(storage.stem(ref)) in validation
            targets[ref] = "validation" if in_validation else (None if ref in near else "train")
        return targets

    sequences, stills = _sequences(refs, seen, hashes)
    summary.videos = {key: len(items) for key, items in sequences.items()}
    summary.stills = len(stills)
    summary.gap = DEFAULT_BLOCK if gap is None else gap
    mode = group_by
    if mode == "auto":
        mode = "video" if len(sequences) * fraction >= MIN_VALIDATION_VIDEOS else "run"
        if not sequences:
            mode = "none"
    key_of = {ref: ref for ref in stills}
    rng = random.Random(seed)
    inside_runs = 0
    for key, items in sequences.items():
        n = len(items)
        run = round(n * fraction)
        if mode == "run" and run >= 1 and n >= 2 * summary.gap:
            start, near = _best_run([position for position, _ in items], run, summary.gap, rng)
            inside_runs += 1
            for i, (_, ref) in enumerate(items):
                inside = start <= i < start + run
                targets[ref] = "validation" if inside else (None if i in near else "train")
        else:
            key_of.update((ref, key) for _, ref in items)
    # "run" where no sequence was long enough for a run of its own is in fact whole sequences
    summary.group_by = "video" if mode == "run" and not inside_runs else mode
    groups = _groups(key_of, seen)
    summary.groups = len(groups) + inside_runs
    validation = _split(groups, names_found, fraction, seed)
    for ref, key in key_of.items():
        targets[ref] = "validation" if key in validation else "train"
    summary.nearest_train_to_validation = _nearest(sequences, targets)
    return targets


def _groups(key_of: dict[str, str], seen: dict[str, _Kept]) -> dict[str, list]:
    groups: dict[str, list] = {}
    for ref, key in key_of.items():
        entry = groups.setdefault(key, [0, Counter()])
        entry[0] += 1
        entry[1].update(set(seen[ref].names) or {""})
    return groups


def _best_run(positions: list[int], run: int, gap: int, rng: random.Random) -> tuple[int, set[int]]:
    """(first index, indices held out) of the ``run`` consecutive frames for validation that leave out the
    fewest training frames within ``gap`` positions of them (ties drawn with ``rng``)."""

    def near(start: int) -> tuple[int, int, int, int]:
        low = bisect.bisect_left(positions, positions[start] - gap)
        high = bisect.bisect_right(positions, positions[start + run - 1] + gap)
        return low, start, start + run, high

    costs = []
    for start in range(len(positions) - run + 1):
        low, first, end, high = near(start)
        costs.append((first - low) + (high - end))
    fewest = min(costs)
    start = rng.choice([i for i, cost in enumerate(costs) if cost == fewest])
    low, first, end, high = near(start)
    return start, set(range(low, first)) | set(range(end, high))


def _nearest(sequences: dict[str, list[tuple[int, str]]], targets: dict) -> dict[str, int]:
    """Per sequence holding both parts, the smallest position distance of a training to a validation frame."""
    nearest = {}
    for key, items in sequences.items():
        val = sorted(p for p, ref in items if targets.get(ref) == "validation")
        train = [p for p, ref in items if targets.get(ref) == "train"]
        if val and train:
            nearest[key] = min(
                min(abs(p - val[j]) for j in (k - 1, k) if 0 <= j < len(val))
                for p in train
                for k in [bisect.bisect_left(val, p)]
            )
    return nearest


def _verification_only(obj: dict) -> bool:
    """A line that carries a verification answer but no bounding-box labels."""
    try:
        return find_label_attribute(obj) is None and find_verification(obj) is not None
    except ManifestError:
        return False


def _near_validation(seen: dict, group_of, validation_groups: set[str], gap: int) -> set[str]:
    """Training identities whose frame number is within ``gap`` of a validation frame of the same video."""
    if gap <= 0:
        return set()
    frames: dict[str, list[tuple[int, bool, str]]] = defaultdict(list)
    for ref in seen:
        m = FRAME_STEM.match(image_id := storage.stem(ref))
        if m:
            in_validation = group_of(image_id) in validation_groups
            frames[m.group("video")].append((int(m.group("frame")), in_validation, ref))
    near = set()
    for items in frames.values():
        val = sorted(frame for frame, is_val, _ in items if is_val)
        if not val:
            continue
        for frame, is_val, ref in items:
            if not is_val:
                k = bisect.bisect_left(val, frame)
                if min(abs(frame - val[j]) for j in (k - 1, k) if 0 <= j < len(val)) <= gap:
                    near.add(ref)
    return near


def is_id_like(item: str) -> bool:
    """True for a value that names image ids rather than a file (has a comma)."""
    return "," in str(item)


def _set_classes(
    obj: dict, attr: str, class_from: str | None, class_id: dict[str, int], label_attribute: str | None
) -> None:
    label = obj[attr]
    meta = obj.get(f"{attr}-metadata")
    if not isinstance(meta, dict) and label_attribute:
        meta = obj.get(f"{label_attribute}-metadata")
    old_map = {int(k): str(v) for k, v in (meta.get("class-map") or {}).items()}
    annotations = label.get("annotations") or []
    new_map = {}
    for ann in annotations:
        name = (
            class_from.format_map({n: obj[n] for n in _template_fields(class_from)}).strip()
            if class_from is not None
            else old_map[int(ann["class_id"])]
        )
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


def format_summary(summary: PrepareSummary, *, examples: int = 10) -> list[str]:
    """What ``prepare`` prints: inputs read, the accounting table, warnings, classes written, the split."""
    s = summary
    lines = [
        f"read {count} {'lines' if s.formats.get(path) == 'manifest' else 'images'} from {path} "
        f"({s.formats.get(path, 'manifest')}"
        + (
            f", split {s.split_given.get(path) or s.split_by_name[path]}"
            if s.kept_splits and (path in s.split_given or path in s.split_by_name)
            else ""
        )
        + ")"
        for path, count in s.lines.items()
    ]
    acc = s.accounting
    rows = [("read", acc["read"])]
    rows += [(f"written to {split}", c) for split, c in acc["written"].items()]
    rows += [(f"held out: {reason}", c) for reason, c in acc["held_out"].items()]
    rows += [(f"skipped: {reason}", c) for reason, c in acc["skipped"].items()]
    totals = acc["totals"]
    rows.append(
        (
            "written + held out + skipped",
            {unit: sum(t[unit] for t in totals.values()) for unit in ("images", "boxes")},
        )
    )
    width = max(len(label) for label, _ in rows)
    lines.append(f"{'':{width}}  {'images':>7}  {'boxes':>7}")
    lines += [f"{label:{width}}  {c['images']:>7}  {c['boxes']:>7}" for label, c in rows]
    for line in (s.skipped + s.skipped_boxes)[:examples]:
        lines.append(f"  skipped {line}")
    for line in s.duplicates[:examples]:
        lines.append(f"  duplicate {line}")
    for image_id, comments in list(s.verification_comments.items())[:examples]:
        lines.append(f"  verification comment on {image_id}: {' | '.join(comments)}")
    lines.append(f"images without boxes written: {s.empty_images}")
    lines.append(
        "boxes per class written: "
        + ", ".join(f"{i} {n}: {c}" for i, (n, c) in enumerate(s.boxes_per_class.items()))
    )
    if s.kept_splits:
        split = "kept the inputs' splits"
    else:
        split = f"split by {s.group_by}, {s.groups} groups"
        if s.videos:
            split += f"; {len(s.videos)} sequences, {s.stills} still images"
    lines.append(
        f"train {s.train}, validation {s.validation}"
        + (f", test {s.test}" if s.test else "")
        + f" ({split}) -> {s.out}"
    )
    if s.nearest_train_to_validation:
        nearest = list(s.nearest_train_to_validation.items())
        lines.append(
            "nearest training frame to a validation frame: "
            + ", ".join(f"{key} {distance}" for key, distance in nearest[:examples])
            + (f" (and {len(nearest) - examples} more)" if len(nearest) > examples else "")
        )
    lines += [f"warning: {w}" for w in s.warnings]
    return lines
