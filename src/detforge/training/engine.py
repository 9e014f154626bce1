"""One training epoch and one validation pass (what ``train`` repeats every epoch).

``train_one_epoch`` steps the optimizer over a loader (AMP on CUDA, gradient clipping, a per-step
learning-rate schedule) and stops with a ``ConfigError`` when the loss is not finite.
``validate`` runs the model over its shard of the validation set, merges the metric accumulators of
every process (``metrics.DetectionAccumulator``, ``coco_metrics.CocoAccumulator``) and returns the
epoch's validation fields (``validation:mAP`` = VOC07 11-point AP at ``overlap_threshold``).

Not here: the run folder, checkpoints, early stopping (``train``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from detforge.errors import ConfigError
from detforge.evaluation.coco_metrics import CocoAccumulator
from detforge.evaluation.metrics import DetectionAccumulator
from detforge.training import distributed


def _to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def train_one_epoch(
    model,
    loader,
    optimizer,
    scheduler,
    *,
    device,
    epoch: int,
    scaler=None,
    grad_clip_norm: float = 0.0,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Train for one pass over ``loader``; returns mean losses, images seen and seconds."""
    import torch

    model.train()
    sums: dict[str, float] = {}
    steps = images_seen = 0
    started = time.perf_counter()
    amp = scaler is not None
    params = [p for p in model.parameters() if p.requires_grad]
    for step, (images, targets, _) in enumerate(loader):
        images, targets = _to_device(images, targets, device)
        with torch.autocast(device_type=device.type, enabled=amp):
            losses = model(images, targets)
            loss = sum(losses.values())
        value = float(loss.detach())
        if not math.isfinite(value):
            parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            raise ConfigError(
                f"the training loss became {value} at epoch {epoch}, step {step + 1} ({parts})",
                field="learning_rate",
                hint="lower learning_rate, add warmup_epochs, or check the boxes of the data",
            )
        optimizer.zero_grad(set_to_none=True)
        if amp:
            scaler.scale(loss).backward()
            if grad_clip_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
            optimizer.step()
        scheduler.step()
        sums["loss"] = sums.get("loss", 0.0) + value
        for key, part in losses.items():
            sums[key] = sums.get(key, 0.0) + float(part.detach())
        steps += 1
        images_seen += len(images)
        if on_step is not None:
            on_step(step + 1, len(images))
    seconds = time.perf_counter() - started
    return {
        "means": {k: v / max(steps, 1) for k, v in sums.items()},
        "images": images_seen,
        "seconds": seconds,
        "steps": steps,
    }


def validate(
    model,
    loader,
    *,
    device,
    class_names: list[str],
    iou_threshold: float,
    dist: distributed.Dist = distributed.Dist(),
    coco: bool = True,
) -> dict:
    """Validation fields of one epoch, identical on every process (accumulators merged across ranks)."""
    import torch

    model.eval()
    acc = DetectionAccumulator(len(class_names), iou_threshold=iou_threshold, score_threshold=0.5)
    coco_acc = CocoAccumulator(class_names) if coco else None
    with torch.inference_mode():
        for images, targets, indices in loader:
            outputs = model([image.to(device) for image in images])
            for output, target, index in zip(outputs, targets, indices, strict=True):
                fields = dict(
                    gt_boxes=target["boxes"].numpy().astype("float64"),
                    gt_classes=target["labels"].numpy() - 1,
                    pred_boxes=output["boxes"].float().cpu().numpy().astype("float64"),
                    pred_scores=output["scores"].float().cpu().numpy().astype("float64"),
                    pred_classes=output["labels"].cpu().numpy() - 1,
                    image_id=str(index),
                    gt_difficult=target["difficult"].numpy() if "difficult" in target else None,
                )
                acc.update(**fields)
                if coco_acc is not None:
                    coco_acc.update(**fields)
    if dist.enabled:
        states = distributed.all_gather_objects(
            dist, (acc.state_dict(), coco_acc.state_dict() if coco_acc else None)
        )
        acc = DetectionAccumulator.from_state_dict(states[0][0])
        for state, _ in states[1:]:
            acc.merge(DetectionAccumulator.from_state_dict(state))
        if coco_acc is not None:
            coco_acc = CocoAccumulator.from_state_dict(states[0][1])
            for _, state in states[1:]:
                coco_acc.merge(CocoAccumulator.from_state_dict(state))
    result = acc.compute()
    row = {"validation:mAP": _num(result.voc07_map), "all_point_map": _num(result.all_point_map)}
    if coco_acc is not None:
        stats = coco_acc.compute()
        row["coco_AP"] = stats.get("AP")
        row["coco_AP50"] = stats.get("AP50")
    for class_id, name in enumerate(class_names):
        row[f"AP/{name}"] = _num(result.per_class_ap_voc07.get(class_id, float("nan")))
    row["validation_images"] = result.num_images
    return row


class epoch_progress:  # noqa: N801 (used as a context manager, reads like a function)
    """A rich progress bar for one epoch (a no-op when disabled); yields ``advance(step, images)``."""

    def __init__(self, enabled: bool, epoch: int, total: int) -> None:
        self.enabled, self.epoch, self.total = enabled, epoch, total
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.bar = Progress(
            "[bold]epoch {task.fields[epoch]}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("train", total=self.total, epoch=self.epoch)
        return lambda step, images: self.bar.update(task, completed=step)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _num(value: float) -> float | None:
    return None if value is None or value != value else float(value)
