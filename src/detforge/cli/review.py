"""``detforge review MANIFEST... --discard FILE``: review labeled boxes in the browser, reject images."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli import options
from detforge.cli.browser_options import Host, NoBrowser, Port


def register(app: typer.Typer) -> None:
    """Add the ``review`` command."""

    @app.command("review")
    def review_command(
        manifests: Annotated[list[str], typer.Argument(help=options.INPUTS_HELP)],
        discard: Annotated[
            str,
            typer.Option(
                "--discard",
                help="The discard list to read and keep up to date "
                "(what `detforge prepare --discard` takes).",
            ),
        ],
        predictions: Annotated[
            str | None,
            typer.Option("--predictions", help="SageMaker-format predictions JSONL to compare with."),
        ] = None,
        classes: Annotated[
            str | None,
            typer.Option(
                "--classes",
                help="classes.json (or model.json) naming the prediction class ids; "
                "without it predictions are matched to labels whatever their class.",
            ),
        ] = None,
        score_threshold: Annotated[
            float, typer.Option("--score-threshold", help="Ignore predictions scoring below this.")
        ] = 0.5,
        label_attribute: options.LabelAttribute = None,
        images: options.Images = None,
        on_error: options.OnError = "stop",
        port: Port = 8765,
        host: Host = "127.0.0.1",
        no_browser: NoBrowser = False,
    ) -> None:
        """Open a local web page to look at every labeled box and reject images into a discard list."""
        from rich.console import Console

        from detforge.data.groundtruth import ReadReport
        from detforge.label.review import review

        console = Console()
        report = ReadReport()

        def ready(server) -> None:
            progress = server.session.progress()
            console.print(
                f"{progress['total']} images, {progress['reviewed']} reviewed, "
                f"{progress['rejected']} rejected; decisions go to {discard}"
            )
            if report.skipped or report.skipped_boxes:
                console.print(
                    f"skipped {len(report.skipped)} bad lines/images and "
                    f"{len(report.skipped_boxes)} bad boxes (--on-error skip)"
                )
            console.print(f"open [bold]{server.url}[/bold]  (Ctrl+C stops)", soft_wrap=True)

        session = review(
            manifests,
            discard=discard,
            predictions=predictions,
            label_attribute=label_attribute,
            classes=classes,
            score_threshold=score_threshold,
            host=host,
            port=port,
            open_browser=not no_browser,
            on_ready=ready,
            on_error=on_error,
            images=options.images_for(images, manifests),
            report=report,
        )
        progress = session.progress()
        console.print(
            f"stopped: {progress['reviewed']} of {progress['total']} reviewed, "
            f"{progress['rejected']} rejected in {discard}"
        )
