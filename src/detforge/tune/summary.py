"""The summary of a tuning study: ``trials.csv``, ``summary.json``, ``best-hyperparams.json`` and plots.

``write_summary(study, job)`` reads every trial from the study's storage (so each machine sharing a
study writes the same summary) and returns a ``TuneResult``. ``trial_state`` names a trial's state
the way the table shows it (an Optuna FAIL is ``failed`` with an error, ``interrupted`` without one,
or ``skipped``). Plots use matplotlib's Agg backend without pyplot.

Not here: running the study (``tune``), the ranges (``tune_ranges``).
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass

import orjson

from detforge import storage
from detforge.errors import require
from detforge.tune.ranges import OBJECTIVE

COUNTED = ("complete", "pruned", "failed")  # the states that count towards the trials wanted


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


def public_url(url: str) -> str:
    """The storage URL as messages and summaries show it, with no password in any form the database
    libraries accept: a URL's user information (all of it up to the last ``@``, so neither libpq's nor
    SQLAlchemy's way of reading ``alice:Hunter2@Secret@host`` shows a piece), ``?password=`` and other
    secret-looking keys, and ``password=...`` in a ``key=value`` connection string (quoted or not)."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest and not scheme.startswith("sqlite"):  # a SQLite URL is a path: no user there
        url = f"{scheme}://{storage.MASK}@{rest.rpartition('@')[2]}"
    return storage.mask_credentials(url)


def redact(text: str, url: str) -> str:
    """``text`` (e.g. a driver's error) with every secret of ``url`` replaced by ``***``, however it is
    spelled there (as given or percent-decoded), then masked like a URL."""
    from urllib.parse import unquote

    scheme, sep, rest = url.partition("://")
    secrets = []
    if sep and "@" in rest and not scheme.startswith("sqlite"):
        userinfo = rest.rpartition("@")[0]
        password = userinfo.partition(":")[2]
        # a parser that stops at the first "@" takes the rest for the host and may print it: every piece
        secrets += [userinfo, password, *password.split("@"), *userinfo.split("@")[1:]]
    for match in storage.secret_values(url):
        secrets.append(match.strip("'\""))
    spellings = {s for found in secrets for s in (found, unquote(found)) if s}
    for secret in sorted(spellings, key=len, reverse=True):  # the longest first: a part never shows
        text = text.replace(secret, storage.MASK)
    return storage.mask_credentials(text)


def trial_state(trial) -> str:
    """complete | pruned | failed | interrupted | skipped | running | waiting."""
    name = trial.state.name.lower()
    if name != "fail":
        return name
    if trial.user_attrs.get("skipped"):
        return "skipped"
    return "failed" if "error" in trial.user_attrs else "interrupted"


def _row(trial, job) -> dict:
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
        "state": trial_state(trial),
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


def best_hyperparameters(study, job) -> tuple[dict | None, dict | None]:
    """(the best complete trial's row, the static hyperparameters with its values), or (None, None)."""
    complete = [t for t in study.get_trials(deepcopy=False) if trial_state(t) == "complete"]
    if not complete:
        return None, None
    best = max(complete, key=lambda t: (t.value, -t.number))
    row = _row(best, job)
    values = {r.name: row[r.name] for r in job.spec.ranges}
    return row, {**job.base, **values}


def write_summary(study, job, *, plots: bool = True) -> TuneResult:
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
        "storage": public_url(job.url),
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
        storage=public_url(job.url),
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


def _plot_importances(study, job, path: str) -> None:
    """Optuna's parameter importances (PED-ANOVA) over the complete trials, as horizontal bars."""
    optuna = require("optuna", "tune")
    labels = {
        r.optuna_name: r.name + (" (1-x, log)" if r.optuna_name != r.name else "") for r in job.spec.ranges
    }
    complete = [t for t in study.get_trials(deepcopy=False) if trial_state(t) == "complete"]
    importances, reason = {}, None
    if len(complete) < 2:
        reason = f"needs 2 complete trials, has {len(complete)}"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                evaluator = optuna.importance.PedAnovaImportanceEvaluator()  # numpy only (fANOVA: sklearn)
                importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except Exception as exc:  # a plot never fails the study
            reason = f"{type(exc).__name__}: {exc}"
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
