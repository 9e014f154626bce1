"""``detforge train``: SageMaker's object-detection training job on your own machine or cluster.

``train(config) -> TrainResult`` reads like torchvision's reference script: ``_start`` resolves what the
run starts from (a fresh run, or the run folder being resumed: the one resume path), ``_build_data``
the loaders, ``_build_model`` the model (``models``), ``_training_state`` the optimizer, schedule,
EMA and time budget; then each epoch trains (``engine.train_one_epoch``), validates
(``engine.validate``), records the row (``TrainingState.record``), writes the run folder and asks
``_stop_reason``. ``TrainingState.state_dict``/``load_state_dict`` are the one place that says what
``checkpoints/last.pt`` holds.

The run folder (docs/architecture.md): ``hyperparams.json`` (resolved), ``classes.json`` and
``inputs.json`` (the manifests, ``checkpoint.RunInputs``): its inputs as plain JSON, written at every
start; ``model.safetensors`` + ``model.json`` (the last epoch), ``best.safetensors`` + ``best.json``
(highest validation:mAP), ``checkpoints/last.pt`` (resume state), ``metrics.jsonl``, ``metrics.csv``,
``metrics.png``, ``train.log``. Under ``torchrun`` only rank 0 writes (and logs).

The recipe (``recipe``, ``mosaic``; docs/training.md): ``ema_decay > 0`` validates and saves the moving
average of the weights; ``mosaic`` builds training images from four (off for the last
``mosaic_off_epochs``); ``multiscale`` resizes each batch; ``lr_schedule=cosine``;
``max_train_minutes`` fits the epochs to a time budget (``recipe.Budget``, re-planned after each epoch:
the cosine and the mosaic switch-off follow the new plan) and stops cleanly, checkpointed;
``validation_interval``.

``TrainConfig.on_epoch_end(epoch, row) -> bool`` is called on every process after each epoch;
returning True stops training (hyperparameter tuning prunes with it).

Not here: metric definitions (``metrics``), the model zoo (``models``), file formats of weights and of
the run folder (``checkpoint``), the optimizers and schedule (``optim``), plots (``plots``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
from detforge.training.optim import build_optimizer, build_scheduler, ignored_hyperparameters
from detforge.training.optim import lr_multiplier as lr_multiplier  # re-exported (bench_train)
from detforge.training.tiles import TileCrops

log = logging.getLogger("detforge.training.train")


@dataclass
class TrainConfig:
    """Everything one training run needs; ``hyperparameters`` is a path, a dict or ``Hyperparameters``.
    The ``detforge train`` options are these fields (tests/training/test_train_cli.py checks them)."""

    train: str | None  # the training manifest; with ``resume``: the run's own when None
    out: str | None  # the run folder; with ``resume=RUN``: RUN when None
    validation: str | None = None  # with ``resume``: the run's own when None
    hyperparameters: str | Mapping | Hyperparameters | None = None
    overrides: Mapping = field(default_factory=dict)  # --set name=value, applied over the file
    weights: str | None = None  # --weights: a run folder or .safetensors to start from
    resume: bool | str = False  # continue a run from checkpoints/last.pt: True (the run in ``out``) or RUN
    classes: str | None = None  # a classes.json; default: beside the train manifest, else its class map
    label_attribute: str | None = None
    on_epoch_end: Callable[[int, dict], bool] | None = None
    progress: bool = True
    console: bool = False  # the log lines on stderr too (the CLI)


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
    main: bool = True  # this process wrote the run folder (rank 0 under torchrun)

    @property
    def last(self) -> dict:
        """The metrics row of the last epoch."""
        return self.history[-1] if self.history else {}

    def summary(self) -> str:
        """One line: epochs, run folder, best validation:mAP, why it stopped early."""
        best = "-" if self.best_map is None else f"{self.best_map:.3f} (epoch {self.best_epoch})"
        return f"{self.epochs} epochs -> {self.run_dir}; best validation:mAP {best}" + (
            f"; stopped early: {self.stop_reason}" if self.stopped_early else ""
        )


@dataclass
class TrainingState:
    """What a run changes as it trains; ``state_dict()`` is what ``checkpoints/last.pt`` holds and
    ``load_state_dict()`` continues from it (the random generators included)."""

    model: Any  # the plain model (not the DDP wrapper)
    optimizer: Any
    scheduler: Any
    budget: recipe.Budget
    scaler: Any = None  # AMP's GradScaler on CUDA
    ema: recipe.ModelEMA | None = None
    epoch: int = 0  # the last finished epoch
    history: list[dict] = field(default_factory=list)
    early_stopping: dict = field(default_factory=lambda: {"best": None, "bad_epochs": 0})
    best: dict = field(default_factory=lambda: {"epoch": None, "map": None})

    @property
    def eval_model(self):
        """The model validated and saved: the moving average with ``ema_decay > 0``."""
        return self.ema.module if self.ema is not None else self.model

    def record(self, row: dict, hp: Hyperparameters) -> bool:
        """Add an epoch's metrics row (history, best epoch, early stopping); True for a new best."""
        self.epoch = row["epoch"]
        self.history.append(row)
        score = row.get("validation:mAP")
        improved = score is not None and (self.best["map"] is None or score > self.best["map"])
        if improved:
            self.best = {"epoch": self.epoch, "map": score}
        self.early_stopping = _early_stopping_update(self.early_stopping, score, hp)
        return improved

    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings (``torch.load(weights_only=True)`` reads them back)."""
        return {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "plan": self.budget.state_dict(),
            "history": [orjson.dumps(row).decode() for row in self.history],
            "early_stopping": self.early_stopping,
            "best": self.best,
            "rng": checkpoint.rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["epoch"]`` as if the run had never stopped."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.epoch = int(state["epoch"])
        self.budget.load_state_dict(state.get("plan") or {}, done=self.epoch)
        self.history = [orjson.loads(row) for row in state["history"]]
        self.early_stopping, self.best = state["early_stopping"], state["best"]
        checkpoint.set_rng_state(state["rng"])


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training job; see the module docstring for what it writes."""
    from detforge.training import engine

    start = _start(config)
    hp, run_dir = start.hp, start.run_dir
    device = resolve_device(hp.device)
    dist = distributed.setup(device.type)
    handlers = _setup_logging(run_dir, main=dist.main, console=config.console)
    try:
        device = _seed_and_place(hp, dist, device)
        data = _build_data(start, dist, device)
        model, train_model = _build_model(start, dist, device)
        state = _training_state(model, hp, steps_per_epoch=data.steps_per_epoch, device=device)
        if start.saved is not None:
            state.load_state_dict(start.saved)
            log.info(f"resuming {run_dir} after epoch {state.epoch}")
        if dist.main:
            _write_inputs(run_dir, hp, data.names, start.inputs)
        info = _run_info(hp, data.names, run_dir)
        log.info(
            f"training {hp.detector} {hp.base_network} at {hp.image_shape} px on {device} x"
            f"{dist.world_size}: {data.describe()}, batch {hp.mini_batch_size} per machine "
            f"({data.per_process} per process, {data.per_process * dist.world_size} per step), "
            f"{hp.epochs} epochs"
        )
        budget, reason = state.budget, None
        for epoch in range(state.epoch + 1, hp.epochs + 1):
            if epoch > budget.planned:
                break
            started = time.perf_counter()
            data.set_epoch(epoch, mosaic=hp.mosaic if epoch <= budget.planned - hp.mosaic_off_epochs else 0.0)
            with engine.epoch_progress(config.progress and dist.main, epoch, data.steps_per_epoch) as advance:
                result = engine.train_one_epoch(
                    train_model,
                    data.train_loader,
                    state.optimizer,
                    state.scheduler,
                    device=device,
                    epoch=epoch,
                    scaler=state.scaler,
                    grad_clip_norm=hp.grad_clip_norm,
                    on_step=_after_step(state, advance),
                )
            row = _train_row(epoch, result, state.optimizer, dist)
            distributed.broadcast_buffers(dist, state.model)
            if data.val_loader is not None and (
                epoch % hp.validation_interval == 0
                or budget.is_last(epoch, seconds_into_it=time.perf_counter() - started)
            ):
                row |= _validate(state.eval_model, data, hp, device=device, dist=dist)
            budget.finish_epoch(epoch, time.perf_counter() - started)
            if budget.limited:
                row["planned_epochs"] = budget.planned
            row["train_time_s"] = budget.seconds
            best = state.record(row, hp)
            if dist.main:
                _save_epoch(run_dir, state, info, row, best=best or data.val_loader is None)
            distributed.barrier(dist)
            reason = _stop_reason(config, hp, state, row)
            if reason:
                log.info(f"early stop after epoch {epoch}: {reason}")
                break
        return TrainResult(
            run_dir=run_dir,
            epochs=len(state.history),
            history=state.history,
            best_epoch=state.best["epoch"],
            best_map=state.best["map"],
            stopped_early=reason is not None,
            stop_reason=reason,
            classes=list(data.names),
            hyperparams=hp,
            model=state.eval_model,
            main=dist.main,
        )
    finally:
        for handler in handlers:
            log.removeHandler(handler)
            handler.close()
        distributed.teardown(dist)


# --- what a run starts from -------------------------------------------------------------------------


@dataclass
class _Start:
    """A fresh run (``saved`` None) or the run folder being resumed (``saved``: its last.pt)."""

    run_dir: str
    hp: Hyperparameters
    inputs: checkpoint.RunInputs
    classes: list[str] | None  # the class names to read the manifests with (None: their own)
    saved: dict | None = None

    @property
    def initial_weights(self) -> str | None:
        """``--weights`` of a fresh run (a resumed run has its own)."""
        return None if self.saved is not None else self.inputs.weights


def _start(config: TrainConfig) -> _Start:
    """Resolve the hyperparameters, manifests and classes; for a resume the one place that reads the
    run folder (hyperparams.json, classes.json, inputs.json, checkpoints/last.pt once)."""
    from detforge.data.groundtruth import classes_beside, read_class_names

    if not config.resume:
        if config.train is None or config.out is None:
            raise ConfigError("--train and --out are required (or --resume RUN)", field="--train")
        inputs = checkpoint.RunInputs(
            train=config.train,
            validation=config.validation,
            label_attribute=config.label_attribute,
            weights=config.weights,
        )
        return _Start(
            os.fspath(config.out), _resolve_hp(config), inputs, classes_beside(config.train, config.classes)
        )
    run_dir = os.fspath(config.resume if isinstance(config.resume, str) else config.out)
    check_resume_options(run_dir, config)
    saved_hp = storage.join(run_dir, "hyperparams.json")
    if not storage.exists(saved_hp):
        raise ModelError("nothing to resume: hyperparams.json is missing", path=saved_hp)
    hp = parse_hyperparameters(
        {**orjson.loads(storage.read_bytes(saved_hp)), **config.overrides}, source=saved_hp
    )
    saved = None  # checkpoints/last.pt, read once; first only for a run folder from before inputs.json
    if not storage.exists(storage.join(run_dir, checkpoint.INPUTS_FILE)):
        saved = checkpoint.load_state(run_dir)
    recorded = checkpoint.read_inputs(run_dir, state=saved)
    if config.train is not None and not _same_path(config.train, recorded.train):
        _refuse_with_resume(run_dir, "--train", f"the run was started on {recorded.train}")
    inputs = dataclasses.replace(
        recorded,
        validation=config.validation or recorded.validation,
        label_attribute=config.label_attribute or recorded.label_attribute,
    )
    names = read_class_names(storage.join(run_dir, "classes.json"))  # whatever the folders hold now
    return _Start(run_dir, hp, inputs, names, saved if saved is not None else checkpoint.load_state(run_dir))


def check_resume_options(run_dir: str, config: TrainConfig) -> None:
    """``--resume RUN`` continues RUN as it was started: ConfigError for an option that would change it
    (``--hyperparameters``, ``--weights``, ``--classes``, another ``--out``; another ``--train``:
    ``_start``). ``--set name=value`` (e.g. more epochs) and ``--validation`` stay allowed."""
    if config.hyperparameters is not None:
        _refuse_with_resume(run_dir, "--hyperparameters", "the run's hyperparams.json is used")
    if config.weights is not None:
        _refuse_with_resume(run_dir, "--weights", "the weights come from the run's checkpoint")
    if config.classes is not None:
        _refuse_with_resume(run_dir, "--classes", "the run's classes.json is used")
    if config.out is not None and not _same_path(config.out, run_dir):
        _refuse_with_resume(run_dir, "--out", f"the run continues in {run_dir} itself, not in {config.out}")


def _refuse_with_resume(run_dir: str, option: str, why: str) -> None:
    raise ConfigError(
        f"cannot be combined with --resume: {why}",
        field=option,
        hint=f"--resume {run_dir} continues with the run's own settings; change one with "
        "--set name=value, or start a new run without --resume",
    )


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = os.fspath(a), os.fspath(b)
    return a == b or (not storage.is_remote(a) and os.path.abspath(a) == os.path.abspath(b))


def _resolve_hp(config: TrainConfig) -> Hyperparameters:
    source = config.hyperparameters
    if isinstance(source, Hyperparameters):
        return parse_hyperparameters({**source.to_json(), **config.overrides}) if config.overrides else source
    if isinstance(source, Mapping):
        return parse_hyperparameters({**source, **config.overrides})
    return load_hyperparameters(source, overrides=config.overrides)


def _setup_logging(run_dir: str, *, main: bool, console: bool) -> list[logging.Handler]:
    """``train.log`` in a local run folder, and stderr with ``console``: rank 0 only."""
    handlers: list[logging.Handler] = []
    if not main:
        return handlers
    if not storage.is_remote(run_dir):
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, "train.log"), encoding="utf-8"))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if console:
        handlers.append(logging.StreamHandler())
        handlers[-1].setFormatter(logging.Formatter("%(message)s"))
    for handler in handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handlers


def _seed_and_place(hp: Hyperparameters, dist: distributed.Dist, device):
    """Seed every generator, log the hyperparameter notes; the device of this process."""
    import torch

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
    return device


# --- setup ---------------------------------------------------------------------------------------------


@dataclass
class _Data:
    """The run's datasets and loaders."""

    names: list[str]
    train_set: Any
    sampler: Any
    train_loader: Any  # a DataLoader, or recipe.MultiScaleLoader around it
    val_loader: Any
    per_process: int  # images per process and step
    steps_per_epoch: int
    validation_images: int

    def set_epoch(self, epoch: int, *, mosaic: float) -> None:
        """The epoch's shuffle and augmentation draws, and its mosaic probability."""
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        if isinstance(self.train_loader, recipe.MultiScaleLoader):
            self.train_loader.set_epoch(epoch)
        self.train_set.mosaic = mosaic

    def describe(self) -> str:
        return f"{len(self.train_set)} train / {self.validation_images} validation images"


def _build_data(start: _Start, dist: distributed.Dist, device) -> _Data:
    """Read and check the manifests; the training loader (sharded, shuffled, augmented) and the
    validation loader (sharded)."""
    import torch
    from torch.utils.data import DataLoader

    from detforge.training.dataset import ManifestDataset, collate, load_split

    hp, inputs = start.hp, start.inputs
    train_samples, names = load_split(
        inputs.train, classes=start.classes, label_attribute=inputs.label_attribute
    )
    if not train_samples:
        raise ConfigError("the training manifest has no images", path=inputs.train)
    val_samples = []
    if inputs.validation:
        val_samples, _ = load_split(inputs.validation, classes=names, label_attribute=inputs.label_attribute)
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
        train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=hp.seed, drop_last=False
    )
    loader_args = dict(collate_fn=collate, num_workers=hp.workers, pin_memory=device.type == "cuda")
    # a last batch of one image would break BatchNorm on the 1x1 maps: drop the remainder instead
    train_loader = DataLoader(
        train_set, batch_size=per_process, sampler=sampler, drop_last=shard_size >= per_process, **loader_args
    )
    steps_per_epoch = len(train_loader)
    if hp.multiscale > 0:
        train_loader = recipe.MultiScaleLoader(
            train_loader, image_size=hp.image_shape, multiscale=hp.multiscale, seed=hp.seed
        )
    val_loader = None
    if val_samples:
        val_set = ManifestDataset(
            val_samples, image_size=hp.image_shape, cache_dir=cache, cache_images=hp.cache_images
        )
        val_set.fill_cache()
        shard = list(range(dist.rank, len(val_set), dist.world_size))
        val_loader = DataLoader(val_set, batch_size=per_process, sampler=shard, **loader_args)
    return _Data(
        list(names),
        train_set,
        sampler,
        train_loader,
        val_loader,
        per_process,
        steps_per_epoch,
        len(val_samples),
    )


def _build_model(start: _Start, dist: distributed.Dist, device):
    """``(model, the model the loop trains)``: built, started from ``--weights``, frozen, placed, and
    wrapped for DDP under torchrun."""
    import torch

    from detforge.models import build_model

    hp = start.hp
    model = build_model(
        hp.base_network,
        detector=hp.detector,
        num_classes=hp.num_classes,
        image_size=hp.image_shape,
        pretrained_backbone=bool(hp.use_pretrained_model) and not (start.initial_weights or start.saved),
        nms_threshold=hp.nms_threshold,
        nms_topk=hp.nms_topk,
        score_threshold=hp.score_threshold,
        nms_candidates=hp.nms_candidates,
    )
    if start.initial_weights:
        log.info(
            load_initial_weights(
                model,
                start.initial_weights,
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
    if not dist.enabled:
        return model, model
    return model, torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _training_state(model, hp: Hyperparameters, *, steps_per_epoch: int, device) -> TrainingState:
    """The optimizer, the per-step schedule over the time budget's plan, EMA and (CUDA) AMP scaler."""
    import torch

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], hp)
    budget = recipe.Budget(epochs=hp.epochs, minutes=hp.max_train_minutes)
    scheduler = build_scheduler(optimizer, hp, steps_per_epoch=steps_per_epoch, budget=budget)
    ema = recipe.ModelEMA(model, hp.ema_decay) if hp.ema_decay > 0 else None
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    return TrainingState(model, optimizer, scheduler, budget, scaler=scaler, ema=ema)


def _write_inputs(run_dir: str, hp: Hyperparameters, names: list[str], inputs: checkpoint.RunInputs) -> None:
    """The run's inputs as plain JSON: ``hyperparams.json``, ``classes.json``, ``inputs.json``."""
    storage.write_bytes(
        storage.join(run_dir, "hyperparams.json"), orjson.dumps(hp.to_json(), option=orjson.OPT_INDENT_2)
    )
    storage.write_bytes(storage.join(run_dir, "classes.json"), orjson.dumps(list(names)))
    checkpoint.write_inputs(run_dir, inputs)


def _run_info(hp: Hyperparameters, names: list[str], run_dir: str) -> checkpoint.RunInfo:
    thresholds = {
        "nms_threshold": hp.nms_threshold,
        "nms_topk": hp.nms_topk,
        "nms_candidates": hp.nms_candidates,
        "score_threshold": hp.score_threshold,
        "overlap_threshold": hp.overlap_threshold,
    }
    return checkpoint.RunInfo(
        detector=hp.detector,
        base_network=hp.base_network,
        image_shape=hp.image_shape,
        num_classes=hp.num_classes,
        classes=list(names),
        thresholds=thresholds,
        hyperparams=hp.to_json(),
        source_run=run_dir,
    )


# --- one epoch's pieces ----------------------------------------------------------------------------


def _after_step(state: TrainingState, advance: Callable | None) -> Callable[[int, int], None]:
    """What runs after every optimizer step: the EMA update, the progress bar."""

    def on_step(step: int, images: int) -> None:
        if state.ema is not None:
            state.ema.update(state.model)
        if advance is not None:
            advance(step, images)

    return on_step


def _train_row(epoch: int, result: dict, optimizer, dist: distributed.Dist) -> dict:
    """The epoch's training fields (losses averaged over the processes)."""
    means = result["means"]
    keys = sorted(means)
    averaged = dict(zip(keys, distributed.all_reduce_mean(dist, [means[k] for k in keys]), strict=True))
    row = {"epoch": epoch, "train_loss": averaged.get("loss")}
    row |= {f"train_loss_{k}": v for k, v in averaged.items() if k != "loss"}
    row["lr"] = optimizer.param_groups[0]["lr"]
    row["epoch_time_s"] = result["seconds"]
    row["images_per_s"] = result["images"] * dist.world_size / max(result["seconds"], 1e-9)
    return row


def _validate(model, data: _Data, hp: Hyperparameters, *, device, dist: distributed.Dist) -> dict:
    from detforge.training import engine

    started = time.perf_counter()
    row = engine.validate(
        model,
        data.val_loader,
        device=device,
        class_names=data.names,
        iou_threshold=hp.overlap_threshold,
        dist=dist,
    )
    row["validation_time_s"] = time.perf_counter() - started
    return row


def _save_epoch(
    run_dir: str, state: TrainingState, info: checkpoint.RunInfo, row: dict, *, best: bool
) -> None:
    """model.*, best.* (``best``), metrics.*, checkpoints/last.pt and the log line of an epoch."""
    info.epoch, info.metrics = row["epoch"], {k: v for k, v in row.items() if not k.startswith("AP/")}
    checkpoint.save_model(run_dir, state.eval_model, info)
    if best:
        checkpoint.save_model(run_dir, state.eval_model, info, name="best")
    _write_metrics(run_dir, state.history)
    checkpoint.save_state(run_dir, state.state_dict())
    log.info(_log_line(row))


def _stop_reason(config: TrainConfig, hp: Hyperparameters, state: TrainingState, row: dict) -> str | None:
    """Why the run ends after this epoch: early stopping, ``on_epoch_end``, the spent time budget."""
    epoch, bad = row["epoch"], state.early_stopping["bad_epochs"]
    if hp.early_stopping and epoch >= hp.early_stopping_min_epochs and bad >= hp.early_stopping_patience:
        return (
            f"validation:mAP did not improve by more than {hp.early_stopping_tolerance} (relative) "
            f"for {bad} epochs"
        )
    if config.on_epoch_end is not None and config.on_epoch_end(epoch, row):
        return "stopped by on_epoch_end"
    if state.budget.spent(epoch):
        return f"the time budget (max_train_minutes={hp.max_train_minutes:g}) is spent"
    return None


# --- the rest ----------------------------------------------------------------------------------------


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
            + (f" or, as SageMaker's MXNet network names them, {mx!r}" if mx else "")
            + ")",
            field="freeze_layer_pattern",
            hint="`detforge train --list-layers -p hyperparams.json` lists them",
        )
    return frozen


def load_initial_weights(
    model, source: str, *, base_network: str, num_classes: int, detector: str = "ssd"
) -> str:
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
    weights = checkpoint.weights_file(source)
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
