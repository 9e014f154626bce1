"""``detforge stats MANIFEST...``: counts per class and job, box sizes, empty images."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli import options


def register(app: typer.Typer) -> None:
    """Add the ``stats`` command."""

    @app.command("stats")
    def stats_command(
        manifests: Annotated[list[str], typer.Argument(help=options.INPUTS_HELP)],
        label_attribute: options.LabelAttribute = None,
        images: options.Images = None,
        on_error: options.OnError = "stop",
        as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
        content_checks: Annotated[
            bool,
            typer.Option(
                "--content-checks/--no-content-checks",
                help="Count local images with the same bytes as duplicates (as prepare does).",
            ),
        ] = True,
    ) -> None:
        """Print what a set of manifests holds."""
        import json

        from detforge.data.stats import format_stats, manifest_stats

        result = manifest_stats(
            manifests,
            label_attribute=label_attribute,
            images_dir=options.images_for(images, manifests),
            on_error=on_error,
            content=content_checks,
        )
        typer.echo(json.dumps(result, indent=2) if as_json else format_stats(result))
