"""``detforge convert``: any labeled input (manifest, YOLO, VOC, COCO, labelme) -> any of four formats.

Inputs are read by ``data.sources`` (the readers ``prepare``, ``stats`` and ``review`` use, with the same
checks and ``on_error`` treatment). Class names are kept; ids follow the source's class order (YOLO
``names``, COCO categories by id, VOC names sorted, a manifest's merged class maps by id); a class no
box uses (COCO's ``_background_``, a supercategory) is left out and listed, as ``prepare`` does.

Splits are kept in every format: a manifest line's ``detforge-split``, VOC ``ImageSets/Main``, YOLO
``train``/``val``/``test`` folders (``data.yaml`` names only the splits there are), COCO one file per
split (``annotations/instances_<split>.json``) when ``--out`` is a folder; a ``.json`` out is one file.

The output is written whole (``data.output``): built beside the target, moved into place when complete;
an existing non-empty output is refused unless ``overwrite`` (which replaces it whole).

Image references in the output: a manifest refers to images relative to its own folder
(``groundtruth.ref_from``) when both are local; a COCO file relative to its folder when the images lie
inside it, else by absolute path; VOC gets the file name and its full path; YOLO gets copies of the
images in its layout (only files whose header is an image).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import orjson

from detforge import storage
from detforge.data.formats.coco import coco_data
from detforge.data.formats.voc import write_voc
from detforge.data.formats.yolo import write_yolo
from detforge.data.groundtruth import ReadReport, Record, ref_from, resolve_source_ref, write_manifest
from detforge.data.output import check_free, whole_output
from detforge.data.sources import manifest_classes, read_source
from detforge.errors import ConfigError, FormatError

FORMATS = ("coco", "voc", "yolo", "manifest")
# the file name part of each split in COCO and VOC outputs
SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test", None: "default"}


@dataclass
class ConvertSummary:
    """What ``convert`` did."""

    source_format: str
    images: int = 0
    skipped: list[str] = field(default_factory=list)  # images (lines, files) passed over
    skipped_boxes: list[str] = field(default_factory=list)
    corrected: list[str] = field(default_factory=list)  # e.g. EXIF-swapped sizes turned upright
    notes: list[str] = field(default_factory=list)  # what the reader found and did not read
    classes: list[str] = field(default_factory=list)
    unused_classes: list[str] = field(default_factory=list)  # classes of the source no box uses
    splits: dict[str, int] = field(default_factory=dict)  # images per split written ("" = none)
    written: list[str] = field(default_factory=list)  # the files written (COCO per split)


def _folder_of(path: str) -> str:
    path = os.fspath(path).rstrip("/")
    return path.rsplit("/", 1)[0] if "/" in path else "."


def _coco_ref(image: str, folder: str) -> str:
    """A COCO ``file_name``: relative to the JSON's folder when the image lies inside it, else absolute."""
    if storage.is_remote(image) or storage.is_remote(folder):
        return image
    image, folder = os.path.abspath(image), os.path.abspath(folder)
    return os.path.relpath(image, folder) if os.path.commonpath([image, folder]) == folder else image


def convert(
    source: str,
    *,
    to: str,
    out: str,
    images: str | None = None,
    label_attribute: str | None = None,
    on_error: str = "stop",
    overwrite: bool = False,
    source_format: str | None = None,
) -> ConvertSummary:
    """Convert ``source`` to format ``to`` at ``out`` (a file for manifest, a file or folder for coco, a
    folder for voc/yolo), written whole; ``source_format`` picks the reader of a folder holding several."""
    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"--on-error must be stop or skip, got {on_error!r}")
    out = os.fspath(out)
    single_file = to == "manifest" or (to == "coco" and out.endswith(".json"))
    check_free(out, overwrite=overwrite, what="output file" if single_file else "output folder")
    report = ReadReport()
    kind, classes, stream = read_source(
        source,
        images=images,
        label_attribute=label_attribute,
        on_error=on_error,
        report=report,
        kind=source_format,
    )
    records: list[Record] = list(stream)  # the whole set: a manifest's classes come from every line
    if not records:
        raise FormatError(
            "no image left to convert" + (f" ({len(report.skipped)} skipped)" if report.skipped else ""),
            path=os.fspath(source),
        )
    if classes is None:
        classes = manifest_classes(records, source)
        records = [r.replace(source_ref=resolve_source_ref(r.source_ref, source)) for r in records]
    used = {n for r in records for n in r.class_names}
    summary = ConvertSummary(
        source_format=kind,
        classes=[n for n in classes if n in used],
        unused_classes=[n for n in classes if n not in used],
        skipped=[message for _, _, message in report.skipped],
        skipped_boxes=list(report.skipped_boxes),
        corrected=list(report.corrected),
        notes=list(report.notes),
    )
    classes = summary.classes
    index = {name: i for i, name in enumerate(classes)}
    records = [
        r.replace(
            class_ids=np.array([index[n] for n in r.class_names], dtype=np.int64),
            class_map={index[n]: n for n in r.class_names},
        )
        for r in records
    ]
    for record in records:
        key = record.split or ""
        summary.splits[key] = summary.splits.get(key, 0) + 1
    if single_file:
        folder = _folder_of(out)
        if to == "coco":
            data = coco_data(
                [r.replace(source_ref=_coco_ref(r.source_ref, folder)) for r in records], classes=classes
            )
            storage.write_bytes(out, orjson.dumps(data))
            summary.images = len(data["images"])
        else:
            summary.images = write_manifest(
                out, [r.replace(source_ref=ref_from(r.source_ref, folder)) for r in records]
            )
        summary.written = [out]
        return summary
    with whole_output(out, overwrite=overwrite, last=("data.yaml",)) as staging:
        if to == "coco":
            _write_coco_splits(records, staging, out, classes, summary)
        elif to == "voc":
            full = [
                r.replace(
                    source_ref=r.source_ref
                    if storage.is_remote(r.source_ref)
                    else os.path.abspath(r.source_ref)
                )
                for r in records
            ]
            summary.images = write_voc(full, staging, classes=classes)
        else:
            summary.images = write_yolo(records, staging, classes=classes)
    return summary


def _write_coco_splits(records, staging: str, out: str, classes: list[str], summary: ConvertSummary) -> None:
    """``annotations/instances_<split>.json`` per split (CVAT's layout), images referred to from ``out``."""
    by_split: dict[str | None, list[Record]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    folder = storage.join(out, "annotations")
    for split, group in by_split.items():
        name = f"instances_{SPLIT_NAMES.get(split, split)}.json"
        data = coco_data(
            [r.replace(source_ref=_coco_ref(r.source_ref, folder)) for r in group], classes=classes
        )
        storage.write_bytes(os.path.join(staging, "annotations", name), orjson.dumps(data))
        summary.images += len(data["images"])
        summary.written.append(storage.join(folder, name))
