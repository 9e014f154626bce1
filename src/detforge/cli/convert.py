"""``detforge convert IN --to coco|voc|yolo|manifest --out OUT``."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command."""

    @app.command("convert")
    def convert_command(
        source: Annotated[str, typer.Argument(
            help="Manifest, COCO JSON, VOC XML folder or YOLO folder.")],
        to: Annotated[str, typer.Option("--to", help="coco, voc, yolo or manifest.")],
        out: Annotated[str, typer.Option("--out", help="File (coco, manifest) or folder.")],
    ) -> None:
        """Convert labels between Ground Truth manifest, COCO, Pascal VOC and YOLO, keeping class names."""
        from detforge.convert import convert

        kind, count = convert(source, to=to, out=out)
        typer.echo(f"converted {count} images from {kind} to {to}: {out}")
