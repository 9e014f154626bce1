"""labelme's JSON files (one per image) -> Records: ``read_labelme``.

- A labelme folder holds one ``.json`` per labeled image (beside it, or in a folder of their own), each
  with ``shapes``, ``imagePath`` (relative to the JSON's folder), ``imageWidth`` and ``imageHeight``.
- ``rectangle`` shapes are boxes (two corner points, in any order). Other shapes (``polygon``,
  ``circle``, ``point``, ``line``, ...) are not boxes: they are left out and counted in one note per
  read (``report.notes``), by shape type.
- Classes are the rectangle labels, sorted by name (labelme has no class list).
- ``imagePath`` must stay inside the folder that was given; the image is found by a header probe (a
  missing image is the same error, or counted skip, as in every format). A JSON embedding the image
  (``imageData``) without the file beside it is refused: write the image out first.

Not here: writing labelme (``convert`` writes the other formats), choosing the format (``data.sources``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

from detforge import images, storage
from detforge.data.formats import checked_size, decoded_json, imported_record, pass_over, skipped_boxes_list
from detforge.data.groundtruth import ReadReport, Record
from detforge.errors import FormatError, ManifestError

BOX_SHAPE = "rectangle"


def is_labelme(data) -> bool:
    """True for a parsed labelme annotation (``shapes`` and ``imagePath``)."""
    return isinstance(data, dict) and isinstance(data.get("shapes"), list) and "imagePath" in data


def looks_like_labelme(path: str) -> bool:
    """A local JSON file whose first 64 KiB hold labelme's ``shapes`` and no COCO ``annotations`` or
    ``categories`` (a COCO file may be hundreds of MB: it is not parsed to tell)."""
    if storage.is_remote(path) or not os.path.isfile(path):
        return False
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    return b'"shapes"' in head and b'"annotations"' not in head and b'"categories"' not in head


def labelme_files(folder: str, *, limit: int | None = None) -> list[str]:
    """The labelme JSON files under ``folder`` (checked by content; ``limit``: stop after that many)."""
    found = []
    if storage.is_remote(folder) or not os.path.isdir(folder):
        return found
    for path in storage.list_files(folder, suffixes=(".json",)):
        if not looks_like_labelme(path):
            continue
        try:
            data = decoded_json(storage.read_bytes(path), path)
        except FormatError:
            continue
        if is_labelme(data):
            found.append(path)
            if limit is not None and len(found) >= limit:
                break
    return found


def _load(path: str) -> dict:
    data = decoded_json(storage.read_bytes(path), path)
    if not is_labelme(data):
        raise FormatError("not a labelme file: no 'shapes' list and 'imagePath'", path=path)
    return data


def read_labelme(
    source: str, *, images_dir: str | None = None, on_error: str = "stop", report: ReadReport | None = None
) -> tuple[list[str], Iterator[Record]]:
    """(class names sorted, a stream of Records) of a folder of labelme JSON files (or one file)."""
    source = os.fspath(source).rstrip("/")
    root = os.path.abspath(source if os.path.isdir(source) else os.path.dirname(source) or ".")
    paths = labelme_files(source) if os.path.isdir(source) else [source]
    if not paths:
        raise FormatError("no labelme .json files here", path=source)
    names: set[str] = set()
    for path in paths:
        try:
            data = _load(path)
        except FormatError:
            if on_error == "stop":
                raise
            continue
        names |= {
            str(s.get("label")).strip()
            for s in data["shapes"]
            if isinstance(s, dict) and s.get("shape_type", BOX_SHAPE) == BOX_SHAPE and s.get("label")
        }
    classes = sorted(names)
    return classes, _records(paths, classes, root, images_dir, on_error, report)


def _image(data: dict, path: str, root: str, images_dir: str | None) -> str:
    ref = data.get("imagePath")
    if not isinstance(ref, str) or not ref.strip():
        raise FormatError("missing 'imagePath'", path=path, field="imagePath")
    ref = ref.strip().replace("\\", "/")
    if images_dir:
        return storage.join(images_dir, os.path.basename(ref))
    if os.path.isabs(ref) or storage.is_remote(ref):
        raise FormatError(
            f"imagePath {ref!r} is an absolute path or URI; an annotation names an image "
            "inside its dataset folder",
            path=path,
            field="imagePath",
        )
    image = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), ref))
    if os.path.commonpath([image, root]) != root:
        raise FormatError(
            f"imagePath {ref!r} climbs out of the dataset folder {root}", path=path, field="imagePath"
        )
    if not os.path.exists(image) and data.get("imageData"):
        raise images.ImageError(
            f"image {ref!r} not found (the JSON embeds it as imageData)",
            path=path,
            field="imagePath",
            hint="save the image beside the JSON first",
        )
    return image


def _records(paths, classes, root, images_dir, on_error, report) -> Iterator[Record]:
    index = {name: i for i, name in enumerate(classes)}
    skipped_boxes = skipped_boxes_list(on_error, report)
    other_shapes: Counter = Counter()
    for path in paths:
        if report is not None:
            report.lines += 1
        try:
            data = _load(path)
            image = _image(data, path, root, images_dir)
            width, height = data.get("imageWidth"), data.get("imageHeight")
            stated = (
                (width, height)
                if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
                else None
            )
            width, height, _ = checked_size(image, stated, path=path, field="imageWidth/imageHeight")
            rows, ids, where = [], [], []
            for i, shape in enumerate(data["shapes"]):
                fld = f"shape {i + 1}"
                if not isinstance(shape, dict):
                    raise FormatError("expected an object", path=path, field=fld)
                kind = shape.get("shape_type") or BOX_SHAPE
                if kind != BOX_SHAPE:
                    other_shapes[str(kind)] += 1
                    continue
                label = str(shape.get("label") or "").strip()
                if not label:
                    raise FormatError("a rectangle without a 'label'", path=path, field=f"{fld}.label")
                points = shape.get("points")
                if not (
                    isinstance(points, list)
                    and len(points) == 2
                    and all(
                        isinstance(p, list) and len(p) == 2 and all(isinstance(v, int | float) for v in p)
                        for p in points
                    )
                ):
                    raise FormatError(
                        "a rectangle needs two corner points [[x1, y1], [x2, y2]]",
                        path=path,
                        field=f"{fld}.points",
                    )
                (x1, y1), (x2, y2) = points
                rows.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
                ids.append(index[label])
                where.append((path, None, f"{fld}.points"))
            record = imported_record(
                image,
                width=width,
                height=height,
                boxes_xyxy=rows,
                class_ids=ids,
                names=classes,
                where=where,
                skipped_boxes=skipped_boxes,
            )
        except (FormatError, ManifestError, images.ImageError) as exc:
            pass_over(exc, on_error=on_error, report=report, path=path)
            continue
        yield record
    if other_shapes and report is not None:
        shown = ", ".join(f"{kind} {n}" for kind, n in sorted(other_shapes.items()))
        report.notes.append(
            f"{sum(other_shapes.values())} labelme shapes that are not rectangles left out ({shown})"
        )
