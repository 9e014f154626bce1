"""Ultralytics / Roboflow YOLO datasets <-> Records: ``read_yolo`` and ``write_yolo``.

Reading follows Ultralytics' own dataset rules (written here from its documentation, not its code):

- ``data.yaml`` is real YAML: ``path:`` (the root; default the YAML's folder), ``train``/``val``/``test``
  as folders, list files (``.txt``, one image per line; ``./x`` relative to the list file) or lists of
  either; a relative entry that does not exist and starts with ``../`` is also tried without it (what
  Roboflow's exports need); ``names`` as a list or an ``{id: name}`` map; ``nc`` checked when given.
  An image named by several splits is read once, in the first (train, val, test).
- An image's labels are at the same path with the last ``images`` folder replaced by ``labels`` and the
  suffix by ``.txt``; a missing or empty label file is an image without objects.
- A label line is ``class cx cy w h`` (normalized) or ``class x1 y1 x2 y2 ...`` (a segmentation polygon,
  turned into its bounding box). Image sizes come from the image header (EXIF orientation applied).
- A split folder (``train/`` with ``images/`` and ``labels/``) is read too, with the names of the
  ``data.yaml`` beside it or one level up.

Writing gives ``<split>/images`` + ``<split>/labels`` and a ``data.yaml`` Ultralytics accepts.
Not here: choosing the format (``data.sources``), the box checks (``groundtruth.checked_boxes``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from detforge import boxes as box_ops
from detforge import images, storage
from detforge.data.formats import decoded_text, imported_record, pass_over, skipped_boxes_list
from detforge.data.groundtruth import ReadReport, Record
from detforge.errors import FormatError, ManifestError

YAML_SUFFIXES = (".yaml", ".yml")
SPLIT_KEYS = {"train": "train", "val": "validation", "test": "test"}
_FOLDER_SPLITS = {
    "train": "train",
    "valid": "validation",
    "val": "validation",
    "validation": "validation",
    "test": "test",
}
# A box may overshoot the image by rounding in the exporting tool; up to this many pixels are clipped.
CLIP_TOLERANCE = 1.0


# A dataset YAML is a few hundred bytes; a larger one is refused before it is parsed.
MAX_YAML_BYTES = 1 << 20


def _no_alias_loader():
    """A SafeLoader that refuses aliases (``*name``): a 459-byte "billion laughs" YAML of nested aliases
    expands into gigabytes in memory; a dataset file has no use for them."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.MarkedYAMLError(
                    problem=f"an alias (*{event.anchor}) is not accepted in a dataset file",
                    problem_mark=event.start_mark,
                )
            return super().compose_node(parent, index)

    return Loader


def read_data_yaml(path: str) -> dict:
    """The parsed ``data.yaml`` (FormatError naming the line for bad YAML, aliases or an oversized file)."""
    import yaml

    raw = storage.read_bytes(path)
    if len(raw) > MAX_YAML_BYTES:
        raise FormatError(
            f"{len(raw)} bytes is too large for a dataset YAML (the limit is {MAX_YAML_BYTES})", path=path
        )
    try:
        data = yaml.load(decoded_text(raw, path), Loader=_no_alias_loader())  # noqa: S506 (a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise FormatError(
            f"not valid YAML: {exc.problem}", path=path, line=mark.line + 1 if mark is not None else None
        ) from None
    except yaml.YAMLError as exc:
        raise FormatError(f"not valid YAML: {exc}", path=path) from None
    if not isinstance(data, dict):
        raise FormatError("expected a mapping with 'names' and 'train'/'val'", path=path)
    return data


def class_names(data: dict, path: str) -> list[str]:
    """The class names of a parsed ``data.yaml``, in class-id order."""
    names = data.get("names")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise FormatError("'names' keys must be class ids 0, 1, ...", path=path, field="names") from None
        if ids != list(range(len(ids))):
            raise FormatError(
                f"'names' ids must be 0..{len(ids) - 1} without gaps, got {ids}", path=path, field="names"
            )
        result = [str(names[k] if k in names else names[str(k)]) for k in ids]
    elif isinstance(names, list):
        result = [str(n) for n in names]
    else:
        raise FormatError("missing 'names' (a list or an {id: name} map)", path=path, field="names")
    nc = data.get("nc")
    if nc is not None and nc != len(result):
        raise FormatError(f"'nc' is {nc} but 'names' has {len(result)} entries", path=path, field="nc")
    return result


def label_path(image: str) -> str:
    """The label file of an image: the last ``images`` folder becomes ``labels``, the suffix ``.txt``."""
    head, sep, tail = image.rpartition("/images/")
    path = f"{head}/labels/{tail}" if sep else image
    return path.rsplit(".", 1)[0] + ".txt"


def _entry_path(entry: str, root: str) -> str:
    if storage.is_remote(entry) or os.path.isabs(entry):
        return entry
    path = storage.join(root, entry)
    if not storage.exists(path) and entry.startswith("../"):
        alt = storage.join(root, entry[3:])
        if storage.exists(alt):
            return alt
    return path


def _images_of(entry: str, root: str, yaml_path: str, key: str) -> list[str]:
    path = _entry_path(str(entry), root)
    if path.endswith(".txt"):
        if not storage.exists(path):
            raise FormatError(f"the list file {path} does not exist", path=yaml_path, field=key)
        base = path.rsplit("/", 1)[0]
        found = []
        for _, raw in storage.iter_lines(path):
            line = raw.decode("utf-8").strip()
            if line:
                found.append(
                    line
                    if storage.is_remote(line) or os.path.isabs(line)
                    else os.path.normpath(storage.join(base, line))
                )
        return found
    if storage.is_remote(path) or os.path.isdir(path):
        return sorted(p for p in storage.list_files(path) if images.is_image_name(p))
    raise FormatError(
        f"{path} is neither an image folder nor a list file",
        path=yaml_path,
        field=key,
        hint="Ultralytics' rule: relative to 'path:' or the data.yaml's folder",
    )


def find_data_yaml(folder: str) -> str | None:
    """The dataset YAML in ``folder`` (``data.yaml`` first), or None."""
    for name in ("data.yaml", "data.yml"):
        if storage.exists(storage.join(folder, name)):
            return storage.join(folder, name)
    if not storage.is_remote(folder) and os.path.isdir(folder):
        found = sorted(f for f in os.listdir(folder) if f.endswith(YAML_SUFFIXES))
        if len(found) == 1:
            return storage.join(folder, found[0])
    return None


def is_split_folder(folder: str) -> bool:
    """True for a YOLO split folder: ``images/`` and ``labels/`` side by side."""
    return (
        not storage.is_remote(folder)
        and os.path.isdir(storage.join(folder, "images"))
        and os.path.isdir(storage.join(folder, "labels"))
    )


def read_yolo(
    source: str, *, on_error: str = "stop", report: ReadReport | None = None, classes_from: str | None = None
) -> tuple[list[str], Iterator[Record]]:
    """(class names, a stream of Records) of a ``data.yaml``, a folder holding one, or a split folder.

    Each record's ``source_ref`` is where the image is (a path or URI) and ``split`` the split the
    dataset gave it. Bad boxes stop with an error naming the label file and line, or with
    ``on_error='skip'`` are left out and listed in ``report.skipped_boxes``.
    """
    source = os.fspath(source).rstrip("/")
    if source.endswith(YAML_SUFFIXES):
        yaml_path = source
    elif is_split_folder(source):
        parent = source.rsplit("/", 1)[0] if "/" in source else "."
        yaml_path = classes_from or find_data_yaml(source) or find_data_yaml(parent)
        if yaml_path is None:
            raise FormatError(
                "a YOLO split folder needs the dataset's data.yaml (with 'names') beside it or one level up",
                path=source,
            )
        names = class_names(read_data_yaml(yaml_path), yaml_path)
        split = _FOLDER_SPLITS.get(source.rsplit("/", 1)[-1].lower())
        paths = sorted(
            p for p in storage.list_files(storage.join(source, "images")) if images.is_image_name(p)
        )
        return names, _records(names, [(split, paths)], on_error=on_error, report=report)
    else:
        yaml_path = find_data_yaml(source)
        if yaml_path is None:
            raise FormatError("no data.yaml in this folder", path=source)
    data = read_data_yaml(yaml_path)
    names = class_names(data, yaml_path)
    folder = yaml_path.rsplit("/", 1)[0] if "/" in yaml_path else "."
    root = data.get("path")
    root = (
        folder
        if not root
        else (
            str(root)
            if storage.is_remote(str(root)) or os.path.isabs(str(root))
            else storage.join(folder, str(root))
        )
    )
    splits = []
    seen: set[str] = set()  # an image named by several splits (e.g. val: the train folder) is read once
    for key, split in SPLIT_KEYS.items():
        value = data.get(key)
        if value in (None, ""):
            continue
        entries = value if isinstance(value, list) else [value]
        paths: list[str] = []
        for entry in entries:
            paths.extend(p for p in _images_of(entry, root, yaml_path, key) if p not in seen)
        seen.update(paths)
        splits.append((split, paths))
    if not splits:
        raise FormatError("names no split: expected 'train' (and 'val')", path=yaml_path)
    return names, _records(names, splits, on_error=on_error, report=report)


def _parse_label_line(parts: list[str], n_classes: int, path: str, line: int) -> tuple[int, list[float]]:
    """(class id, normalized cxcywh) of one label line."""
    try:
        values = [float(p) for p in parts[1:]]
        cid = int(parts[0])
    except ValueError:
        raise FormatError("expected 'class cx cy w h' (numbers)", path=path, line=line) from None
    if float(parts[0]) != cid or not 0 <= cid < n_classes:
        raise FormatError(
            f"class {parts[0]} is not one of the {n_classes} classes in 'names'", path=path, line=line
        )
    if len(values) == 4:
        return cid, values
    if len(values) >= 6 and len(values) % 2 == 0:  # a polygon: its bounding box
        xs, ys = values[0::2], values[1::2]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        return cid, [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
    raise FormatError(
        f"expected 'class cx cy w h' or a polygon 'class x1 y1 x2 y2 ...', got {len(parts)} values",
        path=path,
        line=line,
    )


def _records(
    names: list[str], splits: list[tuple[str | None, list[str]]], *, on_error: str, report: ReadReport | None
) -> Iterator[Record]:
    skipped_boxes = skipped_boxes_list(on_error, report)
    for split, paths in splits:
        for image in paths:
            label = label_path(image)
            if report is not None:
                report.lines += 1
            try:
                width, height = images.probe(image)
                rows, where = [], []
                if storage.exists(label):
                    for number, raw in storage.iter_lines(label):
                        parts = raw.decode("utf-8", "replace").lstrip("\ufeff").split()  # a BOM is no value
                        if parts:
                            rows.append(_parse_label_line(parts, len(names), label, number))
                            where.append((label, number, None))
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                cxcywh = np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 4)
                xyxy = box_ops.cxcywh_norm_to_xyxy(cxcywh, width=width, height=height)
                overshoot = (
                    (xyxy < -CLIP_TOLERANCE).any(axis=1)
                    | (xyxy[:, 2] > width + CLIP_TOLERANCE)
                    | (xyxy[:, 3] > height + CLIP_TOLERANCE)
                )
                xyxy = np.where(overshoot[:, None], xyxy, box_ops.clip_xyxy(xyxy, width=width, height=height))
                record = imported_record(
                    image,
                    width=width,
                    height=height,
                    boxes_xyxy=xyxy,
                    class_ids=ids,
                    names=names,
                    where=where,
                    split=split,
                    skipped_boxes=skipped_boxes,
                )
            except (FormatError, ManifestError, images.ImageError) as exc:
                pass_over(exc, on_error=on_error, report=report, path=label)
                continue
            yield record


def write_yolo(
    records: Iterable[Record], folder: str | os.PathLike, *, classes: list[str], resolve=lambda ref: ref
) -> int:
    """Write ``<split>/images/*`` (copies), ``<split>/labels/*.txt`` and ``data.yaml``; returns the count.

    Records without a split go to ``train``; ``data.yaml`` names only the splits written (never the
    training images as ``val``: a model graded on its training images looks better than it is).
    ``resolve`` maps a record's ``source_ref`` to the image to copy (e.g. the manifest's folder rule);
    only a file whose header is an image (``images.probe``) is copied.
    """
    import yaml

    folder = os.fspath(folder)
    index = {name: i for i, name in enumerate(classes)}
    folders = {"train": "train", "validation": "val", "test": "test"}
    used: dict[str, set[str]] = {}
    count = 0
    for record in records:
        split = folders.get(record.split or "train", "train")
        name = storage.basename(record.source_ref)
        taken = used.setdefault(split, set())
        if name in taken:
            raise FormatError(
                f"two images named {name!r} in the {split} split; YOLO keeps one folder per split",
                path=record.origin or record.source_ref,
            )
        taken.add(name)
        image = resolve(record.source_ref)
        images.probe(image)  # a non-image (whatever an annotation names) is never copied
        storage.copy_file(image, storage.join(folder, split, "images", name))
        boxes = box_ops.xyxy_to_cxcywh_norm(record.boxes, width=record.width, height=record.height)
        lines = [
            f"{index[n]} " + " ".join(f"{v:.8f}" for v in box)
            for box, n in zip(boxes, record.class_names, strict=True)
        ]
        stem = name.rsplit(".", 1)[0]
        storage.write_text(
            storage.join(folder, split, "labels", stem + ".txt"), "".join(x + "\n" for x in lines)
        )
        count += 1
    data = {key: f"{key}/images" for key in ("train", "val", "test") if key in used}
    data["nc"] = len(classes)
    data["names"] = dict(enumerate(classes))
    storage.write_text(
        storage.join(folder, "data.yaml"), yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    )
    return count
