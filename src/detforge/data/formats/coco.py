"""COCO detection JSON (CVAT, Label Studio, Roboflow exports) <-> Records: ``read_coco`` and ``write_coco``.

- Category ids may have gaps; classes are the categories in id order. A category that only groups
  others (named as their ``supercategory``) and has no annotation of its own is not a class: Roboflow
  exports list their dataset's name that way, as category 0.
- ``iscrowd`` annotations are kept and flagged: evaluation ignores them as pycocotools does (a
  detection on a crowd region is neither a hit nor a miss).
- ``file_name`` is relative to ``images`` when given, else to the first of CVAT's ``images/<subset>/``,
  ``images/``, the JSON's folder and its ``images/`` that holds it (``image_folders``); a relative name
  may not climb out of that folder (``formats.image_inside``); an absolute one is taken as given.
- Roboflow's export folder (``train/_annotations.coco.json``, ``valid/...``, ``test/...``) and CVAT's
  (``annotations/instances_<subset>.json``) are read file by file, each file's subset its split.
- Every image is probed (``images.probe``): a missing one is an error or a counted skip; the JSON's
  ``width``/``height`` are checked against the header (``formats.checked_size``).
- A file that is not JSON or not COCO stops, or with ``on_error='skip'`` is passed over and counted.

Not here: detection results and COCO metrics (``coco_metrics``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import orjson

from detforge import boxes as box_ops
from detforge import images, storage
from detforge.data.formats import (
    checked_size,
    decoded_json,
    image_inside,
    imported_record,
    pass_over,
    skipped_boxes_list,
    upright_boxes,
)
from detforge.data.groundtruth import ReadReport, Record
from detforge.errors import FormatError, ManifestError

ROBOFLOW_FILE = "_annotations.coco.json"
_FOLDER_SPLITS = {
    "train": "train",
    "valid": "validation",
    "val": "validation",
    "validation": "validation",
    "test": "test",
}
# CVAT's COCO export: annotations/instances_<subset>.json with the images in images/<subset>/
CVAT_PREFIX = "instances_"


def subset_split(name: str) -> str | None:
    """The split a folder or subset name means (``Train``, ``valid``, ``val``, ``Validation``, ``test``)."""
    return _FOLDER_SPLITS.get(name.lower())


def _cvat_subset(path: str) -> str | None:
    name = os.path.basename(path)
    if name.startswith(CVAT_PREFIX) and name.endswith(".json"):
        return name[len(CVAT_PREFIX) : -len(".json")]
    return None


def file_split(path: str) -> str | None:
    """The split a COCO file's own name gives it: CVAT's ``instances_<subset>.json``, or the split folder
    of Roboflow's ``<split>/_annotations.coco.json``."""
    subset = _cvat_subset(path)
    if subset is not None:
        return subset_split(subset)
    if os.path.basename(path) == ROBOFLOW_FILE:
        return subset_split(os.path.basename(os.path.dirname(os.path.abspath(path))))
    return None


def coco_files(folder: str) -> list[tuple[str, str | None]]:
    """(annotation file, split) of a COCO export folder: Roboflow's (one ``_annotations.coco.json`` per
    split folder) or CVAT's (``annotations/instances_<subset>.json``)."""
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        path = os.path.join(folder, name, ROBOFLOW_FILE)
        if os.path.isfile(path):
            found.append((path, subset_split(name)))
    if os.path.isfile(os.path.join(folder, ROBOFLOW_FILE)):
        found.append((os.path.join(folder, ROBOFLOW_FILE), subset_split(os.path.basename(folder))))
    annotations = os.path.join(folder, "annotations")
    for name in sorted(os.listdir(annotations)) if os.path.isdir(annotations) else ():
        subset = _cvat_subset(name)
        if subset is not None:
            found.append((os.path.join(annotations, name), subset_split(subset)))
    return found


roboflow_files = coco_files  # the older name


def image_folders(path: str, images_dir: str | None) -> list[str]:
    """Where the images of a COCO file may be, in order: ``--images``, else CVAT's ``images/<subset>/``,
    the JSON's folder and its ``images/`` (a Roboflow export whose owner moved the images there)."""
    if images_dir:
        return [images_dir]
    folder = os.path.dirname(path) or "."
    found = []
    subset = _cvat_subset(path)
    if subset is not None and os.path.basename(folder) == "annotations":
        root = os.path.dirname(folder) or "."
        found += [os.path.join(root, "images", subset), os.path.join(root, "images")]
    return found + [folder, os.path.join(folder, "images")]


def _load(path: str) -> dict:
    data = decoded_json(storage.read_bytes(path), path)
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
    """(class names, a stream of Records) of a COCO JSON file or a Roboflow / CVAT COCO export folder.

    A file that cannot be read as COCO stops with its error, or with ``on_error='skip'`` is passed over
    and listed in ``report.skipped`` (an error still when no file is left).
    """
    source = os.fspath(source).rstrip("/")
    if os.path.isdir(source):
        files = coco_files(source)
    else:
        files = [(source, file_split(source))]
    if not files:
        raise FormatError(
            f"no COCO JSON here (expected {ROBOFLOW_FILE} in split folders, or annotations/"
            f"{CVAT_PREFIX}<subset>.json)",
            path=source,
        )
    loaded, first_error = [], None
    for path, split in files:
        try:
            data = _load(path)
            categories(data, path)
        except FormatError as exc:
            if on_error == "stop":
                raise
            first_error = first_error or exc
            if report is not None:
                report.skipped.append((path, exc.line or 0, str(exc)))
            continue
        loaded.append((path, split, data))
    if not loaded:
        raise first_error
    names: list[str] = []
    for path, _, data in loaded:
        these, _ = categories(data, path)
        if names and these != names:
            raise FormatError(f"categories {these} differ from {names} of {loaded[0][0]}", path=path)
        names = these
    return names, _records(loaded, names, images_dir, on_error, report)


def _image_path(ref: str, folders: list[str], path: str, fld: str) -> str:
    """The image a ``file_name`` names: a URI or absolute path as given (the header probe then checks it
    is an image), a relative name inside the first of ``folders`` that holds it."""
    if storage.is_remote(ref) or os.path.isabs(ref):
        return ref
    candidates = [image_inside(folder, ref, path=path, field=fld) for folder in folders]
    for candidate in candidates:
        if storage.is_remote(candidate) or os.path.isfile(candidate):
            return candidate
    if len(candidates) == 1:
        return candidates[0]
    tried = ", ".join(dict.fromkeys(f"{f}/" for f in folders))
    raise images.ImageError(
        f"image {ref!r} not found in {tried}",
        path=path,
        field=fld,
        hint="give the image folder with --images",
    )


def _records(loaded, names, images_dir, on_error, report) -> Iterator[Record]:
    skipped_boxes = skipped_boxes_list(on_error, report)
    for path, split, data in loaded:
        _, class_of = categories(data, path)
        folders = image_folders(path, images_dir)
        per_image: dict = {}
        for n, ann in enumerate(data.get("annotations") or ()):
            per_image.setdefault(ann.get("image_id") if isinstance(ann, dict) else None, []).append((n, ann))
        known = {img.get("id") for img in data["images"] if isinstance(img, dict)}
        for image_id in per_image:
            if image_id not in known:
                n, ann = per_image[image_id][0]
                fld = f"{_ann_field(n, ann)}.image_id"
                error = FormatError(f"image_id {image_id!r} is not in 'images'", path=path, field=fld)
                if on_error == "stop":
                    raise error
                if report is not None:
                    report.skipped.append((path, 0, str(error)))
        for m, img in enumerate(data["images"]):
            if report is not None:
                report.lines += 1
            try:
                img_fld = f"image {m + 1}" + (f" (id {img.get('id')})" if isinstance(img, dict) else "")
                if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
                    raise FormatError("an image needs a 'file_name'", path=path, field=img_fld)
                image = _image_path(img["file_name"], folders, path, f"{img_fld}.file_name")
                width, height = img.get("width"), img.get("height")
                stated = (
                    (width, height)
                    if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
                    else None
                )
                width, height, turn = checked_size(image, stated, path=path, field=f"{img_fld}.width/height")
                rows, ids, crowd, where = [], [], [], []
                for n, ann in per_image.get(img.get("id"), ()):
                    fld = _ann_field(n, ann)
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
                xyxy = box_ops.coco_xywh_to_xyxy(np.asarray(rows, dtype=np.float64).reshape(-1, 4))
                if turn != 1:
                    xyxy = upright_boxes(xyxy, turn, width=width, height=height)
                    if report is not None:
                        report.corrected.append(
                            f"{path}, field '{img_fld}': size {stated[0]}x{stated[1]} is the stored size of "
                            f"an EXIF-turned photo ({width}x{height} upright): boxes turned with it"
                        )
                record = imported_record(
                    image,
                    width=width,
                    height=height,
                    names=names,
                    where=where,
                    split=split,
                    boxes_xyxy=xyxy,
                    class_ids=ids,
                    difficult=crowd,
                    skipped_boxes=skipped_boxes,
                )
            except (FormatError, ManifestError, images.ImageError) as exc:
                pass_over(exc, on_error=on_error, report=report, path=path)
                continue
            yield record


def _ann_field(n: int, ann) -> str:
    """How a message names an annotation: its 1-based index in the file, and its id."""
    ident = ann.get("id") if isinstance(ann, dict) else None
    return f"annotation {n + 1}" + (f" (id {ident})" if ident is not None else "")


def coco_data(records: Iterable[Record], *, classes: list[str]) -> dict:
    """The COCO detection JSON of records: categories get ids 1..K in class order; difficult boxes
    are written with ``iscrowd: 1``."""
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
    return {
        "images": images_out,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
    }


def write_coco(records: Iterable[Record], path: str | os.PathLike, *, classes: list[str]) -> int:
    """Write records as one COCO JSON file (atomic); returns the image count."""
    data = coco_data(records, classes=classes)
    storage.write_bytes(path, orjson.dumps(data))
    return len(data["images"])
