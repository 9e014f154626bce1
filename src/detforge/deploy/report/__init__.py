"""Prediction reports: what an image's entry holds, thumbnails, class colours, and the HTML gallery.

Reports are written while the images stream through ``detforge predict``: each ``ReportItem`` carries
a small JPEG thumbnail (made once, shared by the PDF and the HTML report) and its detections as
fractions of the image, so memory stays flat however many images there are.

The HTML page is one self-contained file: thumbnails inline (base64 JPEG), boxes in SVG, CSS and JS
from the ``static/report.html`` template; filters by class, by minimum score and (with ground truth)
by true/false positive and missed box. Items are staged in a temporary file and copied in after the
summary, which needs the totals.

Not here: the PDF (``report_pdf``); running the model, reading inputs, matching to ground truth
(``predict``).
"""

from __future__ import annotations

import base64
import colorsys
import datetime as _dt
import html
import re
import tempfile
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from detforge import storage
from detforge.evaluation.metrics import DetectionMetrics

THUMBNAIL_SIDE = 400  # px, longest side: sharp at the PDF cell size (~190 pt) and in the HTML grid
THUMBNAIL_QUALITY = 82
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


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
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"))
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
    return tuple(int(color[i:i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def text_on(color: str) -> str:
    """Black or white, whichever reads better on ``color``."""
    r, g, b = rgb(color)
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.6 else "#ffffff"


def make_thumbnail(image: np.ndarray, *, side: int = THUMBNAIL_SIDE,
                   quality: int = THUMBNAIL_QUALITY) -> Thumbnail:
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


_ITEMS_MARK = "<!--ITEMS-->"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def html_item(item: ReportItem, names: list[str]) -> str:
    """One ``<figure>`` of the gallery: the inline thumbnail and its boxes in SVG (thumbnail pixels)."""
    thumb = item.thumbnail
    tw, th = thumb.width, thumb.height
    font = max(tw, th) * 0.04  # in thumbnail pixels: ~12 CSS px however large the thumbnail is shown
    parts = []

    def box(coords, cid: int, kind: str, label: str, score: float | None) -> None:
        x0, y0, x1, y1 = (float(v) for v in coords)
        x, y, w, h = x0 * tw, y0 * th, max((x1 - x0) * tw, 0.5), max((y1 - y0) * th, 0.5)
        ty = y - 0.3 * font if y >= 1.1 * font else y + font
        score_attr = f' data-s="{score:.6f}"' if score is not None else ""
        parts.append(f'<g class="box {kind} c{cid}" data-c="{cid}"{score_attr}>'
                     f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}"/>'
                     f'<text x="{x + 1:.1f}" y="{ty:.1f}">{_e(label)}</text></g>')

    if item.missed_boxes is not None:
        for coords, cid in zip(item.missed_boxes, item.missed_class_ids, strict=True):
            cid = int(cid)
            box(coords, cid, "fn", f"FN {names[cid] if cid < len(names) else cid}", None)
    for j in np.argsort(item.scores, kind="stable"):
        kind = "det" if item.is_tp is None else ("tp" if item.is_tp[j] else "fp")
        box(item.boxes[j], int(item.class_ids[j]), kind, detection_label(item, int(j), names),
            float(item.scores[j]))
    data = base64.b64encode(thumb.jpeg).decode("ascii")
    return (f'<figure class="item" data-n="{len(item.scores)}">'
            f'<div class="pic" style="aspect-ratio:{tw}/{th}"><img src="data:image/jpeg;base64,{data}" '
            f'alt="{_e(item.name)}" loading="lazy" width="{tw}" height="{th}">'
            f'<svg viewBox="0 0 {tw} {th}" preserveAspectRatio="none" style="font-size:{font:.1f}px">'
            f'{"".join(parts)}</svg></div>'
            f'<figcaption><b title="{_e(item.source_ref)}">{_e(item.name)}</b>'
            f'<span>{_e(caption(item))}</span></figcaption></figure>\n')


def summary_facts(summary: ReportSummary) -> list[tuple[str, str]]:
    """(name, value) lines of a summary: the model, the run, the counts, validation:mAP, the batch's mAP."""
    m = summary.metrics
    unreadable = f", {len(summary.skipped)} unreadable (skipped)" if summary.skipped else ""
    size = f"  ({summary.input_size} px input)" if summary.input_size else ""
    facts = [("model", summary.model_name + size),
             ("trained in", summary.source_run or "-"), ("date", summary.created),
             ("score threshold", f"{summary.threshold:g}"),
             ("images", f"{summary.images} predicted{unreadable}"),
             ("detections", str(sum(summary.detections_per_class))),
             ("validation:mAP", f"{format_value(summary.validation_map)}  (the model's, from training)")]
    if m is not None:
        facts += [("mAP of this batch", f"{format_value(m.voc07_map)}  (VOC07 11-point, IoU "
                                        f"{m.iou_threshold:g}, {summary.images_with_truth} labeled images, "
                                        "scores >= threshold)"),
                  ("precision / recall", f"{format_value(m.precision)} / {format_value(m.recall)}   "
                                         f"TP {m.tp}  FP {m.fp}  FN {m.fn}")]
    return facts


def html_summary(summary: ReportSummary) -> dict[str, str]:
    """The template's fields, escaped."""
    m = summary.metrics
    facts = summary_facts(summary)
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v.replace('>=', '≥'))}</td></tr>" for k, v in facts)
    classes = []
    for cid, name in enumerate(summary.class_names):
        extra = ""
        if m is not None and cid in m.per_class:
            s = m.per_class[cid]
            extra = f" · TP {s.tp} FP {s.fp} FN {s.fn}"
        classes.append(f'<label class="check"><input type="checkbox" class="class-filter" value="{cid}" '
                       f'checked><i class="swatch c{cid}"></i>{_e(name)} '
                       f'<small>({summary.detections_per_class[cid]} detections{_e(extra)})</small></label>')
    colors = "".join(f".c{cid}{{--c:{class_color(cid)};--t:{text_on(class_color(cid))}}}"
                     for cid in range(len(summary.class_names)))
    skipped = ""
    if summary.skipped:
        listed = "".join(f"<li><b>{_e(name)}</b>: {_e(reason)}</li>"
                         for name, reason in summary.skipped[:200])
        more = f"<li>and {len(summary.skipped) - 200} more</li>" if len(summary.skipped) > 200 else ""
        skipped = (f'<details id="skipped"><summary>{len(summary.skipped)} unreadable images (skipped)'
                   f"</summary><ul>{listed}{more}</ul></details>")
    status = "".join(f'<label class="check"><input type="checkbox" id="show-{kind}" checked>{text}</label>'
                     for kind, text in (("tp", "true positives"), ("fp", "false positives (dashed)"),
                                        ("fn", "missed labeled boxes (dotted)")))
    status = f'<div class="group">{status}</div>' if m is not None else ""
    return {"TITLE": _e(f"detforge predictions: {summary.model_name}"), "FACTS": rows,
            "CLASSES": "".join(classes), "COLORS": colors, "SKIPPED": skipped, "STATUS": status,
            "THRESHOLD": f"{summary.threshold:.2f}", "TOTAL": str(summary.images)}


class HtmlReport:
    """A self-contained HTML gallery: ``add`` items, then ``finish(summary)``; use it as a context manager."""

    def __init__(self, path: str, *, class_names: list[str], title: str | None = None) -> None:
        self.path = str(path)
        self.class_names = list(class_names)
        self.title = title  # the page's title and heading; default "detforge predictions: <model>"
        self._items = None
        self._finished = False

    def __enter__(self) -> HtmlReport:
        self._items = tempfile.TemporaryFile()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._items is not None:
            self._items.close()
        return False

    def add(self, item: ReportItem) -> None:
        """Stage one gallery item."""
        self._items.write(html_item(item, self.class_names).encode("utf-8"))

    def finish(self, summary: ReportSummary) -> None:
        """Write the page: template head with the summary, the staged items, the tail with the script."""
        template = resources.files("detforge").joinpath("static/report.html").read_text(encoding="utf-8")
        fields = html_summary(summary)
        if self.title:
            fields["TITLE"] = _e(self.title)
        # one pass, so that a class name that looks like a placeholder stays as it is
        head, tail = (re.sub(r"\{\{([A-Z]+)\}\}", lambda m: fields[m.group(1)], part)
                      for part in template.split(_ITEMS_MARK))
        self._items.seek(0)
        with storage.atomic_writer(self.path, "wb") as out:
            out.write(head.encode("utf-8"))
            while chunk := self._items.read(1 << 20):
                out.write(chunk)
            out.write(tail.encode("utf-8"))
        self._finished = True
