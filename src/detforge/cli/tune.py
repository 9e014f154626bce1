"""``detforge tune --train M --validation M --hyperparameters hp.json --ranges ranges.json --trials N``."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``tune`` command."""

    @app.command("tune")
    def tune_command(
        train: Annotated[str, typer.Option("--train", help="Training manifest (as for detforge train).")],
        validation: Annotated[
            str,
            typer.Option("--validation", help="Validation manifest: the objective is its validation:mAP."),
        ],
        hyperparameters: Annotated[
            str | None,
            typer.Option(
                "--hyperparameters", "-p", help="SageMaker hyperparams.json: the static hyperparameters."
            ),
        ] = None,
        ranges: Annotated[
            str | None,
            typer.Option(
                "--ranges",
                help="SageMaker ParameterRanges (or HyperParameterTuningJobConfig) JSON; "
                "default: SageMaker's object-detection ranges.",
            ),
        ] = None,
        trials: Annotated[
            int | None,
            typer.Option(
                "--trials", help="Finished trials wanted in the study (default: the file's limit, else 10)."
            ),
        ] = None,
        parallel: Annotated[int, typer.Option("--parallel", help="Local worker processes.")] = 1,
        storage: Annotated[
            str | None,
            typer.Option(
                "--storage", help="Study database URL (default sqlite:///OUT/study.db; postgresql://...)."
            ),
        ] = None,
        study_name: Annotated[
            str | None, typer.Option("--study-name", help="Study name (default: the --out folder's name).")
        ] = None,
        out: Annotated[
            str, typer.Option("--out", help="Folder for trial-NNN/ run folders and the summary.")
        ] = ("tune"),
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override one static hyperparameter: name=value (repeatable)."),
        ] = None,
        pruner: Annotated[
            str | None,
            typer.Option("--pruner", help="median | halving | hyperband | none (default median)."),
        ] = None,
        prune_after: Annotated[
            int, typer.Option("--prune-after", help="Epochs every trial trains before it can be pruned.")
        ] = 1,
        prune_startup_trials: Annotated[
            int, typer.Option("--prune-startup-trials", help="Complete trials needed before pruning starts.")
        ] = 3,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the sampler.")] = 0,
        classes: Annotated[
            str | None, typer.Option("--classes", help="classes.json to use (as for detforge train).")
        ] = None,
        label_attribute: Annotated[
            str | None, typer.Option("--label-attribute", help="The manifests' label attribute.")
        ] = None,
    ) -> None:
        """Search hyperparameters for the best validation:mAP (SageMaker Automatic Model Tuning; Optuna)."""
        from rich.console import Console
        from rich.table import Table

        from detforge.training.hyperparams import parse_overrides
        from detforge.tune import TuneConfig, console_logging, log, tune
        from detforge.tune.ranges import OBJECTIVE

        handler = console_logging()
        try:
            result = tune(
                TuneConfig(
                    train=train,
                    validation=validation,
                    out=out,
                    hyperparameters=hyperparameters,
                    overrides=parse_overrides(set_ or []),
                    ranges=ranges,
                    trials=trials,
                    parallel=parallel,
                    storage=storage,
                    study_name=study_name,
                    pruner=pruner,
                    prune_startup_trials=prune_startup_trials,
                    prune_after_epochs=prune_after,
                    seed=seed,
                    classes=classes,
                    label_attribute=label_attribute,
                    verbose=True,
                )
            )
        finally:
            log.removeHandler(handler)
        table = Table(title=f"study {result.study_name} ({result.storage})")
        skip = {"run_dir", "worker"}
        columns = [c for c in (result.rows[0] if result.rows else {}) if c not in skip]
        for column in columns:
            table.add_column(column, overflow="fold", no_wrap=column in ("trial", "state"))
        for row in result.rows:
            table.add_row(*("" if row[c] is None else _cell(row[c]) for c in columns))
        console = Console()
        console.print(table)
        counts = ", ".join(
            f"{result.count(s)} {s}"
            for s in ("complete", "pruned", "failed", "interrupted")
            if result.count(s)
        )
        console.print(f"{len(result.rows)} trials ({counts}) -> {result.out}")
        if result.best:
            console.print(
                f"best: trial {result.best['trial']} {OBJECTIVE}={result.best[OBJECTIVE]:.4f}; "
                f"detforge train --hyperparameters {result.out}/best-hyperparams.json"
            )


def _cell(value) -> str:
    """Numbers (sampled values arrive as strings) with 4 significant digits."""
    if isinstance(value, (int, bool)):
        return str(value)
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)
