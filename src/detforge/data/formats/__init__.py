"""Label formats other than Ground Truth's manifest: ``coco``, ``voc``, ``yolo``, each a reader
(``read_*`` -> class names and a stream of Records) and a writer (``write_*``).

Here: what the three readers share — turning one image's boxes into a checked Record and the
``on_error`` treatment of a bad box, line or file (``groundtruth.checked_boxes`` holds the rule).
"""

from __future__ import annotations

import os

import numpy as np

from detforge import images, storage
from detforge.data.groundtruth import ReadReport, Record, checked_boxes, make_record
from detforge.errors import DetforgeError, FormatError


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


def image_inside(base: str, ref: str, *, path: str, field: str, line: int | None = None) -> str:
    """``ref`` (an annotation's relative image name) joined to ``base``, refused (FormatError naming the
    file and field) when it is absolute or climbs out of ``base`` with ``..``: an annotation names images
    inside its own dataset (``<filename>../../secret.txt</filename>`` is an attack, not a label)."""
    parts = ref.replace("\\", "/").split("/")
    if ref.startswith(("/", "\\")) or (len(ref) > 1 and ref[1] == ":") or storage.is_remote(ref):
        raise FormatError(
            f"image name {ref!r} is an absolute path or URI; an annotation names an image "
            "inside its dataset folder",
            path=path,
            line=line,
            field=field,
        )
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 0 if part in ("", ".") else 1
        if depth < 0:
            raise FormatError(
                f"image name {ref!r} climbs out of the dataset folder {base}",
                path=path,
                line=line,
                field=field,
            )
    joined = storage.join(base, *[p for p in parts if p not in ("", ".")])
    return joined if storage.is_remote(joined) else os.path.normpath(joined)


def checked_size(
    image: str, stated: tuple[int, int] | None, *, path: str, field: str, line: int | None = None
) -> tuple[int, int, int]:
    """(width, height, orientation) of ``image`` from its header, checked against the size an annotation
    states: the header is the truth. A missing image is an ImageError. ``orientation`` is 1, or the EXIF
    orientation (5..8) when the stated size is the stored size of an EXIF-turned photo (its boxes were
    drawn on the stored pixels: ``upright_boxes`` turns them); any other disagreement is a FormatError
    naming the file and field."""
    width, height = images.probe(image)
    if stated is None or stated == (width, height):
        return width, height, 1
    if stated == (height, width):
        turn = images.orientation(images.read_bytes(image))
        if turn in (5, 6, 7, 8):
            return width, height, turn
    raise FormatError(
        f"the annotation says the image is {stated[0]}x{stated[1]} but {image} is {width}x{height} (upright)",
        path=path,
        line=line,
        field=field,
    )


def upright_boxes(xyxy, orientation: int, *, width: int, height: int) -> np.ndarray:
    """``xyxy`` boxes drawn on an image's stored pixels, moved to its upright (EXIF-applied) pixels.

    ``width`` x ``height`` is the upright size; the stored image is ``height`` x ``width`` for the
    orientations 5..8 (the ones that swap the sides), as Pillow's ``exif_transpose`` turns them.
    """
    boxes = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    if orientation not in (5, 6, 7, 8):
        return boxes
    x0, y0, x1, y1 = boxes.T
    stored_w, stored_h = height, width
    if orientation == 6:  # turned 90 degrees clockwise for display: (x, y) -> (H - y, x)
        nx0, nx1, ny0, ny1 = stored_h - y1, stored_h - y0, x0, x1
    elif orientation == 8:  # counter-clockwise: (x, y) -> (y, W - x)
        nx0, nx1, ny0, ny1 = y0, y1, stored_w - x1, stored_w - x0
    elif orientation == 5:  # transpose: (x, y) -> (y, x)
        nx0, nx1, ny0, ny1 = y0, y1, x0, x1
    else:  # 7, transverse: (x, y) -> (H - y, W - x)
        nx0, nx1, ny0, ny1 = stored_h - y1, stored_h - y0, stored_w - x1, stored_w - x0
    return np.stack([nx0, ny0, nx1, ny1], axis=1)


def decoded_text(data: bytes, path: str) -> str:
    """UTF-8 text of a label file, a BOM (Windows tools write one) dropped; FormatError naming the line and
    column of the first byte that is not UTF-8."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise FormatError(
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}, column {column}",
            path=path,
            line=line,
            hint="save the file as UTF-8",
        ) from None


def decoded_json(data: bytes, path: str):
    """A JSON document's value (``decoded_text``); not JSON is a FormatError naming the line and column."""
    import orjson

    text = decoded_text(data, path)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        line = text.count("\n", 0, exc.pos) + 1
        column = exc.pos - (text.rfind("\n", 0, exc.pos) + 1) + 1
        raise FormatError(
            f"not valid JSON at line {line}, column {column}: {exc.msg}", path=path, line=line
        ) from None
