"""``detforge frames VIDEO... --out DIR``: JPEG frames, a labeling input manifest and a contact sheet."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``frames`` command."""

    @app.command("frames")
    def frames_command(
        videos: Annotated[list[str], typer.Argument(help="Video files (local or s3://).")],
        out: Annotated[str, typer.Option("--out", help="Folder or s3:// prefix for the frames.")],
        every: Annotated[int | None, typer.Option("--every", help="Keep every Nth frame.")] = None,
        fps: Annotated[float | None, typer.Option("--fps", help="Keep about F frames per second.")] = None,
        meta: Annotated[
            list[str] | None,
            typer.Option("--meta", help="key=value added to every manifest line (repeat), e.g. color=blue."),
        ] = None,
        max_frames: Annotated[
            int | None, typer.Option("--max-frames", help="At most M frames per video.")
        ] = None,
        on_error: Annotated[
            str, typer.Option("--on-error", help="stop: fail on a bad video; skip: report it and go on.")
        ] = "stop",
        quality: Annotated[int, typer.Option("--quality", help="JPEG quality 1..100.")] = 95,
    ) -> None:
        """Extract video frames for labeling: <video>_<NNNNNN>.jpg, input.manifest, contact-sheet.jpg."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        from detforge.data.frames import extract_frames, parse_metadata

        metadata = parse_metadata(meta or [])
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=True,
        ) as bar:
            tasks: dict[str, int] = {}

            def progress(video: str, done: int, total: int | None) -> None:
                if video not in tasks:
                    tasks[video] = bar.add_task(video.rsplit("/", 1)[-1], total=total)
                bar.update(tasks[video], completed=done)

            summary = extract_frames(
                videos,
                out,
                every=every,
                fps=fps,
                metadata=metadata,
                max_frames=max_frames,
                on_error=on_error,
                quality=quality,
                progress=progress,
            )
        console = Console()
        for video, count in summary.per_video.items():
            console.print(f"{video}: {count} frames")
        for video, message in summary.warnings.items():
            console.print(f"[yellow]warning[/yellow] {video}: {message}")
        for video, message in summary.failed.items():
            console.print(f"[red]skipped[/red] {video}: {message}")
        console.print(f"wrote {summary.frames} frames and {summary.manifest}")
        if summary.contact_sheet:
            console.print(f"contact sheet: {summary.contact_sheet}")
        if summary.failed:
            raise typer.Exit(1)
