"""The PDF report of ``detforge predict``: a title page, then A4 landscape pages of thumbnail grids.

Written by a small streaming writer (standard library only): every page, with its thumbnails as JPEG
(DCTDecode) images and its boxes, labels and captions as vector drawing and Helvetica text, goes to the
file as soon as it is full, so memory stays flat however many images there are. The title page, which
needs the totals, is written last but listed first, and "page N of T" takes T from a form XObject
written at the end. Why not matplotlib or fpdf2: ``PdfPages`` keeps every image until the file closes
(measured here: +1.6 MiB per 12-thumbnail page), fpdf2 builds the whole document in memory, and
neither is in the ``edge`` extra.

Not here: the items, colours and thumbnails (``report.items``); the HTML page (``report.html_report``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import zlib

import numpy as np

from detforge import storage
from detforge.deploy.report.items import (
    ReportItem,
    ReportSummary,
    caption,
    class_color,
    detection_label,
    format_value,
    rgb,
    summary_facts,
    text_on,
)

# Helvetica and Helvetica-Bold advance widths (1/1000 em) for WinAnsi codes 32..126, from the AFM files.
_HELVETICA = (
    278,
    278,
    355,
    556,
    556,
    889,
    667,
    191,
    333,
    333,
    389,
    584,
    278,
    333,
    278,
    278,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    278,
    278,
    584,
    584,
    584,
    556,
    1015,
    667,
    667,
    722,
    722,
    667,
    611,
    778,
    722,
    278,
    500,
    667,
    556,
    833,
    722,
    778,
    667,
    778,
    722,
    667,
    611,
    722,
    667,
    944,
    667,
    667,
    611,
    278,
    278,
    278,
    469,
    556,
    333,
    556,
    556,
    500,
    556,
    556,
    278,
    556,
    556,
    222,
    222,
    500,
    222,
    833,
    556,
    556,
    556,
    556,
    333,
    500,
    278,
    556,
    500,
    722,
    500,
    500,
    500,
    334,
    260,
    334,
    584,
)
_HELVETICA_BOLD = (
    278,
    333,
    474,
    556,
    556,
    889,
    722,
    238,
    333,
    333,
    389,
    584,
    278,
    333,
    278,
    278,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    333,
    333,
    584,
    584,
    584,
    611,
    975,
    722,
    722,
    722,
    722,
    667,
    611,
    778,
    722,
    278,
    556,
    722,
    611,
    833,
    722,
    778,
    667,
    778,
    722,
    667,
    611,
    722,
    667,
    944,
    667,
    667,
    611,
    333,
    278,
    333,
    584,
    556,
    333,
    556,
    611,
    556,
    611,
    556,
    333,
    611,
    611,
    278,
    278,
    556,
    278,
    889,
    611,
    611,
    611,
    611,
    389,
    556,
    333,
    611,
    556,
    778,
    556,
    556,
    500,
    389,
    280,
    389,
    584,
)
_ELLIPSIS = "\u2026"
PAGE_WIDTH, PAGE_HEIGHT = 842.0, 595.0  # A4 landscape, points
MARGIN = 28.0
MAX_DRAWN = 30  # detections drawn per thumbnail (the best ones); a barely trained model gives hundreds


def text_width(text: str, size: float, *, bold: bool = False) -> float:
    """Width in points of ``text`` in Helvetica (characters outside ASCII counted as an average letter)."""
    table = _HELVETICA_BOLD if bold else _HELVETICA
    units = sum(
        table[ord(ch) - 32] if 32 <= ord(ch) <= 126 else (1000 if ch == _ELLIPSIS else 556) for ch in text
    )
    return units * size / 1000


def fit_text(text: str, width: float, size: float, *, bold: bool = False) -> str:
    """``text``, cut with an ellipsis where it would be wider than ``width`` points."""
    if text_width(text, size, bold=bold) <= width:
        return text
    while text and text_width(text + _ELLIPSIS, size, bold=bold) > width:
        text = text[:-1]
    return text + _ELLIPSIS


def _pdf_string(text: str) -> bytes:
    data = text.encode("cp1252", errors="replace")
    return b"(" + data.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _n(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


class _Canvas:
    """PDF content-stream operators, in top-left page coordinates (points)."""

    def __init__(self) -> None:
        self.ops: list[str] = []

    def _y(self, y: float) -> float:
        return PAGE_HEIGHT - y

    def rect(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        *,
        stroke: str | None = None,
        fill: str | None = None,
        width: float = 1.0,
        dash: tuple[float, ...] = (),
    ) -> None:
        ops = self.ops
        if fill:
            ops.append("{} {} {} rg".format(*map(_n, rgb(fill))))
        if stroke:
            ops.append(
                "{} {} {} RG {} w [{}] 0 d".format(*map(_n, rgb(stroke)), _n(width), " ".join(map(_n, dash)))
            )
        paint = "B" if fill and stroke else ("f" if fill else "S")
        ops.append(f"{_n(x)} {_n(self._y(y + h))} {_n(w)} {_n(h)} re {paint}")

    def text(
        self, x: float, y: float, text: str, *, size: float, color: str = "#000000", bold: bool = False
    ) -> None:
        """``text`` with its baseline at ``y``."""
        font = "/F2" if bold else "/F1"
        ops = "{} {} {} rg".format(*map(_n, rgb(color)))
        self.ops.append(
            f"{ops} BT {font} {_n(size)} Tf {_n(x)} {_n(self._y(y))} Td "
            + _pdf_string(text).decode("latin-1")
            + " Tj ET"
        )

    def image(self, name: str, x: float, y: float, w: float, h: float) -> None:
        self.ops.append(f"q {_n(w)} 0 0 {_n(h)} {_n(x)} {_n(self._y(y + h))} cm /{name} Do Q")

    def place(self, name: str, x: float, y: float) -> None:
        """A form XObject with its origin at (x, baseline y)."""
        self.ops.append(f"q 1 0 0 1 {_n(x)} {_n(self._y(y))} cm /{name} Do Q")

    def clip(self, x: float, y: float, w: float, h: float) -> None:
        self.ops.append(f"q {_n(x)} {_n(self._y(y + h))} {_n(w)} {_n(h)} re W n")

    def restore(self) -> None:
        self.ops.append("Q")

    def data(self) -> bytes:
        return "\n".join(self.ops).encode("latin-1")


class _PdfFile:
    """Objects written one after the other to a binary handle, then the cross-reference table."""

    CATALOG, PAGES, FONT, FONT_BOLD, TOTAL = 1, 2, 3, 4, 5

    def __init__(self, handle) -> None:
        self.handle = handle
        self.position = 0
        self.offsets: dict[int, int] = {}
        self.next_id = 6
        self._write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        self.object(
            self.FONT, b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
        )
        self.object(
            self.FONT_BOLD,
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>",
        )

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self.position += len(data)

    def reserve(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def object(self, oid: int, body: bytes) -> None:
        self.offsets[oid] = self.position
        self._write(b"%d 0 obj\n" % oid + body + b"\nendobj\n")

    def stream(self, oid: int, entries: bytes, data: bytes, *, compress: bool = False) -> None:
        if compress:
            data = zlib.compress(data, 6)
            entries += b" /Filter /FlateDecode"
        self.object(oid, b"<< " + entries + b" /Length %d >>\nstream\n" % len(data) + data + b"\nendstream")

    def page(self, canvas: _Canvas, images: dict[str, int]) -> int:
        """Write a page (contents + page object); returns the page object's id."""
        content, page = self.reserve(), self.reserve()
        self.stream(content, b"", canvas.data(), compress=True)
        xobjects = b" ".join(b"/%s %d 0 R" % (name.encode(), oid) for name, oid in images.items())
        self.object(
            page,
            b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 %d %d] /Contents %d 0 R /Resources "
            b"<< /Font << /F1 %d 0 R /F2 %d 0 R >> /XObject << /Tot %d 0 R %s >> >> >>"
            % (self.PAGES, PAGE_WIDTH, PAGE_HEIGHT, content, self.FONT, self.FONT_BOLD, self.TOTAL, xobjects),
        )
        return page

    def finish(self, pages: list[int], *, title: str) -> None:
        total = _Canvas()
        total.text(0, PAGE_HEIGHT, str(len(pages)), size=7, color="#666666")
        self.stream(
            self.TOTAL,
            b"/Type /XObject /Subtype /Form /BBox [0 0 60 12] "
            b"/Resources << /Font << /F1 %d 0 R >> >>" % self.FONT,
            total.data(),
        )
        kids = b" ".join(b"%d 0 R" % p for p in pages)
        self.object(self.PAGES, b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(pages)))
        self.object(self.CATALOG, b"<< /Type /Catalog /Pages %d 0 R >>" % self.PAGES)
        info = self.reserve()
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("D:%Y%m%d%H%M%SZ")
        self.object(
            info,
            b"<< /Title "
            + _pdf_string(title)
            + b" /Producer (detforge) /CreationDate ("
            + stamp.encode()
            + b") >>",
        )
        start = self.position
        count = self.next_id
        rows = [b"xref\n0 %d\n0000000000 65535 f \n" % count]
        rows += [b"%010d 00000 n \n" % self.offsets[i] for i in range(1, count)]
        self._write(b"".join(rows))
        self._write(
            b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
            % (count, self.CATALOG, info, start)
        )


class PdfReport:
    """A PDF report written as items arrive: ``add`` each item, then ``finish(summary)``.

    Use as a context manager: leaving it on an exception (or without ``finish``) leaves no file behind.
    Pages are A4 landscape, ``columns x rows`` thumbnails each.
    """

    def __init__(
        self,
        path: str,
        *,
        class_names: list[str],
        title: str = "detforge predictions",
        columns: int = 4,
        rows: int = 3,
    ) -> None:
        self.path = str(path)
        self.class_names = list(class_names)
        self.title = title
        self.columns, self.rows = int(columns), int(rows)
        self.pending: list[ReportItem] = []
        self.pages: list[int] = []
        self._stack = contextlib.ExitStack()
        self._pdf: _PdfFile | None = None
        self._finished = False

    def __enter__(self) -> PdfReport:
        handle = self._stack.enter_context(storage.atomic_writer(self.path, "wb"))
        self._pdf = _PdfFile(handle)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self._finished:
            exc = RuntimeError("report not finished")
            exc_type = RuntimeError
        self._stack.__exit__(exc_type, exc, tb)
        return False

    def add(self, item: ReportItem) -> None:
        """Queue an item; a full page is written at once."""
        self.pending.append(item)
        if len(self.pending) == self.columns * self.rows:
            self._grid_page()

    def finish(self, summary: ReportSummary) -> None:
        """Write the last grid page, the title page (listed first) and the file's tables."""
        if self.pending:
            self._grid_page()
        assert self._pdf is not None, "use PdfReport as a context manager"
        title = _Canvas()
        draw_title_page(title, summary, self.title)
        _footer(title, 1)
        first = self._pdf.page(title, {})
        self._pdf.finish([first, *self.pages], title=self.title)
        self._finished = True

    def _grid_page(self) -> None:
        pdf = self._pdf
        assert pdf is not None, "use PdfReport as a context manager"
        canvas = _Canvas()
        canvas.text(MARGIN, MARGIN - 10, fit_text(self.title, 500, 8), size=8, color="#666666")
        images: dict[str, int] = {}
        gap = 10.0
        cell_w = (PAGE_WIDTH - 2 * MARGIN - gap * (self.columns - 1)) / self.columns
        cell_h = (PAGE_HEIGHT - 2 * MARGIN - 12 - gap * (self.rows - 1)) / self.rows
        for i, item in enumerate(self.pending):
            oid = pdf.reserve()
            thumb = item.thumbnail
            pdf.stream(
                oid,
                b"/Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB "
                b"/BitsPerComponent 8 /Filter /DCTDecode" % (thumb.width, thumb.height),
                thumb.jpeg,
            )
            name = f"Im{i}"
            images[name] = oid
            x = MARGIN + (i % self.columns) * (cell_w + gap)
            y = MARGIN + (i // self.columns) * (cell_h + gap)
            draw_cell(canvas, item, name, self.class_names, x=x, y=y, width=cell_w, height=cell_h)
        _footer(canvas, len(self.pages) + 2)
        self.pages.append(pdf.page(canvas, images))
        self.pending = []


def _footer(canvas: _Canvas, number: int) -> None:
    text = f"page {number} of "
    x = PAGE_WIDTH - MARGIN - text_width("page 0000 of 0000", 7)
    canvas.text(x, PAGE_HEIGHT - MARGIN + 14, text, size=7, color="#666666")
    canvas.place("Tot", x + text_width(text, 7), PAGE_HEIGHT - MARGIN + 14)


def draw_cell(
    canvas: _Canvas,
    item: ReportItem,
    image_name: str,
    names: list[str],
    *,
    x: float,
    y: float,
    width: float,
    height: float,
) -> None:
    """One thumbnail with its boxes and labels, the file name and counts below it."""
    caption_h = 22.0
    area_h = height - caption_h
    thumb = item.thumbnail
    scale = min(width / thumb.width, area_h / thumb.height)
    w, h = thumb.width * scale, thumb.height * scale
    ix, iy = x + (width - w) / 2, y + (area_h - h) / 2
    canvas.rect(x, y, width, area_h, fill="#f2f2f2")
    canvas.image(image_name, ix, iy, w, h)
    canvas.clip(ix, iy, w, h)
    size = 6.0
    if item.missed_boxes is not None:
        for box, cid in zip(item.missed_boxes, item.missed_class_ids, strict=True):
            color = class_color(int(cid))
            name = names[int(cid)] if 0 <= int(cid) < len(names) else str(int(cid))
            _box(
                canvas,
                box,
                ix,
                iy,
                w,
                h,
                color=color,
                dash=(1.2, 1.6),
                label=f"FN {name}",
                size=size,
                label_fill="#ffffff",
                label_color="#000000",
            )
    order = np.argsort(item.scores, kind="stable")[-MAX_DRAWN:]  # the best, drawn last (on top)
    for j in order:
        color = class_color(int(item.class_ids[j]))
        false_positive = item.is_tp is not None and not item.is_tp[j]
        _box(
            canvas,
            item.boxes[j],
            ix,
            iy,
            w,
            h,
            color=color,
            dash=(3.5, 2) if false_positive else (),
            label=detection_label(item, int(j), names),
            size=size,
            label_fill=color,
            label_color=text_on(color),
        )
    canvas.restore()
    canvas.rect(ix, iy, w, h, stroke="#bbbbbb", width=0.4)
    canvas.text(x, y + area_h + 9, fit_text(item.name, width, 7.5, bold=True), size=7.5, bold=True)
    text = caption(item) + (f"  (best {MAX_DRAWN} drawn)" if len(order) < len(item.scores) else "")
    canvas.text(x, y + area_h + 18, fit_text(text, width, 6.5), size=6.5, color="#555555")


def _box(
    canvas: _Canvas,
    box,
    ix: float,
    iy: float,
    w: float,
    h: float,
    *,
    color: str,
    dash: tuple,
    label: str,
    size: float,
    label_fill: str,
    label_color: str,
) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    bx, by, bw, bh = ix + x0 * w, iy + y0 * h, (x1 - x0) * w, (y1 - y0) * h
    canvas.rect(bx, by, bw, bh, stroke=color, width=1.1, dash=dash)
    tw = text_width(label, size) + 3
    th = size + 2
    ty = by - th if by - th >= iy else by  # above the box, or inside it at the top edge
    tx = min(bx, ix + w - tw) if tw < w else ix
    canvas.rect(tx, ty, tw, th, fill=label_fill, stroke=color if label_fill == "#ffffff" else None, width=0.5)
    canvas.text(tx + 1.5, ty + size, label, size=size, color=label_color)


def draw_title_page(canvas: _Canvas, summary: ReportSummary, title: str) -> None:
    """Model, date, threshold, counts, validation:mAP and the batch mAP, a per-class table, a legend."""
    x, y = MARGIN + 10, MARGIN + 30
    canvas.text(x, y, fit_text(title, PAGE_WIDTH - 2 * x, 22, bold=True), size=22, bold=True)
    y += 26
    m = summary.metrics
    for key, value in summary_facts(summary):
        y += 15
        canvas.text(x, y, key, size=10, color="#555555")
        canvas.text(x + 110, y, fit_text(value, PAGE_WIDTH - x - 110 - MARGIN, 10), size=10)
    y += 28
    columns = ["class", "detections"] + (["labeled", "TP", "FP", "FN", "AP"] if m is not None else [])
    stops = [x, x + 200, x + 270, x + 330, x + 380, x + 430, x + 480]
    for stop, column in zip(stops, columns, strict=False):
        canvas.text(stop, y, column, size=9, bold=True)
    limit = 14
    for cid, name in enumerate(summary.class_names[:limit]):
        y += 14
        canvas.rect(x, y - 7.5, 8, 8, fill=class_color(cid))
        values = [fit_text(name, 185, 9), str(summary.detections_per_class[cid])]
        if m is not None and cid in m.per_class:
            stats = m.per_class[cid]
            values += [
                str(stats.n_gt),
                str(stats.tp),
                str(stats.fp),
                str(stats.fn),
                format_value(m.per_class_ap_voc07.get(cid)),
            ]
        for i, (stop, value) in enumerate(zip(stops, values, strict=False)):
            canvas.text(stop + (12 if i == 0 else 0), y, value, size=9)
    if len(summary.class_names) > limit:
        y += 14
        canvas.text(x, y, f"and {len(summary.class_names) - limit} more classes", size=9, color="#555555")
    y += 28
    canvas.text(x, y, "legend", size=9, bold=True)
    legend = [("detection: class score", (), "#1f77b4", "#1f77b4")]
    if m is not None:
        legend = [
            ("true positive (matches a labeled box)", (), "#1f77b4", "#1f77b4"),
            ("FP: false positive (dashed)", (3.5, 2), "#1f77b4", "#1f77b4"),
            ("FN: labeled box not found (dotted)", (1.2, 1.6), "#1f77b4", "#ffffff"),
        ]
    for text, dash, stroke, fill in legend:
        y += 16
        canvas.rect(x, y - 9, 22, 11, stroke=stroke, width=1.1, dash=dash)
        canvas.rect(x, y - 9, 4, 11, fill=fill, stroke=stroke, width=0.5)
        canvas.text(x + 30, y, text, size=9)
    if summary.skipped:
        y += 28
        canvas.text(x, y, f"unreadable images ({len(summary.skipped)})", size=9, bold=True)
        room = max(1, int((PAGE_HEIGHT - MARGIN - 20 - y) // 11))
        shown = summary.skipped[:room] if len(summary.skipped) <= room else summary.skipped[: room - 1]
        for name, reason in shown:
            y += 11
            canvas.text(
                x, y, fit_text(f"{name}: {reason}", PAGE_WIDTH - x - MARGIN, 7.5), size=7.5, color="#8b2430"
            )
        if len(shown) < len(summary.skipped):
            y += 11
            canvas.text(x, y, f"and {len(summary.skipped) - len(shown)} more", size=7.5, color="#8b2430")
