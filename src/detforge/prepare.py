"""``detforge prepare``: join Ground Truth job manifests, discard, inject classes, split leak-aware.

Two streaming passes over the inputs, so memory stays flat as the manifests grow:

1. every line is checked (``groundtruth.parse_record``) and only a compact summary is kept: its
   decision byte, image id (for duplicates), group key and class names (for the split);
2. the lines are streamed again and written to ``train.manifest`` / ``validation.manifest`` with every
   unknown field kept; only ``class_id`` and ``class-map`` are rewritten (injected or merged classes).

Class ids: ``--classes "a,b"`` gives them in that order; otherwise the class names found (from the
``--class-from`` template or the jobs' class maps) are sorted by name and numbered from 0.

Split: lines are grouped (``block:N`` runs of N consecutive frame numbers of one ``<video>_<frame>``
stem by default, ``video``, ``none`` or ``regex:PATTERN``); whole groups go to validation, drawn per
stratum (the rarest class of the group) with the seed until the stratum's share is reached.

Not here: reading/writing single records (``groundtruth``), other formats (``convert``).
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import orjson

from detforge import storage
from detforge.errors import ConfigError, ManifestError
from detforge.groundtruth import ADJUSTED_PREFIX, find_label_attribute, parse_record

DEFAULT_BLOCK = 10
FRAME_STEM = re.compile(r"^(?P<video>.+)_(?P<frame>\d+)$")
_DROP, _TRAIN, _VAL = 0, 1, 2
_TEMPLATE_FIELD = re.compile(r"{([^{}:!]*)")


@dataclass
class PrepareSummary:
    """What ``prepare`` did, also written as ``summary.json``."""

    out: str
    lines: dict[str, int] = field(default_factory=dict)  # per input manifest
    jobs: dict[str, int] = field(default_factory=dict)  # per job-name
    discarded: list[str] = field(default_factory=list)  # image ids from the discard list
    rejected_by_verification: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # "id: kept path:line, dropped path:line"
    skipped: list[str] = field(default_factory=list)  # bad lines passed over with on_error=skip
    dropped_empty: int = 0
    empty_images: int = 0
    boxes_per_class: dict[str, int] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    train: int = 0
    validation: int = 0
    groups: int = 0
    max_boxes_per_image: int = 0

    def to_json(self) -> dict:
        """The summary as a JSON-ready dict."""
        return asdict(self)


def read_discard_list(uri: str) -> set[str]:
    """Image ids of a discard file: one per line, ``#`` comments, ``id<TAB>reason`` lines accepted."""
    ids = set()
    for _, raw in storage.iter_lines(uri):
        text = raw.decode("utf-8", "replace").split("#", 1)[0].strip()
        if text:
            ids.add(text.split("\t", 1)[0].split()[0])
    return ids


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


def prepare(manifests: list[str], out: str, *, discard: list[str] = (), class_from: str | None = None,
            classes: list[str] | None = None, label_attribute: str | None = None, drop_empty: bool = False,
            validation_fraction: float = 0.1, seed: int = 0, group_by: str = f"block:{DEFAULT_BLOCK}",
            on_error: str = "stop") -> PrepareSummary:
    """Join manifests, drop discarded/rejected/duplicate images, set classes, split; write into ``out``.

    ``discard`` items are discard files (when they exist) or image ids (comma separated allowed).
    Writes ``train.manifest``, ``validation.manifest``, ``classes.json`` and ``summary.json``; nothing
    is written when a bad line stops it (``on_error='stop'``).
    """
    if not manifests:
        raise ConfigError("no manifest given")
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"--on-error must be stop or skip, got {on_error!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError(f"--validation-fraction must be in [0, 1), got {validation_fraction}")
    if class_from is not None:
        try:
            class_from.format_map({name: "x" for name in _template_fields(class_from)})
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError(f"--class-from {class_from!r} is not a valid template: {exc}") from None
    group_of = parse_group_by(group_by)
    discard_ids: set[str] = set()
    for item in discard or ():
        if storage.exists(item) and not is_id_like(item):
            discard_ids |= read_discard_list(item)
        else:
            discard_ids |= {part.strip() for part in str(item).split(",") if part.strip()}

    summary = PrepareSummary(out=os.fspath(out))
    decisions: list[bytearray] = []
    seen: dict[str, int] = {}  # image id -> manifest index << 32 | line of the kept copy
    # group key -> [line count, class names counter]; kept lines by (manifest index, line)
    groups: dict[str, list] = {}
    names_found: Counter = Counter()

    # pass 1: check every line, keep compact facts
    for index, path in enumerate(manifests):
        path = os.fspath(path)
        decision = bytearray()
        summary.lines[path] = 0
        for number, raw in storage.iter_lines(path):
            if len(decision) <= number:
                decision.extend(b"\0" * (number + 1 - len(decision)))
            if not raw.strip():
                continue
            summary.lines[path] += 1
            try:
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise ManifestError(f"not valid JSON: {exc}", path=path, line=number) from None
                record = parse_record(obj, path=path, line=number, label_attribute=label_attribute)
                if class_from is not None:
                    names = [_template_name(class_from, obj, path, number)] * len(record.class_ids)
                else:
                    names = record.class_names
            except ManifestError as exc:
                if on_error == "stop":
                    raise
                summary.skipped.append(str(exc))
                continue
            job = record.job_name or storage.stem(path)
            summary.jobs[job] = summary.jobs.get(job, 0) + 1
            image_id = record.image_id
            if image_id in discard_ids:
                summary.discarded.append(image_id)
                continue
            if record.verified is False:
                summary.rejected_by_verification.append(image_id)
                continue
            if image_id in seen:
                first = seen[image_id]
                summary.duplicates.append(f"{image_id}: kept {os.fspath(manifests[first >> 32])}:"
                                          f"{first & 0xFFFFFFFF}, dropped {path}:{number}")
                continue
            seen[image_id] = (index << 32) | number
            if not names:
                if drop_empty:
                    summary.dropped_empty += 1
                    continue
                summary.empty_images += 1
            if classes is not None:
                unknown = sorted(set(names) - set(classes))
                if unknown:
                    error = ManifestError(f"class {unknown[0]!r} is not in --classes {classes}", path=path,
                                          line=number)
                    if on_error == "stop":
                        raise error
                    summary.skipped.append(str(error))
                    continue
            names_found.update(names)
            summary.max_boxes_per_image = max(summary.max_boxes_per_image, len(names))
            decision[number] = _TRAIN
            key = group_of(image_id)
            entry = groups.setdefault(key, [0, Counter()])
            entry[0] += 1
            entry[1].update(set(names) or {""})
        decisions.append(decision)

    class_list = list(classes) if classes is not None else sorted(names_found)
    class_id = {name: i for i, name in enumerate(class_list)}
    summary.classes = class_list
    summary.boxes_per_class = {name: names_found.get(name, 0) for name in class_list}
    summary.groups = len(groups)
    validation_groups = _split(groups, names_found, validation_fraction, seed)

    # pass 2: stream the kept lines to their split
    storage.makedirs(out)
    counts = {_TRAIN: 0, _VAL: 0}
    with storage.atomic_writer(storage.join(out, "train.manifest"), "wb") as train_file, \
            storage.atomic_writer(storage.join(out, "validation.manifest"), "wb") as val_file:
        handles = {_TRAIN: train_file, _VAL: val_file}
        for index, path in enumerate(manifests):
            path = os.fspath(path)
            decision = decisions[index]
            for number, raw in storage.iter_lines(path):
                if number >= len(decision) or decision[number] == _DROP:
                    continue
                obj = orjson.loads(raw)
                # the group key is computed again from the id rather than kept per line (flat memory)
                key = group_of(storage.stem(obj["source-ref"]))
                target = _VAL if key in validation_groups else _TRAIN
                attr = _attribute(obj, label_attribute)
                _set_classes(obj, attr, class_from, class_id, label_attribute)
                handles[target].write(orjson.dumps(obj) + b"\n")
                counts[target] += 1
    summary.train, summary.validation = counts[_TRAIN], counts[_VAL]
    storage.write_bytes(storage.join(out, "classes.json"),
                        orjson.dumps(class_list, option=orjson.OPT_INDENT_2))
    storage.write_bytes(storage.join(out, "summary.json"),
                        orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2))
    return summary


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
