"""The HTML report: one self-contained gallery page of a batch of predictions.

Thumbnails inline (base64 JPEG), boxes in SVG, CSS and JS from the ``report.html`` template beside this
module; filters by class, by minimum score and (with ground truth) by true/false positive and missed box.
``HtmlReport`` stages the items in a temporary file while the images stream through ``predict`` and copies
them in after the summary, which needs the totals, so memory stays flat however many images there are.

Not here: what an item holds (``report.items``); the PDF (``report.pdf``).
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
from importlib import resources

import numpy as np

from detforge import storage
from detforge.deploy.report.items import (
    ReportItem,
    ReportSummary,
    caption,
    class_color,
    detection_label,
    summary_facts,
    text_on,
)

TEMPLATE = "report.html"  # package data of detforge.deploy.report

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
        parts.append(
            f'<g class="box {kind} c{cid}" data-c="{cid}"{score_attr}>'
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}"/>'
            f'<text x="{x + 1:.1f}" y="{ty:.1f}">{_e(label)}</text></g>'
        )

    if item.missed_boxes is not None:
        for coords, cid in zip(item.missed_boxes, item.missed_class_ids, strict=True):
            cid = int(cid)
            box(coords, cid, "fn", f"FN {names[cid] if cid < len(names) else cid}", None)
    for j in np.argsort(item.scores, kind="stable"):
        kind = "det" if item.is_tp is None else ("tp" if item.is_tp[j] else "fp")
        box(
            item.boxes[j],
            int(item.class_ids[j]),
            kind,
            detection_label(item, int(j), names),
            float(item.scores[j]),
        )
    data = base64.b64encode(thumb.jpeg).decode("ascii")
    return (
        f'<figure class="item" data-n="{len(item.scores)}">'
        f'<div class="pic" style="aspect-ratio:{tw}/{th}"><img src="data:image/jpeg;base64,{data}" '
        f'alt="{_e(item.name)}" loading="lazy" width="{tw}" height="{th}">'
        f'<svg viewBox="0 0 {tw} {th}" preserveAspectRatio="none" style="font-size:{font:.1f}px">'
        f"{''.join(parts)}</svg></div>"
        f'<figcaption><b title="{_e(item.source_ref)}">{_e(item.name)}</b>'
        f"<span>{_e(caption(item))}</span></figcaption></figure>\n"
    )


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
        classes.append(
            f'<label class="check"><input type="checkbox" class="class-filter" value="{cid}" '
            f'checked><i class="swatch c{cid}"></i>{_e(name)} '
            f"<small>({summary.detections_per_class[cid]} detections{_e(extra)})</small></label>"
        )
    colors = "".join(
        f".c{cid}{{--c:{class_color(cid)};--t:{text_on(class_color(cid))}}}"
        for cid in range(len(summary.class_names))
    )
    skipped = ""
    if summary.skipped:
        listed = "".join(
            f"<li><b>{_e(name)}</b>: {_e(reason)}</li>" for name, reason in summary.skipped[:200]
        )
        more = f"<li>and {len(summary.skipped) - 200} more</li>" if len(summary.skipped) > 200 else ""
        skipped = (
            f'<details id="skipped"><summary>{len(summary.skipped)} unreadable images (skipped)'
            f"</summary><ul>{listed}{more}</ul></details>"
        )
    status = "".join(
        f'<label class="check"><input type="checkbox" id="show-{kind}" checked>{text}</label>'
        for kind, text in (
            ("tp", "true positives"),
            ("fp", "false positives (dashed)"),
            ("fn", "missed labeled boxes (dotted)"),
        )
    )
    status = f'<div class="group">{status}</div>' if m is not None else ""
    return {
        "TITLE": _e(f"detforge predictions: {summary.model_name}"),
        "FACTS": rows,
        "CLASSES": "".join(classes),
        "COLORS": colors,
        "SKIPPED": skipped,
        "STATUS": status,
        "THRESHOLD": f"{summary.threshold:.2f}",
        "TOTAL": str(summary.images),
    }


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
        template = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
        fields = html_summary(summary)
        if self.title:
            fields["TITLE"] = _e(self.title)
        # one pass, so that a class name that looks like a placeholder stays as it is
        head, tail = (
            re.sub(r"\{\{([A-Z]+)\}\}", lambda m: fields[m.group(1)], part)
            for part in template.split(_ITEMS_MARK)
        )
        self._items.seek(0)
        with storage.atomic_writer(self.path, "wb") as out:
            out.write(head.encode("utf-8"))
            while chunk := self._items.read(1 << 20):
                out.write(chunk)
            out.write(tail.encode("utf-8"))
        self._finished = True
