"""``detforge label MANIFEST --classes ... --out FILE``: draw and fix boxes in the browser."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli.browser_options import Host, NoBrowser, Port
from detforge.cli.tile_options import Overlap, Tile, TileFullPass


def register(app: typer.Typer) -> None:
    """Add the ``label`` command."""

    @app.command("label")
    def label_command(
        manifest: Annotated[
            str,
            typer.Argument(
                help='The input manifest (one {"source-ref": ...} a line), '
                "or with --adjust a Ground Truth output manifest."
            ),
        ],
        out: Annotated[
            str,
            typer.Option(
                "--out",
                help="The job's output manifest: written after every change, read back on start to resume.",
            ),
        ],
        classes: Annotated[
            str | None,
            typer.Option(
                "--classes",
                help='Class names, "blue box,yellow box", or a classes.json '
                "(default with --model: the model's classes; with --adjust: the input's).",
            ),
        ] = None,
        model: Annotated[
            str | None,
            typer.Option("--model", help="A deploy folder whose detections are offered as proposals."),
        ] = None,
        threshold: Annotated[
            float | None,
            typer.Option(
                "--threshold",
                help="Where the proposal slider starts (default: the model's default_threshold).",
            ),
        ] = None,
        order: Annotated[
            str,
            typer.Option(
                "--order",
                help="manifest, or uncertainty: the images the model is least sure of first (needs --model).",
            ),
        ] = "manifest",
        adjust: Annotated[
            bool,
            typer.Option(
                "--adjust",
                help="An adjustment job: correct the input's boxes, written as "
                "adjusted-<attr> with adjustment-status.",
            ),
        ] = False,
        label_attribute: Annotated[
            str | None,
            typer.Option(
                "--label-attribute",
                help="The label attribute to write (default: the "
                "job name) or, with --adjust, to correct (default: found by type).",
            ),
        ] = None,
        job_name: Annotated[
            str | None,
            typer.Option(
                "--job-name",
                help="The job name (default: the --out file name, e.g. boxes-1 for boxes-1.output.manifest).",
            ),
        ] = None,
        port: Port = 8766,
        host: Host = "127.0.0.1",
        no_browser: NoBrowser = False,
        tile: Tile = None,
        overlap: Overlap = None,
        tile_full_pass: TileFullPass = None,
    ) -> None:
        """Open a local web page to draw, fix and check boxes, written as a Ground Truth job's output."""
        from rich.console import Console

        from detforge.label.app import label

        console = Console()

        def progress(done: int, total: int) -> None:
            if done == total or done % 200 == 0:
                console.print(f"model: {done} of {total} images scored", highlight=False)

        def ready(server) -> None:
            p = server.job.progress()
            for problem in server.job.unreadable[:5]:
                console.print(f"[yellow]not scored:[/yellow] {problem}", highlight=False)
            if len(server.job.unreadable) > 5:
                console.print(f"[yellow]and {len(server.job.unreadable) - 5} more images not scored[/yellow]")
            console.print(
                f"{p['total']} images, {p['done']} done; labels go to {out} as '{server.job.attribute}'",
                highlight=False,
            )
            console.print(
                f"open [bold]{server.url}[/bold]  (Ctrl+C stops; every change is already saved)",
                soft_wrap=True,
            )

        job = label(
            manifest,
            out=out,
            classes=classes,
            adjust=adjust,
            label_attribute=label_attribute,
            job_name=job_name,
            model=model,
            order=order,
            threshold=threshold,
            host=host,
            port=port,
            open_browser=not no_browser,
            on_progress=progress,
            on_ready=ready,
            tiling={"tile": tile, "overlap": overlap, "full_pass": tile_full_pass},
        )
        p = job.progress()
        console.print(f"stopped: {p['done']} of {p['total']} images done in {out}", highlight=False)
