"""``detforge train``: SageMaker's object-detection training job on your own machine or cluster.

``train(config) -> TrainResult`` reads the manifests, builds the model (``models``), and for each epoch
trains (``engine.train_one_epoch``), validates (``engine.validate``), writes the run folder and
applies early stopping. The run folder (docs/architecture.md): ``hyperparams.json`` (resolved),
``classes.json``, ``model.safetensors`` + ``model.json`` (the last epoch), ``best.safetensors`` +
``best.json`` (highest validation:mAP), ``checkpoints/last.pt`` (resume state), ``metrics.jsonl``,
``metrics.csv``, ``metrics.png``, ``train.log``. Under ``torchrun`` only rank 0 writes.

The recipe (``recipe``, ``mosaic``; docs/training.md): ``ema_decay > 0`` validates and saves the moving
average of the weights; ``mosaic`` builds training images from four (off for the last
``mosaic_off_epochs``); ``multiscale`` resizes each batch; ``lr_schedule=cosine``;
``max_train_minutes`` fits the epochs to a time budget (measured after each epoch: the cosine and the
mosaic switch-off follow the new plan) and stops cleanly, checkpointed; ``validation_interval``.

``TrainConfig.on_epoch_end(epoch, row) -> bool`` is called on every process after each epoch;
returning True stops training (hyperparameter tuning prunes with it).

Not here: metric definitions (``metrics``), the model zoo (``models``), file formats of weights
(``checkpoint``), plots (``plots``).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import orjson

from detforge import storage
from detforge.errors import ConfigError, ModelError
from detforge.training import checkpoint, distributed, recipe
from detforge.training.hyperparams import (
    Hyperparameters,
    check_against_data,
    load_hyperparameters,
    parse_hyperparameters,
)
from detforge.training.optim import IGNORES_LEARNING_RATE, build_optimizer, ignored_hyperparameters
from detforge.training.tiles import TileCrops

log = logging.getLogger("detforge.training.train")


@dataclass
class TrainConfig:
    """Everything one training run needs; ``hyperparameters`` is a path, a dict or ``Hyperparameters``."""

    train: str
    out: str
    validation: str | None = None
    hyperparameters: str | Mapping | Hyperparameters | None = None
    overrides: Mapping = field(default_factory=dict)  # --set name=value, applied over the file
    weights: str | None = None  # --weights: a run folder or .safetensors to start from
    resume: bool = False  # continue the run in ``out`` from checkpoints/last.pt
    classes: str | None = None  # a classes.json; default: beside the train manifest, else its class map
    label_attribute: str | None = None
    on_epoch_end: Callable[[int, dict], bool] | None = None
    progress: bool = True


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: str
    epochs: int
    history: list[dict]
    best_epoch: int | None
    best_map: float | None
    stopped_early: bool
    stop_reason: str | None
    classes: list[str]
    hyperparams: Hyperparameters
    model: object = field(default=None, repr=False)  # the trained model (last epoch), on its device

    @property
    def last(self) -> dict:
        """The metrics row of the last epoch."""
        return self.history[-1] if self.history else {}


def resolve_device(name: str):
    """``auto`` -> cuda, else mps, else cpu; a named device must be available."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            "CUDA is not available on this machine", field="device", hint="use device=cpu or auto"
        )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(
            "Apple MPS is not available on this machine", field="device", hint="use device=auto"
        )
    return torch.device(name)


def lr_multiplier(
    step: int, *, steps_per_epoch: int, hp: Hyperparameters, epochs: int | None = None
) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warm-up, then x factor per lr step
    (``lr_schedule=step``) or a cosine over ``epochs`` (default ``hp.epochs``; ``lr_schedule=cosine``);
    1 for an optimizer without a learning rate (MXNet's adadelta)."""
    if hp.optimizer in IGNORES_LEARNING_RATE:
        return 1.0
    return recipe.lr_factor(step, steps_per_epoch=steps_per_epoch, epochs=epochs or hp.epochs,
                            warmup_epochs=hp.warmup_epochs, schedule=hp.lr_schedule,
                            steps=hp.lr_scheduler_step, step_factor=hp.lr_scheduler_factor,
                            min_factor=hp.lr_min_factor)


def freeze(model, pattern: str, *, base_network: str = "") -> list[str]:
    """Stop gradients for parameters whose torch name or SageMaker MXNet name (``detforge.training.layers``,
    vgg-16 and resnet-50 backbones) matches ``pattern`` (re.search); returns their torch names."""
    from detforge.training.layers import matching_parameters, mxnet_names

    if not pattern:
        return []
    frozen = matching_parameters(model, base_network, pattern)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if not frozen:
        first = next(iter(dict(model.named_parameters())))
        mx = next(iter(mxnet_names(model, base_network).values()), None)
        raise ConfigError(
            f"matches no parameter of the model (names look like {first!r}"
            + (f" or, as SageMaker's MXNet network names them, {mx!r}" if mx else "") + ")",
            field="freeze_layer_pattern",
            hint="`detforge train --list-layers -p hyperparams.json` lists them",
        )
    return frozen


def load_initial_weights(model, source: str, *, base_network: str, num_classes: int,
                         detector: str = "ssd") -> str:
    """``--weights``: copy every tensor of an earlier detforge model whose name and shape fit."""
    info = checkpoint.read_run_info(source)
    if info.detector != detector:
        raise ModelError(
            f"is a detector={info.detector} model but detector is {detector}", path=source, field="--weights"
        )
    if info.base_network != base_network:
        raise ModelError(
            f"is a {info.base_network} model but base_network is {base_network}",
            path=source,
            field="--weights",
        )
    weights, _ = checkpoint._locate(os.fspath(source), "model")
    state = checkpoint.load_state_dict(weights)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    fresh = len(own) - len(usable)
    note = f"started from {weights}: {len(usable)} tensors loaded"
    if fresh:
        note += f", {fresh} initialised afresh" + (
            f" (classes {info.num_classes} -> {num_classes})" if info.num_classes != num_classes else ""
        )
    return note


def _write_metrics(run_dir: str, history: list[dict]) -> None:
    storage.write_bytes(
        storage.join(run_dir, "metrics.jsonl"), b"".join(orjson.dumps(row) + b"\n" for row in history)
    )
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    storage.write_text(storage.join(run_dir, "metrics.csv"), text.getvalue())
    from detforge.training.plots import plot_metrics

    plot_metrics(history, storage.join(run_dir, "metrics.png"), title=storage.basename(run_dir))


def _log_line(row: dict) -> str:
    parts = [f"epoch {row['epoch']}:"]
    for key in (
        "validation:mAP",
        "all_point_map",
        "coco_AP",
        "train_loss",
        "lr",
        "images_per_s",
        "epoch_time_s",
    ):
        value = row.get(key)
        if value is not None:
            parts.append(f"{key}={value:.4g}" if key in ("lr",) else f"{key}={value:.3f}")
    return " ".join(parts)


def _setup_logging(run_dir: str, main: bool) -> logging.Handler | None:
    if not main or storage.is_remote(run_dir):
        return None
    os.makedirs(run_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _resolve_hp(config: TrainConfig) -> Hyperparameters:
    source = config.hyperparameters
    if isinstance(source, Hyperparameters):
        return parse_hyperparameters({**source.to_json(), **config.overrides}) if config.overrides else source
    if isinstance(source, Mapping):
        return parse_hyperparameters({**source, **config.overrides})
    return load_hyperparameters(source, overrides=config.overrides)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training job; see the module docstring for what it writes."""
    import torch
    from torch.utils.data import DataLoader

    from detforge.data.groundtruth import classes_beside, read_class_names
    from detforge.models import build_model
    from detforge.training import engine
    from detforge.training.dataset import ManifestDataset, collate, load_split

    run_dir = os.fspath(config.out)
    if config.resume:
        check_resume_options(run_dir, hyperparameters=config.hyperparameters, weights=config.weights,
                             classes=config.classes)
        saved = storage.join(run_dir, "hyperparams.json")
        if not storage.exists(saved):
            raise ModelError("nothing to resume: hyperparams.json is missing", path=saved)
        hp = parse_hyperparameters(
            {**orjson.loads(storage.read_bytes(saved)), **config.overrides}, source=saved
        )
    else:
        hp = _resolve_hp(config)
    device = resolve_device(hp.device)
    dist = distributed.setup(device.type)
    handler = _setup_logging(run_dir, dist.main)
    try:
        if device.type == "cuda" and dist.enabled:
            device = torch.device("cuda", dist.local_rank)
            torch.cuda.set_device(device)
        if hp.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(hp.seed)
        random.seed(hp.seed)
        np.random.seed(hp.seed)
        for note in (*hp.notes, *ignored_hyperparameters(hp)):
            log.info(note)

        if config.resume:  # the run's own classes, whatever the manifests' folders hold now
            names = read_class_names(storage.join(run_dir, "classes.json"))
        else:
            names = classes_beside(config.train, config.classes)
        train_samples, names = load_split(config.train, classes=names, label_attribute=config.label_attribute)
        if not train_samples:
            raise ConfigError("the training manifest has no images", path=config.train)
        val_samples = []
        if config.validation:
            val_samples, _ = load_split(
                config.validation, classes=names, label_attribute=config.label_attribute
            )
        max_boxes = max(len(s.boxes) for s in (*train_samples, *val_samples))  # label_width: both
        for note in check_against_data(
            hp, num_classes=len(names), num_samples=len(train_samples), max_boxes=max_boxes
        ):
            log.info(note)
        # SageMaker's mini_batch_size is per machine: split over the machine's processes (GPUs); with
        # several machines a step sees mini_batch_size x machines images.
        per_process = batch_per_process(hp.mini_batch_size, dist)
        shard_size = -(-len(train_samples) // dist.world_size)

        cache = hp.image_cache or None
        train_set = ManifestDataset(
            train_samples,
            image_size=hp.image_shape,
            preset=hp.augmentation,
            train=True,
            cache_dir=cache,
            seed=hp.seed,
            mosaic=hp.mosaic,
            scale_jitter=hp.scale_jitter,
            cache_images=hp.cache_images,
            tiles=TileCrops.from_hyperparameters(hp),
        )
        train_set.fill_cache()
        sampler = torch.utils.data.DistributedSampler(
            train_set,
            num_replicas=dist.world_size,
            rank=dist.rank,
            shuffle=True,
            seed=hp.seed,
            drop_last=False,
        )
        loader_args = dict(collate_fn=collate, num_workers=hp.workers, pin_memory=device.type == "cuda")
        # a last batch of one image would break BatchNorm on the 1x1 maps: drop the remainder instead
        train_loader = DataLoader(
            train_set,
            batch_size=per_process,
            sampler=sampler,
            drop_last=shard_size >= per_process,
            **loader_args,
        )
        val_loader = None
        if val_samples:
            val_set = ManifestDataset(
                val_samples, image_size=hp.image_shape, cache_dir=cache, cache_images=hp.cache_images
            )
            val_set.fill_cache()
            shard = list(range(dist.rank, len(val_set), dist.world_size))
            val_loader = DataLoader(val_set, batch_size=per_process, sampler=shard, **loader_args)

        model = build_model(
            hp.base_network,
            detector=hp.detector,
            num_classes=hp.num_classes,
            image_size=hp.image_shape,
            pretrained_backbone=bool(hp.use_pretrained_model) and not (config.weights or config.resume),
            nms_threshold=hp.nms_threshold,
            nms_topk=hp.nms_topk,
            score_threshold=hp.score_threshold,
        )
        if config.weights and not config.resume:
            log.info(
                load_initial_weights(
                    model,
                    config.weights,
                    base_network=hp.base_network,
                    num_classes=hp.num_classes,
                    detector=hp.detector,
                )
            )
        frozen = freeze(model, hp.freeze_layer_pattern, base_network=hp.base_network)
        if frozen:
            log.info(f"froze {len(frozen)} parameters matching {hp.freeze_layer_pattern!r}")
        model.to(device)
        if dist.enabled and hp.sync_batchnorm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        train_model = model
        if dist.enabled:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], hp)
        steps_per_epoch = len(train_loader)
        plan = {"epochs": hp.epochs, "seconds": 0.0}  # the time budget may shorten the run
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(step, steps_per_epoch=steps_per_epoch, hp=hp, epochs=plan["epochs"]),
        )
        ema = recipe.ModelEMA(model, hp.ema_decay) if hp.ema_decay > 0 else None
        eval_model = ema.module if ema is not None else model
        if hp.multiscale > 0:
            train_loader = recipe.MultiScaleLoader(
                train_loader, image_size=hp.image_shape, multiscale=hp.multiscale, seed=hp.seed
            )
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None

        info = checkpoint.RunInfo(
            detector=hp.detector,
            base_network=hp.base_network,
            image_shape=hp.image_shape,
            num_classes=hp.num_classes,
            classes=list(names),
            thresholds={
                "nms_threshold": hp.nms_threshold,
                "nms_topk": hp.nms_topk,
                "score_threshold": hp.score_threshold,
                "overlap_threshold": hp.overlap_threshold,
            },
            hyperparams=hp.to_json(),
            source_run=run_dir,
        )
        history: list[dict] = []
        start_epoch = 1
        early = {"best": None, "bad_epochs": 0}
        best = {"epoch": None, "map": None}
        if config.resume:
            state = checkpoint.load_state(run_dir)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            plan["seconds"] = float((state.get("plan") or {}).get("seconds", 0.0))
            plan["epochs"] = recipe.plan_epochs(  # --set epochs=N may have changed the plan
                epochs=hp.epochs,
                done=int(state["epoch"]),
                seconds_so_far=plan["seconds"],
                budget_minutes=hp.max_train_minutes,
            )
            history = [orjson.loads(row) for row in state["history"]]
            early, best = state["early_stopping"], state["best"]
            start_epoch = int(state["epoch"]) + 1
            checkpoint.set_rng_state(state["rng"])
            log.info(f"resuming {run_dir} after epoch {state['epoch']}")
        elif dist.main:
            storage.write_bytes(
                storage.join(run_dir, "hyperparams.json"),
                orjson.dumps(hp.to_json(), option=orjson.OPT_INDENT_2),
            )
            storage.write_bytes(storage.join(run_dir, "classes.json"), orjson.dumps(list(names)))
        if dist.main:
            checkpoint.write_inputs(run_dir, train=config.train, validation=config.validation,
                                    label_attribute=config.label_attribute,
                                    weights=None if config.resume else config.weights)
        log.info(
            f"training {hp.detector} {hp.base_network} at {hp.image_shape} px "
            f"on {device} x{dist.world_size}: "
            f"{len(train_samples)} train / {len(val_samples)} validation images, "
            f"batch {hp.mini_batch_size} per machine ({per_process} per process, "
            f"{per_process * dist.world_size} per step), {hp.epochs} epochs"
        )

        stopped, reason = False, None

        def on_step(step: int, images: int, advance=None) -> None:
            if ema is not None:
                ema.update(model)
            if advance is not None:
                advance(step, images)

        for epoch in range(start_epoch, hp.epochs + 1):
            if epoch > plan["epochs"]:
                break
            epoch_started = time.perf_counter()
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            if isinstance(train_loader, recipe.MultiScaleLoader):
                train_loader.set_epoch(epoch)
            train_set.mosaic = hp.mosaic if epoch <= plan["epochs"] - hp.mosaic_off_epochs else 0.0
            with engine.epoch_progress(config.progress and dist.main, epoch, steps_per_epoch) as advance:
                result = engine.train_one_epoch(
                    train_model,
                    train_loader,
                    optimizer,
                    scheduler,
                    device=device,
                    epoch=epoch,
                    scaler=scaler,
                    grad_clip_norm=hp.grad_clip_norm,
                    on_step=lambda step, images, advance=advance: on_step(step, images, advance),
                )
            means = result["means"]
            keys = sorted(means)
            averaged = dict(
                zip(keys, distributed.all_reduce_mean(dist, [means[k] for k in keys]), strict=True)
            )
            row = {"epoch": epoch, "train_loss": averaged.get("loss")}
            row |= {f"train_loss_{k}": v for k, v in averaged.items() if k != "loss"}
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["epoch_time_s"] = result["seconds"]
            row["images_per_s"] = result["images"] * dist.world_size / max(result["seconds"], 1e-9)
            distributed.broadcast_buffers(dist, model)
            last_planned = epoch >= min(plan["epochs"], hp.epochs)
            if hp.max_train_minutes > 0 and not last_planned:
                # would the next epoch still fit? (mean epoch time so far, validation included)
                seconds = plan["seconds"] + time.perf_counter() - epoch_started
                last_planned = (
                    recipe.plan_epochs(
                        epochs=hp.epochs,
                        done=epoch,
                        seconds_so_far=seconds,
                        budget_minutes=hp.max_train_minutes,
                    )
                    <= epoch
                )
            if val_loader is not None and (epoch % hp.validation_interval == 0 or last_planned):
                started = time.perf_counter()
                row |= engine.validate(
                    eval_model,
                    val_loader,
                    device=device,
                    class_names=list(names),
                    iou_threshold=hp.overlap_threshold,
                    dist=dist,
                )
                row["validation_time_s"] = time.perf_counter() - started
            plan["seconds"] += time.perf_counter() - epoch_started
            if hp.max_train_minutes > 0:
                plan["epochs"] = recipe.plan_epochs(
                    epochs=hp.epochs,
                    done=epoch,
                    seconds_so_far=plan["seconds"],
                    budget_minutes=hp.max_train_minutes,
                )
                row["planned_epochs"] = plan["epochs"]
            row["train_time_s"] = plan["seconds"]
            history.append(row)
            score = row.get("validation:mAP")
            improved_best = score is not None and (best["map"] is None or score > best["map"])
            if improved_best:
                best = {"epoch": epoch, "map": score}
            early = _early_stopping_update(early, score, hp)
            if dist.main:
                info.epoch, info.metrics = epoch, {k: v for k, v in row.items() if not k.startswith("AP/")}
                checkpoint.save_model(run_dir, eval_model, info)
                if improved_best or (val_loader is None):
                    checkpoint.save_model(run_dir, eval_model, info, name="best")
                _write_metrics(run_dir, history)
                checkpoint.save_state(
                    run_dir,
                    {
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler else {},
                        "history": [orjson.dumps(r).decode() for r in history],
                        "early_stopping": early,
                        "best": best,
                        "ema": ema.state_dict() if ema is not None else {},
                        "plan": plan,
                        "rng": checkpoint.rng_state(),
                        "data": {
                            "train": os.fspath(config.train),
                            "validation": os.fspath(config.validation) if config.validation else None,
                        },
                    },
                )
                log.info(_log_line(row))
            distributed.barrier(dist)
            if (
                hp.early_stopping
                and epoch >= hp.early_stopping_min_epochs
                and early["bad_epochs"] >= hp.early_stopping_patience
            ):
                stopped, reason = (
                    True,
                    (
                        f"validation:mAP did not improve by more than "
                        f"{hp.early_stopping_tolerance} (relative) for {early['bad_epochs']} epochs"
                    ),
                )
            if not stopped and config.on_epoch_end is not None and config.on_epoch_end(epoch, row):
                stopped, reason = True, "stopped by on_epoch_end"
            if not stopped and epoch >= plan["epochs"] and plan["epochs"] < hp.epochs:
                stopped = True
                reason = f"the time budget (max_train_minutes={hp.max_train_minutes:g}) is spent"
            if stopped:
                log.info(f"early stop after epoch {epoch}: {reason}")
                break
        return TrainResult(
            run_dir=run_dir,
            epochs=len(history),
            history=history,
            best_epoch=best["epoch"],
            best_map=best["map"],
            stopped_early=stopped,
            stop_reason=reason,
            classes=list(names),
            hyperparams=hp,
            model=eval_model,
        )
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        distributed.teardown(dist)


def resume_data(run_dir: str, validation: str | None = None) -> tuple[str, str | None]:
    """The train and validation manifests an interrupted run was started with (for ``--resume``)."""
    inputs = checkpoint.read_inputs(run_dir)
    return inputs.train, validation or inputs.validation


def batch_per_process(mini_batch_size: int, dist: distributed.Dist) -> int:
    """Images per process and step: SageMaker's ``mini_batch_size`` is per machine, shared by the
    machine's ``local_world_size`` processes (ConfigError when it does not split evenly or leaves fewer
    than 2 images, which BatchNorm needs)."""
    local = max(1, dist.local_world_size)
    if mini_batch_size % local:
        raise ConfigError(
            f"{mini_batch_size} does not split evenly over the {local} processes of a machine "
            "(SageMaker's mini_batch_size is per machine)",
            field="mini_batch_size",
        )
    per_process = mini_batch_size // local
    if per_process < 2:
        raise ConfigError(
            f"gives {per_process} image per process and step; BatchNorm needs at least 2",
            field="mini_batch_size",
            hint=f"use mini_batch_size >= {2 * local}",
        )
    return per_process


def check_resume_options(run_dir: str, *, out: str | None = None, train: str | None = None,
                         hyperparameters=None, weights: str | None = None,
                         classes: str | None = None) -> None:
    """``--resume RUN`` continues RUN as it was started: ConfigError for an option that would change it
    (``--hyperparameters``, ``--weights``, ``--classes``, another ``--out``, another ``--train``).
    ``--set name=value`` (e.g. more epochs) and ``--validation`` stay allowed."""
    def refuse(option: str, why: str) -> None:
        raise ConfigError(f"cannot be combined with --resume: {why}", field=option,
                          hint=f"--resume {run_dir} continues with the run's own settings; change one with "
                               "--set name=value, or start a new run without --resume")

    if hyperparameters is not None:
        refuse("--hyperparameters", "the run's hyperparams.json is used")
    if weights is not None:
        refuse("--weights", "the weights come from the run's checkpoint")
    if classes is not None:
        refuse("--classes", "the run's classes.json is used")
    if out is not None and os.path.abspath(os.fspath(out)) != os.path.abspath(os.fspath(run_dir)):
        refuse("--out", f"the run continues in {run_dir} itself, not in {out}")
    if train is not None:
        saved = resume_data(run_dir)[0]
        if saved != train and os.path.abspath(saved) != os.path.abspath(train):
            refuse("--train", f"the run was started on {saved}")


def _early_stopping_update(state: dict, score: float | None, hp: Hyperparameters) -> dict:
    """SageMaker's rule: an epoch counts as an improvement when (mAP - best) / best > tolerance."""
    if score is None:
        return state
    best = state["best"]
    if best is None:
        return {"best": score, "bad_epochs": 0}
    improvement = (score - best) / best if best > 0 else (float("inf") if score > best else 0.0)
    if improvement > hp.early_stopping_tolerance:
        return {"best": score, "bad_epochs": 0}
    return {"best": best, "bad_epochs": state["bad_epochs"] + 1}
