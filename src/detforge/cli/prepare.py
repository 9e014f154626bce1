"""``detforge prepare INPUT... --out DIR``: labels in from any tool, joined, checked, leak-free split."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli import options


def register(app: typer.Typer) -> None:
    """Add the ``prepare`` command."""

    @app.command("prepare")
    def prepare_command(
        manifests: Annotated[
            list[str],
            typer.Argument(
                help="Ground Truth output manifests (local or s3://), YOLO data.yaml or split folders, VOC "
                "Annotations folders, COCO JSON files or Roboflow COCO export folders; any mix. "
                "INPUT=train|validation|test gives all its images that split (--keep-splits)."
            ),
        ],
        out: Annotated[str, typer.Option("--out", help="Folder or s3:// prefix for the outputs.")],
        images: options.Images = None,
        discard: Annotated[
            list[str],
            typer.Option(
                "--discard", help="Discard file (one id per line, # comments) or ids 'a,b'; repeatable."
            ),
        ] = [],  # noqa: B006
        reject_labels: Annotated[
            str | None,
            typer.Option(
                "--reject-labels",
                help="Verification-job answers (class-name) that reject an image, e.g. 'bad,needs fixing' "
                "(default: bad, incorrect, wrong, reject, ...).",
            ),
        ] = None,
        class_from: Annotated[
            str | None,
            typer.Option(
                "--class-from", help="Class name template over line fields, e.g. '{color} {object}'."
            ),
        ] = None,
        classes: Annotated[
            str | None, typer.Option("--classes", help="Class names in id order, e.g. 'blue box,yellow box'.")
        ] = None,
        label_attribute: options.LabelAttribute = None,
        drop_empty: Annotated[bool, typer.Option("--drop-empty", help="Drop images without boxes.")] = False,
        keep_splits: Annotated[
            bool,
            typer.Option(
                "--keep-splits",
                help="Keep the train/val/test split the inputs give (YOLO splits, VOC "
                "ImageSets, Roboflow/CVAT per-subset files, INPUT=SPLIT); an error when "
                "none does.",
            ),
        ] = False,
        split_of: Annotated[
            list[str],
            typer.Option(
                "--split-of",
                help="INPUT=SPLIT: the split of every image of one input (for --keep-splits); repeatable.",
            ),
        ] = [],  # noqa: B006
        content_checks: Annotated[
            bool,
            typer.Option(
                "--content-checks/--no-content-checks",
                help="Compare local images' bytes (exact duplicates) and thumbnails (near-copy sequences).",
            ),
        ] = True,
        validation_fraction: Annotated[float, typer.Option("--validation-fraction")] = 0.1,
        seed: Annotated[int, typer.Option("--seed")] = 0,
        group_by: Annotated[
            str,
            typer.Option(
                "--group-by",
                help="auto (default: whole videos/near-copy sequences when validation can get 2, "
                "else one validation run per video; still photos image by image), video, "
                "run, block:N, none or regex:PATTERN.",
            ),
        ] = "auto",
        gap: Annotated[
            int | None,
            typer.Option(
                "--gap",
                help="With runs or blocks: hold out training frames this close to a validation frame "
                "of their video (default: 10; 0 keeps them).",
            ),
        ] = None,
        overwrite: options.Overwrite = False,
        on_error: options.OnError = "stop",
    ) -> None:
        """Turn labels from any tool into train.manifest, validation.manifest and classes.json."""
        from detforge.data.prepare import format_summary, parse_input, prepare
        from detforge.errors import ConfigError

        names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
        rejecting = [c.strip() for c in reject_labels.split(",") if c.strip()] if reject_labels else None
        splits = {}
        for item in split_of:
            path, sep, split = item.rpartition("=")
            if not sep or not path:
                raise ConfigError(f"--split-of {item!r}: expected INPUT=SPLIT, e.g. val.json=validation")
            splits[path] = split
        s = prepare(
            manifests,
            out,
            discard=discard,
            class_from=class_from,
            classes=names,
            label_attribute=label_attribute,
            drop_empty=drop_empty,
            images=options.images_for(images, [parse_input(m)[0] for m in manifests]),
            validation_fraction=validation_fraction,
            seed=seed,
            group_by=group_by,
            gap=gap,
            keep_splits=keep_splits,
            reject_labels=rejecting,
            on_error=on_error,
            split_of=splits,
            content=content_checks,
            overwrite=overwrite,
        )
        for line in format_summary(s):
            typer.echo(line)
