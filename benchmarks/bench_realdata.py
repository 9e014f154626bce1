"""Detectors on real photos: detforge's anchor-free ``gfl`` vs Ultralytics YOLO11n vs constant boxes.

Data: ``../shared/data/aquarium`` (Roboflow's "Aquarium Combined" raw-1024, CC BY 4.0, https://roboflow.com;
638 photos, 7 classes, Ultralytics YOLO layout). This script converts the layout itself into Ground Truth
manifests (train / valid / test) in its work folder, independent of detforge's YOLO importer, so that the
ground truth the models are scored on does not depend on code under test (boxes under 1 px are dropped).

Models, all trained AT THE SAME TIME, each in its own process pinned to its own core (one thread each), from
scratch, for the same wall-clock budget:
- ``gfl``: detforge with ``recipes/cpu-small-data.json`` as shipped (``max_train_minutes`` = the budget);
- ``yolo11n``: Ultralytics YOLO11n from ``yolo11n.yaml`` with ``time=`` the budget, its defaults otherwise,
  run by the Python of ``--yolo-venv`` (a throwaway venv: ``python -m venv /tmp/yolo-venv &&
  /tmp/yolo-venv/bin/pip install ultralytics==8.4.190 onnx``) -- a measuring stick, never imported here;
- ``ssd`` (optional, ``--models``): SSDLite-MobileNetV3 with the demo's Adam recipe;
- ``const``: the constant-box baseline, the k-means boxes of each class of the training set on every
  image (normalised to the image), scored by the cluster's share.
The final models are scored by pycocotools on ``valid`` and ``test`` at the photos' own resolution: COCO
AP50-95, AP50, AP small / medium / large. The curve of AP50-95 on ``valid`` against training time: gfl's
validation during training (pycocotools, every ``--validation-interval`` epochs), YOLO11n's epoch
checkpoints (up to 12, its EMA weights) scored afterwards the same way; plotted into
``benchmarks/results/realdata_curve.png``. ONNX Runtime latency: each exported model, batch 1, the same
thread count, timed once every model is trained and scored, one after the other on one core
(detforge's graph has decoding and NMS inside, YOLO11n's does not).

    python benchmarks/bench_realdata.py --budget-minutes 90 --yolo-venv /tmp/yolo-venv   # the measured run
    python benchmarks/bench_realdata.py --quick    # `make bench`: 2 minutes, gfl + constant boxes, no claims

Writes ``benchmarks/results/realdata.json`` (``--quick``: ``realdata_quick.json``); ``run_all.py --render``
puts it into RESULTS.md and the README table.
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
    from detforge.evaluation.coco_metrics import coco_metrics

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
        out += run([images.read(r.source_ref) for r in records[start:start + batch]])
    return out


YOLO_SCRIPT = """
import csv, json, sys
from pathlib import Path
from ultralytics import YOLO
cfg = json.load(open(sys.argv[1]))
model = YOLO("yolo11n.yaml")
model.train(data=cfg["data"], imgsz=cfg["imgsz"], epochs=300, time=cfg["hours"], batch=cfg["batch"],
            workers=0, device="cpu", plots=False, pretrained=False, amp=False, seed=0, save_period=1,
            project=cfg["project"], name="yolo11n", exist_ok=True, verbose=False)
weights = Path(cfg["project"]) / "yolo11n" / "weights"
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


def run_yolo(venv: Path, work: Path, *, budget_minutes: float, imgsz: int, records_by_split: dict,
             curve_points: int = 12) -> dict:
    """Ultralytics YOLO11n from scratch in its own venv (a measuring stick; never imported by detforge):
    train for the budget with its ``time=`` (its defaults otherwise: AdamW chosen by 'auto', mosaic off
    for the last 10 epochs, EMA, validation every epoch), keeping every epoch's checkpoint; then predict
    every evaluation image with the last one, and the validation images with up to ``curve_points``
    epoch checkpoints (the curve), and export ONNX."""
    import subprocess

    yaml = work / "yolo-data.yaml"
    names = _yaml_names(DATA / "data.yaml")
    yaml.write_text(f"path: {DATA}\ntrain: train/images\nval: valid/images\ntest: test/images\n"
                    f"names: {json.dumps(dict(enumerate(names)))}\n")
    images = [r.source_ref for split in ("validation", "test") for r in records_by_split[split]]
    cfg = {"data": str(yaml), "imgsz": imgsz, "hours": budget_minutes / 60, "batch": 8,
           "project": str(work / "yolo"), "images": images, "curve_points": curve_points,
           "curve_images": [r.source_ref for r in records_by_split["validation"]],
           "predictions": str(work / "yolo-predictions.json")}
    (work / "yolo-config.json").write_text(json.dumps(cfg))
    started = time.perf_counter()
    subprocess.run([str(venv / "bin" / "python"), "-c", YOLO_SCRIPT, str(work / "yolo-config.json")],
                   check=True, cwd=str(work), env={**os.environ, "YOLO_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    raw = json.loads(Path(cfg["predictions"]).read_text())

    def arrays(rows):
        return [(np.array(b, dtype=np.float64).reshape(-1, 4), np.array(s, dtype=np.float64),
                 np.array(c, dtype=np.int64)) for b, s, c in rows]

    preds, start = {}, 0
    for split in ("validation", "test"):
        n = len(records_by_split[split])
        preds[split] = arrays(raw["final"][start:start + n])
        start += n
    curve = [(t, arrays(rows)) for t, rows in raw["curve"]]
    return {"seconds": seconds, "predictions": preds, "curve": curve, "epochs": raw["epochs"],
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


def latencies(rows: list[dict], *, image_size: int, threads: int, core: int) -> None:
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
                row["onnx_ms"] = onnx_latency_ms(Path(path).parent, image_size, threads=threads, runs=100)
            else:
                row["onnx_ms"] = yolo_onnx_latency_ms(Path(path), image_size, threads=threads, runs=100)
    finally:
        os.sched_setaffinity(0, before)


def gflops(model, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()([torch.zeros(3, size, size)])
    return round(counter.get_total_flops() / 1e9, 3)


def run_model(name: str, *, work: Path, manifests: dict, names: list[str], budget: float, image_size: int,
              threads: int, validation_interval: int, yolo_venv: str) -> tuple[dict, list]:
    """Train, score and time one model: (its row, its curve [(training seconds, valid AP50-95)])."""
    import torch

    torch.set_num_threads(threads)
    evals = {split: _records(manifests[split]) for split in ("validation", "test")}
    row: dict = {"model": name, "budget_min": budget}
    if name == "const":
        boxes = constant_boxes(_records(manifests["train"]))
        row |= {"train_s": 0, "epochs": 0, "GFLOPs": 0}
        for split, records in evals.items():
            row |= {f"{SHORT[split]} {k}": v for k, v in
                    coco_scores(records, predict_constant(boxes, records), names).items()}
        return row, []
    if name == "yolo11n":
        got = run_yolo(Path(yolo_venv), work, budget_minutes=budget, imgsz=image_size, records_by_split=evals)
        row |= {"train_s": round(got["seconds"], 1), "epochs": got["epochs"],
                "GFLOPs": round(6.5 * (image_size / 640) ** 2, 3)}  # Ultralytics: 6.5 GFLOPs at 640
        for split, records in evals.items():
            row |= {f"{SHORT[split]} {k}": v for k, v in
                    coco_scores(records, got["predictions"][split], names).items()}
        curve = [(t, coco_scores(evals["validation"], preds, names)["AP"]) for t, preds in got["curve"]]
        if got["onnx"].exists():  # timed by the parent once every model is done (latencies())
            row["onnx_file"] = str(got["onnx"])
            row["onnx_note"] = "no NMS in graph"
        return row, curve
    from detforge.models import set_postprocess
    from detforge.training import checkpoint
    from detforge.training.train import TrainConfig, train

    hp = {"num_classes": str(len(names)), "use_pretrained_model": "0", "image_shape": str(image_size),
          "epochs": "300", "workers": "0", "cache_images": "1", "max_train_minutes": str(budget),
          "validation_interval": str(validation_interval), "score_threshold": "0.01", "nms_topk": "100",
          **recipe(name)}
    hp["max_train_minutes"] = str(budget)
    out = work / "runs" / name
    started = time.perf_counter()
    result = train(TrainConfig(train=str(manifests["train"]), validation=str(manifests["validation"]),
                               out=str(out), hyperparameters=hp, progress=False))
    row |= {"train_s": round(time.perf_counter() - started, 1), "epochs": result.epochs}
    curve = [(r["train_time_s"], r.get("coco_AP")) for r in result.history if r.get("coco_AP") is not None]
    model, _ = checkpoint.load_run_model(out)
    set_postprocess(model, nms_threshold=0.45, nms_topk=100, score_threshold=0.001)
    row["GFLOPs"] = gflops(model, image_size)
    for split, records in evals.items():
        detections = predict_model(model, records, image_size=image_size)
        row |= {f"{SHORT[split]} {k}": v for k, v in coco_scores(records, detections, names).items()}
    try:
        from detforge.deploy.export import export_run

        export_run(str(out), str(work / "deploy" / name), verify_count=2)
        row["onnx_file"] = str(work / "deploy" / name / "model.onnx")  # timed by the parent (latencies())
        row["onnx_note"] = "NMS inside"
    except Exception as exc:  # a failed export is a figure too: say why
        row["onnx_ms"] = f"export failed: {str(exc)[:80]}"
    return row, curve


def recipe(name: str) -> dict:
    """gfl: the shipped recipes/cpu-small-data.json as it is; ssd: the issue's reference recipe."""
    if name == "gfl":
        return json.loads((ROOT / "recipes" / "cpu-small-data.json").read_text())
    return RECIPES[name]


def plot_curves(curves: dict, baseline: float | None, path: Path, *, title: str) -> None:
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
    fig.text(0.01, 0.01, "Data: Roboflow Aquarium, CC BY 4.0 (roboflow.com)", fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=90.0)
    parser.add_argument("--quick", action="store_true",
                        help="2 minutes each, gfl and the constant boxes only; writes realdata_quick, "
                        "no claims")
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--models", default="",
                        help="comma list of const,gfl,ssd,yolo11n "
                        "(default const,gfl, and yolo11n with --yolo-venv)")
    parser.add_argument("--work", default="/tmp/detforge-bench-realdata")
    parser.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime threads per model")
    parser.add_argument("--validation-interval", type=int, default=1)
    parser.add_argument("--note", default="", help="a sentence for the notes")
    parser.add_argument("--yolo-venv", default=os.environ.get("DETFORGE_YOLO_VENV", ""),
                        help="a venv with `pip install ultralytics==8.4.190` (outside the repo): "
                        "adds YOLO11n")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one model, write its row
    args = parser.parse_args()
    budget = 2.0 if args.quick else args.budget_minutes
    if not DATA.exists():
        sys.exit(f"no {DATA}: this benchmark needs the Aquarium photos beside the checkout "
                 "(../shared/data/aquarium, Roboflow's export in Ultralytics layout)")
    work = Path(args.work)
    manifests = {split: work / "data" / f"{split}.manifest" for split in SPLITS}
    if args.one:
        names = json.loads((work / "data" / "classes.json").read_text())
        row, curve = run_model(args.one, work=work, manifests=manifests, names=names, budget=budget,
                               image_size=args.image_size, threads=args.threads,
                               validation_interval=args.validation_interval, yolo_venv=args.yolo_venv)
        (work / "rows").mkdir(exist_ok=True)
        (work / "rows" / f"{args.one}.json").write_text(json.dumps({"row": row, "curve": curve}))
        print(row, flush=True)
        return
    default = "const,gfl" + (",yolo11n" if args.yolo_venv else "")
    models = [m for m in (args.models or default).split(",") if m]
    if args.quick:
        models = [m for m in models if m in ("const", "gfl")]
    if "yolo11n" in models and not args.yolo_venv:
        parser.error("yolo11n needs --yolo-venv (a venv with ultralytics; never detforge's own)")
    convert(work / "data")
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
        cmd = [sys.executable, __file__, "--one", name, "--work", str(work), "--budget-minutes", str(budget),
               "--image-size", str(args.image_size), "--threads", str(args.threads),
               "--validation-interval", str(args.validation_interval), "--yolo-venv", args.yolo_venv]
        if args.quick:
            cmd.append("--quick")
        if len(trained) <= len(cores) and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(cores[i]), *cmd]
        log = open(work / f"{name}.log", "w")
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})))
        print(f"started {name}: log {work / f'{name}.log'}", flush=True)
    if "const" in models:
        row, _ = run_model("const", work=work, manifests=manifests, names=names, budget=budget,
                           image_size=args.image_size, threads=args.threads, validation_interval=1,
                           yolo_venv="")
        (work / "rows" / "const.json").write_text(json.dumps({"row": row, "curve": []}))
    failed = [name for name, proc in procs if proc.wait() != 0]
    load_end = os.getloadavg()[0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see the logs in {work})")
    got = {m: json.loads((work / "rows" / f"{m}.json").read_text()) for m in models}
    rows = [got[m]["row"] for m in models]
    latencies(rows, image_size=args.image_size, threads=args.threads, core=cores[0])
    curves = {m: got[m]["curve"] for m in trained}
    by = {r["model"]: r for r in rows}
    summary = "; ".join(f"{m}: valid AP50-95 {r.get('val AP')} (AP50 {r.get('val AP50')}, "
                        f"APs {r.get('val APs')}), test {r.get('test AP')}" for m, r in by.items())
    if not args.quick and "gfl" in by and "yolo11n" in by and by["yolo11n"].get("val AP"):
        summary += (f". gfl / YOLO11n: valid {by['gfl']['val AP'] / by['yolo11n']['val AP']:.2f}x, "
                    f"test {by['gfl']['test AP'] / max(by['yolo11n']['test AP'], 1e-9):.2f}x")
    name = "realdata_quick" if args.quick else "realdata"
    title = (f"Detectors on real photos (Roboflow Aquarium, CC BY 4.0; {args.image_size} px, CPU, "
             f"{budget:g} min each, side by side"
             + (", QUICK: no claims)" if args.quick else ")"))
    plot = Path(__file__).resolve().parent / "results" / f"{name}_curve.png"
    plot.parent.mkdir(exist_ok=True)
    plot_curves(curves, by.get("const", {}).get("val AP"), plot, title=title)
    notes = (("QUICK run: checks that the benchmark runs; no claims. " if args.quick else "")
             + f"Models {','.join(models)}, all trained at the same time, each from scratch for "
             f"{budget:g} min (max_train_minutes / Ultralytics time=, schedules fitted to it) in its own "
             f"process pinned to its own core, {args.threads} thread(s) each, {args.image_size} px, batch 8; "
             f"1-min load average {load_start:.1f} at the start, {load_end:.1f} at the end. Scored by "
             "pycocotools at the photos' own size on 'valid' (127 images) and 'test' (63 images); detforge's "
             "models see each photo resized by images.resize_rgb as the runtime does, YOLO11n its own "
             "predict(). "
             f"Curve (plot: benchmarks/results/{plot.name}): training seconds, AP50-95 on 'valid' "
             "(gfl: its validation during training; YOLO11n: its epoch checkpoints scored afterwards): "
             + "; ".join(f"{m}: " + ", ".join(f"{t:.0f}s {a:.3f}" for t, a in c
                                             if a is not None and t is not None)
                         for m, c in curves.items())
             + ". ONNX Runtime latency: batch 1, same threads, timed after every model is trained and "
             "scored, one graph after the other on one core (median of 100 runs); YOLO11n's graph has no "
             "NMS. "
             "Data: Roboflow Aquarium (CC BY 4.0, https://roboflow.com). " + args.note)
    write_result(name, title=title, rows=rows, summary=summary, notes=notes)


if __name__ == "__main__":
    main()
