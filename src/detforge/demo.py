"""The main job: the whole workflow end to end on the embedded synthetic dataset (``detforge demo``).

Steps, each writing into ``OUT/`` and leaving a marker ``OUT/.steps/<step>.json`` (its result and seconds):

1. ``synth``: storage-box videos labeled by four Ground Truth jobs + a reviewer's discard list, and a
   separate held-out set (other videos, other seed) for the final predictions;
2. ``prepare``: join the jobs, discard rejected images, classes ``blue box``/``yellow box`` from the
   ``color``/``object`` fields, train/validation split by whole videos (validation videos are unseen);
3. ``augment``: offline x-flipped copies of the training images (boxes moved exactly);
4. ``train``: an SSD with SageMaker's hyperparameters (``DEMO_PROFILES``, their hyperparameters in
   ``recipes/demo-<profile>.json``: MobileNetV3 at a small size on a CPU, larger on a GPU),
   validation:mAP after every epoch, ``metrics.png``;
5. ``evaluate``: the trained run on the validation split (VOC07 mAP, COCO AP, PR curves);
6. ``export``: ``deploy/model.onnx`` verified against PyTorch;
7. ``predict``: the deployed model (ONNX Runtime, no torch) on the validation split (its mAP must match
   step 5) and on the held-out frames, with PDF and HTML reports;
8. ``summary``: every artifact, validation:mAP, latency per image; also ``OUT/summary.json``.

A second run skips the steps whose marker exists; ``start="train"`` (``--from train``) re-runs that step
and every later one. ``tiny=True`` is the test-suite variant: few small images, one short epoch, no
accuracy target. Not here: any of the steps' own logic (each is one library call).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from detforge import storage
from detforge.data.groundtruth import resolve_source_ref
from detforge.errors import ConfigError

STEPS = ("synth", "prepare", "augment", "train", "evaluate", "export", "predict", "summary")
CLASSES = ["blue box", "yellow box"]

# What the demo trains, by where it runs: the synthetic data here, the hyperparameters in the repository's
# recipes/demo-<profile>.json (a hyperparams.json `detforge train -p` takes too; num_classes comes from the
# data). The CPU profile is tuned to reach validation:mAP >= 0.9 within the 10-minute budget on 2 cores
# (docs/demo.md has the measurements behind it).
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DEMO_PROFILES = {
    "cpu": {
        "images": 600,
        "heldout": 48,
        "size": (640, 360),
        "frames_per_video": 20,
        "ops": ("xflip",),
        "recipe": "demo-cpu.json",
    },
    "gpu": {
        "images": 1200,
        "heldout": 96,
        "size": (640, 360),
        "frames_per_video": 20,
        "ops": ("xflip", "yflip"),
        "recipe": "demo-gpu.json",
    },
    "tiny": {
        "images": 60,
        "heldout": 6,
        "size": (320, 180),
        "frames_per_video": 10,
        "ops": ("xflip",),
        "recipe": "demo-tiny.json",
    },
}


def demo_hyperparameters(profile: dict) -> dict:
    """The hyperparameters of a profile as its recipe file holds them (SageMaker's string values)."""
    from detforge.training.hyperparams import read_hyperparameters_file

    path = RECIPES / profile["recipe"]
    if not path.exists():
        raise ConfigError(
            "the demo's recipe is missing (the demo runs from a checkout of the repository)", path=str(path)
        )
    return read_hyperparameters_file(path)


@dataclass
class DemoResult:
    """Where everything went and what it measured (``summary.json``)."""

    out: str
    summary: dict
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def _profile(tiny: bool, device: str) -> str:
    if tiny:
        return "tiny"
    if device == "cpu":
        return "cpu"
    try:
        import torch

        return "gpu" if torch.cuda.is_available() and device in ("auto", "cuda") else "cpu"
    except ImportError:
        return "cpu"


def _marker(out: str, step: str) -> str:
    return os.path.join(out, ".steps", f"{step}.json")


def _read_marker(out: str, step: str) -> dict | None:
    path = _marker(out, step)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _write_marker(out: str, step: str, result: dict) -> None:
    os.makedirs(os.path.join(out, ".steps"), exist_ok=True)
    storage.write_text(_marker(out, step), json.dumps(result, indent=2, default=str))


@contextlib.contextmanager
def _bar(enabled: bool, description: str, total: int):
    """A rich progress bar (when ``enabled``) as a callback ``update(done, total=None)``."""
    if not enabled:
        yield lambda done, total=None: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        f"   {description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done, total=None: bar.update(task, completed=done, **({"total": total} if total else {}))


def _step_synth(out: str, profile: dict, say: Callable, progress: bool) -> dict:
    from detforge.data.synth import synthesize

    with _bar(progress, "drawing frames", profile["images"]) as update:
        data = synthesize(
            os.path.join(out, "data", "synth"),
            images=profile["images"],
            seed=0,
            size=profile["size"],
            frames_per_video=profile["frames_per_video"],
            progress=update,
        )
    with _bar(progress, "drawing held-out frames", profile["heldout"]) as update:
        heldout = synthesize(
            os.path.join(out, "data", "heldout"),
            images=profile["heldout"],
            seed=1,
            size=profile["size"],
            frames_per_video=profile["frames_per_video"],
            progress=update,
        )
    say(
        f"{data.images} labeled frames in {len(data.job_images)} labeling jobs, {len(data.rejected)} ids on "
        f"the reviewer's discard list; {heldout.images} held-out frames (other videos)"
    )
    return {
        "images": data.images,
        "heldout": heldout.images,
        "jobs": data.job_images,
        "rejected": len(data.rejected),
    }


def _manifests(folder: str) -> list[str]:
    return sorted(
        os.path.join(folder, "manifests", n)
        for n in os.listdir(os.path.join(folder, "manifests"))
        if n.endswith(".manifest")
    )


def _step_prepare(out: str, profile: dict, say: Callable) -> dict:
    from detforge.data.prepare import prepare

    synth = os.path.join(out, "data", "synth")
    # the default split (auto): whole videos, since the demo has enough of them
    summary = prepare(
        _manifests(synth),
        os.path.join(out, "prepared"),
        discard=[os.path.join(synth, "rejected.txt")],
        class_from="{color} {object}",
        classes=CLASSES,
        validation_fraction=0.15,
        seed=7,
        overwrite=True,
    )
    heldout = os.path.join(out, "data", "heldout")
    prepare(
        _manifests(heldout),
        os.path.join(out, "heldout"),
        discard=[os.path.join(heldout, "rejected.txt")],
        class_from="{color} {object}",
        classes=CLASSES,
        validation_fraction=0.0,
        seed=7,
        overwrite=True,
    )
    say(
        f"discarded {len(summary.discarded)}, boxes per class {summary.boxes_per_class}; "
        f"train {summary.train}, validation {summary.validation} (split by {summary.group_by}: "
        f"{summary.groups} groups)"
    )
    return {
        "train": summary.train,
        "validation": summary.validation,
        "discarded": len(summary.discarded),
        "boxes_per_class": summary.boxes_per_class,
        "split": summary.group_by,
    }


def _step_augment(out: str, profile: dict, say: Callable, progress: bool) -> dict:
    from detforge.data.augment import augment

    with _bar(progress, "augmenting", 0) as update:
        result = augment(
            os.path.join(out, "prepared", "train.manifest"),
            out_dir=os.path.join(out, "augmented"),
            ops=profile["ops"],
            workers=2,
            overwrite=True,
            progress=update,
        )
    say(
        f"{result.written} new images ({', '.join(profile['ops'])}), {result.lossless} without re-encoding; "
        f"training manifest {result.manifest}"
    )
    return {"written": result.written, "lossless": result.lossless, "manifest": result.manifest}


def _step_train(out: str, profile: dict, say: Callable, progress: bool) -> dict:
    from detforge.training.train import TrainConfig, train

    hp = {"num_classes": str(len(CLASSES)), **demo_hyperparameters(profile)}
    run = os.path.join(out, "runs", "demo")
    if os.path.exists(run):
        shutil.rmtree(run)
    storage.write_text(os.path.join(out, "hyperparams.json"), json.dumps(hp, indent=2))
    result = train(
        TrainConfig(
            train=os.path.join(out, "augmented", "augmented.manifest"),
            validation=os.path.join(out, "prepared", "validation.manifest"),
            out=run,
            hyperparameters=hp,
            classes=os.path.join(out, "prepared", "classes.json"),
            progress=progress,
        )
    )
    say(
        f"{result.epochs} epochs, validation:mAP {result.last.get('validation:mAP', float('nan')):.3f} "
        f"(best {result.best_map or 0:.3f} at epoch {result.best_epoch}); {run}/metrics.png"
    )
    return {
        "run": run,
        "epochs": result.epochs,
        "validation:mAP": result.last.get("validation:mAP"),
        "best_map": result.best_map,
        "best_epoch": result.best_epoch,
        "history": [round(r.get("validation:mAP") or 0.0, 4) for r in result.history],
    }


def _step_evaluate(out: str, profile: dict, say: Callable) -> dict:
    from detforge.evaluation.evaluate import evaluate

    result = evaluate(
        os.path.join(out, "runs", "demo"),
        os.path.join(out, "prepared", "validation.manifest"),
        out_dir=os.path.join(out, "evaluation"),
    )
    m = result.metrics
    say(
        f"validation:mAP (VOC07, IoU 0.5) {m.voc07_map:.3f}, all-point AP {m.all_point_map:.3f}, "
        f"COCO AP {result.coco['AP'] if result.coco else float('nan'):.3f}"
    )
    return {
        "validation:mAP": m.voc07_map,
        "all_point_map": m.all_point_map,
        "coco_AP": result.coco["AP"] if result.coco else None,
        "images": m.num_images,
    }


def _step_export(out: str, profile: dict, say: Callable) -> dict:
    from detforge.deploy.export import export_run

    result = export_run(os.path.join(out, "runs", "demo"), os.path.join(out, "deploy"), name="storage-boxes")
    check = result.verify
    say(
        f"{result.model_path}: verified on {check.images} validation images: {check.raw_values} pre-NMS "
        f"scores and box coordinates match PyTorch (max score difference {check.max_score_diff:.1e}), "
        f"{check.detections} detections are a valid NMS of them"
    )
    return {
        "model": result.model_path,
        "verified_detections": check.detections,
        "size_bytes": os.path.getsize(result.model_path),
    }


def _latency_ms(deploy: str, image: str, repeats: int) -> float:
    import numpy as np

    from detforge.runtime import Predictor

    predictor = Predictor(deploy)
    predictor.predict([image])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict([image])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def _step_predict(out: str, profile: dict, say: Callable, progress: bool) -> dict:
    from detforge.deploy.predict import predict
    from detforge.evaluation.evaluate import evaluate

    deploy = os.path.join(out, "deploy")
    validation = os.path.join(out, "prepared", "validation.manifest")
    on_validation = os.path.join(out, "predictions", "validation.jsonl")
    predict(deploy, [validation], out=on_validation, threshold=0.01)
    onnx_map = evaluate(on_validation, validation, coco=False).metrics.voc07_map
    heldout = os.path.join(out, "heldout", "train.manifest")
    with _bar(progress, "predicting held-out frames", profile["heldout"]) as update:
        result = predict(
            deploy,
            [heldout],
            out=os.path.join(out, "predictions", "heldout.jsonl"),
            report=os.path.join(out, "report.pdf"),
            html=os.path.join(out, "report.html"),
            progress=update,
        )
    first_image = resolve_source_ref(json.loads(open(heldout).readline())["source-ref"], heldout)
    latency = _latency_ms(deploy, first_image, 5 if profile is DEMO_PROFILES["tiny"] else 30)
    # every detection counts here (the report's own mAP only sees those above the display threshold)
    heldout_map = evaluate(deploy, heldout, coco=False).metrics.voc07_map
    shown = heldout_map if heldout_map is not None else float("nan")
    say(
        f"ONNX Runtime on the validation split: mAP {onnx_map:.3f}; on {result.images} held-out frames: "
        f"{result.detections} detections, mAP {shown:.3f}; "
        f"{latency:.1f} ms per image at batch 1 (decode + resize + model)"
    )
    return {
        "onnx_validation_map": onnx_map,
        "heldout_images": result.images,
        "heldout_map": heldout_map,
        "detections": result.detections,
        "latency_ms": latency,
        "report_pdf": os.path.join(out, "report.pdf"),
        "report_html": os.path.join(out, "report.html"),
    }


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _summary(out: str, results: dict, seconds: dict, total: float, profile_name: str) -> dict:
    train = results.get("train", {})
    evaluation = results.get("evaluate", {})
    predicted = results.get("predict", {})
    return {
        "validation:mAP": evaluation.get("validation:mAP", train.get("validation:mAP")),
        "onnx_validation:mAP": predicted.get("onnx_validation_map"),
        "heldout:mAP": predicted.get("heldout_map"),
        "latency_ms": predicted.get("latency_ms"),
        "seconds": round(total, 1),
        "step_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "profile": profile_name,
        "hyperparameters": demo_hyperparameters(DEMO_PROFILES[profile_name]),
        "epochs_map": train.get("history"),
        "machine": _machine(),
        "artifacts": {
            "synthetic data": os.path.join(out, "data", "synth"),
            "prepared manifests": os.path.join(out, "prepared"),
            "augmented manifest": os.path.join(out, "augmented", "augmented.manifest"),
            "run folder": os.path.join(out, "runs", "demo"),
            "metrics plot": os.path.join(out, "runs", "demo", "metrics.png"),
            "evaluation": os.path.join(out, "evaluation", "metrics.json"),
            "deploy folder": os.path.join(out, "deploy"),
            "predictions": os.path.join(out, "predictions"),
            "PDF report": os.path.join(out, "report.pdf"),
            "HTML report": os.path.join(out, "report.html"),
        },
        "next": [
            "your own labels: detforge prepare JOB.manifest... --out prepared/ (README, docs/data.md)",
            f"serve it: detforge serve {os.path.join(out, 'deploy')} --port 8080 (docs/serve.md)",
            f"on a device: detforge edge {os.path.join(out, 'deploy')} --source camera:0 "
            "--broker mqtt://HOST:1883 (docs/edge.md)",
        ],
    }


def run_demo(
    out: str = "demo",
    *,
    start: str | None = None,
    tiny: bool = False,
    device: str = "auto",
    progress: bool = True,
    say: Callable[[str], None] = print,
    header: Callable[[int, str], None] | None = None,
) -> DemoResult:
    """Run (or finish) the demo in ``out``; ``start`` re-runs that step and the ones after it."""
    if start is not None and start not in STEPS:
        raise ConfigError(f"unknown step {start!r}; steps: {', '.join(STEPS)}", field="--from")
    if storage.is_remote(out):
        raise ConfigError("the demo writes a local folder", field="--out")
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    profile_name = _profile(tiny, device)
    profile = DEMO_PROFILES[profile_name]
    settings = {"profile": profile_name, "tiny": tiny}
    previous = _read_marker(out, "settings")
    if previous is not None and previous != settings and start is None:
        start = STEPS[0]  # another profile: nothing done before can be reused
    _write_marker(out, "settings", settings)
    header = header or (lambda i, name: say(f"== {i}/{len(STEPS)} {name}"))
    results: dict = {}
    seconds: dict = {}
    ran, reused = [], []
    rerun_from = STEPS.index(start) if start is not None else len(STEPS)
    begin = time.perf_counter()
    for index, step in enumerate(STEPS):
        marker = _read_marker(out, step)
        if step != "summary" and marker is not None and index < rerun_from:
            results[step], seconds[step] = marker["result"], marker["seconds"]
            reused.append(step)
            continue
        rerun_from = min(rerun_from, index)  # a step that runs makes every later one run too
        header(index + 1, step)
        tick = time.perf_counter()
        if step == "synth":
            result = _step_synth(out, profile, say, progress)
        elif step == "prepare":
            result = _step_prepare(out, profile, say)
        elif step == "augment":
            result = _step_augment(out, profile, say, progress)
        elif step == "train":
            result = _step_train(out, profile, say, progress)
        elif step == "evaluate":
            result = _step_evaluate(out, profile, say)
        elif step == "export":
            result = _step_export(out, profile, say)
        elif step == "predict":
            result = _step_predict(out, profile, say, progress)
        else:
            total = sum(seconds.values())
            result = _summary(out, results, seconds, total, profile_name)
            storage.write_text(os.path.join(out, "summary.json"), json.dumps(result, indent=2))
        seconds[step] = time.perf_counter() - tick
        results[step] = result
        if step != "summary":
            _write_marker(out, step, {"result": result, "seconds": seconds[step]})
        ran.append(step)
    summary = results["summary"]
    summary["this_run_seconds"] = round(time.perf_counter() - begin, 1)
    storage.write_text(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    return DemoResult(out=out, summary=summary, ran=ran, reused=reused)
