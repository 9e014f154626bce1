"""deploy.report: the streaming PDF (rendered by poppler) and the HTML gallery (driven in Chromium)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import need_binary
from PIL import Image

from detforge.deploy import report
from detforge.deploy.report import HtmlReport, ReportItem, ReportSummary
from detforge.deploy.report import pdf as report_pdf
from detforge.deploy.report.pdf import PdfReport
from detforge.evaluation.metrics import DetectionAccumulator

NAMES = ["blue box", "yellow box", "red (box)"]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def picture(i: int, width: int = 320, height: int = 240) -> np.ndarray:
    pixels = np.full((height, width, 3), 200, np.uint8)
    pixels[40:120, 40 + i : 140 + i] = (40, 70, 210)
    return pixels


def make_items(count: int, *, truth: bool) -> list[ReportItem]:
    """``count`` items: image i has detections (0, 0.9), (1, 0.6) and (2, 0.35); every fifth has none."""
    items = []
    for i in range(count):
        empty = i % 5 == 4
        boxes = (
            np.zeros((0, 4))
            if empty
            else np.array([[0.1, 0.15, 0.45, 0.5], [0.5, 0.5, 0.9, 0.95], [0.0, 0.0, 0.2, 0.1]])
        )
        scores = np.zeros(0) if empty else np.array([0.9, 0.6, 0.35])
        classes = np.zeros(0, np.int64) if empty else np.array([0, 1, 2])
        item = ReportItem(
            name=f"img_{i:03d}.jpg",
            source_ref=f"s3://bucket/img_{i:03d}.jpg",
            thumbnail=report.make_thumbnail(picture(i)),
            boxes=boxes,
            scores=scores,
            class_ids=classes,
        )
        if truth:
            item.is_tp = np.array([True, False, False])[: len(scores)]
            item.missed_boxes = np.array([[0.6, 0.1, 0.8, 0.3]])
            item.missed_class_ids = np.array([1])
        items.append(item)
    return items


def make_summary(items: list[ReportItem], *, truth: bool, skipped=()) -> ReportSummary:
    metrics = None
    if truth:
        acc = DetectionAccumulator(len(NAMES), score_threshold=0.3)
        acc.update(
            gt_boxes=[[0, 0, 10, 10]],
            gt_classes=[0],
            pred_boxes=[[0, 0, 10, 10]],
            pred_scores=[0.9],
            pred_classes=[0],
        )
        metrics = acc.compute()
    per_class = [sum(int(np.count_nonzero(it.class_ids == c)) for it in items) for c in range(len(NAMES))]
    return ReportSummary(
        class_names=NAMES,
        model_name="boxes",
        threshold=0.3,
        images=len(items),
        detections_per_class=per_class,
        source_run="runs/boxes",
        input_size=320,
        validation_map=0.8125,
        metrics=metrics,
        images_with_truth=len(items) if truth else 0,
        skipped=list(skipped),
    )


def write_pdf(path: Path, items, summary) -> None:
    with PdfReport(str(path), class_names=NAMES, title="detforge predict: boxes") as pdf:
        for item in items:
            pdf.add(item)
        pdf.finish(summary)


def render(pdf: Path, tmp_path: Path) -> list[np.ndarray]:
    """Every page as an RGB array (pdftoppm at 50 dpi); poppler must not complain."""
    binary = need_binary("pdftoppm")
    done = subprocess.run(
        [binary, "-png", "-r", "50", str(pdf), str(tmp_path / "page")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stderr == ""
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(tmp_path.glob("page-*.png"))]


# ----------------------------------------------------------------------------- pieces


def test_thumbnail_is_a_small_jpeg():
    thumb = report.make_thumbnail(np.zeros((1080, 1920, 3), np.uint8), side=400)
    assert (thumb.width, thumb.height) == (400, 225) and thumb.jpeg[:2] == b"\xff\xd8"
    small = report.make_thumbnail(np.zeros((60, 80, 3), np.uint8), side=400)
    assert (small.width, small.height) == (80, 60)  # never enlarged


def test_text_width_and_fit():
    assert report_pdf.text_width("ii", 10) == pytest.approx(4.44)  # 222/1000 em each, Helvetica
    assert report_pdf.text_width("W", 10, bold=True) == pytest.approx(9.44)
    cut = report_pdf.fit_text("a_very_long_image_name_000123.jpg", 60, 8)
    assert cut.endswith("\u2026") and report_pdf.text_width(cut, 8) <= 60
    assert report_pdf.fit_text("short", 60, 8) == "short"


def test_class_colors_are_distinct():
    colors = [report.class_color(c) for c in range(40)]
    assert colors[:2] == ["#1f77b4", "#ff7f0e"] and len(set(colors)) == 40
    assert all(len(c) == 7 and c[0] == "#" for c in colors)


# ----------------------------------------------------------------------------- PDF


def test_pdf_pages_render_and_are_not_blank(tmp_path):
    items = make_items(13, truth=True)
    pdf = tmp_path / "report.pdf"
    write_pdf(pdf, items, make_summary(items, truth=True, skipped=[("bad.jpg", "cannot decode the image")]))
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-1.4") and data.rstrip().endswith(b"%%EOF")
    assert data.count(b"/Type /Page ") == 3  # title + 12 + 1
    pages = render(pdf, tmp_path)
    assert len(pages) == 3
    for page in pages:
        assert page.shape[1] > page.shape[0]  # landscape
        assert (page < 250).any(axis=2).mean() > 0.01  # something is drawn
    title, full, last = pages
    # the grid page holds 12 thumbnails (grey 200) and boxes in class colours
    blue = np.all(np.abs(full.astype(int) - (31, 119, 180)) < 40, axis=2)
    assert blue.sum() > 100
    assert (np.abs(full.astype(int) - 200).max(axis=2) < 6).mean() > 0.2  # the thumbnails' grey
    # the last page has one thumbnail: far less ink than a full page
    ink = [(p < 240).any(axis=2).mean() for p in pages]
    assert ink[2] < ink[1] / 4


def test_pdf_cross_reference_table_is_exact(tmp_path):
    """Every xref entry points at its object, so strict readers need no repair."""
    items = make_items(14, truth=False)
    pdf = tmp_path / "r.pdf"
    write_pdf(pdf, items, make_summary(items, truth=False))
    data = pdf.read_bytes()
    start = int(data.rsplit(b"startxref", 1)[1].split()[0])
    assert data[start : start + 4] == b"xref"
    rows = data[start:].split(b"trailer")[0].splitlines()
    count = int(rows[1].split()[1])
    entries = rows[3 : 3 + count - 1]
    assert len(entries) == count - 1 and all(len(row) == 19 for row in entries)  # + "\n": 20 bytes
    for number, row in enumerate(entries, start=1):
        offset = int(row[:10])
        assert data[offset:].startswith(b"%d 0 obj\n" % number)
    trailer = data[start:].split(b"trailer", 1)[1]
    assert b"/Size %d" % count in trailer


def test_pdf_text_is_there(tmp_path):
    pdftotext = need_binary("pdftotext")
    items = make_items(3, truth=False)
    pdf = tmp_path / "r.pdf"
    write_pdf(pdf, items, make_summary(items, truth=False, skipped=[("bad (1).jpg", "cannot decode")]))
    text = subprocess.run(
        [pdftotext, "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    pages = text.split("\f")
    assert "detforge predict: boxes" in pages[0] and "0.812" in pages[0] and "runs/boxes" in pages[0]
    assert "3 predicted, 1 unreadable (skipped)" in pages[0] and "bad (1).jpg: cannot decode" in pages[0]
    assert "red (box)" in pages[0] and "page 1 of 2" in pages[0]
    assert "mAP of this batch" not in pages[0]  # no ground truth
    assert "img_000.jpg" in pages[1] and "blue box 0.90" in pages[1] and "page 2 of 2" in pages[1]
    assert "3 detections, best 0.90" in pages[1]


def test_pdf_with_truth_marks_fp_and_fn(tmp_path):
    pdftotext = need_binary("pdftotext")
    items = make_items(2, truth=True)
    pdf = tmp_path / "r.pdf"
    write_pdf(pdf, items, make_summary(items, truth=True))
    text = subprocess.run([pdftotext, str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    assert "mAP of this batch" in text and "1.000" in text
    assert "FP yellow box 0.60" in text and "FN yellow box" in text
    assert "TP 1 FP 2 FN 1" in " ".join(text.split())


def test_pdf_left_unfinished_or_failed_leaves_no_file(tmp_path):
    target = tmp_path / "r.pdf"
    with pytest.raises(ValueError), PdfReport(str(target), class_names=NAMES) as pdf:
        for item in make_items(13, truth=False):
            pdf.add(item)
        raise ValueError("stop")
    with PdfReport(str(target), class_names=NAMES):
        pass
    assert list(tmp_path.iterdir()) == []


def test_pdf_memory_stays_flat(tmp_path):
    """Pages go to the file as they fill: nothing of an item is kept once its page is written."""
    items = make_items(12, truth=False)
    with PdfReport(str(tmp_path / "r.pdf"), class_names=NAMES) as pdf:
        sizes = []
        for _ in range(5):
            for item in items:
                pdf.add(item)
            assert pdf.pending == []
            sizes.append(pdf._pdf.position)
        pdf.finish(make_summary(items, truth=False))
    steps = np.diff(sizes)
    assert steps.min() > 12 * len(items[0].thumbnail.jpeg)  # each page's JPEGs were written...
    assert steps.max() - steps.min() < 200  # ...and every page costs the same


# ----------------------------------------------------------------------------- HTML


def write_html(path: Path, items, summary) -> str:
    with HtmlReport(str(path), class_names=NAMES) as page:
        for item in items:
            page.add(item)
        page.finish(summary)
    return path.read_text(encoding="utf-8")


def test_html_is_one_self_contained_file(tmp_path):
    items = make_items(6, truth=False)
    items[0].name = "<script>alert(1)</script>.jpg"
    summary = make_summary(items, truth=False, skipped=[("x{{FACTS}}.jpg", "cannot decode")])
    text = write_html(tmp_path / "r.html", items, summary)
    assert text.count('<figure class="item"') == 6 and text.count("data:image/jpeg;base64,") == 6
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    assert "x{{FACTS}}.jpg" in text  # placeholders are filled in one pass
    assert "http://" not in text and "https://" not in text and 'src="/' not in text
    assert list(tmp_path.iterdir()) == [tmp_path / "r.html"]


def test_html_filters_in_chromium(tmp_path, chromium_path):
    from playwright.sync_api import sync_playwright

    items = make_items(10, truth=True)  # items 4 and 9 have no detections (but a missed box)
    items.append(
        ReportItem(
            name="nothing.jpg",
            source_ref="nothing.jpg",
            thumbnail=report.make_thumbnail(picture(0)),
            boxes=np.zeros((0, 4)),
            scores=np.zeros(0),
            class_ids=np.zeros(0, np.int64),
        )
    )
    path = tmp_path / "r.html"
    write_html(path, items, make_summary(items, truth=True))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            requests: list[str] = []
            page.on("request", lambda req: requests.append(req.url))
            page.goto(path.as_uri())
            visible = "figure.item:not([hidden])"
            assert page.locator(visible).count() == 11
            assert page.locator("#shown").inner_text() == "11 of 11 images"
            # every picture decoded and the boxes drawn over it
            assert page.locator("figure.item img").evaluate_all(
                "els => els.every(e => e.naturalWidth === 320)"
            )
            assert page.locator("figure.item").first.locator("g.box").count() == 4
            rect = page.locator("figure.item").first.locator("g.box.tp rect").bounding_box()
            pic = page.locator("figure.item .pic").first.bounding_box()
            assert rect["x"] == pytest.approx(pic["x"] + 0.1 * pic["width"], abs=2)
            assert rect["width"] == pytest.approx(0.35 * pic["width"], abs=2)

            # the score slider: at 0.95 no detection is left; images keep their missed boxes only
            page.locator("#min-score").fill("0.95")
            assert page.locator("#min-score-value").inner_text() == "0.95"
            assert page.locator("figure.item g.box.tp:not(.off)").count() == 0
            page.locator("#show-fn").uncheck()
            assert page.locator(visible).count() == 1  # only the image without any box (show-empty)
            page.locator("#show-empty").uncheck()
            assert page.locator(visible).count() == 0
            assert page.locator("#shown").inner_text() == "0 of 11 images"
            page.locator("#show-empty").check()
            page.locator("#show-fn").check()

            # at 0.5 the 0.9 and 0.6 detections are shown, the 0.35 one hidden
            page.locator("#min-score").fill("0.5")
            first = page.locator("figure.item").first
            assert first.locator("g.box:not(.off)").count() == 3
            assert first.locator("g.box.off").get_attribute("data-c") == "2"

            # class filter: only "red (box)" checked -> its 0.35 detections are below 0.5: only missed?
            page.locator("#min-score").fill("0.3")
            for cid in ("0", "1"):
                page.locator(f".class-filter[value='{cid}']").uncheck()
            # images with a red detection (8) + the empty one; missed boxes are yellow (unchecked)
            assert page.locator(visible).count() == 9
            assert page.locator("figure.item g.box:not(.off)").evaluate_all(
                "els => [...new Set(els.map(e => e.dataset.c))]"
            ) == ["2"]
            page.locator("#show-fp").uncheck()  # the red detections are false positives
            assert page.locator(visible).count() == 1
            page.locator(".class-filter[value='0']").check()
            page.locator("#show-fp").check()
            assert page.locator(visible).count() == 9
            # clicking a picture enlarges it
            page.locator("figure.item .pic").first.click()
            assert page.locator("figure.item.big").count() == 1
            assert errors == []
            assert all(r.startswith(("file://", "data:")) for r in requests)
        finally:
            browser.close()
