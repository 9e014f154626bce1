"""Pascal VOC XML (LabelImg, CVAT, VOC2007 layout) <-> Records: ``read_voc`` and ``write_voc``.

- XML is parsed with defusedxml (no entity expansion, no external entities).
- The image of an annotation is found by its ``<filename>``: in ``images`` when given, else in the
  layout's own image folder (``JPEGImages/`` or ``images/`` beside ``Annotations/``), else beside the
  XML (LabelImg's default). ``<path>`` is the labeler's own disk: it is used only as a last resort,
  when it is absolute (or a URI) and exists on this machine (what ``write_voc`` writes).
- ``<filename>`` may not climb out of the folder it is looked up in (``formats.image_inside``).
- ``ImageSets/Main/<split>.txt`` splits are kept (VOC's ``train``/``val``/``test``, CVAT's ``Train``,
  ``Validation``, ...); ``difficult`` objects are kept and flagged (evaluation treats them as the VOC
  devkit does: neither a hit nor a miss).
- Coordinates are kept as written (pixels); ``<size>`` is checked against the image header (a missing
  or zero one is read from it; the stored size of an EXIF-turned photo turns its boxes upright).
- Messages name an object by its 1-based index and the XML line it starts on.

Not here: the VOC metric (``metrics``), choosing the format (``data.sources``).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator

from detforge import images, storage
from detforge.data.formats import (
    checked_size,
    decoded_text,
    image_inside,
    imported_record,
    pass_over,
    skipped_boxes_list,
    upright_boxes,
)
from detforge.data.groundtruth import ReadReport, Record
from detforge.errors import FormatError, ManifestError

IMAGE_FOLDERS = ("JPEGImages", "images", "Images")
_CORNERS = ("xmin", "ymin", "xmax", "ymax")
_SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}


class _LineBuilder(ET.TreeBuilder):
    """An ElementTree builder that notes the line each element starts on (for messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[int, int] = {}
        self.parser = None

    def start(self, tag, attrs):
        element = super().start(tag, attrs)
        self.lines[id(element)] = self.parser.parser.CurrentLineNumber
        return element


def _parse(path: str) -> tuple[ET.Element, dict[int, int]]:
    """(root, element id -> line) of an XML file, parsed without entity expansion."""
    from defusedxml.common import DefusedXmlException
    from defusedxml.ElementTree import DefusedXMLParser

    builder = _LineBuilder()
    parser = DefusedXMLParser(target=builder)
    builder.parser = parser
    try:
        parser.feed(storage.read_bytes(path))
        return parser.close(), builder.lines
    except ET.ParseError as exc:
        raise FormatError(f"not valid XML: {exc}", path=path, line=exc.position[0]) from None
    except DefusedXmlException as exc:
        raise FormatError(f"refused unsafe XML: {exc}", path=path) from None


def annotations_folder(source: str) -> str:
    """The folder of XML files: ``source`` itself, or its ``Annotations/`` (a VOC root)."""
    sub = storage.join(source, "Annotations")
    return sub if os.path.isdir(sub) else source


def read_splits(annotations: str) -> dict[str, str]:
    """Image stem -> split from ``ImageSets/Main/<split>.txt`` beside ``Annotations/``: VOC's ``train``,
    ``val``, ``test`` and CVAT's subset names (``Train.txt``, ``Validation.txt``, ...); per-class lists
    (``dog_train.txt``) and ``trainval.txt`` are not splits."""
    from detforge.data.formats.coco import subset_split

    root = os.path.dirname(os.path.abspath(annotations))
    folder = os.path.join(root, "ImageSets", "Main")
    splits: dict[str, str] = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        split = subset_split(name[: -len(".txt")]) if name.endswith(".txt") else None
        if split is None:
            continue
        for _, raw in storage.iter_lines(os.path.join(folder, name)):
            stem = decoded_text(raw, name).strip().split(" ")[0]
            if stem:
                splits[stem] = split
    return splits


def _find_image(
    filename: str, xml_path: str, images_dir: str | None, annotations: str, recorded: str = "", line=None
) -> str:
    root = os.path.dirname(os.path.abspath(annotations))
    folders = [images_dir] if images_dir else []
    folders += [os.path.join(root, name) for name in IMAGE_FOLDERS] + [
        os.path.dirname(os.path.abspath(xml_path))
    ]
    names = [filename] if "." in filename else [filename + s for s in images.SUFFIXES]
    for folder in folders:
        for name in names:
            candidate = image_inside(folder, name, path=xml_path, field="filename", line=line)
            if storage.exists(candidate):
                return candidate
    # <path> is the labeler's disk; only an absolute path or URI that exists here is worth trying (the
    # header probe then checks that it is an image)
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
        line=line,
        field="filename",
        hint="give the image folder with --images",
    )


def _number(element: ET.Element, tag: str, path: str, fld: str, line: int | None = None) -> float:
    text = element.findtext(tag)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise FormatError(f"expected a number, got {text!r}", path=path, line=line, field=fld) from None


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
            root, _ = _parse(path)
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
            root, lines = _parse(path)

            def where_of(element, lines=lines):
                return lines.get(id(element))

            file_element = root.find("filename")
            filename = (file_element.text if file_element is not None else "") or ""
            filename = filename.strip()
            if not filename:
                raise FormatError("missing <filename>", path=path, field="filename")
            image = _find_image(
                filename,
                path,
                images_dir,
                annotations,
                (root.findtext("path") or "").strip(),
                line=where_of(file_element),
            )
            size_element = root.find("size")
            size_line = where_of(size_element) if size_element is not None else None
            width = (
                int(_number(root, "size/width", path, "size.width", size_line))
                if root.findtext("size/width")
                else 0
            )
            height = (
                int(_number(root, "size/height", path, "size.height", size_line))
                if root.findtext("size/height")
                else 0
            )
            depth = int(float(root.findtext("size/depth") or 3)) or 3
            stated = (width, height) if width > 0 and height > 0 else None
            width, height, turn = checked_size(image, stated, path=path, field="size", line=size_line)
            rows, ids, flags, where = [], [], [], []
            for i, obj in enumerate(root.findall("object")):
                fld = f"object {i + 1}"
                line = where_of(obj)
                name = (obj.findtext("name") or "").strip()
                if not name:
                    raise FormatError("object without a <name>", path=path, line=line, field=f"{fld}.name")
                box = obj.find("bndbox")
                if box is None:
                    raise FormatError(
                        "object without a <bndbox>", path=path, line=line, field=f"{fld}.bndbox"
                    )
                line = where_of(box)
                rows.append([_number(box, k, path, f"{fld}.bndbox.{k}", line) for k in _CORNERS])
                ids.append(index[name])
                flags.append((obj.findtext("difficult") or "0").strip() in ("1", "true"))
                where.append((path, line, f"{fld}.bndbox"))
            if turn != 1:
                rows = upright_boxes(rows, turn, width=width, height=height)
                if report is not None:
                    report.corrected.append(
                        f"{path}:{size_line}: <size> {stated[0]}x{stated[1]} is the stored size of an "
                        f"EXIF-turned photo ({width}x{height} upright): boxes turned with it"
                    )
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
    """Write the VOC2007 layout into ``folder``: ``Annotations/<stem>.xml`` per record and, when the
    records carry splits, ``ImageSets/Main/{train,val,test}.txt``; returns the count.

    ``<filename>`` is the image's file name and ``<path>`` its reference as the records give it. Two
    images with one stem would need one XML file: an error naming both.
    """
    del classes  # names are written per object
    folder = os.fspath(folder)
    split_file = {split: name for name, split in _SPLIT_FILES.items()}
    stems: dict[str, str] = {}
    sets: dict[str, list[str]] = {}
    for record in records:
        stem = storage.stem(record.source_ref)
        if stem in stems:
            raise FormatError(
                f"two images named {stem!r} ({stems[stem]} and {record.source_ref}); VOC keeps one "
                "Annotations/<name>.xml per image",
                path=record.origin or record.source_ref,
            )
        stems[stem] = record.source_ref
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
            for key, value in zip(_CORNERS, box, strict=True):
                ET.SubElement(bnd, key).text = f"{float(value):g}"
        ET.indent(root)
        storage.write_bytes(
            storage.join(folder, "Annotations", stem + ".xml"), ET.tostring(root, encoding="utf-8") + b"\n"
        )
        if record.split in split_file:
            sets.setdefault(split_file[record.split], []).append(stem)
    for name, listed in sets.items():
        storage.write_text(
            storage.join(folder, "ImageSets", "Main", f"{name}.txt"), "".join(s + "\n" for s in listed)
        )
    return len(stems)
