"""Pascal VOC XML (LabelImg, CVAT, VOC2007 layout) <-> Records: ``read_voc`` and ``write_voc``.

- XML is parsed with defusedxml (no entity expansion, no external entities).
- The image of an annotation is found by its ``<filename>``: in ``images`` when given, else in the
  layout's own image folder (``JPEGImages/`` or ``images/`` beside ``Annotations/``), else beside the
  XML (LabelImg's default). ``<path>`` is the labeler's own disk: it is used only as a last resort,
  when it is absolute (or a URI) and exists on this machine (what ``write_voc`` writes).
- ``ImageSets/Main/{train,val,test}.txt`` splits are kept; ``difficult`` objects are kept and flagged
  (evaluation treats them as the VOC devkit does: neither a hit nor a miss).
- Coordinates are kept as written (pixels); a missing or zero ``<size>`` is read from the image header.

Not here: the VOC metric (``metrics``), choosing the format (``data.sources``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator

from detforge import images, storage
from detforge.data.formats import imported_record, pass_over, skipped_boxes_list
from detforge.data.groundtruth import ReadReport, Record
from detforge.errors import FormatError, ManifestError

IMAGE_FOLDERS = ("JPEGImages", "images", "Images")
_SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}


def _parse(path: str) -> ET.Element:
    from defusedxml import ElementTree as SafeET
    from defusedxml.common import DefusedXmlException

    try:
        return SafeET.fromstring(storage.read_bytes(path))
    except ET.ParseError as exc:
        raise FormatError(f"not valid XML: {exc}", path=path, line=exc.position[0]) from None
    except DefusedXmlException as exc:
        raise FormatError(f"refused unsafe XML: {exc}", path=path) from None


def annotations_folder(source: str) -> str:
    """The folder of XML files: ``source`` itself, or its ``Annotations/`` (a VOC root)."""
    sub = storage.join(source, "Annotations")
    return sub if os.path.isdir(sub) else source


def read_splits(annotations: str) -> dict[str, str]:
    """Image stem -> split from ``ImageSets/Main/{train,val,test}.txt`` beside ``Annotations/``."""
    root = os.path.dirname(os.path.abspath(annotations))
    splits: dict[str, str] = {}
    for name, split in _SPLIT_FILES.items():
        path = os.path.join(root, "ImageSets", "Main", f"{name}.txt")
        if os.path.isfile(path):
            for _, raw in storage.iter_lines(path):
                stem = raw.decode("utf-8").strip().split(" ")[0]
                if stem:
                    splits[stem] = split
    return splits


def _find_image(
    filename: str, xml_path: str, images_dir: str | None, annotations: str, recorded: str = ""
) -> str:
    root = os.path.dirname(os.path.abspath(annotations))
    folders = [images_dir] if images_dir else []
    folders += [os.path.join(root, name) for name in IMAGE_FOLDERS] + [
        os.path.dirname(os.path.abspath(xml_path))
    ]
    names = [filename] if "." in filename else [filename + s for s in images.SUFFIXES]
    for folder in folders:
        for name in names:
            candidate = storage.join(folder, name)
            if storage.exists(candidate):
                return candidate if storage.is_remote(candidate) else os.path.normpath(candidate)
    # <path> is the labeler's disk; only an absolute path or URI that exists here is worth trying
    if (
        recorded
        and not (images_dir)
        and (storage.is_remote(recorded) or os.path.isabs(recorded))
        and (storage.exists(recorded))
    ):
        return recorded
    where = images_dir or ", ".join(f"{n}/" for n in IMAGE_FOLDERS) + " beside Annotations/ or beside the XML"
    raise FormatError(
        f"image {filename!r} not found in {where}",
        path=xml_path,
        field="filename",
        hint="give the image folder with --images",
    )


def _number(element: ET.Element, tag: str, path: str, fld: str) -> float:
    text = element.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise FormatError(f"expected a number, got {text!r}", path=path, field=fld) from None


def read_voc(
    source: str, *, images_dir: str | None = None, on_error: str = "stop", report: ReadReport | None = None
) -> tuple[list[str], Iterator[Record]]:
    """(class names sorted, a stream of Records) of a folder of VOC XML files (or a VOC root)."""
    annotations = annotations_folder(os.fspath(source).rstrip("/"))
    paths = sorted(storage.list_files(annotations, suffixes=(".xml",)))
    if not paths:
        raise FormatError(
            "no .xml annotation files here",
            path=annotations,
            hint="give the Annotations/ folder of a Pascal VOC export",
        )
    splits = read_splits(annotations)
    names: set[str] = set()
    for path in paths:  # the class list first (small: names only)
        try:
            root = _parse(path)
        except FormatError:
            if on_error == "stop":
                raise
            continue
        names |= {(o.findtext("name") or "").strip() for o in root.findall("object")} - {""}
    classes = sorted(names)
    return classes, _records(paths, classes, splits, images_dir, annotations, on_error, report)


def _records(paths, classes, splits, images_dir, annotations, on_error, report) -> Iterator[Record]:
    index = {name: i for i, name in enumerate(classes)}
    skipped_boxes = skipped_boxes_list(on_error, report)
    for path in paths:
        if report is not None:
            report.lines += 1
        try:
            root = _parse(path)
            filename = (root.findtext("filename") or "").strip()
            if not filename:
                raise FormatError("missing <filename>", path=path, field="filename")
            image = _find_image(
                filename, path, images_dir, annotations, (root.findtext("path") or "").strip()
            )
            width = int(float(root.findtext("size/width") or 0))
            height = int(float(root.findtext("size/height") or 0))
            depth = int(float(root.findtext("size/depth") or 3)) or 3
            if width <= 0 or height <= 0:
                width, height = images.probe(image)
            rows, ids, flags, where = [], [], [], []
            for i, obj in enumerate(root.findall("object")):
                fld = f"object[{i}]"
                name = (obj.findtext("name") or "").strip()
                if not name:
                    raise FormatError("object without a <name>", path=path, field=f"{fld}.name")
                box = obj.find("bndbox")
                if box is None:
                    raise FormatError("object without a <bndbox>", path=path, field=f"{fld}.bndbox")
                rows.append(
                    [_number(box, k, path, f"{fld}.bndbox.{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
                )
                ids.append(index[name])
                flags.append((obj.findtext("difficult") or "0").strip() in ("1", "true"))
                where.append((path, None, f"{fld}.bndbox"))
            record = imported_record(
                image,
                width=width,
                height=height,
                depth=depth,
                boxes_xyxy=rows,
                class_ids=ids,
                names=classes,
                where=where,
                difficult=flags,
                split=splits.get(storage.stem(path)),
                skipped_boxes=skipped_boxes,
            )
        except (FormatError, ManifestError, images.ImageError) as exc:
            pass_over(exc, on_error=on_error, report=report, path=path)
            continue
        yield record


def write_voc(records: Iterable[Record], folder: str | os.PathLike, *, classes: list[str]) -> int:
    """Write one VOC XML file per record into ``folder``; returns the count.

    ``<filename>`` is the image's file name and ``<path>`` its reference as the records give it.
    """
    del classes  # names are written per object
    count = 0
    for record in records:
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = storage.basename(record.source_ref)
        ET.SubElement(root, "path").text = record.source_ref
        size = ET.SubElement(root, "size")
        for key, value in (("width", record.width), ("height", record.height), ("depth", record.depth)):
            ET.SubElement(size, key).text = str(value)
        for box, name, hard in zip(record.boxes, record.class_names, record.difficult, strict=True):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = name
            ET.SubElement(obj, "difficult").text = "1" if hard else "0"
            bnd = ET.SubElement(obj, "bndbox")
            for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
                ET.SubElement(bnd, key).text = f"{float(value):g}"
        storage.write_bytes(
            storage.join(folder, storage.stem(record.source_ref) + ".xml"),
            ET.tostring(root, encoding="utf-8"),
        )
        count += 1
    return count
