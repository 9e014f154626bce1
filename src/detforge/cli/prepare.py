"""``detforge prepare INPUT... --out DIR``: labels in from any tool, joined, checked, leak-free split."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``prepare`` command."""

    @app.command("prepare")
    def prepare_command(
        manifests: Annotated[list[str], typer.Argument(
            help="Ground Truth output manifests (local or s3://), YOLO data.yaml or split folders, VOC "
                 "Annotations folders, COCO JSON files or Roboflow COCO export folders; any mix.")],
        out: Annotated[str, typer.Option("--out", help="Folder or s3:// prefix for the outputs.")],
        images: Annotated[str | None, typer.Option(
            "--images", help="Image folder of VOC/COCO inputs (default: the layout's own).")] = None,
        discard: Annotated[list[str], typer.Option(
            "--discard",
            help="Discard file (one id per line, # comments) or ids 'a,b'; repeatable.")] = [],  # noqa: B006
        reject_labels: Annotated[str | None, typer.Option(
            "--reject-labels",
            help="Verification-job answers (class-name) that reject an image, e.g. 'bad,needs fixing' "
                 "(default: bad, incorrect, wrong, reject, ...).")] = None,
        class_from: Annotated[str | None, typer.Option(
            "--class-from", help="Class name template over line fields, e.g. '{color} {object}'.")] = None,
        classes: Annotated[str | None, typer.Option(
            "--classes", help="Class names in id order, e.g. 'blue box,yellow box'.")] = None,
        label_attribute: Annotated[str | None, typer.Option(
            "--label-attribute", help="Label attribute (found by its metadata type).")] = None,
        drop_empty: Annotated[bool, typer.Option("--drop-empty", help="Drop images without boxes.")] = False,
        keep_splits: Annotated[bool, typer.Option(
            "--keep-splits", help="Keep the train/val/test split the YOLO/VOC/COCO source gives.")] = False,
        validation_fraction: Annotated[float, typer.Option("--validation-fraction")] = 0.1,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        group_by: Annotated[str, typer.Option(
            "--group-by", help="auto (default: whole videos when there are enough, else block:10), video, "
                               "block:N, none or regex:PATTERN.")] = "auto",
        gap: Annotated[int | None, typer.Option(
            "--gap", help="With blocks: leave out training frames this close to a validation frame "
                          "(default: the block size).")] = None,
        on_error: Annotated[str, typer.Option(
            "--on-error", help="stop at a bad line/box/file, or skip it and count it.")] = "stop",
    ) -> None:
        """Turn labels from any tool into train.manifest, validation.manifest and classes.json."""
        from detforge.data.prepare import prepare

        names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
        rejecting = [c.strip() for c in reject_labels.split(",") if c.strip()] if reject_labels else None
        s = prepare(manifests, out, discard=discard, class_from=class_from, classes=names,
                    label_attribute=label_attribute, drop_empty=drop_empty, images=images,
                    validation_fraction=validation_fraction, seed=seed, group_by=group_by, gap=gap,
                    keep_splits=keep_splits, reject_labels=rejecting, on_error=on_error)
        for path, count in s.lines.items():
            typer.echo(f"read {count} {'lines' if s.formats.get(path) == 'manifest' else 'images'} from "
                       f"{path} ({s.formats.get(path, 'manifest')})")
        typer.echo(f"discarded {len(s.discarded)}, failed verification {len(s.rejected_by_verification)}, "
                   f"duplicates {len(s.duplicates)}, skipped bad lines/images {len(s.skipped)}, "
                   f"skipped bad boxes {len(s.skipped_boxes)}, dropped empty {s.dropped_empty}")
        for line in (s.skipped + s.skipped_boxes)[:10]:
            typer.echo(f"  skipped {line}")
        for line in s.duplicates[:10]:
            typer.echo(f"  duplicate {line}")
        for image_id, comments in list(s.verification_comments.items())[:10]:
            typer.echo(f"  verification comment on {image_id}: {' | '.join(comments)}")
        typer.echo(f"images without boxes kept: {s.empty_images}")
        typer.echo("boxes per class: " + ", ".join(f"{i} {n}: {c}" for i, (n, c)
                                                  in enumerate(s.boxes_per_class.items())))
        split = "kept splits" if s.kept_splits else f"split by {s.group_by}, {s.groups} groups"
        typer.echo(f"train {s.train}, validation {s.validation}" + (f", test {s.test}" if s.test else "")
                   + f" ({split}" + (f", {s.dropped_for_gap} training frames left out next to validation"
                                     if s.dropped_for_gap else "") + f") -> {s.out}")
