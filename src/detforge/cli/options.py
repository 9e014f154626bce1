"""The options every command that reads labels shares (``prepare``, ``convert``, ``stats``, ``review``),
declared once so that their names, defaults and help read the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

INPUTS_HELP = ("Ground Truth manifests (local or s3://), YOLO data.yaml or split folders, VOC Annotations "
               "folders, COCO JSON files or Roboflow/CVAT COCO export folders, labelme JSON folders; any "
               "mix. A folder holding several formats is named as FORMAT:PATH (e.g. voc:photos/).")

Images = Annotated[str | None, typer.Option(
    "--images", help="Image folder of VOC/COCO/labelme inputs (default: the layout's own).")]
OnError = Annotated[str, typer.Option(
    "--on-error", help="stop at a bad line/box/file, or skip it and count it.")]
LabelAttribute = Annotated[str | None, typer.Option(
    "--label-attribute", help="A manifest's label attribute (default: found by its metadata type).")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an existing output whole (default: refuse a non-empty one).")]
Format = Annotated[str | None, typer.Option(
    "--format", help="Read the input as this format: manifest, yolo, voc, coco or labelme (for a folder "
                     "holding several).")]
