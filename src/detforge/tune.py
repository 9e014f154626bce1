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

Not here: the ranges file (``tune_ranges``), training itself (``train``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import socket
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

from detforge import storage
from detforge.errors import ConfigError, DetforgeError, MissingDependencyError, require
from detforge.hyperparams import parse_hyperparameters
from detforge.tune_ranges import OBJECTIVE, TuningSpec, load_tuning_config, parse_tuning_config

log = logging.getLogger("detforge.tune")

PRUNERS = ("median", "halving", "hyperband", "none")
MACHINE_KEYS = ("device", "workers", "image_cache")  # may differ between machines sharing a study
COUNTED = ("complete", "pruned", "failed")


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


@dataclass
class TuneResult:
    """The study after this call: every trial's row, the best one and its hyperparameters."""

    out: str
    study_name: str
    storage: str  # the URL with any password hidden
    rows: list[dict]
    best: dict | None
    best_hyperparameters: dict | None

    def count(self, state: str) -> int:
        """Trials in ``state`` (complete, pruned, failed, interrupted, skipped, running)."""
        return sum(1 for row in self.rows if row["state"] == state)


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
        source = os.fspath(config.hyperparameters)
        try:
            loaded = orjson.loads(storage.read_bytes(source))
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON: {exc}", path=source) from None
        if not isinstance(loaded, dict):
            raise ConfigError("expected a JSON object of name -> value", path=source)
        base.update(loaded)
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


def _public_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


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
                job.url,
                engine_kwargs=engine,
                heartbeat_interval=job.config.heartbeat_s,
                grace_period=2 * job.config.heartbeat_s,
            )
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                f"the database driver '{exc.name}' is not installed",
                field="--storage",
                hint="pip install psycopg2-binary for postgresql://, pymysql for mysql+pymysql://",
            ) from exc
        except Exception as exc:
            raise ConfigError(f"cannot open {_public_url(job.url)}: {exc}", field="--storage") from exc


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
    taken = [t.params for t in trials if _state(t) in (*COUNTED, "running", "waiting")]
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
            f"the study {job.study_name!r} in {_public_url(job.url)} was started with other "
            f"{', '.join(k.replace('_', ' ') for k in changed)}",
            field="--study-name",
            hint="give the same files as before, or another --study-name / --out",
        )
    if study.directions[0] != optuna.study.StudyDirection.MAXIMIZE:
        raise ConfigError(f"the study {job.study_name!r} does not maximize", field="--study-name")
    return study


def _state(trial) -> str:
    """complete | pruned | failed | interrupted | skipped | running | waiting."""
    name = trial.state.name.lower()
    if name != "fail":
        return name
    if trial.user_attrs.get("skipped"):
        return "skipped"
    return "failed" if "error" in trial.user_attrs else "interrupted"


def _taken(trials, *, before: int | None = None) -> tuple[int, int]:
    """(finished trials that count, trials running) among those numbered below ``before``."""
    done = running = 0
    for trial in trials:
        if before is not None and trial.number >= before:
            continue
        state = _state(trial)
        done += state in COUNTED
        running += state in ("running", "waiting")
    return done, running


def _objective(job: _Job, *, worker: int, overrides: dict):
    from detforge.train import TrainConfig, train

    optuna = _optuna()
    cfg = job.config

    def objective(trial) -> float:
        run_dir = storage.join(os.fspath(cfg.out), f"trial-{trial.number:03d}")
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
        except Exception as exc:
            message = str(exc) if isinstance(exc, DetforgeError) else f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("error", message[:2000])
            _write_error(run_dir, traceback.format_exc())
            log.info(f"trial {trial.number} failed: {message}")
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


def _run_worker(job: _Job, worker: int, barrier=None) -> None:
    """Run trials until the study holds ``job.trials`` finished ones (waits for others' running ones)."""
    optuna = _optuna()
    overrides: dict = {}
    if job.config.parallel > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // job.config.parallel))
        device = str(parse_hyperparameters(job.base).device)
        if device in ("auto", "cuda") and torch.cuda.device_count() > 1:
            overrides["device"] = f"cuda:{worker % torch.cuda.device_count()}"
            torch.cuda.set_device(worker % torch.cuda.device_count())
    study = _open_study(job, create=False)
    objective = _objective(job, worker=worker, overrides=overrides)
    if barrier is not None:
        barrier.wait()  # start the local workers together
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


def _worker_main(job: _Job, worker: int, barrier) -> None:
    if job.config.verbose:
        console_logging()
    _run_worker(job, worker, barrier)
    # Every result is committed to the study and every file renamed into place; skip the interpreter's
    # teardown, which takes seconds in a process that has loaded torch (measured: 2-8 s per worker).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
        f"study {job.study_name!r} in {_public_url(job.url)}: {len(job.spec.ranges)} ranges, "
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
            context.Process(target=_worker_main, args=(job, i, barrier), name=f"detforge-tune-{i}")
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


# ----------------------------------------------------------------------------------------- summary


def _row(trial, job: _Job) -> dict:
    values = trial.user_attrs.get("hyperparameters") or {
        r.name: r.value_from_params(trial.params) for r in job.spec.ranges
    }
    best = trial.user_attrs.get("best_map")
    if best is None and trial.value is not None:
        best = trial.value
    seconds = trial.user_attrs.get("seconds")
    if seconds is None and trial.datetime_start and trial.datetime_complete:
        seconds = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 3)
    row = {
        "trial": trial.number,
        "state": _state(trial),
        OBJECTIVE: best,
        "best_epoch": trial.user_attrs.get("best_epoch"),
        "epochs": trial.user_attrs.get("epochs", len(trial.intermediate_values) or None),
    }
    row |= {r.name: values.get(r.name) for r in job.spec.ranges}
    row |= {
        "seconds": seconds,
        "worker": trial.user_attrs.get("worker"),
        "run_dir": trial.user_attrs.get("run_dir"),
        "error": trial.user_attrs.get("error") or trial.user_attrs.get("skipped") or "",
    }
    return row


def best_hyperparameters(study, job: _Job) -> tuple[dict | None, dict | None]:
    """(the best complete trial's row, the static hyperparameters with its values), or (None, None)."""
    complete = [t for t in study.get_trials(deepcopy=False) if _state(t) == "complete"]
    if not complete:
        return None, None
    best = max(complete, key=lambda t: (t.value, -t.number))
    row = _row(best, job)
    values = {r.name: row[r.name] for r in job.spec.ranges}
    return row, {**job.base, **values}


def write_summary(study, job: _Job, *, plots: bool = True) -> TuneResult:
    """``trials.csv``, ``summary.json``, ``best-hyperparams.json`` and (``plots``) the two PNGs."""
    out = os.fspath(job.config.out)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    rows = [_row(t, job) for t in trials]
    columns = list(rows[0]) if rows else ["trial", "state", OBJECTIVE]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    storage.write_text(storage.join(out, "trials.csv"), text.getvalue())
    best, hyperparameters = best_hyperparameters(study, job)
    if hyperparameters is not None:
        storage.write_bytes(
            storage.join(out, "best-hyperparams.json"),
            orjson.dumps(hyperparameters, option=orjson.OPT_INDENT_2),
        )
    counts = {state: sum(r["state"] == state for r in rows) for state in sorted({r["state"] for r in rows})}
    summary = {
        "study": job.study_name,
        "storage": _public_url(job.url),
        "objective": {"metric": OBJECTIVE, "direction": "maximize"},
        "strategy": job.spec.strategy,
        "pruner": job.pruner,
        "trials_wanted": job.trials,
        "trials": counts,
        "parameter_ranges": job.spec.parameter_ranges(),
        "best": best,
    }
    storage.write_bytes(storage.join(out, "summary.json"), orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if plots:
        _plot_history(trials, rows, storage.join(out, "optimization-history.png"), title=job.study_name)
        _plot_importances(study, job, storage.join(out, "param-importances.png"))
    return TuneResult(
        out=out,
        study_name=job.study_name,
        storage=_public_url(job.url),
        rows=rows,
        best=best,
        best_hyperparameters=hyperparameters,
    )


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(figure, path: str) -> None:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    storage.write_bytes(path, buffer.getvalue())


def _plot_history(trials, rows: list[dict], path: str, *, title: str) -> None:
    """Left: each trial's objective and the best so far; right: validation:mAP per epoch of each trial."""
    figure = _figure(11, 4)
    history, curves = figure.subplots(1, 2)
    styles = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:gray"), "failed": ("v", "tab:red")}
    for state, (marker, color) in styles.items():
        points = [(r["trial"], r[OBJECTIVE] or 0.0) for r in rows if r["state"] == state]
        if points:
            history.scatter(*zip(*points, strict=True), marker=marker, color=color, label=state, zorder=3)
    best, steps = -math.inf, []
    for row in rows:
        if row["state"] == "complete" and row[OBJECTIVE] is not None:
            best = max(best, row[OBJECTIVE])
        steps.append((row["trial"], best if best > -math.inf else math.nan))
    if steps:
        history.step(*zip(*steps, strict=True), where="post", color="tab:orange", label="best so far")
    history.set_xlabel("trial")
    history.set_ylabel(OBJECTIVE)
    history.set_title("optimization history")
    for trial, row in zip(trials, rows, strict=True):
        if trial.intermediate_values:
            epochs = sorted(trial.intermediate_values)
            curves.plot(
                epochs,
                [trial.intermediate_values[e] for e in epochs],
                marker=".",
                linestyle="--" if row["state"] == "pruned" else "-",
                alpha=0.8,
                label=f"{row['trial']}" if len(rows) <= 12 else None,
            )
    curves.set_xlabel("epoch")
    curves.set_ylabel(OBJECTIVE)
    curves.set_title("per epoch (dashed: pruned)")
    from matplotlib.ticker import MaxNLocator

    for ax in (history, curves):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    figure.suptitle(title)
    _save(figure, path)


def _plot_importances(study, job: _Job, path: str) -> None:
    """Optuna's parameter importances (PED-ANOVA) over the complete trials, as horizontal bars."""
    optuna = _optuna()
    labels = {
        r.optuna_name: r.name + (" (1-x, log)" if r.optuna_name != r.name else "") for r in job.spec.ranges
    }
    complete = [t for t in study.get_trials(deepcopy=False) if _state(t) == "complete"]
    importances, reason = {}, None
    if len(complete) < 2:
        reason = f"needs 2 complete trials, has {len(complete)}"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as exc:
            reason = str(exc)
    figure = _figure(7, 1.2 + 0.45 * max(len(importances), 2))
    ax = figure.subplots()
    if importances:
        names = list(importances)[::-1]
        ax.barh([labels.get(n, n) for n in names], [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel(f"importance for {OBJECTIVE} (share)")
        ax.set_xlim(0, 1)
    else:
        ax.text(0.5, 0.5, f"no importances yet: {reason}", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"hyperparameter importance ({len(complete)} complete trials)")
    _save(figure, path)
