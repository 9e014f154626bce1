"""``detforge stats MANIFEST...``: counts per class and job, box sizes, empty images."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``stats`` command."""

    @app.command("stats")
    def stats_command(
        manifests: Annotated[list[str], typer.Argument(
            help="Ground Truth manifests (local or s3://) or any input prepare reads (YOLO, VOC, COCO).")],
        label_attribute: Annotated[str | None, typer.Option("--label-attribute")] = None,
        images: Annotated[str | None, typer.Option(
            "--images", help="Image folder of VOC/COCO inputs.")] = None,
        on_error: Annotated[str, typer.Option(
            "--on-error", help="stop at a bad line/box/file, or skip it and count it.")] = "stop",
        as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    ) -> None:
        """Print what a set of manifests holds."""
        import json

        from detforge.data.stats import format_stats, manifest_stats

        result = manifest_stats(manifests, label_attribute=label_attribute, images_dir=images,
                                on_error=on_error)
        typer.echo(json.dumps(result, indent=2) if as_json else format_stats(result))
