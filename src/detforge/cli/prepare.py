"""``detforge prepare JOB.manifest... --out DIR``: join jobs, discard, inject classes, leak-aware split."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``prepare`` command."""

    @app.command("prepare")
    def prepare_command(
        manifests: Annotated[list[str], typer.Argument(help="Ground Truth output manifests (local or s3://).")],
        out: Annotated[str, typer.Option("--out", help="Folder or s3:// prefix for the outputs.")],
        discard: Annotated[list[str], typer.Option(
            "--discard", help="Discard file (one id per line, # comments) or ids 'a,b'; repeatable.")] = [],  # noqa: B006
        class_from: Annotated[str | None, typer.Option(
            "--class-from", help="Class name template over line fields, e.g. '{color} {object}'.")] = None,
        classes: Annotated[str | None, typer.Option(
            "--classes", help="Class names in id order, e.g. 'blue box,yellow box'.")] = None,
        label_attribute: Annotated[str | None, typer.Option(
            "--label-attribute", help="Label attribute (found by its metadata type).")] = None,
        drop_empty: Annotated[bool, typer.Option("--drop-empty", help="Drop images without boxes.")] = False,
        validation_fraction: Annotated[float, typer.Option("--validation-fraction")] = 0.1,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        group_by: Annotated[str, typer.Option(
            "--group-by", help="block:N (default block:10), video, none or regex:PATTERN.")] = "block:10",
        on_error: Annotated[str, typer.Option("--on-error", help="stop or skip bad lines.")] = "stop",
    ) -> None:
        """Turn labeling-job manifests into train.manifest, validation.manifest and classes.json."""
        from detforge.prepare import prepare

        names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
        s = prepare(manifests, out, discard=discard, class_from=class_from, classes=names,
                    label_attribute=label_attribute, drop_empty=drop_empty,
                    validation_fraction=validation_fraction, seed=seed, group_by=group_by, on_error=on_error)
        for path, count in s.lines.items():
            typer.echo(f"read {count} lines from {path}")
        typer.echo(f"discarded {len(s.discarded)}, failed verification {len(s.rejected_by_verification)}, "
                   f"duplicates {len(s.duplicates)}, skipped bad lines {len(s.skipped)}, "
                   f"dropped empty {s.dropped_empty}")
        for line in s.duplicates[:10]:
            typer.echo(f"  duplicate {line}")
        typer.echo(f"images without boxes kept: {s.empty_images}")
        typer.echo("boxes per class: " + ", ".join(f"{i} {n}: {c}" for i, (n, c)
                                                  in enumerate(s.boxes_per_class.items())))
        typer.echo(f"train {s.train}, validation {s.validation} ({s.groups} groups) -> {s.out}")
