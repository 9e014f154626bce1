"""Pascal VOC XML folder <-> Records: ``load_voc`` and ``save_voc`` (one ``<stem>.xml`` per image).

VOC boxes are ``xmin ymin xmax ymax`` pixels; class names are the ``<name>`` of each object, class ids
follow ``classes`` (or sorted names on load). Not here: the VOC metric (``metrics``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from detforge import boxes as box_ops
from detforge import storage
from detforge.errors import FormatError
from detforge.groundtruth import Record, make_record


def save_voc(records: Iterable[Record], folder: str | os.PathLike, *, classes: list[str]) -> int:
    """Write one VOC XML file per record into ``folder``; returns the count."""
    del classes  # names are written per object
    count = 0
    for record in records:
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = storage.basename(record.source_ref)
        ET.SubElement(root, "path").text = record.source_ref
        size = ET.SubElement(root, "size")
        for key, value in (("width", record.width), ("height", record.height), ("depth", record.depth)):
            ET.SubElement(size, key).text = str(value)
        for box, name in zip(record.boxes, record.class_names, strict=True):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = name
            bnd = ET.SubElement(obj, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
                ET.SubElement(bnd, key).text = f"{float(value):g}"
        storage.write_bytes(storage.join(folder, storage.stem(record.source_ref) + ".xml"),
                            ET.tostring(root, encoding="utf-8"))
        count += 1
    return count


def load_voc(folder: str | os.PathLike) -> tuple[list[Record], list[str]]:
    """Records and class names (sorted) of a folder of VOC XML files."""
    parsed = []
    for path in sorted(storage.list_files(folder, suffixes=(".xml",))):
        try:
            root = ET.fromstring(storage.read_bytes(path))
            ref = (root.findtext("path") or root.findtext("filename") or "").strip()
            width = int(float(root.findtext("size/width")))
            height = int(float(root.findtext("size/height")))
            depth = int(float(root.findtext("size/depth") or 3))
            objects = [(o.findtext("name").strip(),
                        [float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")])
                       for o in root.findall("object")]
        except (ET.ParseError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"not a Pascal VOC annotation: {exc}", path=path) from None
        parsed.append((ref, width, height, depth, objects))
    classes = sorted({name for *_, objects in parsed for name, _ in objects})
    index = {name: i for i, name in enumerate(classes)}
    records = []
    for ref, width, height, depth, objects in parsed:
        ids = [index[name] for name, _ in objects]
        records.append(make_record(ref, width=width, height=height, depth=depth,
                                   boxes_xyxy=box_ops.as_boxes([b for _, b in objects]), class_ids=ids,
                                   class_map={i: classes[i] for i in sorted(set(ids))}))
    return records, classes
