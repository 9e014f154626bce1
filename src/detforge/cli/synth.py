"""``detforge synth --out DIR``: the embedded synthetic storage-box dataset (images, job manifests)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``synth`` command."""

    @app.command("synth")
    def synth_command(
        out: Annotated[str, typer.Option("--out", help="Folder or s3:// prefix to write the dataset to.")],
        images: Annotated[int, typer.Option("--images", help="How many frames in all.")] = 600,
        seed: Annotated[int, typer.Option("--seed", help="Same seed, same bytes.")] = 0,
        size: Annotated[str, typer.Option("--size", help="Frame size WIDTHxHEIGHT.")] = "640x360",
        frames_per_video: Annotated[
            int,
            typer.Option("--frames-per-video", help="Frames of a large job's video (fewer: more scenes)."),
        ] = 80,
    ) -> None:
        """Generate blue/yellow storage-box videos labeled as several Ground Truth jobs, plus rejected.txt."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from detforge.data.synth import parse_size, synthesize

        width, height = parse_size(size)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        ) as bar:
            task = bar.add_task("drawing frames", total=images)
            summary = synthesize(
                out,
                images=images,
                seed=seed,
                size=(width, height),
                frames_per_video=frames_per_video,
                progress=lambda done: bar.update(task, completed=done),
            )
        console = Console()
        console.print(
            f"wrote {summary.images} images ({summary.width}x{summary.height}, "
            f"{len(summary.videos)} videos) to {summary.out} in {summary.seconds:.1f} s "
            f"({summary.images / max(summary.seconds, 1e-9):.0f} images/s)"
        )
        colors = ", ".join(f"{c} {n}" for c, n in summary.boxes_by_color.items())
        console.print(f"{summary.boxes} boxes: {colors}; {summary.empty_images} images without a box")
        for path in summary.manifests:
            console.print(f"  {path}")
        console.print(f"{len(summary.rejected)} ids to discard in {summary.rejected_file}")
