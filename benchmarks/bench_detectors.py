"""Detectors on real photos: detforge's anchor-free ``gfl`` vs SSDLite vs a constant-box baseline.

Data: ``../shared/data/aquarium`` (Roboflow's "Aquarium Combined" raw-1024, CC BY 4.0, https://roboflow.com;
638 photos, 7 classes, Ultralytics YOLO layout). This script converts the layout itself into Ground Truth
manifests (train / valid / test) in its work folder, independent of detforge's YOLO importer, so that the
ground truth the models are scored on does not depend on code under test (boxes under 1 px are dropped).

Each model trains from scratch (no pretrained weights) on ``train`` for the same wall-clock budget
(``max_train_minutes``: the schedule is fitted to it), validating every few epochs (the curve of COCO AP
against training time comes from those validations, on images resized to the input size). The final
models are then scored by pycocotools on ``valid`` and ``test`` at the photos' own resolution: COCO
AP50-95, AP50, AP small / medium / large. The constant-box baseline predicts, on every image, the
k-means boxes of each class of the training set (normalised to the image), scored by the cluster's share.
ONNX Runtime latency: the exported deploy model (NMS inside), batch 1, the same thread count for all.

    nice -n 10 python benchmarks/bench_detectors.py --budget-minutes 10      # the measured run
    python benchmarks/bench_detectors.py --quick                            # a minute each, no claims

Writes ``benchmarks/results/detectors.json`` (``run_all.py --render`` puts it into RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# beside the main checkout (../shared); from a worktree under ../wt/<name>, one level further up
DATA = next((p for p in (ROOT.parent / "shared" / "data" / "aquarium",
                         ROOT.parents[1] / "shared" / "data" / "aquarium") if p.exists()),
            ROOT.parent / "shared" / "data" / "aquarium")
SPLITS = {"train": "train", "validation": "valid", "test": "test"}
SHORT = {"validation": "val", "test": "test"}

RECIPES = {
    # the new detector with the small-data recipe
    "gfl": {"detector": "gfl", "base_network": "mobilenet-v3", "optimizer": "adamw", "learning_rate": "0.002",
            "weight_decay": "0.05", "lr_schedule": "cosine", "warmup_epochs": "1", "ema_decay": "0.999",
            "mosaic": "0.5", "mosaic_off_epochs": "1", "scale_jitter": "0.5", "multiscale": "0.0",
            "augmentation": "flip", "mini_batch_size": "8", "grad_clip_norm": "10"},
    # the reference: SSDLite-MobileNetV3, the demo's Adam recipe, default ssd augmentation
    "ssd": {"detector": "ssd", "base_network": "mobilenet-v3", "optimizer": "adam", "learning_rate": "0.001",
            "weight_decay": "0.0005", "augmentation": "ssd", "mini_batch_size": "8", "warmup_epochs": "1"},
}


def convert(work: Path) -> dict[str, Path]:
    """The YOLO layout -> Ground Truth manifests (absolute image paths) + classes.json, in ``work``."""
    from PIL import Image

    from detforge.data.groundtruth import make_record, write_manifest

    names = _yaml_names(DATA / "data.yaml")
    work.mkdir(parents=True, exist_ok=True)
    (work / "classes.json").write_text(json.dumps(names))
    out = {}
    for split, folder in SPLITS.items():
        records = []
        for image_path in sorted((DATA / folder / "images").iterdir()):
            with Image.open(image_path) as im:
                width, height = im.size
            label = DATA / folder / "labels" / (image_path.stem + ".txt")
            boxes, ids = [], []
            for line in (label.read_text().splitlines() if label.exists() else []):
                if not line.strip():
                    continue
                c, cx, cy, w, h = line.split()[:5]
                cx, cy, w, h = float(cx) * width, float(cy) * height, float(w) * width, float(h) * height
                x1, y1 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
                x2, y2 = min(float(width), cx + w / 2), min(float(height), cy + h / 2)
                if x2 - x1 >= 1 and y2 - y1 >= 1:
                    boxes.append([x1, y1, x2, y2])
                    ids.append(int(c))
            records.append(make_record(str(image_path), width=width, height=height,
                                       boxes_xyxy=np.array(boxes, dtype=np.float64).reshape(-1, 4),
                                       class_ids=ids, class_map=dict(enumerate(names)),
                                       creation_date="2020-11-18T19:55:00"))
        path = work / f"{split}.manifest"
        write_manifest(path, records)
        out[split] = path
    return out


def _yaml_names(path: Path) -> list[str]:
    for line in path.read_text().splitlines():
        if line.startswith("names:"):
            return [n.strip().strip("'\"") for n in line.split(":", 1)[1].strip().strip("[]").split(",")]
    raise ValueError(f"no names in {path}")


def _records(manifest: Path):
    from detforge.data.groundtruth import read_manifest

    return list(read_manifest(manifest))


def coco_scores(records, predictions, names) -> dict:
    """pycocotools stats (AP, AP50, APs, APm, APl) of per-image (boxes, scores, class ids) predictions."""
    from detforge.coco_metrics import coco_metrics

    stats = coco_metrics(records, predictions, names)
    keys = ("AP", "AP50", "APs", "APm", "APl")
    return {k: (None if stats.get(k) is None else round(stats[k], 4)) for k in keys}


def constant_boxes(train_records, *, k: int = 5, seed: int = 0):
    """Per class, k-means (k boxes) of normalised (x1, y1, x2, y2): ``[(box_norm, score, class_id)]``."""
    rng = np.random.default_rng(seed)
    rows = []
    total = sum(len(r.boxes) for r in train_records)
    for c in sorted({int(c) for r in train_records for c in r.class_ids}):
        pts = np.concatenate([r.boxes[r.class_ids == c] / np.array([r.width, r.height] * 2)
                              for r in train_records])
        centres = pts[rng.choice(len(pts), min(k, len(pts)), replace=False)]
        for _ in range(50):
            nearest = ((pts[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
            centres = np.stack([pts[nearest == j].mean(0) if np.any(nearest == j) else centres[j]
                                for j in range(len(centres))])
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


def predict_model(model, records, *, batch: int = 8):
    """Detections of a detforge model on each record's photo at its own size (the model resizes)."""
    import torch
    from PIL import Image

    out = []
    with torch.inference_mode():
        for start in range(0, len(records), batch):
            images = []
            for r in records[start:start + batch]:
                with Image.open(r.source_ref) as im:
                    images.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
                                  .float().div(255))
            for det in model(images):
                out.append((det["boxes"].numpy().astype(np.float64), det["scores"].numpy().astype(np.float64),
                            det["labels"].numpy() - 1))
    return out


YOLO_SCRIPT = """
import json, sys
from ultralytics import YOLO
cfg = json.load(open(sys.argv[1]))
model = YOLO("yolo11n.yaml")
model.train(data=cfg["data"], imgsz=cfg["imgsz"], epochs=300, time=cfg["hours"], batch=cfg["batch"],
            workers=0, device="cpu", plots=False, pretrained=False, amp=False, seed=0,
            project=cfg["project"], name="yolo11n", exist_ok=True, verbose=False)
best = YOLO(cfg["project"] + "/yolo11n/weights/last.pt")
out = []
for path in cfg["images"]:
    r = best.predict(source=path, imgsz=cfg["imgsz"], conf=0.001, max_det=100, device="cpu", verbose=False)[0]
    out.append([r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), [int(c) for c in r.boxes.cls.tolist()]])
json.dump(out, open(cfg["predictions"], "w"))
try:
    best.export(format="onnx", imgsz=cfg["imgsz"])
except Exception as exc:  # no onnx package in the venv: no latency figure
    print("YOLO ONNX export failed:", exc)
"""


def run_yolo(venv: Path, work: Path, *, budget_minutes: float, imgsz: int, records_by_split: dict) -> dict:
    """Ultralytics YOLO11n from scratch in its own venv (a measuring stick; never imported by detforge):
    train for the budget with its ``time=``, predict every evaluation image, export ONNX."""
    import subprocess

    yaml = work / "yolo-data.yaml"
    names = _yaml_names(DATA / "data.yaml")
    yaml.write_text(f"path: {DATA}\ntrain: train/images\nval: valid/images\ntest: test/images\n"
                    f"names: {json.dumps(dict(enumerate(names)))}\n")
    images = [r.source_ref for split in ("validation", "test") for r in records_by_split[split]]
    cfg = {"data": str(yaml), "imgsz": imgsz, "hours": budget_minutes / 60, "batch": 8,
           "project": str(work / "yolo"), "images": images,
           "predictions": str(work / "yolo-predictions.json")}
    (work / "yolo-config.json").write_text(json.dumps(cfg))
    started = time.perf_counter()
    subprocess.run([str(venv / "bin" / "python"), "-c", YOLO_SCRIPT, str(work / "yolo-config.json")],
                   check=True,
                   cwd=str(work), env={**os.environ, "YOLO_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    raw = json.loads(Path(cfg["predictions"]).read_text())
    preds, start = {}, 0
    for split in ("validation", "test"):
        n = len(records_by_split[split])
        preds[split] = [(np.array(b, dtype=np.float64).reshape(-1, 4), np.array(s, dtype=np.float64),
                         np.array(c, dtype=np.int64)) for b, s, c in raw[start:start + n]]
        start += n
    return {"seconds": seconds, "predictions": preds,
            "onnx": work / "yolo" / "yolo11n" / "weights" / "last.onnx"}


def onnx_latency_ms(deploy: Path, size: int, *, threads: int, runs: int = 30) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(deploy / "model.onnx"), sess_options=options,
                                   providers=["CPUExecutionProvider"])
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


def gflops(model, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()([torch.zeros(3, size, size)])
    return round(counter.get_total_flops() / 1e9, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="1 minute each, no claims")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--models", default="const,gfl,ssd")
    parser.add_argument("--work", default="/tmp/detforge-bench-detectors")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--validation-interval", type=int, default=1)
    parser.add_argument("--note", default="", help="a sentence for the notes")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of models not run now from results/detectors.json")
    parser.add_argument("--yolo-venv", default="",
                        help="a venv with `pip install ultralytics` (outside the repo): adds YOLO11n")
    args = parser.parse_args()
    import torch

    from detforge import checkpoint
    from detforge.models import set_postprocess
    from detforge.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    budget = 1.0 if args.quick else args.budget_minutes
    work = Path(args.work)
    manifests = convert(work / "data")
    names = json.loads((work / "data" / "classes.json").read_text())
    train_records = _records(manifests["train"])
    evals = {split: _records(manifests[split]) for split in ("validation", "test")}
    load_start = os.getloadavg()[0]
    rows, curves = [], {}
    for name in args.models.split(","):
        row: dict = {"model": name, "budget_min": budget}
        if name == "yolo11n":
            got = run_yolo(Path(args.yolo_venv), work, budget_minutes=budget, imgsz=args.image_size,
                           records_by_split=evals)
            row |= {"train_s": round(got["seconds"], 1), "epochs": "", "GFLOPs": ""}
            for split, records in evals.items():
                row |= {f"{SHORT[split]} {k}": v for k, v in
                        coco_scores(records, got["predictions"][split], names).items()}
            if got["onnx"].exists():
                row["onnx_ms"] = yolo_onnx_latency_ms(got["onnx"], args.image_size, threads=args.threads)
            rows.append(row)
            print(row, flush=True)
            continue
        if name == "const":
            boxes = constant_boxes(train_records)
            row |= {"train_s": 0, "epochs": 0, "GFLOPs": 0}
            for split, records in evals.items():
                row |= {f"{SHORT[split]} {k}": v for k, v in
                        coco_scores(records, predict_constant(boxes, records), names).items()}
            rows.append(row)
            print(row, flush=True)
            continue
        hp = {"num_classes": str(len(names)), "use_pretrained_model": "0",
              "image_shape": str(args.image_size),
              "epochs": "300", "workers": "0", "cache_images": "1", "max_train_minutes": str(budget),
              "validation_interval": str(args.validation_interval), "score_threshold": "0.01",
              "nms_topk": "100", **RECIPES[name]}
        out = work / "runs" / name
        started = time.perf_counter()
        result = train(TrainConfig(train=str(manifests["train"]), validation=str(manifests["validation"]),
                                   out=str(out), hyperparameters=hp, progress=False))
        row |= {"train_s": round(time.perf_counter() - started, 1), "epochs": result.epochs}
        curves[name] = [(r["train_time_s"], r.get("coco_AP")) for r in result.history if "coco_AP" in r]
        model, _ = checkpoint.load_run_model(out)
        set_postprocess(model, nms_threshold=0.45, nms_topk=100, score_threshold=0.001)
        row["GFLOPs"] = gflops(model, args.image_size)
        for split, records in evals.items():
            row |= {f"{SHORT[split]} {k}": v for k, v in coco_scores(records, predict_model(model, records),
                                                                  names).items()}
        try:
            from detforge.export import export_run

            export_run(str(out), str(work / "deploy" / name), verify_count=2)
            row["onnx_ms"] = onnx_latency_ms(work / "deploy" / name, args.image_size, threads=args.threads)
        except Exception as exc:  # a failed export is a figure too: say why
            row["onnx_ms"] = f"export failed: {str(exc)[:80]}"
        rows.append(row)
        print(row, flush=True)
    load_end = os.getloadavg()[0]
    earlier_notes = ""
    previous = Path(__file__).resolve().parent / "results" / "detectors.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        ran = {r["model"] for r in rows}
        rows = [r for r in old["rows"] if r["model"] not in ran] + rows
        kept = sorted({r["model"] for r in old["rows"]} - ran)
        earlier_notes = f"Rows {kept} from an earlier run: {old['notes']} This run: "
    by = {r["model"]: r for r in rows}
    summary = "; ".join(f"{m}: valid AP50-95 {r.get('val AP')} (AP50 {r.get('val AP50')}, "
                        f"APs {r.get('val APs')})" for m, r in by.items())
    notes = (earlier_notes + ("QUICK run, no claims. " if args.quick else "")
             + f"models {args.models}: budget {budget:g} min of training each "
             f"(max_train_minutes; schedule fitted to it), from scratch, {args.image_size} px, "
             f"torch threads {args.threads}, `nice -n 10` on a 2-core machine shared with other work "
             f"(1-min load average {load_start:.1f} at the start, {load_end:.1f} at the end). Scored by "
             "pycocotools at the photos' own size on 'valid' (127 images) and 'test' (63 images). "
             "Curves (training seconds, COCO AP on resized validation images): "
             + "; ".join(f"{m}: " + ", ".join(f"{t:.0f}s {a:.3f}" for t, a in c if a is not None)
                         for m, c in curves.items())
             + ". Data: Roboflow Aquarium (CC BY 4.0, https://roboflow.com). " + args.note)
    write_result("detectors", title=f"Detectors on real photos (Aquarium, {args.image_size} px, CPU, "
                 f"{budget:g} min each)", rows=rows, summary=summary, notes=notes)


if __name__ == "__main__":
    main()
