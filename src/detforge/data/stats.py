"""``detforge stats``: what a set of labeled inputs holds, in one streaming pass.

Counts per class (by name) and per job, images without boxes, the most boxes on one image (training's
``label_width`` must be at least 2 + 5 x it, SageMaker's count of label values), and a summary of box
sizes (min / quartiles / max of width, height and area fraction), and duplicates by ``prepare``'s rule
(``identity.DuplicateRule``: the same image path listed again, the same bytes under another path), so
``distinct_images`` is what ``prepare`` keeps before discards and the split. Not here: changing labels
(``prepare``).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from detforge import boxes as box_ops
from detforge.data.groundtruth import ReadReport, resolve_source_ref
from detforge.data.identity import DuplicateRule
from detforge.data.sources import read_source


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    q = np.percentile(np.asarray(values, dtype=np.float64), [0, 25, 50, 75, 100])
    return {
        "min": float(q[0]),
        "p25": float(q[1]),
        "median": float(q[2]),
        "p75": float(q[3]),
        "max": float(q[4]),
    }


def manifest_stats(
    manifests: list[str],
    *,
    label_attribute: str | None = None,
    images_dir: str | None = None,
    on_error: str = "stop",
    content: bool = True,
) -> dict:
    """Figures of labeled inputs as a JSON-ready dict (keys: images, boxes, per_class, per_job, ...).

    Inputs are anything ``prepare`` reads (manifests, YOLO, VOC, COCO), through the same readers and
    with the same ``on_error`` treatment; skipped lines/images and boxes are listed under ``skipped``.
    ``content``: also compare local images' bytes (off: paths only), as ``prepare --no-content-checks``.
    """
    rule = DuplicateRule(content=content)
    duplicates = {"same image": 0, "same content": 0}
    duplicate_examples: list[str] = []
    report = ReadReport()
    per_class: Counter = Counter()
    per_job: Counter = Counter()
    per_manifest: dict[str, int] = {}
    widths, heights, areas = [], [], []
    images = empty = max_boxes = 0
    for path in manifests:
        path = os.fspath(path)
        per_manifest[path] = 0
        _, _, records = read_source(
            path, images=images_dir, label_attribute=label_attribute, on_error=on_error, report=report
        )
        for record in records:
            images += 1
            per_manifest[path] += 1
            origin = record.origin or f"{path}:{per_manifest[path]}"
            found = rule.check(resolve_source_ref(record.source_ref, path), origin)
            if found is not None:
                duplicates[found[0]] += 1
                duplicate_examples.append(f"{origin} is the {found[0]} as {found[1]}")
            per_job[record.job_name or ""] += 1
            n = len(record.class_ids)
            empty += n == 0
            max_boxes = max(max_boxes, n)
            per_class.update(record.class_names)
            ltwh = box_ops.xyxy_to_ltwh(record.boxes)
            widths.extend(ltwh[:, 2].tolist())
            heights.extend(ltwh[:, 3].tolist())
            areas.extend((box_ops.area_xyxy(record.boxes) / (record.width * record.height)).tolist())
    return {
        "images": images,
        "distinct_images": images - sum(duplicates.values()),
        "duplicates": duplicates,
        "duplicate_examples": duplicate_examples[:20],
        "boxes": int(sum(per_class.values())),
        "empty_images": empty,
        "max_boxes_per_image": max_boxes,
        "per_class": dict(sorted(per_class.items())),
        "per_job": dict(sorted(per_job.items())),
        "per_manifest": per_manifest,
        "box_width": _summary(widths),
        "box_height": _summary(heights),
        "box_area_fraction": _summary(areas),
        "skipped": [message for _, _, message in report.skipped] + list(report.skipped_boxes),
    }


def format_stats(stats: dict) -> str:
    """The figures as a few readable lines."""
    lines = [
        f"{stats['images']} images, {stats['boxes']} boxes, {stats['empty_images']} without boxes, "
        f"at most {stats['max_boxes_per_image']} boxes on one image"
    ]
    if sum(stats["duplicates"].values()):
        lines.append(
            f"  duplicates (as prepare counts them): {stats['duplicates']['same image']} the same "
            f"image listed again, {stats['duplicates']['same content']} the same bytes under "
            f"another path; {stats['distinct_images']} distinct images"
        )
        lines += [f"    {example}" for example in stats["duplicate_examples"][:10]]
    lines += [f"  class {name}: {count} boxes" for name, count in stats["per_class"].items()]
    lines += [f"  job {name or '(none)'}: {count} images" for name, count in stats["per_job"].items()]
    lines += [f"  skipped: {message}" for message in stats.get("skipped", [])]
    for key in ("box_width", "box_height", "box_area_fraction"):
        s = stats[key]
        if s:
            lines.append(
                f"  {key}: min {s['min']:.4g}, median {s['median']:.4g}, max {s['max']:.4g} "
                f"(p25 {s['p25']:.4g}, p75 {s['p75']:.4g})"
            )
    return "\n".join(lines)
