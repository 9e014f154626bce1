"""Export: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 on CPU, speed and validation:mAP.

Speed, for ``mobilenet-v3`` at 320 px and ``resnet-50`` at 512 px (2 classes): an initialised model
(LeCun-normal convolutions, as tests/test_export.py saves one, so scores differ and NMS has work) is
saved as a run folder and exported twice by ``export.export_run``: fp32, and int8 (static QDQ
quantization calibrated on ``detforge synth`` frames). The three backends are timed on the same
synthetic frames, already at the model's input size, with the same number of threads
(``torch.set_num_threads`` = ``Predictor(threads=)``):

- eager: ``model(list of float CHW tensors in [0, 1])`` under ``torch.inference_mode``;
- ONNX fp32 / int8: ``Predictor.run_batch(uint8 N x S x S x 3)`` (normalisation, network, box decoding
  and NMS all inside the graph; eager does the same work inside torchvision's SSD).

Latency: per-image time at batch 1, median of ``--runs`` calls after warm-up; throughput: images/s
at batch 8 = 8 / median of ``--batch-runs`` calls; ``_best`` figures use the fastest call instead. The
backends take turns call by call (each after a 0.1 s pause, see ``time_backends``), so all three see
the same load on a shared machine. ``--threads 2 1`` makes a pass per thread count.

Accuracy: a trained run (``--run``, ``--validation``) is exported fp32 and int8 the same way and
``evaluate.evaluate`` computes the VOC07 ``validation:mAP`` of the run folder (PyTorch), of the fp32
deploy folder and of the int8 one (ONNX Runtime) on the same validation manifest.

Targets: ONNX fp32 >= 2x eager, int8 >= 1.5x fp32 (both at batch 1 and batch 8), int8 loses <= 1 mAP
point against fp32.

    python benchmarks/bench_export.py --run runs/demo --validation data/validation.manifest
    python benchmarks/bench_export.py --threads 2 1 --runs 20 --batch-runs 5 --no-accuracy
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# As detforge's CLI (cli/__init__.py): torch's OpenMP threads sleep, not spin, between ops; set before torch
# is imported. ONNX Runtime has its own thread pool. OMP_WAIT_POLICY=ACTIVE in the environment overrides.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

CASES = [("mobilenet-v3", 320), ("resnet-50", 512)]
BATCH = 8
PAUSE_S = 0.1  # before every timed call (see time_backends)
FP32_TARGET, INT8_TARGET, MAP_LOSS_TARGET = 2.0, 1.5, 1.0


def synth_calibration(folder: Path, count: int, *, seed: int) -> Path:
    """``count`` storage-box frames from ``detforge synth`` and one manifest listing them all."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "detforge",
            "synth",
            "--out",
            str(folder),
            "--images",
            str(count),
            "--seed",
            str(seed),
            "--size",
            "640x360",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = []
    for manifest in sorted((folder / "manifests").glob("*.manifest")):
        lines += [line for line in manifest.read_text().splitlines() if line.strip()]
    combined = folder / "calibration.manifest"
    combined.write_text("\n".join(lines) + "\n")
    return combined


def manifest_images(manifest: Path) -> list[np.ndarray]:
    from detforge.runtime import load_image

    return [load_image(json.loads(line)["source-ref"]) for line in manifest.read_text().splitlines() if line]


def save_untrained_run(folder: Path, base_network: str, image_size: int) -> Path:
    """A run folder holding an initialised model (as tests/test_export.py: LeCun-normal convolutions)."""
    import torch

    from detforge.models import build_model
    from detforge.training import checkpoint

    torch.manual_seed(0)
    model = build_model(base_network, num_classes=2, image_size=image_size)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.weight[0].numel()))
    for parameter in model.head.parameters():
        parameter.data *= 0.5
    info = checkpoint.RunInfo(
        base_network=base_network,
        image_shape=image_size,
        num_classes=2,
        classes=["blue box", "yellow box"],
        thresholds={"nms_threshold": 0.45, "nms_topk": 400, "score_threshold": 0.01},
    )
    checkpoint.save_model(folder, model, info)
    return folder


def export_both(
    run: Path, out: Path, *, calibration: Path, calibration_count: int, verify_images: list[str] | None = None
) -> tuple[Path, Path, dict]:
    """fp32 and int8 deploy folders of ``run`` (both verified against PyTorch by export_run)."""
    from detforge.deploy.export import export_run

    started = time.perf_counter()
    export_run(str(run), str(out / "fp32"), verify_images=verify_images)
    fp32_s = time.perf_counter() - started
    started = time.perf_counter()
    # the benchmark measures the int8 model whatever it loses or gains (its accuracy and speed tables are
    # measured below): never refused; export compares it with fp32 on other frames than it calibrates on
    comparison = synth_calibration(out / "comparison", 4, seed=101)
    export_run(
        str(run),
        str(out / "int8"),
        int8=True,
        calibration=str(calibration),
        calibration_count=calibration_count,
        verify_images=verify_images,
        validation=str(comparison),
        max_map_drop=100.0,
        min_speedup=0.0,
    )
    int8_s = time.perf_counter() - started
    return out / "fp32", out / "int8", {"export_fp32_s": round(fp32_s, 1), "export_int8_s": round(int8_s, 1)}


def time_backends(calls: dict, *, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each backend; backends take turns so they share the machine's load.

    Each timed call starts after a short pause: ONNX Runtime's and torch's thread pools spin for a
    while after a call, and on 2 cores the spinning pool of the backend before slowed the next one
    (eager mobilenet-v3 measured 2.7 s a call right after ONNX Runtime calls, 0.4 s after a pause).
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            time.sleep(PAUSE_S)
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def ratios(latency: dict, throughput: dict, suffix: str) -> dict:
    """ONNX fp32 vs eager and int8 vs fp32: speed-ups (> 1: faster) at batch 1 and batch 8."""
    return {
        f"fp32_vs_eager_b1{suffix}": round(latency["eager"] / latency["onnx-fp32"], 2),
        f"int8_vs_fp32_b1{suffix}": round(latency["onnx-fp32"] / latency["onnx-int8"], 2),
        f"fp32_vs_eager_b{BATCH}{suffix}": round(throughput["onnx-fp32"] / throughput["eager"], 2),
        f"int8_vs_fp32_b{BATCH}{suffix}": round(throughput["onnx-int8"] / throughput["onnx-fp32"], 2),
    }


def speed_case(
    arch: str,
    size: int,
    tmp: Path,
    *,
    frames: list[np.ndarray],
    calibration: Path,
    calibration_count: int,
    threads: list[int],
    runs: int,
    batch_runs: int,
) -> list[dict]:
    """Export ``arch`` once, then time the three backends at each thread count: one row per count."""
    import torch
    from PIL import Image

    from detforge.runtime import Predictor, resize_rgb
    from detforge.training.checkpoint import load_run_model

    run = save_untrained_run(tmp / f"run-{arch}", arch, size)
    verify = []
    rng = np.random.default_rng(0)
    for k in range(2):  # noise: an untrained model scores flat regions alike, noise keeps NMS free of ties
        path = tmp / f"verify-{arch}-{k}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        verify.append(str(path))
    fp32_dir, int8_dir, export_times = export_both(
        run,
        tmp / f"deploy-{arch}",
        calibration=calibration,
        calibration_count=calibration_count,
        verify_images=verify,
    )
    model, _ = load_run_model(str(run))
    model.eval()
    pixels = np.stack([resize_rgb(f, size) for f in frames[:BATCH]])
    tensors = [torch.from_numpy(p.copy()).permute(2, 0, 1).contiguous().float().div(255) for p in pixels]
    state = {"i": 0}

    def one() -> int:
        state["i"] = (state["i"] + 1) % BATCH
        return state["i"]

    def eager(items: list) -> None:
        with torch.inference_mode():
            model(items)

    rows = []
    for count in threads:
        torch.set_num_threads(count)
        fp32, int8 = Predictor(fp32_dir, threads=count), Predictor(int8_dir, threads=count)
        single = {
            "eager": lambda: eager([tensors[one()]]),
            "onnx-fp32": lambda: fp32.run_batch(pixels[one()][None]),  # noqa: B023 - used in this pass
            "onnx-int8": lambda: int8.run_batch(pixels[one()][None]),  # noqa: B023
        }
        batched = {
            "eager": lambda: eager(tensors),
            "onnx-fp32": lambda: fp32.run_batch(pixels),  # noqa: B023
            "onnx-int8": lambda: int8.run_batch(pixels),  # noqa: B023
        }
        single_s = time_backends(single, rounds=runs, warmup=3)
        batched_s = time_backends(batched, rounds=batch_runs, warmup=1)
        latency = {k: float(np.median(v)) * 1000 for k, v in single_s.items()}
        throughput = {k: BATCH / float(np.median(v)) for k, v in batched_s.items()}
        best_latency = {k: float(np.min(v)) * 1000 for k, v in single_s.items()}
        best_throughput = {k: BATCH / float(np.min(v)) for k, v in batched_s.items()}
        # the detections each backend finds on the batch (score >= 0.3): same work, same answers
        with torch.inference_mode():
            found = {"eager": sum(int((o["scores"] >= 0.3).sum()) for o in model(tensors))}
        for name, predictor in (("onnx-fp32", fp32), ("onnx-int8", int8)):
            _, scores, _, counts = predictor.run_batch(pixels)
            found[name] = int(sum((scores[i, : int(n)] >= 0.3).sum() for i, n in enumerate(counts)))
        row = {
            "architecture": arch,
            "image_size": size,
            "threads": count,
            **{f"{k}_ms_b1": round(v, 2) for k, v in latency.items()},
            **{f"{k}_img_s_b{BATCH}": round(v, 2) for k, v in throughput.items()},
            **ratios(latency, throughput, ""),
            **{f"{k}_ms_b1_best": round(v, 2) for k, v in best_latency.items()},
            **{f"{k}_img_s_b{BATCH}_best": round(v, 2) for k, v in best_throughput.items()},
            **ratios(best_latency, best_throughput, "_best"),
            "detections_b8_at_0.3": found,
            "onnx_mib": {
                "fp32": round((fp32_dir / "model.onnx").stat().st_size / 2**20, 1),
                "int8": round((int8_dir / "model.onnx").stat().st_size / 2**20, 1),
            },
            "runs_b1": runs,
            f"runs_b{BATCH}": batch_runs,
            **export_times,
        }
        print(row, flush=True)
        rows.append(row)
    return rows


def wait_for_run(run: Path, *, wait_s: float) -> str:
    """Wait (up to ``wait_s``) until the run has model.safetensors and its last epoch in metrics.csv."""
    epochs = int(json.loads((run / "hyperparams.json").read_text()).get("epochs", 0) or 0)
    deadline = time.monotonic() + wait_s
    while True:
        done = []
        if (run / "metrics.csv").exists():
            with open(run / "metrics.csv", newline="") as handle:
                done = [int(r["epoch"]) for r in csv.DictReader(handle) if r.get("epoch", "").isdigit()]
        last = max(done, default=0)
        if (run / "model.safetensors").exists() and epochs and last >= epochs:
            return f"finished ({last} of {epochs} epochs)"
        if time.monotonic() >= deadline:
            return f"still training: {last} of {epochs} epochs done when measured"
        print(f"waiting for {run}: {last} of {epochs} epochs", flush=True)
        time.sleep(30)


def accuracy(
    run: Path, validation: Path, tmp: Path, *, calibration: Path, calibration_count: int, wait_s: float
) -> dict:
    from detforge.evaluation.evaluate import evaluate

    state = wait_for_run(run, wait_s=wait_s)
    # a stable copy of what the run holds now (a run still training rewrites model.safetensors)
    snapshot = tmp / "trained-run"
    snapshot.mkdir()
    for name in ("model.safetensors", "model.json", "classes.json", "hyperparams.json"):
        if (run / name).exists():
            (snapshot / name).write_bytes((run / name).read_bytes())
    meta = json.loads((snapshot / "model.json").read_text())
    verify = []
    for line in validation.read_text().splitlines()[:4]:  # a relative source-ref is beside the manifest
        ref = Path(json.loads(line)["source-ref"])
        verify.append(str(ref if ref.is_absolute() or ref.exists() else validation.parent / ref))
    fp32_dir, int8_dir, export_times = export_both(
        snapshot,
        tmp / "deploy-trained",
        calibration=calibration,
        calibration_count=calibration_count,
        verify_images=verify,
    )
    maps = {}
    for name, path in (("pytorch", snapshot), ("onnx-fp32", fp32_dir), ("onnx-int8", int8_dir)):
        started = time.perf_counter()
        maps[name] = evaluate(str(path), str(validation), coco=False).metrics.voc07_map
        print(f"{name}: validation:mAP {maps[name]:.4f} ({time.perf_counter() - started:.1f} s)", flush=True)
    row = {
        "architecture": meta["base_network"],
        "image_size": meta["image_shape"],
        "run": str(run),
        "run_state": state,
        "epoch": meta.get("epoch"),
        "validation": str(validation),
        "validation_images": sum(1 for line in validation.read_text().splitlines() if line.strip()),
        "calibration_images": calibration_count,
        "run_recorded_validation_map": round((meta.get("metrics") or {}).get("validation:mAP") or 0.0, 4),
        **{f"{k}_map": round(v, 4) for k, v in maps.items()},
        "fp32_vs_pytorch_points": round(100 * (maps["onnx-fp32"] - maps["pytorch"]), 2),
        "int8_vs_fp32_points": round(100 * (maps["onnx-int8"] - maps["onnx-fp32"]), 2),
        **export_times,
    }
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2],
        help="torch and ONNX Runtime intra-op threads (several: a pass each)",
    )
    parser.add_argument("--runs", type=int, default=20, help="timed batch-1 calls per backend")
    parser.add_argument("--batch-runs", type=int, default=5, help=f"timed batch-{BATCH} calls per backend")
    parser.add_argument("--calibration-images", type=int, default=16, help="synth frames to calibrate int8")
    parser.add_argument("--run", type=Path, help="a trained run folder (accuracy)")
    parser.add_argument("--validation", type=Path, help="its validation manifest (accuracy)")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for --run to finish")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(args.threads))
    started, load = time.perf_counter(), os.getloadavg()
    speed_rows, accuracy_rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        calibration = synth_calibration(tmp / "synth", args.calibration_images, seed=11)
        frames = manifest_images(synth_calibration(tmp / "frames", BATCH, seed=23))
        if not args.no_speed:
            for arch, size in CASES:
                speed_rows.extend(
                    speed_case(
                        arch,
                        size,
                        tmp,
                        frames=frames,
                        calibration=calibration,
                        calibration_count=args.calibration_images,
                        threads=args.threads,
                        runs=args.runs,
                        batch_runs=args.batch_runs,
                    )
                )
        if not args.no_accuracy and args.run and args.validation:
            accuracy_rows.append(
                accuracy(
                    args.run,
                    args.validation,
                    tmp,
                    calibration=calibration,
                    calibration_count=args.calibration_images,
                    wait_s=args.wait,
                )
            )
    rows = [{"part": "speed", **r} for r in speed_rows] + [{"part": "accuracy", **r} for r in accuracy_rows]
    parts = []
    misses = []
    b8 = f"b{BATCH}"
    for r in speed_rows:
        parts.append(
            f"{r['architecture']}@{r['image_size']} ({r['threads']} threads): batch 1 eager / fp32 / int8 "
            f"{r['eager_ms_b1']} / "
            f"{r['onnx-fp32_ms_b1']} / {r['onnx-int8_ms_b1']} ms (fp32 {r['fp32_vs_eager_b1']}x eager, int8 "
            f"{r['int8_vs_fp32_b1']}x fp32; best-of {r['fp32_vs_eager_b1_best']}x, "
            f"{r['int8_vs_fp32_b1_best']}x), "
            f"batch {BATCH} {r[f'eager_img_s_{b8}']} / {r[f'onnx-fp32_img_s_{b8}']} / "
            f"{r[f'onnx-int8_img_s_{b8}']} img/s ({r[f'fp32_vs_eager_{b8}']}x, {r[f'int8_vs_fp32_{b8}']}x; "
            f"best-of {r[f'fp32_vs_eager_{b8}_best']}x, {r[f'int8_vs_fp32_{b8}_best']}x)"
        )
        for b in ("b1", b8):
            if r[f"fp32_vs_eager_{b}"] < FP32_TARGET:
                misses.append(
                    f"{r['architecture']} {r['threads']}t fp32/eager {b} "
                    f"{r[f'fp32_vs_eager_{b}']}x < {FP32_TARGET}x"
                )
            if r[f"int8_vs_fp32_{b}"] < INT8_TARGET:
                misses.append(
                    f"{r['architecture']} {r['threads']}t int8/fp32 {b} "
                    f"{r[f'int8_vs_fp32_{b}']}x < {INT8_TARGET}x"
                )
    for r in accuracy_rows:
        parts.append(
            f"validation:mAP {r['architecture']}@{r['image_size']} (trained): PyTorch "
            f"{r['pytorch_map']}, ONNX fp32 {r['onnx-fp32_map']}, int8 {r['onnx-int8_map']} "
            f"({r['int8_vs_fp32_points']:+} points)"
        )
        if -r["int8_vs_fp32_points"] > MAP_LOSS_TARGET:
            misses.append(f"int8 loses {-r['int8_vs_fp32_points']} mAP points > {MAP_LOSS_TARGET}")
    verdict = "targets missed: " + ", ".join(misses) if misses else "all measured targets met"
    summary = "; ".join([*parts, verdict])
    write_result(
        "export",
        title="Export: PyTorch eager vs ONNX Runtime fp32 vs int8 (CPU)",
        rows=rows,
        summary=summary,
        notes=f"CPU; per pass the same thread count ({', '.join(map(str, args.threads))}) for every backend "
        f"(torch.set_num_threads = Predictor(threads=)); OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} "
        "(detforge's CLI default). "
        "The machine's 2 cores were shared with other engineers' jobs (training, demos, tests) during the "
        f"run (load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), so absolute "
        "times are noisy: backends take turns call by call and the ratios are the figures to read. Figures "
        "are medians (targets are judged on them); '_best' = fastest call, closest to an idle machine. "
        "Eager PyTorch suffers most from a busy core: its 2 OpenMP threads meet at a barrier after each of "
        "mobilenet-v3's ~200 small ops and wait whenever one of them is descheduled (the same eager call "
        "measured 0.05 s and 1.6 s minutes apart), so its medians, and the fp32/eager ratios, swing the "
        "most. "
        "Speed models are initialised, not trained (LeCun-normal, 2 classes, nms_topk 400, score_threshold "
        "0.01: every anchor is an NMS candidate, the worst case for all three alike). int8 = ONNX Runtime "
        f"static QDQ quantization calibrated on {args.calibration_images} `detforge synth` frames. "
        f"Targets: fp32 >= {FP32_TARGET}x eager, int8 >= {INT8_TARGET}x fp32, int8 loses <= "
        f"{MAP_LOSS_TARGET} mAP point. Whole benchmark {time.perf_counter() - started:.0f} s.",
    )


if __name__ == "__main__":
    main()
