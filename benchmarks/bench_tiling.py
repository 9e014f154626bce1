"""Tiled inference on real photos: one trained deploy folder scored whole-image vs tiled, with its cost.

The deploy folder (default: the ``gfl`` model ``bench_realdata.py`` leaves in
``/tmp/detforge-bench-realdata/deploy/gfl``, trained on Aquarium, Roboflow, CC BY 4.0) is run by the
torch-free runtime (``detforge.runtime.Predictor``) on Aquarium ``valid`` and ``test`` at the photos'
own size:
- whole photos (the baseline: each photo resized to the model's input, as ``detforge predict`` without tiles);
- tiled, for each ``--tiles`` size at ``--overlap``, with the whole-photo pass, and the first size without it.
Scored by pycocotools through ``detforge.evaluation.evaluate`` (COCO AP50-95, AP50, AP small / medium /
large).

Cost: CPU milliseconds per photo of ``Predictor.predict`` (resizing, the ONNX graph on every window, merging)
on one core, one thread, median of ``--runs`` over the first valid photos decoded beforehand, as a ratio to
whole photos in the same run; and the same on 1920 x 1080 frames (those photos resized: an edge camera's frame
size), with frames per second, so the tile size that keeps an edge device at >= 5 frames/s can be read off.

Also draws one valid photo's detections whole vs tiled side by side into ``--picture``.

    python benchmarks/bench_tiling.py                      # after bench_realdata.py has trained gfl
    python benchmarks/bench_tiling.py --deploy DIR --tiles 320,512,640 \\
        --picture docs/images/tiling-aquarium.jpg

Writes ``benchmarks/results/tiling.json``. Without the deploy folder it says so and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_realdata import convert  # noqa: E402
from common import write_result  # noqa: E402

DEFAULT_DEPLOY = Path("/tmp/detforge-bench-realdata/deploy/gfl")
CREDIT = "Roboflow Aquarium, CC BY 4.0"


def score(deploy: Path, manifest: Path, setting: dict) -> dict:
    """COCO figures of the deploy folder on ``manifest`` with ``setting`` (Predictor's tiling options)."""
    from detforge.evaluation.evaluate import evaluate

    result = evaluate(
        str(deploy),
        str(manifest),
        coco=True,
        tile=setting["tile"],
        overlap=setting.get("overlap"),
        tile_full_pass=setting.get("full_pass"),
    )
    return {
        k: (None if result.coco.get(k) is None else round(float(result.coco[k]), 4))
        for k in ("AP", "AP50", "APs", "APm", "APl")
    }


def latency_ms(predictor, photos: list[np.ndarray], runs: int) -> float:
    """Median CPU milliseconds (this process, one ONNX Runtime thread) of one ``predict`` call per photo,
    after warm-ups: on a machine shared with other work, the time a dedicated core would take; wall-clock
    time there measures the neighbours."""
    for photo in photos[:2]:
        predictor.predict([photo])
    times = []
    for i in range(runs):
        photo = photos[i % len(photos)]
        started = time.process_time()
        predictor.predict([photo])
        times.append(time.process_time() - started)
    return 1000 * float(np.median(times))


def draw(photo: np.ndarray, found, label: str):
    from PIL import Image, ImageDraw

    image = Image.fromarray(photo)
    pen = ImageDraw.Draw(image)
    for box in found.boxes_xyxy.tolist():
        pen.rectangle(box, outline=(255, 60, 60), width=3)
    pen.rectangle([0, 0, 12 + 11 * len(label), 34], fill=(0, 0, 0))
    pen.text((8, 8), label, fill=(255, 255, 255))
    return image


def picture(deploy: Path, photo_path: str, setting: dict, out: Path) -> None:
    """The photo with the whole-image detections (left) and the tiled ones (right), credit below."""
    from PIL import Image, ImageDraw

    from detforge import images
    from detforge.runtime import Predictor

    photo = images.read(photo_path)
    whole = Predictor(deploy, threads=1, tile=0)
    tiled = Predictor(
        deploy, threads=1, tile=setting["tile"], overlap=setting["overlap"], full_pass=setting["full_pass"]
    )
    plain = whole.predict([photo])[0]
    left = draw(photo, plain, f"whole photo at {whole.input_size} px: {len(plain)} boxes")
    found = tiled.predict([photo])[0]
    right = draw(
        photo,
        found,
        f"{setting['tile']} px tiles, overlap {setting['overlap']:g} + full pass: {len(found)} boxes",
    )
    width, height = left.size
    sheet = Image.new("RGB", (2 * width + 16, height + 30), (255, 255, 255))
    sheet.paste(left, (0, 0))
    sheet.paste(right, (width + 16, 0))
    ImageDraw.Draw(sheet).text(
        (8, height + 8),
        f"{Path(photo_path).name} ({CREDIT}); boxes scoring >= {whole.threshold:g}",
        fill=(0, 0, 0),
    )
    scale = min(1.0, 1800 / sheet.width)
    sheet = sheet.resize((round(sheet.width * scale), round(sheet.height * scale)), Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=85)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploy", type=Path, default=DEFAULT_DEPLOY)
    parser.add_argument("--dataset", default="aquarium", help="the bench_realdata dataset it was trained on")
    parser.add_argument("--tiles", default="320,512,640", help="tile sizes (photo pixels), comma-separated")
    parser.add_argument("--overlap", type=float, default=0.2)
    parser.add_argument("--name", default="tiling", help="the result's name (benchmarks/results/NAME.json)")
    parser.add_argument("--latency-only", action="store_true", help="time the settings, score none (quick)")
    parser.add_argument("--runs", type=int, default=20, help="timed predict calls per setting")
    parser.add_argument("--work", type=Path, default=Path("/tmp/detforge-bench-tiling"))
    parser.add_argument("--core", type=int, default=0, help="the core the timing runs on")
    parser.add_argument("--picture", type=Path, default=None, help="also draw one photo whole vs tiled here")
    parser.add_argument(
        "--photo",
        default="",
        help="the photo to draw (default: the valid photo with most small labeled objects)",
    )
    args = parser.parse_args()
    if not (args.deploy / "model.json").exists():
        print(f"no deploy folder at {args.deploy}: run benchmarks/bench_realdata.py first (or pass --deploy)")
        return
    import json

    from detforge import images
    from detforge.data.groundtruth import read_manifest
    from detforge.runtime import Predictor

    manifests = convert(args.work, args.dataset)
    tiles = [int(t) for t in args.tiles.split(",") if t.strip()]
    settings = [{"name": "whole photo", "tile": 0}]
    settings += [{"name": f"tiles {t}", "tile": t, "overlap": args.overlap, "full_pass": True} for t in tiles]
    settings.append(
        {
            "name": f"tiles {tiles[0]}, no full pass",
            "tile": tiles[0],
            "overlap": args.overlap,
            "full_pass": False,
        }
    )
    rows = []
    for setting in settings:
        row = {"setting": setting["name"]}
        for split, short in () if args.latency_only else (("validation", "valid"), ("test", "test")):
            for key, value in score(args.deploy, manifests[split], setting).items():
                row[f"{short} {key}"] = value
        rows.append(row)
        print(row, flush=True)
    # timing: one core, one thread, photos decoded beforehand
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core % os.cpu_count()})
    records = list(read_manifest(str(manifests["validation"])))
    sources = [r.source_ref for r in records]
    photos = [images.read(s) for s in sources[:10]]
    from PIL import Image

    frames = [np.asarray(Image.fromarray(p).resize((1920, 1080), Image.BILINEAR)) for p in photos]
    base = {}
    for row, setting in zip(rows, settings, strict=True):
        predictor = Predictor(
            args.deploy,
            threads=1,
            tile=setting["tile"],
            overlap=setting.get("overlap"),
            full_pass=setting.get("full_pass"),
        )
        for what, batch in (("photo", photos), ("1080p", frames)):
            ms = latency_ms(predictor, batch, args.runs)
            base.setdefault(what, ms)
            row[f"model inputs per {what}"] = predictor.work(batch[0])
            row[f"ms per {what}"] = round(ms, 1)
            row[f"x whole ({what})"] = round(ms / base[what], 2)
        row["1080p frames/s"] = round(1000 / row["ms per 1080p"], 1)
        print(row, flush=True)
    if args.latency_only:
        write_result(
            args.name,
            title=f"Tiled inference on {args.dataset}: cost per photo and 1080p frame",
            rows=rows,
            summary="; ".join(
                f"{r['setting']}: {r['x whole (photo)']}x per photo, {r['1080p frames/s']} 1080p frames/s"
                for r in rows
            ),
        )
        return
    whole, best = rows[0], max(rows[1:], key=lambda r: r["valid APs"] or 0)
    edge = [r for r in rows[1:] if r["1080p frames/s"] >= 5]
    summary = (
        f"{best['setting']}: valid AP small {best['valid APs']} vs {whole['valid APs']} whole "
        f"(AP50-95 {best['valid AP']} vs {whole['valid AP']}; test AP small {best['test APs']} vs "
        f"{whole['test APs']}), {best['x whole (photo)']}x the time per photo; "
        + (
            f"{edge[-1]['setting']} keeps {edge[-1]['1080p frames/s']} 1080p frames/s on one core"
            if edge
            else "no tiling keeps 5 frames/s at 1080p on one core"
        )
    )
    model_name = json.loads((args.deploy / "model.json").read_text()).get("name")
    notes = (
        f"Deploy folder {args.deploy} ({model_name}); {CREDIT}. Timing: one core, one thread, median "
        f"of {args.runs} predict calls on the first 10 valid photos (1024 px), and on the same photos "
        "resized to 1920 x 1080."
    )
    title = f"Tiled inference on {args.dataset} (one model, whole photo vs tiles)"
    write_result(args.name, title=title, rows=rows, summary=summary, notes=notes)
    if args.picture is not None:
        photo = args.photo
        if not photo:
            from detforge.boxes import area_xyxy

            small = [int((area_xyxy(r.boxes) < 32 * 32).sum()) for r in records]  # COCO's small
            photo = records[int(np.argmax(small))].source_ref
        setting = next(s for s in settings if s["tile"] == best_tile(rows, settings))
        picture(args.deploy, photo, setting, args.picture)


def best_tile(rows: list[dict], settings: list[dict]) -> int:
    """The tile size of the tiled setting (with a full pass) with the best valid AP small."""
    tiled = [(r, s) for r, s in zip(rows, settings, strict=True) if s["tile"] and s.get("full_pass")]
    return max(tiled, key=lambda rs: rs[0]["valid APs"] or 0)[1]["tile"]


if __name__ == "__main__":
    main()
