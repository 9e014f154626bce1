"""COCO detection JSON (CVAT, Label Studio, Roboflow exports) <-> Records: ``read_coco`` and ``write_coco``.

- Category ids may have gaps; classes are the categories in id order. A category that only groups
  others (named as their ``supercategory``) and has no annotation of its own is not a class: Roboflow
  exports list their dataset's name that way, as category 0.
- ``iscrowd`` annotations are kept and flagged: evaluation ignores them as pycocotools does (a
  detection on a crowd region is neither a hit nor a miss).
- ``file_name`` is relative to ``images`` when given, else to the JSON's folder. Roboflow's export
  folder (``train/_annotations.coco.json``, ``valid/...``, ``test/...``) is read split by split.
- Image sizes come from the JSON, or from the image header when missing.

Not here: detection results and COCO metrics (``coco_metrics``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import orjson

from detforge import boxes as box_ops
from detforge import images, storage
from detforge.data.formats import imported_record, pass_over, skipped_boxes_list
from detforge.data.groundtruth import ReadReport, Record
from detforge.errors import FormatError, ManifestError

ROBOFLOW_FILE = "_annotations.coco.json"
_FOLDER_SPLITS = {"train": "train", "valid": "validation", "val": "validation", "test": "test"}


def roboflow_files(folder: str) -> list[tuple[str, str | None]]:
    """(annotation file, split) of a Roboflow COCO export folder (one JSON per split folder)."""
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        path = os.path.join(folder, name, ROBOFLOW_FILE)
        if os.path.isfile(path):
            found.append((path, _FOLDER_SPLITS.get(name.lower())))
    if os.path.isfile(os.path.join(folder, ROBOFLOW_FILE)):
        found.append(
            (os.path.join(folder, ROBOFLOW_FILE), _FOLDER_SPLITS.get(os.path.basename(folder).lower()))
        )
    return found


def _load(path: str) -> dict:
    try:
        data = orjson.loads(storage.read_bytes(path))
    except orjson.JSONDecodeError as exc:
        raise FormatError(f"not valid JSON: {exc}", path=path) from None
    for key in ("images", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise FormatError(f"not a COCO detection file: no '{key}' list", path=path, field=key)
    return data


def categories(data: dict, path: str) -> tuple[list[str], dict[int, int]]:
    """(class names in id order, category id -> class id) of a COCO file."""
    used = {a.get("category_id") for a in data.get("annotations") or () if isinstance(a, dict)}
    cats = []
    for n, cat in enumerate(data["categories"]):
        if (
            not isinstance(cat, dict)
            or not isinstance(cat.get("id"), int)
            or not isinstance(cat.get("name"), str)
        ):
            raise FormatError(
                "a category needs an integer 'id' and a 'name'", path=path, field=f"categories[{n}]"
            )
        cats.append(cat)
    groups = {c.get("supercategory") for c in cats if c.get("supercategory") not in (None, "", "none")}
    classes = [
        c for c in sorted(cats, key=lambda c: c["id"]) if not (c["name"] in groups and c["id"] not in used)
    ]
    names = [str(c["name"]) for c in classes]
    if len(set(names)) != len(names):
        raise FormatError(f"category names repeat: {names}", path=path, field="categories")
    return names, {c["id"]: i for i, c in enumerate(classes)}


def read_coco(
    source: str, *, images_dir: str | None = None, on_error: str = "stop", report: ReadReport | None = None
) -> tuple[list[str], Iterator[Record]]:
    """(class names, a stream of Records) of a COCO JSON file or a Roboflow COCO export folder."""
    source = os.fspath(source).rstrip("/")
    files = roboflow_files(source) if os.path.isdir(source) else [(source, None)]
    if not files:
        raise FormatError(f"no COCO JSON here (expected {ROBOFLOW_FILE} in split folders)", path=source)
    loaded = [(path, split, _load(path)) for path, split in files]
    names: list[str] = []
    for path, _, data in loaded:
        these, _ = categories(data, path)
        if names and these != names:
            raise FormatError(f"categories {these} differ from {names} of {loaded[0][0]}", path=path)
        names = these
    return names, _records(loaded, names, images_dir, on_error, report)


def _records(loaded, names, images_dir, on_error, report) -> Iterator[Record]:
    skipped_boxes = skipped_boxes_list(on_error, report)
    for path, split, data in loaded:
        _, class_of = categories(data, path)
        base = images_dir or (os.path.dirname(path) or ".")
        per_image: dict = {}
        for n, ann in enumerate(data.get("annotations") or ()):
            per_image.setdefault(ann.get("image_id") if isinstance(ann, dict) else None, []).append((n, ann))
        known = {img.get("id") for img in data["images"] if isinstance(img, dict)}
        for image_id in per_image:
            if image_id not in known:
                n = per_image[image_id][0][0]
                error = FormatError(
                    f"image_id {image_id!r} is not in 'images'", path=path, field=f"annotations[{n}].image_id"
                )
                if on_error == "stop":
                    raise error
                if report is not None:
                    report.skipped.append((path, 0, str(error)))
        for m, img in enumerate(data["images"]):
            if report is not None:
                report.lines += 1
            try:
                if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
                    raise FormatError("an image needs a 'file_name'", path=path, field=f"images[{m}]")
                ref = img["file_name"]
                image = (
                    ref
                    if (storage.is_remote(ref) or os.path.isabs(ref))
                    else os.path.normpath(storage.join(base, ref))
                    if not storage.is_remote(base)
                    else storage.join(base, ref)
                )
                width, height = img.get("width"), img.get("height")
                if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
                    width, height = images.probe(image)
                rows, ids, crowd, where = [], [], [], []
                for n, ann in per_image.get(img.get("id"), ()):
                    fld = f"annotations[{n}]"
                    if ann.get("category_id") not in class_of:
                        raise FormatError(
                            f"category_id {ann.get('category_id')!r} is not a class {names}",
                            path=path,
                            field=f"{fld}.category_id",
                        )
                    bbox = ann.get("bbox")
                    if not (
                        isinstance(bbox, list)
                        and len(bbox) == 4
                        and all(isinstance(v, int | float) for v in bbox)
                    ):
                        raise FormatError(
                            "expected 'bbox': [x, y, width, height]", path=path, field=f"{fld}.bbox"
                        )
                    rows.append(bbox)
                    ids.append(class_of[ann["category_id"]])
                    crowd.append(bool(ann.get("iscrowd")))
                    where.append((path, None, f"{fld}.bbox"))
                record = imported_record(
                    image,
                    width=width,
                    height=height,
                    names=names,
                    where=where,
                    split=split,
                    boxes_xyxy=box_ops.coco_xywh_to_xyxy(np.asarray(rows, dtype=np.float64).reshape(-1, 4)),
                    class_ids=ids,
                    difficult=crowd,
                    skipped_boxes=skipped_boxes,
                )
            except (FormatError, ManifestError, images.ImageError) as exc:
                pass_over(exc, on_error=on_error, report=report, path=path)
                continue
            yield record


def write_coco(records: Iterable[Record], path: str | os.PathLike, *, classes: list[str]) -> int:
    """Write records as one COCO JSON file (atomic); returns the image count.

    Categories get ids 1..K in class order; difficult boxes are written with ``iscrowd: 1``.
    """
    index = {name: i for i, name in enumerate(classes)}
    images_out, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images_out.append(
            {"id": image_id, "file_name": record.source_ref, "width": record.width, "height": record.height}
        )
        xywh = box_ops.xyxy_to_coco_xywh(record.boxes)
        for box, name, hard in zip(xywh, record.class_names, record.difficult, strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": index[name] + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(bool(hard)),
                }
            )
    data = {
        "images": images_out,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }
    storage.write_bytes(path, orjson.dumps(data))
    return len(images_out)
