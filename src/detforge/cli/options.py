"""The options every command that reads labels shares (``prepare``, ``convert``, ``stats``, ``review``),
declared once so that their names, defaults and help read the same everywhere."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from detforge.errors import ConfigError

INPUTS_HELP = (
    "Ground Truth manifests (local or s3://), YOLO data.yaml or split folders, VOC Annotations "
    "folders, COCO JSON files or Roboflow/CVAT COCO export folders, labelme JSON folders; any "
    "mix. A folder holding several formats is named as FORMAT:PATH (e.g. voc:photos/)."
)

Images = Annotated[
    list[str] | None,
    typer.Option(
        "--images",
        help="Image folder of VOC/COCO/labelme inputs (default: the layout's own); INPUT=DIR for one "
        "input's (repeatable).",
    ),
]
OnError = Annotated[
    str, typer.Option("--on-error", help="stop at a bad line/box/file, or skip it and count it.")
]
LabelAttribute = Annotated[
    str | None,
    typer.Option(
        "--label-attribute", help="A manifest's label attribute (default: found by its metadata type)."
    ),
]
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace an existing output whole (default: refuse a non-empty one)."),
]
Format = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="Read the input as this format: manifest, yolo, voc, coco or labelme (for a folder "
        "holding several).",
    ),
]


def images_for(values: list[str] | None, inputs: list[str]) -> str | dict[str | None, str] | None:
    """What ``--images`` values mean for ``read_source``: one folder for every input, or a map of input ->
    folder (``INPUT=DIR``; the key None for the folder given without an input)."""
    if not values:
        return None
    found: dict[str | None, str] = {}
    for value in values:
        name, sep, folder = value.rpartition("=")
        key = name if sep and name and not os.path.isdir(value) else None
        if key is None:
            folder = value
        if key in found:
            raise ConfigError(
                f"--images {value!r}: {'that input' if key else 'every input'} already has "
                f"the image folder {found[key]!r}",
                hint="give one --images per input as INPUT=DIR",
            )
        if key is not None and key not in inputs:
            raise ConfigError(
                f"--images {value!r} names {key!r}, which is not one of the inputs",
                hint=f"the inputs are {', '.join(inputs)}",
            )
        found[key] = folder
    return found[None] if list(found) == [None] else found
