"""Prediction reports, written while the images stream through ``detforge predict``.

- ``report.items``: ``ReportItem`` (an image's thumbnail and detections), ``ReportSummary``, thumbnails,
  class colours, captions: what both reports show.
- ``report.html_report``: ``HtmlReport``, the self-contained HTML gallery (its template ``report.html``
  beside it).
- ``report.pdf``: ``PdfReport``, the streaming PDF writer.

The names of ``items`` and ``HtmlReport`` are re-exported here (``from detforge.deploy.report import
HtmlReport, ReportItem``).
"""

from detforge.deploy.report.html_report import HtmlReport, html_item, html_summary
from detforge.deploy.report.items import (
    PALETTE,
    THUMBNAIL_QUALITY,
    THUMBNAIL_SIDE,
    ReportItem,
    ReportSummary,
    Thumbnail,
    caption,
    class_color,
    detection_label,
    format_value,
    make_thumbnail,
    rgb,
    summary_facts,
    text_on,
)

__all__ = [
    "PALETTE",
    "THUMBNAIL_QUALITY",
    "THUMBNAIL_SIDE",
    "HtmlReport",
    "ReportItem",
    "ReportSummary",
    "Thumbnail",
    "caption",
    "class_color",
    "detection_label",
    "format_value",
    "html_item",
    "html_summary",
    "make_thumbnail",
    "rgb",
    "summary_facts",
    "text_on",
]
