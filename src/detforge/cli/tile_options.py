"""The tiled-inference options every command that runs a deploy folder takes (predict, evaluate, serve,
edge, label): one block, so the names, defaults and help read the same everywhere (``detforge.tiling``).

``None`` means "as the deploy folder's ``model.json`` says" (its ``tiling``, else whole photos).
"""

from __future__ import annotations

from typing import Annotated

import typer

Tile = Annotated[
    int | None,
    typer.Option(
        "--tile",
        help="Run the model on SIZE x SIZE pixel tiles of each photo, merged (0: whole photos; "
        "default: the tiling in the deploy folder's model.json, else whole photos).",
        metavar="SIZE",
    ),
]
Overlap = Annotated[
    float | None,
    typer.Option(
        "--overlap", help="Neighbouring tiles overlap by at least this fraction of SIZE (default 0.2)."
    ),
]
TileFullPass = Annotated[
    bool | None,
    typer.Option(
        "--tile-full-pass/--no-tile-full-pass",
        help="With tiles, also run the whole photo, for objects larger than a tile (default: on).",
    ),
]
