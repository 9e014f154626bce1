"""What every benchmark shares: machine description, peak memory, writing one result file."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine a figure was measured on (benchmarks compare ratios within one run)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def peak_rss_mib_of_children() -> float:
    """Peak resident memory of finished child processes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def write_result(
    name: str, *, title: str, rows: list[dict], summary: str, notes: str = "", headline: str = ""
) -> Path:
    """Save one benchmark's figures as benchmarks/results/<name>.json. ``headline``: the one line the README's
    table shows (the headline ratio against the baseline); without it the table shows ``summary``."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "name": name,
        "title": title,
        "machine": machine(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
    if headline:
        payload["headline"] = headline
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"{title}: {summary}")
    return path


def export_bench_deploy(folder: Path, *, image_size: int = 320, background_bias: float = 4.5) -> Path:
    """A deploy folder (model.onnx + model.json) of a stand-in mobilenet-v3 SSD at ``image_size`` px,
    exported by ``detforge export`` (NMS inside, verified against PyTorch). Built once into ``folder``.

    Runtime benchmarks time the machinery around the model, so the weights need not be trained, but a
    plain random-init model is no stand-in: its activations die out, every score ties at 1/3, hundreds of
    boxes pass any threshold and the export check cannot match tied boxes. Training one at 320 px takes
    many minutes on 2 shared cores. So: random weights (seed 0), BatchNorm statistics re-estimated on
    synthetic storage-box frames (live, input-dependent activations), and the background logit raised
    by ``background_bias`` so that a few boxes per frame (1-12 on the benchmark frames) score >= 0.3,
    like a trained detector. torch is needed here only, never by the runtime being measured.
    """
    deploy = Path(folder)
    if (deploy / "model.json").exists():
        return deploy
    import tempfile

    import torch
    from PIL import Image

    from detforge.deploy.export import export_run
    from detforge.models import build_model
    from detforge.runtime import load_image, resize_rgb
    from detforge.training.checkpoint import RunInfo, save_model

    torch.manual_seed(0)
    model = build_model("mobilenet-v3", num_classes=2, image_size=image_size).eval()
    frames = [resize_rgb(load_image(data), image_size) for data in bench_frames(16, seed=7)]
    batch = [torch.from_numpy(f.copy()).permute(2, 0, 1).float().div(255) for f in frames]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batch
        norm.train()
    with torch.no_grad():
        model(batch)
        model.eval()
        for conv in model.head.classification_head.modules():
            if isinstance(conv, torch.nn.Conv2d) and conv.bias is not None:
                conv.bias[0::3] += background_bias  # channels are anchor x class, class 0 = background
    info = RunInfo(
        base_network="mobilenet-v3",
        image_shape=image_size,
        num_classes=2,
        classes=["blue box", "yellow box"],
        thresholds={"nms_threshold": 0.45, "nms_topk": 400, "score_threshold": 0.01},
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_model(tmp, model, info)
        images = []
        for k, frame in enumerate(frames[:4]):
            path = Path(tmp) / f"verify_{k}.png"
            Image.fromarray(frame).save(path)
            images.append(str(path))
        export_run(
            tmp,
            str(deploy),
            name=f"bench-stand-in-mobilenet-v3-{image_size}",
            default_threshold=0.3,
            verify_images=images,
        )
    return deploy


def bench_frames(count: int, *, width: int = 640, height: int = 360, seed: int = 1) -> list[bytes]:
    """``count`` consecutive JPEG frames of synthetic storage-box videos (the runtime benchmarks' input)."""
    import tempfile

    from detforge.data.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        summary = synthesize(Path(tmp), images=count, seed=seed, size=(width, height))
        names = sorted((Path(tmp) / "images").iterdir())
        assert len(names) == summary.images
        return [p.read_bytes() for p in names]
