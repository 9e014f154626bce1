"""Detectors on real photos: detforge's ``gfl`` vs Ultralytics YOLO11n / YOLO26n vs constant boxes.

Data (``--dataset``), both in Ultralytics layout beside the checkout:
- ``aquarium``: ``../shared/data/aquarium`` (Roboflow's "Aquarium Combined" raw-1024, CC BY 4.0,
  https://roboflow.com; 638 photos, 7 classes);
- ``pear640``: ``../shared/data/pear640`` (712 640 px crops of 59 orchard photos, one class, ~12 crowded pears
  each, CC BY 4.0; its ``data.yaml`` lists splits by source photo, so no photo's crops are on two sides).
This script converts the layout itself into Ground Truth manifests (train / valid / test) in its work folder,
independent of detforge's YOLO importer, so that the ground truth the models are scored on does not depend on
code under test (boxes under 1 px are dropped).

Models, all trained AT THE SAME TIME (each in its own process pinned to its own core when there are enough
cores, one thread each), from scratch, for the same wall-clock budget:
- ``gfl``: detforge with ``recipes/cpu-small-data.json`` as shipped (its own ``image_shape``,
  ``validation_interval`` and NMS threshold; ``max_train_minutes`` = the budget); any other name with
  ``--recipe NAME=FILE`` trains that recipe file (an A/B of two recipes in one run);
- ``yolo11n`` / ``yolo26n``: Ultralytics' nano models from ``yolo11n.yaml`` / ``yolo26n.yaml`` with ``time=``
  the budget at ``--image-size``, their defaults otherwise, run by the Python of ``--yolo-venv`` (a throwaway
  venv: ``python -m venv /tmp/yolo-venv && /tmp/yolo-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
  ultralytics==8.4.190 onnx``) -- measuring sticks, never imported here (YOLO26n is NMS-free: scored the
  same way);
- ``ssd`` (optional, ``--models``): SSDLite-MobileNetV3 with the demo's Adam recipe;
- ``const``: the constant-box baseline, the k-means boxes of each class of the training set on every
  image (normalised to the image), scored by the cluster's share.
The final models are scored by pycocotools on ``valid`` and ``test`` at the photos' own resolution: COCO
AP50-95, AP50, AP small / medium / large, per-class AP50-95. The curve of AP50-95 on ``valid`` against
training time: gfl's validation during training (pycocotools), the peers' epoch checkpoints (up to 12, EMA
weights) scored afterwards the same way; plotted into ``benchmarks/results/<name>_curve.png``. ONNX
Runtime latency: each exported model at its own input size, batch 1, the same thread count, timed once every
model is trained and scored, one after the other on one core (detforge's graph has decoding and NMS inside,
the peers' not).

    python benchmarks/bench_realdata.py --budget-minutes 90 --yolo-venv /tmp/yolo-venv   # the measured run
    python benchmarks/bench_realdata.py --dataset pear640 --budget-minutes 30 --models const,gfl,yolo26n \\
        --yolo-venv /tmp/yolo-venv
    python benchmarks/bench_realdata.py --quick    # `make bench`: 2 minutes, gfl + constant boxes, no claims

Writes ``benchmarks/results/realdata.json`` (``--dataset pear640``: ``realdata_pear640.json``; ``--name``
chooses; ``--quick``: ``realdata_quick.json``); ``run_all.py --render`` puts it into RESULTS.md and the
README.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _shared(name: str) -> Path:
    """``../shared/data/<name>`` beside the main checkout (from a worktree under ../wt/<x>, one level up)."""
    candidates = (ROOT.parent / "shared" / "data" / name, ROOT.parents[1] / "shared" / "data" / name)
    return next((p for p in candidates if p.exists()), candidates[0])


# Each set: its folder, how a split lists its photos (a folder of images, or an Ultralytics list file),
# and the credit its licence asks for wherever a figure of it is shown.
DATASETS = {
    "aquarium": {
        "root": _shared("aquarium"),
        "splits": {"train": "train", "validation": "valid", "test": "test"},
        "credit": "Roboflow Aquarium, CC BY 4.0 (https://roboflow.com)",
    },
    "pear640": {
        "root": _shared("pear640"),
        "splits": {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"},
        "credit": "Pear640 (CC BY 4.0; see ../shared/data/pear640/README.md)",
    },
}
SHORT = {"validation": "val", "test": "test"}
PEERS = ("yolo11n", "yolo26n")  # Ultralytics nano models, from their .yaml (from scratch)


def split_images(dataset: str, split: str) -> list[Path]:
    """The photos of one split: every file of ``<split>/images`` or the lines of an Ultralytics list file."""
    spec = DATASETS[dataset]
    entry = spec["root"] / spec["splits"][split]
    if entry.is_dir():
        return sorted((entry / "images").iterdir())
    lines = [line.strip() for line in entry.read_text().splitlines()]
    return [(spec["root"] / line).resolve() for line in lines if line]


def label_file(image_path: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, suffix ``.txt``."""
    parts = list(image_path.parts)
    i = len(parts) - 1 - parts[::-1].index("images")
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def convert(work: Path, dataset: str = "aquarium") -> dict[str, Path]:
    """The YOLO layout -> Ground Truth manifests (absolute image paths) + classes.json, in ``work``."""
    from PIL import Image

    from detforge.data.groundtruth import make_record, write_manifest

    names = _yaml_names(DATASETS[dataset]["root"] / "data.yaml")
    work.mkdir(parents=True, exist_ok=True)
    (work / "classes.json").write_text(json.dumps(names))
    out = {}
    for split in DATASETS[dataset]["splits"]:
        records = []
        for image_path in split_images(dataset, split):
            with Image.open(image_path) as im:
                width, height = im.size
            label = label_file(image_path)
            boxes, ids = [], []
            for line in label.read_text().splitlines() if label.exists() else []:
                if not line.strip():
                    continue
                c, cx, cy, w, h = line.split()[:5]
                cx, cy, w, h = float(cx) * width, float(cy) * height, float(w) * width, float(h) * height
                x1, y1 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
                x2, y2 = min(float(width), cx + w / 2), min(float(height), cy + h / 2)
                if x2 - x1 >= 1 and y2 - y1 >= 1:
                    boxes.append([x1, y1, x2, y2])
                    ids.append(int(c))
            records.append(
                make_record(
                    str(image_path),
                    width=width,
                    height=height,
                    boxes_xyxy=np.array(boxes, dtype=np.float64).reshape(-1, 4),
                    class_ids=ids,
                    class_map=dict(enumerate(names)),
                    creation_date="2020-11-18T19:55:00",
                )
            )
        path = work / f"{split}.manifest"
        write_manifest(path, records)
        out[split] = path
    return out


def _yaml_names(path: Path) -> list[str]:
    """``names:`` of an Ultralytics data.yaml, as a flow list (``[a, b]``) or an ``id: name`` block."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("names:"):
            inline = line.split(":", 1)[1].strip()
            if inline:
                return [n.strip().strip("'\"") for n in inline.strip("[]").split(",")]
            block = {}
            for item in lines[i + 1 :]:
                if not item.startswith((" ", "\t")) or ":" not in item:
                    break
                key, value = item.split(":", 1)
                block[int(key.strip())] = value.strip().strip("'\"")
            return [block[k] for k in sorted(block)]
    raise ValueError(f"no names in {path}")


def _records(manifest: Path):
    from detforge.data.groundtruth import read_manifest

    return list(read_manifest(manifest))


def constant_boxes(train_records, *, k: int = 5, seed: int = 0):
    """Per class, k-means (k boxes) of normalised (x1, y1, x2, y2): ``[(box_norm, score, class_id)]``."""
    rng = np.random.default_rng(seed)
    rows = []
    total = sum(len(r.boxes) for r in train_records)
    for c in sorted({int(c) for r in train_records for c in r.class_ids}):
        pts = np.concatenate(
            [r.boxes[r.class_ids == c] / np.array([r.width, r.height] * 2) for r in train_records]
        )
        centres = pts[rng.choice(len(pts), min(k, len(pts)), replace=False)]
        for _ in range(50):
            nearest = ((pts[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
            centres = np.stack(
                [
                    pts[nearest == j].mean(0) if np.any(nearest == j) else centres[j]
                    for j in range(len(centres))
                ]
            )
        nearest = ((pts[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        for j, centre in enumerate(centres):
            rows.append((centre, float((nearest == j).sum()) / total, c))
    return rows


def predict_constant(rows, records):
    out = []
    for r in records:
        boxes = np.stack([b * np.array([r.width, r.height] * 2) for b, _, _ in rows])
        out.append((boxes, np.array([s for _, s, _ in rows]), np.array([c for _, _, c in rows])))
    return out


def predict_model(model, records, *, image_size: int, batch: int = 8):
    """Detections of a detforge model on each record's photo, in that photo's pixels: ``evaluate``'s
    ``torch_detector`` (each photo resized by ``images.resize_rgb``, antialiased, as in training and the
    runtime; boxes scaled back). (Handing the model the full-size photo instead let it downscale without
    antialiasing, which it never saw in training: 0.156 instead of 0.169 AP50-95 on ``valid`` for the
    90-minute run of 2026-12-01.)"""
    from detforge import images
    from detforge.evaluation.evaluate import torch_detector

    run = torch_detector(model, image_size)
    out = []
    for start in range(0, len(records), batch):
        out += run([images.read(r.source_ref) for r in records[start : start + batch]])
    return out


YOLO_SCRIPT = """
import csv, json, sys
from pathlib import Path
from ultralytics import YOLO
cfg = json.load(open(sys.argv[1]))
model = YOLO(cfg["arch"] + ".yaml")
model.train(data=cfg["data"], imgsz=cfg["imgsz"], epochs=300, time=cfg["hours"], batch=cfg["batch"],
            workers=0, device="cpu", plots=False, pretrained=False, amp=False, seed=0, save_period=1,
            project=cfg["project"], name=cfg["arch"], exist_ok=True, verbose=False)
weights = Path(cfg["project"]) / cfg["arch"] / "weights"
seconds = {int(float(row["epoch"])): float(row["time"])
           for row in csv.DictReader(open(weights.parent / "results.csv"))}

def predict(path, images):
    m = YOLO(str(path))
    out = []
    for image in images:
        r = m.predict(source=image, imgsz=cfg["imgsz"], conf=0.001, max_det=100, device="cpu",
                      verbose=False)[0]
        out.append([r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), [int(c) for c in r.boxes.cls.tolist()]])
    return out

# the curve: up to `curve_points` epoch checkpoints (EMA weights, as last.pt), evenly spaced
epochs = sorted(int(p.stem[5:]) for p in weights.glob("epoch*.pt"))
step = max(1, -(-len(epochs) // cfg["curve_points"]))
chosen = sorted(set(epochs[::-1][::step]))
curve = [[seconds.get(e + 1), predict(weights / f"epoch{e}.pt", cfg["curve_images"])] for e in chosen]
json.dump({"final": predict(weights / "last.pt", cfg["images"]), "curve": curve, "epochs": len(seconds)},
          open(cfg["predictions"], "w"))
try:
    YOLO(str(weights / "last.pt")).export(format="onnx", imgsz=cfg["imgsz"])
except Exception as exc:  # no onnx package in the venv: no latency figure
    print("YOLO ONNX export failed:", exc)
"""


def run_yolo(
    venv: Path,
    work: Path,
    *,
    arch: str,
    dataset: str,
    budget_minutes: float,
    imgsz: int,
    records_by_split: dict,
    curve_points: int = 12,
) -> dict:
    """An Ultralytics nano model (``arch``: yolo11n, yolo26n) from scratch in its own venv (a measuring
    stick; never imported by detforge):
    train for the budget with its ``time=`` (its defaults otherwise: AdamW chosen by 'auto', mosaic off
    for the last 10 epochs, EMA, validation every epoch), keeping every epoch's checkpoint; then predict
    every evaluation image with the last one, and the validation images with up to ``curve_points``
    epoch checkpoints (the curve), and export ONNX."""
    import subprocess

    yaml = work / f"{arch}-data.yaml"
    spec = DATASETS[dataset]
    names = _yaml_names(spec["root"] / "data.yaml")
    train, val, test = (
        spec["splits"][k] + ("/images" if (spec["root"] / spec["splits"][k]).is_dir() else "")
        for k in ("train", "validation", "test")
    )
    yaml.write_text(
        f"path: {spec['root']}\ntrain: {train}\nval: {val}\ntest: {test}\n"
        f"names: {json.dumps(dict(enumerate(names)))}\n"
    )
    images = [r.source_ref for split in ("validation", "test") for r in records_by_split[split]]
    cfg = {
        "arch": arch,
        "data": str(yaml),
        "imgsz": imgsz,
        "hours": budget_minutes / 60,
        "batch": 8,
        "project": str(work / "yolo"),
        "images": images,
        "curve_points": curve_points,
        "curve_images": [r.source_ref for r in records_by_split["validation"]],
        "predictions": str(work / f"{arch}-predictions.json"),
    }
    (work / f"{arch}-config.json").write_text(json.dumps(cfg))
    started = time.perf_counter()
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", YOLO_SCRIPT, str(work / f"{arch}-config.json")],
        check=True,
        cwd=str(work),
        env={**os.environ, "YOLO_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - started
    raw = json.loads(Path(cfg["predictions"]).read_text())

    def arrays(rows):
        return [
            (
                np.array(b, dtype=np.float64).reshape(-1, 4),
                np.array(s, dtype=np.float64),
                np.array(c, dtype=np.int64),
            )
            for b, s, c in rows
        ]

    preds, start = {}, 0
    for split in ("validation", "test"):
        n = len(records_by_split[split])
        preds[split] = arrays(raw["final"][start : start + n])
        start += n
    curve = [(t, arrays(rows)) for t, rows in raw["curve"]]
    return {
        "seconds": seconds,
        "predictions": preds,
        "curve": curve,
        "epochs": raw["epochs"],
        "onnx": work / "yolo" / arch / "weights" / "last.onnx",
    }


def onnx_latency_ms(deploy: Path, size: int, *, threads: int, runs: int = 30) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(deploy / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    image = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    for _ in range(3):
        session.run(None, {"images": image})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {"images": image})
        times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 2)


def yolo_onnx_latency_ms(path: Path, size: int, *, threads: int, runs: int = 30) -> float:
    """YOLO11n's own ONNX export (float NCHW input, no NMS inside: NMS not timed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    image = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    for _ in range(3):
        session.run(None, {name: image})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: image})
        times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 2)


def latencies(rows: list[dict], *, threads: int, core: int) -> None:
    """Time each row's exported graph (``onnx_file``, dropped from the row) into ``onnx_ms``: here, after
    every model is done, one after the other on one core, so no graph is timed while another process is
    still training or scoring (timed inside each model's process, the figures moved with what the other
    core was doing: 11.0 / 12.1 ms in one run, 12.5 / 16.6 in the next)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        for row in rows:
            path = row.pop("onnx_file", None)
            if path is None:
                continue
            if row.get("onnx_note") == "NMS inside":
                row["onnx_ms"] = onnx_latency_ms(
                    Path(path).parent, row["image_size"], threads=threads, runs=100
                )
            else:
                row["onnx_ms"] = yolo_onnx_latency_ms(
                    Path(path), row["image_size"], threads=threads, runs=100
                )
    finally:
        os.sched_setaffinity(0, before)


def gflops(model, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()([torch.zeros(3, size, size)])
    return round(counter.get_total_flops() / 1e9, 3)


def coco_row(split: str, records, predictions, names) -> dict:
    """One split's COCO figures as row cells, per-class AP50-95 included."""
    from detforge.evaluation.coco_metrics import coco_metrics

    stats = coco_metrics(records, predictions, names)
    row = {
        f"{SHORT[split]} {k}": (None if stats.get(k) is None else round(stats[k], 4))
        for k in ("AP", "AP50", "APs", "APm", "APl")
    }
    row[f"{SHORT[split]} per-class AP"] = {
        names[c]: (None if v is None else round(v, 4)) for c, v in sorted(stats["per_class_AP"].items())
    }
    return row


def run_model(
    name: str,
    *,
    work: Path,
    dataset: str,
    manifests: dict,
    names: list[str],
    budget: float,
    image_size: int,
    threads: int,
    yolo_venv: str,
    recipes: dict,
) -> tuple[dict, list]:
    """Train, score and time one model: (its row, its curve [(training seconds, valid AP50-95)])."""
    import torch

    torch.set_num_threads(threads)
    evals = {split: _records(manifests[split]) for split in ("validation", "test")}
    row: dict = {"model": name, "budget_min": budget}
    if name == "const":
        boxes = constant_boxes(_records(manifests["train"]))
        row |= {"train_s": 0, "epochs": 0, "GFLOPs": 0}
        for split, records in evals.items():
            row |= coco_row(split, records, predict_constant(boxes, records), names)
        return row, []
    if name in PEERS:
        got = run_yolo(
            Path(yolo_venv),
            work,
            arch=name,
            dataset=dataset,
            budget_minutes=budget,
            imgsz=image_size,
            records_by_split=evals,
        )
        # Ultralytics' own figures at 640 px: YOLO11n 6.5 GFLOPs, YOLO26n 5.4
        row |= {
            "train_s": round(got["seconds"], 1),
            "epochs": got["epochs"],
            "image_size": image_size,
            "GFLOPs": round({"yolo11n": 6.5, "yolo26n": 5.4}[name] * (image_size / 640) ** 2, 3),
        }
        for split, records in evals.items():
            row |= coco_row(split, records, got["predictions"][split], names)
        curve = [
            (t, coco_row("validation", evals["validation"], preds, names)["val AP"])
            for t, preds in got["curve"]
        ]
        if got["onnx"].exists():  # timed by the parent once every model is done (latencies())
            row["onnx_file"] = str(got["onnx"])
            row["onnx_note"] = "no NMS in graph"
        return row, curve
    from detforge.models import set_postprocess
    from detforge.training import checkpoint
    from detforge.training.train import TrainConfig, train

    # the recipe file as shipped; the benchmark sets only the class count, the budget and (for the curve
    # and the scoring at the photos' own size) a low score threshold
    hp = {"num_classes": str(len(names)), "score_threshold": "0.01", **recipe(name, recipes)}
    hp["max_train_minutes"] = str(budget)
    size = int(hp.get("image_shape", image_size))
    out = work / "runs" / name
    started = time.perf_counter()
    result = train(
        TrainConfig(
            train=str(manifests["train"]),
            validation=str(manifests["validation"]),
            out=str(out),
            hyperparameters=hp,
            progress=False,
        )
    )
    row |= {"train_s": round(time.perf_counter() - started, 1), "epochs": result.epochs}
    curve = [(r["train_time_s"], r.get("coco_AP")) for r in result.history if r.get("coco_AP") is not None]
    model, _ = checkpoint.load_run_model(out)
    # scored with the recipe's own NMS threshold and candidates (what `export` puts into the graph), 100
    # detections
    post = {
        "nms_threshold": float(hp.get("nms_threshold", 0.45)),
        "nms_topk": 100,
        "nms_candidates": int(hp.get("nms_candidates", 0)),
        "score_threshold": 0.001,
    }
    set_postprocess(model, **post)
    row |= {"GFLOPs": gflops(model, size), "image_size": size}
    for split, records in evals.items():
        row |= coco_row(split, records, predict_model(model, records, image_size=size), names)
    # a diagnostic for crowded scenes: valid AP50-95 of the same model at other NMS IoU thresholds and
    # candidate counts (per class, into NMS)
    by_nms = {}
    for iou, candidates in ((0.45, 100), (0.6, 1000), (0.7, 1000)):
        set_postprocess(model, **(post | {"nms_threshold": iou, "nms_candidates": candidates}))
        detections = predict_model(model, evals["validation"], image_size=size)
        scores = coco_row("validation", evals["validation"], detections, names)
        by_nms[f"{iou} / {candidates}"] = scores["val AP"]
    row["val AP by NMS IoU / candidates"] = by_nms
    set_postprocess(model, **post)
    try:
        from detforge.deploy.export import export_run

        export_run(str(out), str(work / "deploy" / name), verify_count=2)
        row["onnx_file"] = str(work / "deploy" / name / "model.onnx")  # timed by the parent (latencies())
        row["onnx_note"] = "NMS inside"
    except Exception as exc:  # a failed export is a figure too: say why
        row["onnx_ms"] = f"export failed: {str(exc)[:80]}"
    return row, curve


def recipe(name: str, recipes: dict) -> dict:
    """A recipe file's hyperparameters: ``recipes[name]`` (``--recipe NAME=FILE``), else for ``gfl`` the
    shipped recipes/cpu-small-data.json; ``ssd``: SSDLite-MobileNetV3 with the demo's Adam recipe."""
    if name in recipes:
        return json.loads(Path(recipes[name]).read_text())
    if name == "gfl":
        return json.loads((ROOT / "recipes" / "cpu-small-data.json").read_text())
    if name == "ssd":
        return {
            "detector": "ssd",
            "base_network": "mobilenet-v3",
            "use_pretrained_model": "0",
            "image_shape": "320",
            "epochs": "300",
            "optimizer": "adam",
            "learning_rate": "0.001",
            "weight_decay": "0.0005",
            "augmentation": "ssd",
            "mini_batch_size": "8",
            "warmup_epochs": "1",
            "workers": "0",
            "cache_images": "1",
            "nms_topk": "100",
        }
    raise SystemExit(f"no recipe for model {name!r}: give one with --recipe {name}=FILE")


def plot_curves(curves: dict, baseline: float | None, path: Path, *, title: str, credit: str) -> None:
    """AP50-95 on 'valid' against training minutes, one line per model, the constant boxes dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, points in curves.items():
        pts = [(t / 60, a) for t, a in points if t is not None and a is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name)
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="grey", label="constant boxes")
    ax.set_xlabel("training minutes (wall clock, one CPU core each)")
    ax.set_ylabel("COCO AP50-95 on 'valid'")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, f"Data: {credit}", fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="aquarium")
    parser.add_argument("--budget-minutes", type=float, default=90.0)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 minutes each, gfl and the constant boxes only; writes realdata_quick, no claims",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=320,
        help="the peers' input size (detforge's models take their recipe's image_shape)",
    )
    parser.add_argument(
        "--models",
        default="",
        help="comma list of const, gfl (or any name given a --recipe), ssd, yolo11n, yolo26n "
        "(default const,gfl, and yolo11n with --yolo-venv)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="train model NAME with the recipe FILE (an A/B of two recipes in one run)",
    )
    parser.add_argument("--name", default="", help="the result's name (default realdata[_<dataset>])")
    parser.add_argument(
        "--work", default="", help="work folder (default /tmp/detforge-bench-realdata[-<dataset>])"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads per model")
    parser.add_argument("--note", default="", help="a sentence for the notes")
    parser.add_argument(
        "--yolo-venv",
        default=os.environ.get("DETFORGE_YOLO_VENV", ""),
        help="a venv with `pip install ultralytics==8.4.190 onnx` (outside the repo): adds YOLO11n",
    )
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one model, write its row
    args = parser.parse_args()
    budget = 2.0 if args.quick else args.budget_minutes
    spec = DATASETS[args.dataset]
    recipes = dict(item.split("=", 1) for item in args.recipe)
    if not spec["root"].exists():
        sys.exit(
            f"no {spec['root']}: this benchmark needs the {args.dataset} photos beside the checkout "
            f"(../shared/data/{args.dataset}, in Ultralytics layout)"
        )
    suffix = "" if args.dataset == "aquarium" else f"-{args.dataset}"
    work = Path(args.work or f"/tmp/detforge-bench-realdata{suffix}")
    manifests = {split: work / "data" / f"{split}.manifest" for split in spec["splits"]}
    one = {
        "work": work,
        "dataset": args.dataset,
        "manifests": manifests,
        "budget": budget,
        "image_size": args.image_size,
        "threads": args.threads,
        "recipes": recipes,
    }
    if args.one:
        names = json.loads((work / "data" / "classes.json").read_text())
        row, curve = run_model(args.one, names=names, yolo_venv=args.yolo_venv, **one)
        (work / "rows").mkdir(exist_ok=True)
        (work / "rows" / f"{args.one}.json").write_text(json.dumps({"row": row, "curve": curve}))
        print(row, flush=True)
        return
    default = "const,gfl" + (",yolo11n" if args.yolo_venv else "")
    models = [m for m in (args.models or default).split(",") if m]
    if args.quick:
        models = [m for m in models if m in ("const", "gfl")]
    if any(m in PEERS for m in models) and not args.yolo_venv:
        parser.error("yolo11n / yolo26n need --yolo-venv (a venv with ultralytics; never detforge's own)")
    convert(work / "data", args.dataset)
    names = json.loads((work / "data" / "classes.json").read_text())
    (work / "rows").mkdir(parents=True, exist_ok=True)
    for stale in (work / "rows").glob("*.json"):
        stale.unlink()
    # every trained model at the same time, each in its own process pinned to its own core (when there are
    # enough): the same CPU for each, and the same disturbance from whatever else the machine does
    trained = [m for m in models if m != "const"]
    cores = sorted(os.sched_getaffinity(0))
    load_start = os.getloadavg()[0]
    procs = []
    for i, name in enumerate(trained):
        cmd = [
            sys.executable,
            __file__,
            "--one",
            name,
            "--dataset",
            args.dataset,
            "--work",
            str(work),
            "--budget-minutes",
            str(budget),
            "--image-size",
            str(args.image_size),
            "--threads",
            str(args.threads),
            "--yolo-venv",
            args.yolo_venv,
            *(f"--recipe={item}" for item in args.recipe),
        ]
        if args.quick:
            cmd.append("--quick")
        if len(trained) <= len(cores) and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cores[i]), *cmd]
        log = open(work / f"{name}.log", "w")
        procs.append(
            (
                name,
                subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                ),
            )
        )
        print(f"started {name}: log {work / f'{name}.log'}", flush=True)
    if "const" in models:
        row, _ = run_model("const", names=names, yolo_venv="", **one)
        (work / "rows" / "const.json").write_text(json.dumps({"row": row, "curve": []}))
    failed = [name for name, proc in procs if proc.wait() != 0]
    load_end = os.getloadavg()[0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see the logs in {work})")
    got = {m: json.loads((work / "rows" / f"{m}.json").read_text()) for m in models}
    rows = [got[m]["row"] for m in models]
    latencies(rows, threads=args.threads, core=cores[0])
    curves = {m: got[m]["curve"] for m in trained}
    by = {r["model"]: r for r in rows}
    summary = "; ".join(
        f"{m}: valid AP50-95 {r.get('val AP')} (AP50 {r.get('val AP50')}, "
        f"APs {r.get('val APs')}), test {r.get('test AP')}"
        for m, r in by.items()
    )
    peers = [m for m in PEERS if by.get(m, {}).get("val AP")]
    if not args.quick and peers:
        for mine in [m for m in trained if m not in PEERS]:
            for peer in peers:
                summary += (
                    f". {mine} / {peer}: valid {by[mine]['val AP'] / by[peer]['val AP']:.2f}x, "
                    f"test {by[mine]['test AP'] / max(by[peer]['test AP'], 1e-9):.2f}x"
                )
    headline = ""
    if not args.quick and "gfl" in by and peers:
        peer = max(peers, key=lambda m: by[m]["val AP"])  # against the best peer of the run
        g, p = by["gfl"], by[peer]
        headline = (
            f"{args.dataset}, {budget:g} min: gfl / {peer} valid "
            f"{g['val AP'] / p['val AP']:.2f}x, test {g['test AP'] / max(p['test AP'], 1e-9):.2f}x "
            f"(AP50-95 {g['val AP']:.3f} vs {p['val AP']:.3f}, "
            f"{g['test AP']:.3f} vs {p['test AP']:.3f})"
        )
    name = args.name or ("realdata_quick" if args.quick else "realdata" + suffix.replace("-", "_"))
    title = (
        f"Detectors on real photos ({spec['credit'].split(' (')[0]}; CPU, {budget:g} min each, "
        "side by side" + (", QUICK: no claims)" if args.quick else ")")
    )
    plot = Path(__file__).resolve().parent / "results" / f"{name}_curve.png"
    plot.parent.mkdir(exist_ok=True)
    plot_curves(curves, by.get("const", {}).get("val AP"), plot, title=title, credit=spec["credit"])
    sizes = ", ".join(f"{r['model']} {r['image_size']} px" for r in rows if r.get("image_size"))
    counts = {split: sum(1 for _ in open(manifests[split])) for split in ("validation", "test")}
    notes = (
        ("QUICK run: checks that the benchmark runs; no claims. " if args.quick else "")
        + f"Models {','.join(models)}, all trained at the same time, each from scratch for "
        f"{budget:g} min (max_train_minutes / Ultralytics time=, schedules fitted to it), "
        + (
            "each in its own process pinned to its own core, "
            if len(trained) <= len(cores)
            else f"{len(trained)} processes sharing {len(cores)} cores (not pinned), "
        )
        + f"{args.threads} thread(s) each, batch 8, input {sizes}; "
        f"1-min load average {load_start:.1f} at the start, {load_end:.1f} at the end. Recipes: "
        + ", ".join(f"{m}={recipes.get(m, 'recipes/cpu-small-data.json')}" for m in trained if m not in PEERS)
        + ". Scored by pycocotools at the photos' own size on 'valid' "
        f"({counts['validation']} images) and 'test' ({counts['test']} images); detforge's "
        "models see each photo resized by images.resize_rgb as the runtime does, with their recipe's "
        "NMS threshold, the peers their own predict() (conf 0.001, 100 detections). "
        f"Curve (plot: benchmarks/results/{plot.name}): training seconds, AP50-95 on 'valid' "
        "(detforge: its validation during training; peers: their epoch checkpoints scored afterwards): "
        + "; ".join(
            f"{m}: " + ", ".join(f"{t:.0f}s {a:.3f}" for t, a in c if a is not None and t is not None)
            for m, c in curves.items()
        )
        + ". ONNX Runtime latency: batch 1, same threads, timed after every model is trained and "
        "scored, one graph after the other on one core (median of 100 runs), each at its own input "
        "size; the peers' graphs have no NMS. "
        f"Data: {spec['credit']}. " + args.note
    )
    write_result(name, title=title, rows=rows, summary=summary, notes=notes, headline=headline)


if __name__ == "__main__":
    main()
