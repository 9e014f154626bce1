"""Any labeled input -> Records, the one entry point of ``prepare``, ``convert``, ``stats`` and ``review``.

``detect_format`` names the format of a path (``manifest``, ``yolo``, ``voc``, ``coco``, ``labelme``); a
folder holding several formats is refused with what was found and how to pick one (``FORMAT:PATH`` or
``--format``), never read as one of them silently. ``read_source``
gives its class names and a stream of Records through the format's reader, with the same checks and
the same ``on_error`` treatment for every format (``groundtruth.box_problem``).

Records of a manifest keep their ``source_ref`` as written (``groundtruth.resolve_source_ref`` finds
the image); records of the other formats carry the image's resolved path or URI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from detforge import storage
from detforge.data.formats import coco, labelme, voc, yolo
from detforge.data.groundtruth import ClassMaps, ReadReport, Record, checked_local_image, read_manifest
from detforge.errors import FormatError, ManifestError

FORMATS = ("manifest", "yolo", "voc", "coco", "labelme")
_FOLDER_FORMATS = ("yolo", "coco", "voc", "labelme")


def split_format(source: str) -> tuple[str | None, str]:
    """(format, path) of an input named ``FORMAT:PATH`` (e.g. ``voc:photos/``, how one input of a mixed
    folder is picked on any command line), else (None, source)."""
    source = os.fspath(source)
    head, sep, tail = source.partition(":")
    if sep and head in FORMATS and not tail.startswith("//"):
        return head, tail
    return None, source


def formats_found(folder: str) -> dict[str, str]:
    """Format -> what shows it, for every label format a folder holds (a folder may hold several)."""
    found: dict[str, str] = {}
    data_yaml = yolo.find_data_yaml(folder)
    if data_yaml or yolo.is_split_folder(folder):
        found["yolo"] = f"YOLO {storage.basename(data_yaml)}" if data_yaml else "YOLO images/ + labels/"
    coco_files = coco.coco_files(folder)
    if coco_files:
        found["coco"] = f"COCO {os.path.relpath(coco_files[0][0], folder)}" + (
            f" (+{len(coco_files) - 1} more)" if len(coco_files) > 1 else ""
        )
    xml = storage.list_files(voc.annotations_folder(folder), suffixes=(".xml",))
    if xml:
        found["voc"] = f"{len(xml)} VOC .xml files"
    if labelme.labelme_files(folder, limit=1):
        found["labelme"] = "labelme .json files"
    return found


def detect_format(source: str) -> str:
    """``manifest``, ``yolo``, ``voc``, ``coco`` or ``labelme`` for an input path (FormatError when it is
    none, or when a folder holds several: the message says what was found and how to pick one)."""
    picked, source = split_format(source)
    if picked is not None:
        return picked
    source = source.rstrip("/")
    if source.endswith(yolo.YAML_SUFFIXES):
        return "yolo"
    if source.endswith(".json"):
        return "labelme" if labelme.looks_like_labelme(source) else "coco"
    if storage.is_remote(source) or not os.path.isdir(source):
        return "manifest"
    found = formats_found(source)
    if len(found) > 1:
        shown = "; ".join(found.values())
        pick = " or ".join(f"{kind}:{source}" for kind in found)
        raise FormatError(
            f"this folder holds several label formats ({shown}): which one to read is not guessed",
            path=source,
            hint=f"name one as {pick}, or give --format",
        )
    if found:
        return next(iter(found))
    raise FormatError(
        "not a label folder: no data.yaml, images/+labels/, _annotations.coco.json, "
        "annotations/instances_*.json, VOC .xml files or labelme .json files",
        path=source,
    )


def read_source(
    source: str,
    *,
    images: str | None = None,
    label_attribute: str | None = None,
    on_error: str = "stop",
    report: ReadReport | None = None,
    kind: str | None = None,
) -> tuple[str, list[str] | None, Iterator[Record]]:
    """(format, class names or None for a manifest, a stream of Records) of any supported input.

    ``images``: the image folder for VOC/COCO/labelme (``--images``), or a map input -> folder. A
    manifest's classes come from its lines' class maps (see ``manifest_classes``); its local images are
    probed like every format's (``groundtruth.checked_local_image``).
    """
    if on_error not in ("stop", "skip"):
        raise ValueError("on_error must be 'stop' or 'skip'")
    named = os.fspath(source)
    picked, source = split_format(named)
    kind = kind or picked or detect_format(source)
    if isinstance(images, dict):  # per input (``--images INPUT=DIR``), None: the folder of every other
        images = images.get(named, images.get(source, images.get(None)))
    if kind not in FORMATS:
        raise FormatError(f"--format {kind!r} is not one of {', '.join(FORMATS)}", path=source)
    if kind == "yolo":
        return kind, *yolo.read_yolo(source, on_error=on_error, report=report)
    if kind == "voc":
        return kind, *voc.read_voc(source, images_dir=images, on_error=on_error, report=report)
    if kind == "coco":
        return kind, *coco.read_coco(source, images_dir=images, on_error=on_error, report=report)
    if kind == "labelme":
        return kind, *labelme.read_labelme(source, images_dir=images, on_error=on_error, report=report)
    stream = read_manifest(source, label_attribute=label_attribute, on_error=on_error, report=report)
    return kind, None, _with_images(stream, source, on_error, report)


def _with_images(
    records: Iterator[Record], manifest: str, on_error: str, report: ReadReport | None
) -> Iterator[Record]:
    """The records whose local image exists and has the size the line says (the same check as every
    format's); a bad one stops, or with ``on_error='skip'`` is counted in ``report.skipped``."""
    for record in records:
        try:
            checked_local_image(record, manifest)
        except (ManifestError, FormatError) as exc:
            if on_error == "stop":
                raise
            if report is not None:
                report.skipped.append((exc.path or manifest, exc.line or 0, str(exc)))
            continue
        yield record


def manifest_classes(records: list[Record], path: str) -> list[str]:
    """The class names of a manifest's records, by id (``groundtruth.ClassMaps``: an id that means two
    names is an error naming both lines)."""
    merged = ClassMaps()
    for record in records:
        merged.add(record, path)
    return [merged.names[i] for i in sorted(merged.names)]
