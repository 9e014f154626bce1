"""Any labeled input -> Records, the one entry point of ``prepare``, ``convert``, ``stats`` and ``review``.

``detect_format`` names the format of a path (``manifest``, ``yolo``, ``voc``, ``coco``); ``read_source``
gives its class names and a stream of Records through the format's reader, with the same checks and
the same ``on_error`` treatment for every format (``groundtruth.box_problem``).

Records of a manifest keep their ``source_ref`` as written (``groundtruth.resolve_source_ref`` finds
the image); records of the other formats carry the image's resolved path or URI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from detforge import storage
from detforge.data.formats import coco, voc, yolo
from detforge.data.groundtruth import ReadReport, Record, read_manifest
from detforge.errors import FormatError

FORMATS = ("manifest", "yolo", "voc", "coco")


def detect_format(source: str) -> str:
    """``manifest``, ``yolo``, ``voc`` or ``coco`` for an input path (FormatError when it is none)."""
    source = os.fspath(source).rstrip("/")
    if source.endswith(yolo.YAML_SUFFIXES):
        return "yolo"
    if source.endswith(".json"):
        return "coco"
    if storage.is_remote(source) or not os.path.isdir(source):
        return "manifest"
    if yolo.find_data_yaml(source) or yolo.is_split_folder(source):
        return "yolo"
    if coco.roboflow_files(source):
        return "coco"
    if storage.list_files(voc.annotations_folder(source), suffixes=(".xml",)):
        return "voc"
    raise FormatError(
        "not a label folder: no data.yaml, images/+labels/, _annotations.coco.json or VOC .xml files",
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

    ``images``: the image folder for VOC/COCO (``--images``). A manifest's classes come from its
    lines' class maps (see ``manifest_classes``).
    """
    if on_error not in ("stop", "skip"):
        raise ValueError("on_error must be 'stop' or 'skip'")
    source = os.fspath(source)
    kind = kind or detect_format(source)
    if kind == "yolo":
        return kind, *yolo.read_yolo(source, on_error=on_error, report=report)
    if kind == "voc":
        return kind, *voc.read_voc(source, images_dir=images, on_error=on_error, report=report)
    if kind == "coco":
        return kind, *coco.read_coco(source, images_dir=images, on_error=on_error, report=report)
    return (
        kind,
        None,
        read_manifest(source, label_attribute=label_attribute, on_error=on_error, report=report),
    )


def manifest_classes(records: list[Record], path: str) -> list[str]:
    """The class names of a manifest's records, by id (FormatError when an id means two names)."""
    merged: dict[int, str] = {}
    for record in records:
        for cid, name in record.class_map.items():
            if merged.setdefault(cid, name) != name:
                raise FormatError(
                    f"class id {cid} means both {merged[cid]!r} and {name!r}",
                    path=path,
                    hint="run `detforge prepare` first to merge the class maps",
                )
    return [merged[i] for i in sorted(merged)]
