"""``detforge augment MANIFEST --ops xflip,yflip,cw,ccw --out DIR``: flipped/rotated copies + manifests."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli import options


def register(app: typer.Typer) -> None:
    """Add the ``augment`` command."""

    @app.command("augment")
    def augment_command(
        manifest: Annotated[str, typer.Argument(help="The training manifest (local path or s3://).")],
        out: Annotated[
            str,
            typer.Option(
                "--out", help="Folder for images/, augmented.manifest and one <op>.manifest per op."
            ),
        ],
        ops: Annotated[
            str, typer.Option("--ops", help="Comma-separated: xflip, yflip, cw, ccw, rot180.")
        ] = "xflip,yflip,cw,ccw",
        workers: Annotated[int, typer.Option("--workers", "-j", help="Parallel processes.")] = 1,
        force: Annotated[
            bool, typer.Option("--force", help="Augment even a manifest named or marked as validation data.")
        ] = False,
        overwrite: options.Overwrite = False,
        label_attribute: Annotated[
            str | None,
            typer.Option(
                "--label-attribute", help="The manifest's label attribute, when it cannot be found."
            ),
        ] = None,
    ) -> None:
        """Write flipped and rotated copies of every image with exactly moved boxes (lossless for JPEG
        where the size allows), into --out whole; an interrupted run resumes."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from detforge.data.augment import augment

        console = Console(stderr=True)
        with Progress(
            TextColumn("augment"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("augment", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            result = augment(
                manifest,
                out_dir=out,
                ops=ops,
                workers=workers,
                force=force,
                overwrite=overwrite,
                label_attribute=label_attribute,
                progress=progress,
            )
        Console().print(
            f"{result.images} images: wrote {result.written} copies ({result.lossless} lossless, "
            f"{result.reencoded} re-encoded), reused {result.skipped} already written\n"
            f"manifest: {result.manifest} ({result.images * (1 + len(result.op_manifests))} lines); "
            f"per op: {', '.join(result.op_manifests.values())}"
        )
