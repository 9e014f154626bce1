"""``detforge tune``: SageMaker's Automatic Model Tuning on your own machines, Optuna underneath.

``tune(config) -> TuneResult`` opens (or creates, or continues) an Optuna study in an RDB storage
(default ``<out>/study.db``, SQLite; a ``postgresql://`` URL lets many machines share one study),
runs trials until the study holds ``trials`` finished ones, each a normal ``detforge train`` run
folder ``<out>/trial-NNN/``, and writes the summary beside them: ``trials.csv``, ``summary.json``,
``best-hyperparams.json`` (ready for ``detforge train --hyperparameters``),
``optimization-history.png`` and ``param-importances.png``.

The objective is the best ``validation:mAP`` of a trial's epochs (its ``best.safetensors``),
maximized. Sampling: TPE (``Bayesian``), random, grid, seeded; each ask reseeds the sampler from
(seed, host, worker, trials so far) so a resumed or shared study does not repeat draws. Pruning:
each epoch's ``validation:mAP`` is reported (``TrainConfig.on_epoch_end``); the median,
successive-halving or Hyperband pruner stops a poor trial after its epoch.

Counting: finished trials are complete, pruned or failed (with their error recorded); an
interrupted trial (Ctrl-C, or a killed process whose heartbeat stopped) does not count, so
re-running the same command continues to the requested number. ``parallel`` local worker
processes share the storage; workers on other machines do the same through a shared URL.

Not here: the ranges file (``tune_ranges``), the summary and plots (``tune_summary``), training (``train``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from detforge import storage
from detforge.errors import ConfigError, DetforgeError, MissingDependencyError, require
from detforge.training.hyperparams import parse_hyperparameters, read_hyperparameters_file
from detforge.tune.ranges import OBJECTIVE, TuningSpec, load_tuning_config, parse_tuning_config
from detforge.tune.summary import COUNTED, TuneResult, public_url, redact, trial_state, write_summary

log = logging.getLogger("detforge.tune")

PRUNERS = ("median", "halving", "hyperband", "none")
MACHINE_KEYS = ("device", "workers", "image_cache")  # may differ between machines sharing a study


@dataclass
class TuneConfig:
    """One tuning job. ``hyperparameters``: a path or dict (the static ones); ``ranges``: path/dict/spec."""

    train: str
    validation: str
    out: str = "tune"
    hyperparameters: str | Mapping | None = None
    overrides: Mapping = field(default_factory=dict)  # --set name=value over the hyperparameters
    ranges: str | Mapping | TuningSpec | None = None  # None: SageMaker's object-detection ranges
    trials: int | None = None  # finished trials wanted in the study; default: the file's limit, else 10
    parallel: int = 1  # local worker processes
    storage: str | None = None  # an RDB URL; default sqlite:///<out>/study.db
    study_name: str | None = None  # default: the name of the out folder
    pruner: str | None = None  # median | halving | hyperband | none; default from the file, else median
    prune_startup_trials: int = 3  # no pruning before this many trials completed
    prune_after_epochs: int = 1  # a trial trains at least this many epochs
    random_trials: int = 10  # TPE samples at random until this many trials exist
    seed: int = 0
    heartbeat_s: int = 60  # a trial silent for 2x this long is marked interrupted
    classes: str | None = None
    label_attribute: str | None = None
    verbose: bool = False  # log one line per trial to the console (the CLI sets it)


@dataclass(frozen=True)
class _Job:
    """The resolved job, identical in every worker process (picklable)."""

    config: TuneConfig
    spec: TuningSpec
    base: dict  # the static hyperparameters as given (file, then --set)
    trials: int
    pruner: str
    url: str
    study_name: str


def _optuna():
    optuna = require("optuna", "tune")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials: our own one line
    return optuna


def _resolve(config: TuneConfig) -> _Job:
    """Read the files and check everything that does not need a trial; ConfigError otherwise."""
    out = os.fspath(config.out)
    if isinstance(config.ranges, TuningSpec):
        spec = config.ranges
    elif isinstance(config.ranges, Mapping):
        spec = parse_tuning_config(config.ranges, source="<ranges>")
    else:
        spec = load_tuning_config(config.ranges)
    base: dict = dict(spec.static_hyperparameters or {})
    if isinstance(config.hyperparameters, Mapping):
        base.update(config.hyperparameters)
    elif config.hyperparameters is not None:
        base.update(read_hyperparameters_file(config.hyperparameters))
    base.update(config.overrides)
    path = config.hyperparameters if isinstance(config.hyperparameters, (str, os.PathLike)) else None
    parse_hyperparameters(base, source=os.fspath(path) if path is not None else None)
    tuned = {r.name for r in spec.ranges}
    for key in sorted(tuned & set(config.overrides)):
        log.warning(f"--set {key} is overridden by its tuning range")
    if not config.validation:
        raise ConfigError(f"tuning needs a validation manifest ({OBJECTIVE})", field="--validation")
    for name, path in (("--train", config.train), ("--validation", config.validation)):
        if not storage.exists(path):
            raise ConfigError("no such manifest", path=os.fspath(path), field=name)
    trials = config.trials if config.trials is not None else (spec.max_trials or 10)
    if trials < 1:
        raise ConfigError(f"must be >= 1, got {trials}", field="--trials")
    if spec.strategy == "Grid":
        trials = min(trials, spec.grid_size())
    if config.parallel < 1:
        raise ConfigError(f"must be >= 1, got {config.parallel}", field="--parallel")
    pruner = config.pruner or (
        "hyperband" if spec.strategy == "Hyperband" else "none" if spec.early_stopping == "Off" else "median"
    )
    if pruner not in PRUNERS:
        raise ConfigError(f"expected one of {', '.join(PRUNERS)}, got {pruner!r}", field="--pruner")
    if config.prune_after_epochs < 1:
        raise ConfigError(f"must be >= 1, got {config.prune_after_epochs}", field="--prune-after")
    url = config.storage
    if url is None:
        if storage.is_remote(out):
            raise ConfigError(
                "an object-store --out needs a database for the study",
                field="--storage",
                hint="give --storage URL",
            )
        url = "sqlite:///" + os.path.abspath(os.path.join(out, "study.db"))
    name = config.study_name or os.path.basename(os.path.normpath(out)) or "detforge-tune"
    return _Job(config, spec, base, trials, pruner, url, name)


def engine_url(url: str) -> str:
    """The URL as SQLAlchemy should see it: ``postgresql://`` means the psycopg2 driver to SQLAlchemy, so
    where only psycopg (3, ``detforge[postgres]``) is installed the URL names it explicitly."""
    from importlib.util import find_spec

    scheme, sep, rest = url.partition("://")
    only_psycopg3 = find_spec("psycopg2") is None and find_spec("psycopg") is not None
    if sep and scheme in ("postgresql", "postgres") and only_psycopg3:
        return f"postgresql+psycopg://{rest}"
    return url


def _storage(job: _Job):
    optuna = _optuna()
    if job.url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(job.url[len("sqlite:///") :]) or ".", exist_ok=True)
        engine = {"connect_args": {"timeout": 120}}  # workers queue for SQLite's single writer
    else:
        engine = {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                engine_url(job.url),
                engine_kwargs=engine,
                heartbeat_interval=job.config.heartbeat_s,
                grace_period=2 * job.config.heartbeat_s,
            )
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                f"the database driver '{exc.name}' is not installed",
                field="--storage",
                hint="pip install 'detforge[postgres]' for postgresql://, pymysql for mysql+pymysql://",
            ) from exc
        except Exception as exc:
            # from None: the driver's exception may hold the URL itself; what it says is kept, redacted
            reason = " ".join(redact(str(exc), job.url).split())  # one line: drivers' messages have several
            raise ConfigError(f"cannot open {public_url(job.url)}: {reason}", field="--storage") from None


def _pruner(job: _Job):
    optuna = _optuna()
    cfg = job.config
    if job.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.prune_startup_trials, n_warmup_steps=cfg.prune_after_epochs
        )
    if job.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.prune_after_epochs, reduction_factor=3)
    if job.pruner == "hyperband":
        epochs = parse_hyperparameters(job.base).epochs
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.prune_after_epochs,
            max_resource=max(epochs, cfg.prune_after_epochs),
            reduction_factor=3,
        )
    return optuna.pruners.NopPruner()


def _sampler(job: _Job, *, worker: int, known: int):
    """A sampler seeded by (seed, host, worker, trials known): resumed and shared studies draw afresh."""
    import numpy as np

    optuna = _optuna()
    host = zlib.crc32(socket.gethostname().encode())
    seed = int(np.random.SeedSequence([job.config.seed, host, worker, known]).generate_state(1)[0])
    if job.spec.strategy in ("Random", "Grid"):  # Grid: the points are enqueued (_next_grid_point)
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=job.config.random_trials, constant_liar=True
    )


def _next_grid_point(job: _Job, trials) -> dict | None:
    """The first combination, in an order shuffled by the seed, that no trial has taken yet.

    Optuna's GridSampler would draw failed points again; here a failed point counts as tried (as
    with every other strategy) and only interrupted ones are run again.
    """
    import itertools
    import random

    names = [r.name for r in job.spec.ranges]
    points = [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(r.values for r in job.spec.ranges))
    ]
    random.Random(job.config.seed).shuffle(points)
    taken = [t.params for t in trials if trial_state(t) in (*COUNTED, "running", "waiting")]
    return next((p for p in points if p not in taken), None)


def _identity(job: _Job) -> dict:
    """What must match when a study is continued (machine-local hyperparameters aside)."""
    base = {k: str(v) for k, v in job.base.items() if k not in MACHINE_KEYS}
    return {
        "objective": OBJECTIVE,
        "parameter_ranges": job.spec.parameter_ranges(),
        "strategy": job.spec.strategy,
        "static_hyperparameters": dict(sorted(base.items())),
    }


def _open_study(job: _Job, *, create: bool):
    optuna = _optuna()
    kwargs = dict(storage=_storage(job), study_name=job.study_name, pruner=_pruner(job))
    if not create:
        return optuna.load_study(**kwargs)
    study = optuna.create_study(direction="maximize", load_if_exists=True, **kwargs)
    identity = _identity(job)
    stored = study.user_attrs.get("detforge")
    if stored is None:
        study.set_user_attr("detforge", identity)
    elif stored != identity:
        changed = [k for k in identity if identity[k] != stored.get(k)]
        raise ConfigError(
            f"the study {job.study_name!r} in {public_url(job.url)} was started with other "
            f"{', '.join(k.replace('_', ' ') for k in changed)}",
            field="--study-name",
            hint="give the same files as before, or another --study-name / --out",
        )
    if study.directions[0] != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"the study {job.study_name!r} does not maximize", field="--study-name")
    return study


def _taken(trials, *, before: int | None = None) -> tuple[int, int]:
    """(finished trials that count, trials running) among those numbered below ``before``."""
    done = running = 0
    for trial in trials:
        if before is not None and trial.number >= before:
            continue
        state = trial_state(trial)
        done += state in COUNTED
        running += state in ("running", "waiting")
    return done, running


def _objective(job: _Job, *, worker: int, overrides: dict):
    from detforge.training.train import TrainConfig, train

    optuna = _optuna()
    cfg = job.config

    def objective(trial) -> float:
        run_dir = storage.join(os.fspath(cfg.out), f"trial-{trial.number:03d}")
        try:
            return attempt(trial, run_dir)
        except (_Skipped, optuna.TrialPruned):
            raise
        except Exception as exc:  # recorded as failed (it counts, so a failing setup cannot loop forever)
            message = str(exc) if isinstance(exc, DetforgeError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", message[:2000])
            _write_error(run_dir, traceback.format_exc())
            log.info(f"trial {trial.number} failed: {message}")
            raise

    def attempt(trial, run_dir: str) -> float:
        trial.set_user_attr("run_dir", run_dir)
        trial.set_user_attr("worker", f"{socket.gethostname()}/{worker}")
        done, running = _taken(trial.study.get_trials(deepcopy=False), before=trial.number)
        if done + running >= job.trials:  # another worker took the last place meanwhile
            message = f"not run: the study already had {job.trials} trials"
            trial.set_user_attr("skipped", message)
            raise _Skipped(message)
        values = {r.name: r.suggest(trial) for r in job.spec.ranges}
        trial.set_user_attr("hyperparameters", values)
        pruned: dict = {}

        def on_epoch_end(epoch: int, row: dict) -> bool:
            score = row.get(OBJECTIVE)
            if score is None:
                return False
            trial.report(float(score), step=epoch)
            if trial.should_prune():
                pruned["epoch"] = epoch
                return True
            return False

        started = time.monotonic()
        try:
            result = train(
                TrainConfig(
                    train=cfg.train,
                    validation=cfg.validation,
                    out=run_dir,
                    hyperparameters={**job.base, **overrides, **values},
                    classes=cfg.classes,
                    label_attribute=cfg.label_attribute,
                    on_epoch_end=on_epoch_end,
                    progress=False,
                )
            )
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", "KeyboardInterrupt")
            raise
        trial.set_user_attr("best_map", result.best_map)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs", result.epochs)
        trial.set_user_attr("seconds", round(time.monotonic() - started, 3))
        shown = " ".join(f"{k}={v}" for k, v in values.items())
        if pruned:
            log.info(
                f"trial {trial.number} pruned after epoch {pruned['epoch']}: best {OBJECTIVE} "
                f"{result.best_map:.4f} ({shown})"
            )
            raise optuna.TrialPruned(f"pruned after epoch {pruned['epoch']}")
        if result.best_map is None:
            raise ConfigError(f"the run reported no {OBJECTIVE}", path=run_dir)
        log.info(
            f"trial {trial.number}: {OBJECTIVE}={result.best_map:.4f} (epoch {result.best_epoch} of "
            f"{result.epochs}) {shown}"
        )
        return float(result.best_map)

    return objective


class _Skipped(Exception):
    """A worker asked for a trial after another took the study's last place."""


def _write_error(run_dir: str, text: str) -> None:
    try:
        storage.write_text(storage.join(run_dir, "error.txt"), text)
    except DetforgeError:
        pass  # the error is in the study either way


def _run_worker(job: _Job, worker: int, *, processes: int = 1, barrier=None) -> None:
    """Run trials until the study holds ``job.trials`` finished ones (waits for others' running ones).

    ``processes > 1``: this is one of several spawned workers; it takes its share of the cores and,
    on a machine with several GPUs, its own GPU.
    """
    overrides: dict = {}
    if processes > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // processes))
        device = str(parse_hyperparameters(job.base).device)
        if device in ("auto", "cuda") and torch.cuda.device_count() > 1:
            overrides["device"] = f"cuda:{worker % torch.cuda.device_count()}"
            torch.cuda.set_device(worker % torch.cuda.device_count())
    study = _open_study(job, create=False)
    objective = _objective(job, worker=worker, overrides=overrides)
    if barrier is not None:
        try:
            barrier.wait(timeout=300)  # start the local workers together
        except threading.BrokenBarrierError:
            pass  # a worker failed to start (its error is printed); go on without it
    try:
        _trial_loop(job, study, objective, worker)
    except KeyboardInterrupt:
        write_summary(study, job, plots=False)  # the interrupted trial is recorded as such
        raise


def _trial_loop(job: _Job, study, objective, worker: int) -> None:
    optuna = _optuna()
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done, running = _taken(trials)
        if done >= job.trials:
            break
        if done + running >= job.trials:
            time.sleep(1.0)  # the last trials are running elsewhere: they finish, or go stale
            continue
        study.sampler = _sampler(job, worker=worker, known=len(trials))
        if job.spec.strategy == "Grid":
            point = _next_grid_point(job, trials)
            if point is None:
                break
            study.enqueue_trial(point)
        study.optimize(objective, n_trials=1, catch=(Exception,))
        write_summary(study, job, plots=False)


def _worker_main(job: _Job, worker: int, processes: int, barrier) -> None:
    if job.config.verbose:
        console_logging()
    try:
        _run_worker(job, worker, processes=processes, barrier=barrier)
    except KeyboardInterrupt:  # Ctrl-C reaches every worker; the trial is recorded as interrupted
        code = 130
    else:
        code = 0
    # Every result is committed to the study and every file renamed into place; skip the interpreter's
    # teardown, which takes seconds in a process that has loaded torch (measured: 2-8 s per worker).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console_logging() -> logging.Handler:
    """One line per trial on stderr (the CLI and verbose workers); the caller removes the handler."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def tune(config: TuneConfig) -> TuneResult:
    """Create or continue the study, run trials (in ``parallel`` processes), write the summary."""
    job = _resolve(config)
    _optuna()
    study = _open_study(job, create=True)
    log.info(
        f"study {job.study_name!r} in {public_url(job.url)}: {len(job.spec.ranges)} ranges, "
        f"{job.spec.strategy} search, {job.pruner} pruning, {job.trials} trials"
    )
    done, _ = _taken(study.get_trials(deepcopy=False))
    parallel = max(1, min(config.parallel, job.trials - done))
    if parallel == 1:
        _run_worker(job, 0)
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # torch and SQLite connections do not fork well
        barrier = context.Barrier(parallel)
        workers = [
            context.Process(target=_worker_main, args=(job, i, parallel, barrier), name=f"detforge-tune-{i}")
            for i in range(parallel)
        ]
        for process in workers:
            process.start()
        try:
            for process in workers:
                process.join()
        except KeyboardInterrupt:
            for process in workers:  # they got the same SIGINT; let them record their trials
                process.join(timeout=30)
            raise
        failed = [p.name for p in workers if p.exitcode != 0]
        if failed:
            raise ConfigError(f"worker process {', '.join(failed)} stopped with an error (see above)")
    return write_summary(study, job, plots=True)
