"""``detforge convert IN --to coco|voc|yolo|manifest --out OUT``."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli import options


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command."""

    @app.command("convert")
    def convert_command(
        source: Annotated[
            str,
            typer.Argument(
                help="Manifest, YOLO data.yaml or split folder, VOC Annotations folder, COCO JSON, "
                "Roboflow/CVAT COCO export folder or labelme JSON folder "
                "(FORMAT:PATH picks one of a mixed folder)."
            ),
        ],
        to: Annotated[str, typer.Option("--to", help="coco, voc, yolo or manifest.")],
        out: Annotated[
            str,
            typer.Option(
                "--out",
                help="File (manifest; coco as one .json) or folder (voc, yolo; coco as one file per "
                "split), written whole.",
            ),
        ],
        images: options.Images = None,
        label_attribute: options.LabelAttribute = None,
        on_error: options.OnError = "stop",
        overwrite: options.Overwrite = False,
        source_format: options.Format = None,
    ) -> None:
        """Convert labels between Ground Truth manifest, COCO, Pascal VOC and YOLO (labelme in), keeping
        class names and splits."""
        from detforge.data.convert import convert

        s = convert(
            source,
            to=to,
            out=out,
            images=options.images_for(images, [source]),
            label_attribute=label_attribute,
            on_error=on_error,
            overwrite=overwrite,
            source_format=source_format,
        )
        for message in s.skipped + s.skipped_boxes:
            typer.echo(f"skipped: {message}", err=True)
        for message in s.corrected:
            typer.echo(f"corrected: {message}", err=True)
        for message in s.notes:
            typer.echo(f"note: {message}", err=True)
        if s.unused_classes:
            typer.echo(f"classes no box uses, left out: {', '.join(s.unused_classes)}", err=True)
        splits = ", ".join(f"{name or 'no split'} {n}" for name, n in s.splits.items())
        typer.echo(
            f"converted {s.images} images ({splits}) from {s.source_format} to {to}: {out}"
            + (
                f" (skipped {len(s.skipped)} images, {len(s.skipped_boxes)} boxes)"
                if s.skipped or s.skipped_boxes
                else ""
            )
            + (f", {len(s.corrected)} sizes corrected" if s.corrected else "")
        )
        if to == "yolo" and "validation" not in s.splits:
            typer.echo(
                "note: no validation split in the input, so data.yaml names none (Ultralytics needs "
                "'val:'); `detforge prepare` splits leak-free",
                err=True,
            )
