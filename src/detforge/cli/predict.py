"""``detforge predict DEPLOY INPUT... --out predictions.jsonl``: batch inference, optional PDF/HTML report;
``--engine ray``: the same over a Ray cluster, part files under ``--out``."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli.tile_options import Overlap, Tile, TileFullPass


def register(app: typer.Typer) -> None:
    """Add the ``predict`` command."""

    @app.command("predict")
    def predict_command(
        deploy: Annotated[
            str, typer.Argument(help="The deploy folder `detforge export` wrote (or its model.onnx).")
        ],
        inputs: Annotated[
            list[str],
            typer.Argument(
                help="Images, folders (searched recursively), Ground Truth manifests or s3:// prefixes."
            ),
        ],
        out: Annotated[
            str,
            typer.Option(
                "--out",
                "-o",
                help="Predictions JSON Lines to write (--engine ray: a folder or s3:// prefix).",
            ),
        ],
        report: Annotated[str | None, typer.Option("--report", help="Also write a PDF report here.")] = None,
        html: Annotated[
            str | None, typer.Option("--html", help="Also write a self-contained HTML report.")
        ] = None,
        threshold: Annotated[
            float | None,
            typer.Option("--threshold", help="Keep detections scoring at least this (default: the model's)."),
        ] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model run.")] = 8,
        threads: Annotated[
            int | None,
            typer.Option(
                "--threads",
                help="ONNX Runtime intra-op threads (default: its own choice; with --engine ray 1 "
                "per actor, each actor taking that many CPUs).",
            ),
        ] = None,
        on_error: Annotated[
            str, typer.Option("--on-error", help="An unreadable image: 'skip' (listed at the end) or 'stop'.")
        ] = "skip",
        iou: Annotated[
            float,
            typer.Option("--iou", help="IoU for a match with a labeled box (manifest inputs with labels)."),
        ] = 0.5,
        label_attribute: Annotated[
            str | None,
            typer.Option(
                "--label-attribute", help="The manifests' label attribute, when it cannot be found."
            ),
        ] = None,
        engine: Annotated[
            str,
            typer.Option(
                "--engine",
                help="'local' (this process) or 'ray' (Ray Data: a local instance or --address; "
                "--out is then a folder of part files).",
            ),
        ] = "local",
        address: Annotated[
            str | None,
            typer.Option(
                "--address",
                help="--engine ray: the Ray cluster ('auto' on one of its nodes, ray://HOST:10001); "
                "default: a local instance for this run.",
            ),
        ] = None,
        workers: Annotated[
            int | None,
            typer.Option(
                "--workers", help="--engine ray: model actors (default: as many as the cluster's CPUs)."
            ),
        ] = None,
        block_size: Annotated[
            int,
            typer.Option(
                "--block-size",
                help="--engine ray: images per block (one part file each; the unit of retry and resume).",
            ),
        ] = 256,
        report_sample: Annotated[
            int,
            typer.Option(
                "--report-sample", help="--engine ray: the reports show the first this many images."
            ),
        ] = 200,
        tile: Tile = None,
        overlap: Overlap = None,
        tile_full_pass: TileFullPass = None,
    ) -> None:
        """Run a deployed model on many images: predictions in SageMaker's format, a PDF/HTML report."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from detforge.deploy.predict import predict
        from detforge.errors import ConfigError

        if engine not in ("local", "ray"):
            raise ConfigError(f"engine must be 'local' or 'ray', got {engine!r}", field="engine")
        if engine == "local" and (address is not None or workers is not None):
            raise ConfigError("--address and --workers are for --engine ray", field="engine")
        console = Console(soft_wrap=True)  # the summary: stdout, one line each
        columns = (
            TextColumn("predict"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} images/s"),
            TimeRemainingColumn(),
        )
        err = Console(stderr=True)
        with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("predict", total=None, rate="-")

            def progress(done: int, total: int) -> None:
                elapsed = bar.tasks[0].elapsed or 0.0
                rate = f"{done / elapsed:.1f}" if elapsed > 0 else "-"
                bar.update(task, completed=done, total=total, rate=rate)

            if engine == "ray":
                from detforge.deploy.predict_ray import predict_ray

                if (tile, overlap, tile_full_pass) != (None, None, None):
                    raise ConfigError(
                        "--tile, --overlap and --tile-full-pass are for --engine local (the "
                        "Ray workers use the deploy folder's tiling)",
                        field="tile",
                    )

                result = predict_ray(
                    deploy,
                    inputs,
                    out=out,
                    threshold=threshold,
                    batch_size=batch_size,
                    block_size=block_size,
                    workers=workers,
                    address=address,
                    threads=threads,
                    on_error=on_error,
                    iou_threshold=iou,
                    label_attribute=label_attribute,
                    report=report,
                    html=html,
                    report_sample=report_sample,
                    progress=progress,
                )
            else:
                result = predict(
                    deploy,
                    inputs,
                    out=out,
                    report=report,
                    html=html,
                    threshold=threshold,
                    batch_size=batch_size,
                    threads=threads,
                    on_error=on_error,
                    iou_threshold=iou,
                    label_attribute=label_attribute,
                    progress=progress,
                    tile=tile,
                    overlap=overlap,
                    tile_full_pass=tile_full_pass,
                )
        counts = zip(result.class_names, result.detections_per_class, strict=True)
        per_class = ", ".join(f"{name} {n}" for name, n in counts)
        console.print(
            f"{result.images} images, {result.detections} detections (score >= "
            f"{result.threshold:g}): {per_class}; {result.images_per_second:.1f} images/s"
        )
        if result.metrics is not None:
            m = result.metrics
            ap = "-" if m.voc07_map != m.voc07_map else f"{m.voc07_map:.3f}"
            console.print(
                f"against the labels of {result.images_with_truth} images: mAP (VOC07, IoU "
                f"{m.iou_threshold:g}) {ap}, precision {m.precision:.3f}, recall {m.recall:.3f}, "
                f"TP {m.tp} FP {m.fp} FN {m.fn}"
            )
        for warning in result.warnings:
            console.print(f"warning: {warning}", style="yellow", markup=False)
        if result.skipped:
            console.print(f"skipped {len(result.skipped)} unreadable images:", style="red")
            for name, reason in result.skipped[:20]:
                console.print(f"  {name}: {reason}", markup=False, highlight=False)
            if len(result.skipped) > 20:
                where = "_SUCCESS" if engine == "ray" else "the report"
                console.print(f"  and {len(result.skipped) - 20} more (all listed in {where})")
        if engine == "ray":
            from detforge.deploy.predict_ray import SUCCESS_FILE
            from detforge.storage import basename

            success = next(f for f in result.files if basename(f) == SUCCESS_FILE)
            parts = result.files.index(success)
            reports = result.files[parts + 1 :]
            console.print(
                f"wrote {parts} part files (in order) and {success} naming them"
                + (f"; reports of the first {report_sample} images: {', '.join(reports)}" if reports else "")
            )
        else:
            console.print("wrote " + ", ".join(result.files))
