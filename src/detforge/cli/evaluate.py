"""``detforge evaluate MODEL_OR_PREDICTIONS MANIFEST``: metrics.json, PR curves, a confusion matrix."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli.tile_options import Overlap, Tile, TileFullPass


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command."""

    @app.command("evaluate")
    def evaluate_command(
        model_or_predictions: Annotated[
            str,
            typer.Argument(
                help="A predictions JSON Lines file (SageMaker format), a run folder or a deploy folder."
            ),
        ],
        manifest: Annotated[str, typer.Argument(help="The labeled Ground Truth manifest to evaluate on.")],
        iou: Annotated[
            float, typer.Option("--iou", help="IoU for a match (SageMaker's overlap_threshold).")
        ] = 0.5,
        threshold: Annotated[
            float,
            typer.Option(
                "--threshold", help="Score at which precision/recall/F1 and the confusion matrix count."
            ),
        ] = 0.5,
        out: Annotated[
            str | None,
            typer.Option("--out", help="Folder for metrics.json, pr_*.png and confusion_matrix.png."),
        ] = None,
        classes: Annotated[
            str | None,
            typer.Option(
                "--classes",
                help="The manifest's classes.json (list of names, index = class id); default: the "
                "one beside the manifest, else its class maps. A run or deploy folder's "
                "classes are matched to them by name.",
            ),
        ] = None,
        label_attribute: Annotated[
            str | None,
            typer.Option(
                "--label-attribute", help="The manifest's label attribute, when it cannot be found."
            ),
        ] = None,
        coco: Annotated[
            bool, typer.Option("--coco/--no-coco", help="Also compute COCO AP (pycocotools).")
        ] = True,
        tile: Tile = None,
        overlap: Overlap = None,
        tile_full_pass: TileFullPass = None,
    ) -> None:
        """Measure detections against labeled images: VOC07 validation:mAP, all-point AP, COCO AP."""
        from rich.console import Console
        from rich.table import Table

        from detforge.evaluation.evaluate import evaluate

        result = evaluate(
            model_or_predictions,
            manifest,
            iou_threshold=iou,
            score_threshold=threshold,
            out_dir=out,
            classes=classes,
            label_attribute=label_attribute,
            coco=coco,
            tile=tile,
            overlap=overlap,
            tile_full_pass=tile_full_pass,
        )
        m = result.metrics
        table = Table(title=f"{m.num_images} images, IoU {m.iou_threshold:g}, score >= {m.score_threshold:g}")
        for column in ("class", "boxes", "AP07", "AP", "P", "R", "F1"):
            table.add_column(column, justify="left" if column == "class" else "right")

        def ap(value) -> str:
            return "-" if value is None or value != value else f"{value:.3f}"

        for c, stats in sorted(m.per_class.items()):
            table.add_row(
                result.class_names[c],
                str(stats.n_gt),
                ap(m.per_class_ap_voc07.get(c)),
                ap(m.per_class_ap_all_point.get(c)),
                f"{stats.precision:.3f}",
                f"{stats.recall:.3f}",
                f"{stats.f1:.3f}",
            )
        table.add_row(
            "mean / all",
            str(m.n_gt),
            ap(m.voc07_map),
            ap(m.all_point_map),
            f"{m.precision:.3f}",
            f"{m.recall:.3f}",
            f"{m.f1:.3f}",
            style="bold",
        )
        console = Console()
        console.print(table)
        console.print(f"validation:mAP (VOC07 11-point) = {ap(m.voc07_map)}")
        if result.coco is not None:
            console.print("COCO " + ", ".join(f"{k} {ap(result.coco[k])}" for k in ("AP", "AP50", "AP75")))
        if m.classes_without_gt_with_predictions:
            names = [result.class_names[c] for c in m.classes_without_gt_with_predictions]
            console.print(f"predicted but absent from the labels (not averaged): {', '.join(names)}")
        if result.images_without_predictions:
            console.print(
                f"{result.images_without_predictions} manifest images had no predictions line "
                "(counted as no detections)"
            )
        if result.files:
            console.print(f"wrote {len(result.files)} files to {out}")
