"""Training throughput: detforge's training loop vs a bare PyTorch loop, each architecture.

Same model (same seed), batch, optimizer (SGD, lr 0.001, momentum 0.9, weight decay 0.0005), same
number of steps. The bare loop trains on in-memory tensors already at the model's size; detforge's
loop reads PNG files through ``ManifestDataset`` + ``DataLoader``, steps the learning-rate schedule,
clips gradients and keeps its books: it is ``engine.train_one_epoch`` set up exactly as ``train.train``
sets it up (validation, checkpoints and metrics files, once per epoch, are not timed). After one
warm-up epoch each, epochs of the two alternate; images/s = batch / median step time (robust to the
load of a shared machine). The ratio detforge / bare shows what data loading and bookkeeping cost
(target >= 0.9).

    python benchmarks/bench_train.py                    # CPU, 128 px, every architecture
    python benchmarks/bench_train.py --device cuda      # GPU with AMP: resnet-50 @ 512, mobilenet-v3 @ 320
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def make_data(folder: Path, count: int, size: int) -> Path:
    """``count`` RGB PNGs with 1-3 colored boxes each, a manifest and classes.json."""
    from PIL import Image

    from detforge.data.groundtruth import make_record, write_manifest

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        boxes, ids = [], []
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(size // 8, size // 2, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            pixels[y : y + h, x : x + w] = (200, 40, 40)
            boxes.append([x, y, x + w, y + h])
            ids.append(int(rng.integers(0, 2)))
        name = f"b_{i:04d}.png"
        Image.fromarray(pixels).save(folder / name)
        records.append(
            make_record(
                name,
                width=size,
                height=size,
                boxes_xyxy=boxes,
                class_ids=ids,
                class_map={0: "a", 1: "b"},
                creation_date="2024-01-01T00:00:00",
            )
        )
    write_manifest(folder / "train.manifest", records)
    (folder / "classes.json").write_text(json.dumps(["a", "b"]))
    return folder / "train.manifest"


def hyperparameters(arch: str, size: int, batch: int, device: str, workers: int) -> dict:
    return {
        "num_classes": 2,
        "base_network": arch,
        "use_pretrained_model": 0,
        "mini_batch_size": batch,
        "image_shape": size,
        "workers": workers,
        "augmentation": "none",
        "device": device,
        "learning_rate": 0.001,
    }


def detforge_setup(manifest: Path, hp_raw: dict):
    """What ``train.train`` builds (dataset, sampler, loader, model, optimizer, schedule) -> epoch fn."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from detforge.models import build_model
    from detforge.training import engine
    from detforge.training.dataset import ManifestDataset, collate, load_split
    from detforge.training.hyperparams import parse_hyperparameters
    from detforge.training.train import build_optimizer, lr_multiplier, resolve_device

    hp = parse_hyperparameters(hp_raw)
    device = resolve_device(hp.device)
    samples, _ = load_split(manifest)
    dataset = ManifestDataset(samples, image_size=hp.image_shape, preset=hp.augmentation, train=True)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(
        dataset,
        batch_size=hp.mini_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=hp.workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    torch.manual_seed(0)
    model = build_model(hp.base_network, num_classes=2, image_size=hp.image_shape).to(device)
    optimizer = build_optimizer(model.parameters(), hp)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_multiplier(i, steps_per_epoch=steps, hp=hp)
    )
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    state = {"epoch": 0}

    def epoch() -> list[float]:
        state["epoch"] += 1
        sampler.set_epoch(state["epoch"])
        dataset.set_epoch(state["epoch"])
        marks = [time.perf_counter()]

        def on_step(step: int, images: int) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        engine.train_one_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            device=device,
            epoch=state["epoch"],
            scaler=scaler,
            grad_clip_norm=hp.grad_clip_norm,
            on_step=on_step,
        )
        return list(np.diff(marks))

    return epoch


def bare_setup(manifest: Path, hp: dict):
    """The same model and optimizer over in-memory tensors: no loader, no schedule, no clipping, no books."""
    import torch

    from detforge.models import build_model
    from detforge.training.dataset import ManifestDataset, load_split

    device = torch.device("cuda" if hp["device"] == "cuda" else "cpu")
    samples, _ = load_split(manifest)
    dataset = ManifestDataset(samples, image_size=hp["image_shape"])
    items = [dataset[i] for i in range(len(dataset))]
    images = [image.to(device) for image, _, _ in items]
    targets = [{k: v.to(device) for k, v in target.items()} for _, target, _ in items]
    torch.manual_seed(0)
    model = build_model(hp["base_network"], num_classes=2, image_size=hp["image_shape"]).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["learning_rate"], momentum=0.9, weight_decay=0.0005)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    batch = hp["mini_batch_size"]
    steps = len(images) // batch

    def epoch() -> list[float]:
        times = []
        for step in range(steps):
            started = time.perf_counter()
            chunk = slice(step * batch, (step + 1) * batch)
            with torch.autocast(device_type=device.type, enabled=scaler is not None):
                loss = sum(model(images[chunk], targets[chunk]).values())
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                torch.cuda.synchronize()
            else:
                loss.backward()
                optimizer.step()
            times.append(time.perf_counter() - started)
        return times

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=None, help="images per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats, best kept")
    args = parser.parse_args()
    import torch

    if args.device == "cpu":
        torch.set_num_threads(2)
        cases = [("mobilenet-v3", 128, 4), ("resnet-50", 128, 4), ("vgg-16", 128, 4)]
        images, workers = args.images or 16, 0
    else:
        cases = [("mobilenet-v3", 320, 32), ("resnet-50", 512, 16)]
        images, workers = args.images or 256, 6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, size, batch in cases:
            manifest = make_data(Path(tmp) / f"data{size}", images, size)
            hp = hyperparameters(arch, size, batch, args.device, workers)
            ours_epoch, bare_epoch = detforge_setup(manifest, hp), bare_setup(manifest, hp)
            ours_epoch(), bare_epoch()  # warm-up
            ours, bare = [], []
            for _ in range(args.repeats):  # alternate, so both see the same load on a shared machine
                bare += bare_epoch()
                ours += ours_epoch()
            bare_rate, ours_rate = batch / float(np.median(bare)), batch / float(np.median(ours))
            row = {
                "architecture": arch,
                "image_size": size,
                "batch": batch,
                "device": args.device,
                "amp": args.device == "cuda",
                "images_per_epoch": images,
                "workers": workers,
                "timed_steps": len(ours),
                "bare_images_per_s": round(bare_rate, 2),
                "detforge_images_per_s": round(ours_rate, 2),
                "ratio": round(ours_rate / bare_rate, 3),
            }
            if args.device == "cuda":
                row["gpu"] = torch.cuda.get_device_name(0)
            print(row, flush=True)
            rows.append(row)
    summary = ", ".join(
        f"{r['architecture']}@{r['image_size']}: {r['detforge_images_per_s']} vs "
        f"{r['bare_images_per_s']} img/s (ratio {r['ratio']})"
        for r in rows
    )
    name = "train" if args.device == "cpu" else "train_gpu"
    write_result(
        name,
        title=f"Training loop throughput vs a bare PyTorch loop ({args.device})",
        rows=rows,
        summary=summary,
        notes="CPU: 2 cores shared with other engineers' jobs at the time, torch threads 2; images/s = "
        "batch / median step time over alternating epochs after a warm-up epoch; random init."
        if args.device == "cpu"
        else "CUDA with AMP (fp16 autocast + GradScaler); best of repeats.",
    )


if __name__ == "__main__":
    main()
