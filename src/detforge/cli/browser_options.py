"""The options of the two commands that serve a page in the browser (``label``, ``review``): one block, so
the names and help read the same in both. Each command keeps its own default port (in its signature).
"""

from __future__ import annotations

from typing import Annotated

import typer

Port = Annotated[int, typer.Option("--port", help="TCP port (0 picks a free one).")]
Host = Annotated[str, typer.Option("--host", help="Loopback address to listen on.")]
NoBrowser = Annotated[
    bool,
    typer.Option(
        "--no-browser",
        help="Print the URL without opening a browser (which is otherwise opened through a "
        "private redirect file, keeping the token off its command line).",
    ),
]
