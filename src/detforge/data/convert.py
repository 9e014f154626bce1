"""``detforge convert``: any labeled input (manifest, YOLO, VOC, COCO) -> any of the four formats.

Inputs are read by ``data.sources`` (the readers ``prepare``, ``stats`` and ``review`` use, with the same
checks and ``on_error`` treatment). Class names are kept; ids follow the source's class order (YOLO
``names``, COCO categories by id, VOC names sorted, a manifest's merged class maps by id).

Image references in the output: a manifest and a COCO file refer to images relative to their own
folder (``groundtruth.ref_from``) when both are local; VOC gets the file name and its full path; YOLO
gets copies of the images in its layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from detforge import storage
from detforge.data.formats.coco import write_coco
from detforge.data.formats.voc import write_voc
from detforge.data.formats.yolo import write_yolo
from detforge.data.groundtruth import ReadReport, Record, ref_from, resolve_source_ref, write_manifest
from detforge.data.sources import manifest_classes, read_source
from detforge.errors import ConfigError

FORMATS = ("coco", "voc", "yolo", "manifest")


@dataclass
class ConvertSummary:
    """What ``convert`` did."""

    source_format: str
    images: int = 0
    skipped: list[str] = field(default_factory=list)  # images (lines, files) passed over
    skipped_boxes: list[str] = field(default_factory=list)


def _folder_of(path: str) -> str:
    path = os.fspath(path).rstrip("/")
    return path.rsplit("/", 1)[0] if "/" in path else "."


def convert(source: str, *, to: str, out: str, images: str | None = None, label_attribute: str | None = None,
            on_error: str = "stop") -> ConvertSummary:
    """Convert ``source`` to format ``to`` at ``out`` (a file for coco/manifest, a folder for voc/yolo)."""
    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"--on-error must be stop or skip, got {on_error!r}")
    report = ReadReport()
    kind, classes, stream = read_source(source, images=images, label_attribute=label_attribute,
                                        on_error=on_error, report=report)
    records: list[Record] = list(stream)  # the whole set: a manifest's classes come from every line
    if classes is None:
        classes = manifest_classes(records, source)
        records = [r.replace(source_ref=resolve_source_ref(r.source_ref, source)) for r in records]
    index = {name: i for i, name in enumerate(classes)}
    records = [r.replace(class_ids=np.array([index[n] for n in r.class_names], dtype=np.int64),
                         class_map={index[n]: n for n in r.class_names}) for r in records]
    if to == "coco":
        folder = _folder_of(out)
        count = write_coco([r.replace(source_ref=ref_from(r.source_ref, folder)) for r in records], out,
                           classes=classes)
    elif to == "voc":
        full = [r.replace(source_ref=r.source_ref if storage.is_remote(r.source_ref)
                          else os.path.abspath(r.source_ref)) for r in records]
        count = write_voc(full, out, classes=classes)
    elif to == "yolo":
        count = write_yolo(records, out, classes=classes)
    else:
        folder = _folder_of(out)
        count = write_manifest(out, [r.replace(source_ref=ref_from(r.source_ref, folder)) for r in records])
    return ConvertSummary(source_format=kind, images=count,
                          skipped=[message for _, _, message in report.skipped],
                          skipped_boxes=list(report.skipped_boxes))
