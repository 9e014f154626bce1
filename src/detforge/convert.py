"""``detforge convert``: Ground Truth manifest <-> COCO JSON <-> Pascal VOC folder <-> YOLO folder.

The input format is detected: a folder with ``data.yaml`` is YOLO, a folder of ``.xml`` is VOC, a
``.json`` file with ``images``/``categories`` is COCO, anything else is a manifest. Class names are
kept; ids follow the order of the source's classes (a manifest's: its merged class maps by id).
"""

from __future__ import annotations

import os

from detforge import storage
from detforge.errors import ConfigError, FormatError
from detforge.formats_coco import load_coco, save_coco
from detforge.formats_voc import load_voc, save_voc
from detforge.formats_yolo import load_yolo, save_yolo
from detforge.groundtruth import Record, read_manifest, write_manifest

FORMATS = ("coco", "voc", "yolo", "manifest")


def detect_format(source: str) -> str:
    """``coco``, ``voc``, ``yolo`` or ``manifest`` for an input path."""
    source = os.fspath(source)
    if storage.exists(storage.join(source, "data.yaml")):
        return "yolo"
    if source.endswith(".yaml"):
        return "yolo"
    if not storage.is_remote(source) and os.path.isdir(source):
        return "voc"
    if source.endswith(".json"):
        return "coco"
    return "manifest"


def load_any(source: str) -> tuple[str, list[Record], list[str]]:
    """(format, records, class names) of any supported input."""
    kind = detect_format(source)
    if kind == "yolo":
        folder = source[: -len("/data.yaml")] if source.endswith("data.yaml") else source
        return kind, *load_yolo(folder)
    if kind == "voc":
        return kind, *load_voc(source)
    if kind == "coco":
        return kind, *load_coco(source)
    records = list(read_manifest(source))
    merged: dict[int, str] = {}
    for record in records:
        for cid, name in record.class_map.items():
            if merged.setdefault(cid, name) != name:
                raise FormatError(f"class id {cid} means both {merged[cid]!r} and {name!r}", path=source,
                                  hint="run `detforge prepare` first to merge the class maps")
    classes = [merged[i] for i in sorted(merged)]
    return kind, records, classes


def convert(source: str, *, to: str, out: str) -> tuple[str, int]:
    """Convert ``source`` to format ``to`` at ``out``; returns (detected input format, image count)."""
    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    kind, records, classes = load_any(source)
    if to == "coco":
        count = save_coco(records, out, classes=classes)
    elif to == "voc":
        count = save_voc(records, out, classes=classes)
    elif to == "yolo":
        count = save_yolo(records, out, classes=classes)
    else:
        index = {name: i for i, name in enumerate(classes)}
        fixed = []
        for r in records:
            ids = [index[n] for n in r.class_names]
            fixed.append(r.replace(class_ids=r.class_ids * 0 + ids if len(ids) else r.class_ids,
                                   class_map={index[n]: n for n in r.class_names}))
        count = write_manifest(out, fixed)
    return kind, count
