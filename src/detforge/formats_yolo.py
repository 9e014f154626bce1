"""YOLO labels <-> Records: ``load_yolo`` and ``save_yolo``.

Layout: ``data.yaml`` (``names:`` list, ``images:`` map of label file stem -> image reference and size,
which YOLO itself ignores) and ``labels/<stem>.txt`` with ``class cx cy w h`` normalized per line.
Image sizes are needed to go back to pixels, hence the ``images`` map. Not here: image copying.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

from detforge import boxes as box_ops
from detforge import storage
from detforge.errors import FormatError
from detforge.groundtruth import Record, make_record


def save_yolo(records: Iterable[Record], folder: str | os.PathLike, *, classes: list[str]) -> int:
    """Write ``labels/*.txt`` and ``data.yaml`` into ``folder``; returns the image count."""
    index = {name: i for i, name in enumerate(classes)}
    images = {}
    for record in records:
        stem = storage.stem(record.source_ref)
        boxes = box_ops.xyxy_to_cxcywh_norm(record.boxes, width=record.width, height=record.height)
        lines = [f"{index[name]} " + " ".join(f"{v:.8f}" for v in box)
                 for box, name in zip(boxes, record.class_names, strict=True)]
        storage.write_text(storage.join(folder, "labels", stem + ".txt"), "".join(x + "\n" for x in lines))
        images[stem] = {"source-ref": record.source_ref, "width": record.width, "height": record.height}
    # YAML is a superset of JSON: each value is written as JSON so names with any character survive
    text = "names:\n" + "".join(f"  - {json.dumps(n)}\n" for n in classes)
    text += f"nc: {len(classes)}\nimages:\n"
    text += "".join(f"  {json.dumps(k)}: {json.dumps(v)}\n" for k, v in images.items())
    storage.write_text(storage.join(folder, "data.yaml"), text)
    return len(images)


def _read_yaml(path: str) -> tuple[list[str], dict]:
    names, images, section = [], {}, None
    for number, line in enumerate(storage.read_text(path).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            if not line.startswith(" "):
                key, _, rest = line.partition(":")
                section = key.strip()
                if section == "names" and rest.strip().startswith("["):
                    names = [str(n) for n in json.loads(rest.strip())]
            elif section == "names":
                names.append(str(json.loads(line.strip()[2:].strip())))
            elif section == "images":
                key, _, value = line.strip().partition(": ")
                images[json.loads(key)] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FormatError(f"cannot read: {exc}", path=path, line=number) from None
    return names, images


def load_yolo(folder: str | os.PathLike) -> tuple[list[Record], list[str]]:
    """Records and class names of a YOLO folder written by ``save_yolo`` (or with such a data.yaml)."""
    folder = os.fspath(folder)
    yaml_path = storage.join(folder, "data.yaml")
    classes, images = _read_yaml(yaml_path)
    records = []
    for stem, info in images.items():
        label = storage.join(folder, "labels", stem + ".txt")
        rows = []
        if storage.exists(label):
            for number, raw in storage.iter_lines(label):
                if raw.strip():
                    parts = raw.split()
                    if len(parts) != 5 or not parts[0].isdigit() or int(parts[0]) >= len(classes):
                        raise FormatError("expected 'class cx cy w h' with a known class", path=label,
                                          line=number)
                    rows.append([float(p) for p in parts])
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        ids = arr[:, 0].astype(np.int64)
        xyxy = box_ops.cxcywh_norm_to_xyxy(arr[:, 1:], width=info["width"], height=info["height"])
        records.append(make_record(info["source-ref"], width=int(info["width"]), height=int(info["height"]),
                                   boxes_xyxy=np.round(xyxy, 6), class_ids=ids,
                                   class_map={int(i): classes[int(i)] for i in sorted(set(ids.tolist()))}))
    return records, classes
