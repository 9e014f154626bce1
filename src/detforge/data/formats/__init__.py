"""Label formats other than Ground Truth's manifest: ``coco``, ``voc``, ``yolo``, each a reader
(``read_*`` -> class names and a stream of Records) and a writer (``write_*``).

Here: what the three readers share — turning one image's boxes into a checked Record and the
``on_error`` treatment of a bad box, line or file (``groundtruth.checked_boxes`` holds the rule).
"""

from __future__ import annotations

import numpy as np

from detforge.data.groundtruth import ReadReport, Record, checked_boxes, make_record
from detforge.errors import DetforgeError


def skipped_boxes_list(on_error: str, report: ReadReport | None) -> list[str] | None:
    """Where a reader notes the boxes it leaves out: None (stop at the first) or a list."""
    if on_error != "skip":
        return None
    return report.skipped_boxes if report is not None else []


def pass_over(exc: DetforgeError, *, on_error: str, report: ReadReport | None, path: str) -> None:
    """Raise ``exc`` (``on_error='stop'``) or note the image it concerns as skipped."""
    if on_error == "stop":
        raise exc
    if report is not None:
        report.skipped.append((exc.path or path, exc.line or 0, str(exc)))


def imported_record(
    image: str,
    *,
    width: int,
    height: int,
    boxes_xyxy,
    class_ids,
    names: list[str],
    where: list,
    skipped_boxes: list[str] | None,
    difficult=None,
    split: str | None = None,
    depth: int = 3,
) -> Record:
    """A Record of one imported image with only the boxes a manifest can hold (see ``checked_boxes``)."""
    xyxy = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    keep = checked_boxes(xyxy, width=width, height=height, where=where, skipped_boxes=skipped_boxes)
    ids = np.asarray(class_ids, dtype=np.int64).reshape(-1)[keep]
    flags = None if difficult is None else np.asarray(difficult, dtype=bool).reshape(-1)[keep]
    return make_record(
        image,
        width=width,
        height=height,
        depth=depth,
        boxes_xyxy=np.round(xyxy[keep], 6),
        class_ids=ids,
        difficult=flags,
        split=split,
        class_map={int(i): names[int(i)] for i in sorted(set(ids.tolist()))},
    )
