"""What a report shows of one image and of the whole batch, shared by the PDF and the HTML report.

``ReportItem`` (an image's thumbnail and its detections as fractions of the image, with true/false positive
and missed-box marks when the image has ground truth), ``ReportSummary`` (the title page / header),
``make_thumbnail`` (one small JPEG per image, made once while the images stream through ``predict``), class
colours, and the words under a thumbnail and on the title page (``detection_label``, ``caption``,
``summary_facts``).

Not here: drawing them (``report.html_report``, ``report.pdf``); running the model (``predict``).
"""

from __future__ import annotations

import colorsys
import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from detforge.evaluation.metrics import DetectionMetrics

THUMBNAIL_SIDE = 400  # px, longest side: sharp at the PDF cell size (~190 pt) and in the HTML grid
THUMBNAIL_QUALITY = 82
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass
class Thumbnail:
    """A downscaled image as JPEG bytes."""

    jpeg: bytes
    width: int
    height: int


@dataclass
class ReportItem:
    """One image of a report: detections as ``xyxy`` fractions of the image, ground-truth marks when known.

    ``is_tp`` (K,) marks each detection true/false positive; ``missed_boxes`` (M, 4) fractions and
    ``missed_class_ids`` are labeled boxes no detection found (false negatives). All three are None
    when the image has no ground truth.
    """

    name: str
    source_ref: str
    thumbnail: Thumbnail
    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    is_tp: np.ndarray | None = None
    missed_boxes: np.ndarray | None = None
    missed_class_ids: np.ndarray | None = None

    @property
    def has_truth(self) -> bool:
        return self.is_tp is not None


@dataclass
class ReportSummary:
    """What the title page (PDF) and the header (HTML) say."""

    class_names: list[str]
    model_name: str
    threshold: float
    images: int
    detections_per_class: list[int]
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    )
    source_run: str | None = None
    input_size: int | None = None
    validation_map: float | None = None  # from the model's metadata
    metrics: DetectionMetrics | None = None  # of this batch, against the ground truth
    images_with_truth: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)


def class_color(class_id: int) -> str:
    """``#rrggbb`` of a class: the tab10 palette, then evenly spread hues."""
    if class_id < len(PALETTE):
        return PALETTE[class_id]
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.85)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def rgb(color: str) -> tuple[float, float, float]:
    """``#rrggbb`` as three fractions."""
    return tuple(int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def text_on(color: str) -> str:
    """Black or white, whichever reads better on ``color``."""
    r, g, b = rgb(color)
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "#ffffff"


def make_thumbnail(
    image: np.ndarray, *, side: int = THUMBNAIL_SIDE, quality: int = THUMBNAIL_QUALITY
) -> Thumbnail:
    """A JPEG of an ``HxWx3`` uint8 image whose longest side is at most ``side`` pixels."""
    from detforge import images

    return Thumbnail(*images.thumbnail(np.ascontiguousarray(image[:, :, :3]), size=side, quality=quality))


def detection_label(item: ReportItem, index: int, names: list[str]) -> str:
    """``"blue box 0.93"``, ``"FP blue box 0.41"`` for a false positive."""
    cid = int(item.class_ids[index])
    name = names[cid] if 0 <= cid < len(names) else str(cid)
    prefix = "FP " if item.is_tp is not None and not item.is_tp[index] else ""
    return f"{prefix}{name} {float(item.scores[index]):.2f}"


def caption(item: ReportItem) -> str:
    """The line under a thumbnail: detection count and best score, or TP/FP/FN with ground truth."""
    n = len(item.scores)
    if item.has_truth:
        tp = int(np.count_nonzero(item.is_tp))
        return f"TP {tp}   FP {n - tp}   FN {len(item.missed_boxes)}"
    if n == 0:
        return "no detections"
    return f"{n} detection{'s' if n != 1 else ''}, best {float(np.max(item.scores)):.2f}"


def format_value(value: float | None, digits: int = 3) -> str:
    """A metric with ``digits`` decimals, ``-`` when unknown (None or NaN)."""
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def summary_facts(summary: ReportSummary) -> list[tuple[str, str]]:
    """(name, value) lines of a summary: the model, the run, the counts, validation:mAP, the batch's mAP."""
    m = summary.metrics
    unreadable = f", {len(summary.skipped)} unreadable (skipped)" if summary.skipped else ""
    size = f"  ({summary.input_size} px input)" if summary.input_size else ""
    facts = [
        ("model", summary.model_name + size),
        ("trained in", summary.source_run or "-"),
        ("date", summary.created),
        ("score threshold", f"{summary.threshold:g}"),
        ("images", f"{summary.images} predicted{unreadable}"),
        ("detections", str(sum(summary.detections_per_class))),
        ("validation:mAP", f"{format_value(summary.validation_map)}  (the model's, from training)"),
    ]
    if m is not None:
        facts += [
            (
                "mAP of this batch",
                f"{format_value(m.voc07_map)}  (VOC07 11-point, IoU "
                f"{m.iou_threshold:g}, {summary.images_with_truth} labeled images, "
                "scores >= threshold)",
            ),
            (
                "precision / recall",
                f"{format_value(m.precision)} / {format_value(m.recall)}   TP {m.tp}  FP {m.fp}  FN {m.fn}",
            ),
        ]
    return facts
