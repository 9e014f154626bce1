"""COCO detection JSON <-> Records: ``load_coco`` and ``save_coco`` (class names kept as categories).

COCO boxes are ``xywh`` pixels; category ids are written 1-based in class-id order and read back by
name, so ``class_id = index of the category in id order``. Not here: detection results, metrics.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import orjson

from detforge import boxes as box_ops
from detforge import storage
from detforge.errors import FormatError
from detforge.groundtruth import Record, make_record


def save_coco(records: Iterable[Record], path: str | os.PathLike, *, classes: list[str]) -> int:
    """Write records as one COCO JSON file (atomic); returns the image count."""
    index = {name: i for i, name in enumerate(classes)}
    images, annotations = [], []
    for image_id, record in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": record.source_ref, "width": record.width,
                       "height": record.height})
        xywh = box_ops.xyxy_to_ltwh(record.boxes)
        for box, name in zip(xywh, record.class_names, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": index[name] + 1, "bbox": [float(v) for v in box],
                                "area": float(box[2] * box[3]), "iscrowd": 0})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)]}
    storage.write_bytes(path, orjson.dumps(data))
    return len(images)


def load_coco(path: str | os.PathLike) -> tuple[list[Record], list[str]]:
    """Records and class names of a COCO JSON file."""
    path = os.fspath(path)
    try:
        data = orjson.loads(storage.read_bytes(path))
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images = data["images"]
        annotations = data.get("annotations", [])
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise FormatError(f"not a COCO detection file: {exc}", path=path) from None
    classes = [str(c["name"]) for c in categories]
    by_category = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict = {img["id"]: [] for img in images}
    for n, ann in enumerate(annotations):
        if ann.get("image_id") not in per_image or ann.get("category_id") not in by_category:
            raise FormatError("unknown image_id or category_id", path=path, field=f"annotations[{n}]")
        per_image[ann["image_id"]].append(ann)
    records = []
    for img in images:
        anns = per_image[img["id"]]
        xyxy = box_ops.ltwh_to_xyxy([a["bbox"] for a in anns]) if anns else box_ops.as_boxes([])
        ids = [by_category[a["category_id"]] for a in anns]
        records.append(make_record(img["file_name"], width=int(img["width"]), height=int(img["height"]),
                                   boxes_xyxy=xyxy, class_ids=ids,
                                   class_map={i: classes[i] for i in sorted(set(ids))}))
    return records, classes
