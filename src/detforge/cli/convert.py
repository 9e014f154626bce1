"""``detforge convert IN --to coco|voc|yolo|manifest --out OUT``."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command."""

    @app.command("convert")
    def convert_command(
        source: Annotated[str, typer.Argument(
            help="Manifest, YOLO data.yaml or split folder, VOC Annotations folder, COCO JSON or Roboflow "
                 "COCO export folder.")],
        to: Annotated[str, typer.Option("--to", help="coco, voc, yolo or manifest.")],
        out: Annotated[str, typer.Option("--out", help="File (coco, manifest) or folder (voc, yolo).")],
        images: Annotated[str | None, typer.Option(
            "--images", help="Image folder of a VOC or COCO input (default: the layout's own).")] = None,
        label_attribute: Annotated[str | None, typer.Option(
            "--label-attribute", help="Label attribute of a manifest (found by its metadata type).")] = None,
        on_error: Annotated[str, typer.Option(
            "--on-error", help="stop at a bad box/line/file, or skip it and count it.")] = "stop",
    ) -> None:
        """Convert labels between Ground Truth manifest, COCO, Pascal VOC and YOLO, keeping class names."""
        from detforge.data.convert import convert

        s = convert(source, to=to, out=out, images=images, label_attribute=label_attribute, on_error=on_error)
        for message in s.skipped + s.skipped_boxes:
            typer.echo(f"skipped: {message}", err=True)
        typer.echo(f"converted {s.images} images from {s.source_format} to {to}: {out}"
                   + (f" (skipped {len(s.skipped)} images, {len(s.skipped_boxes)} boxes)"
                      if s.skipped or s.skipped_boxes else ""))
