"""``detforge train --train M --validation M --hyperparameters hp.json --out runs/NAME``: a run folder.

Each option is a field of ``training.train.TrainConfig`` (``--set`` fills ``overrides``; ``--list-layers``
prints the model's parameter names instead of training); the command parses and calls ``train``."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``train`` command."""

    @app.command("train")
    def train_command(
        train: Annotated[
            str | None,
            typer.Option(
                "--train", help="Training manifest (prepared; classes.json beside it names the classes)."
            ),
        ] = None,
        validation: Annotated[
            str | None,
            typer.Option("--validation", help="Validation manifest: validation:mAP after every epoch."),
        ] = None,
        hyperparameters: Annotated[
            str | None,
            typer.Option(
                "--hyperparameters",
                "-p",
                help="SageMaker hyperparams.json (string values as SageMaker takes them).",
            ),
        ] = None,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="Override one hyperparameter: name=value (repeatable)."),
        ] = None,
        out: Annotated[str | None, typer.Option("--out", help="The run folder to write (runs/NAME).")] = None,
        weights: Annotated[
            str | None,
            typer.Option(
                "--weights", help="Start from an earlier detforge model: a run folder or .safetensors file."
            ),
        ] = None,
        resume: Annotated[
            str | None,
            typer.Option("--resume", help="Continue an interrupted run folder from its checkpoints/last.pt."),
        ] = None,
        classes: Annotated[
            str | None,
            typer.Option(
                "--classes", help="classes.json to use instead of the one beside the training manifest."
            ),
        ] = None,
        label_attribute: Annotated[
            str | None,
            typer.Option(
                "--label-attribute", help="The manifests' label attribute, when it cannot be found."
            ),
        ] = None,
        progress: Annotated[
            bool, typer.Option("--progress/--no-progress", help="A progress bar per epoch.")
        ] = True,
        list_layers: Annotated[
            bool,
            typer.Option(
                "--list-layers",
                help="Print the model's parameter names (torch and SageMaker's MXNet) for "
                "freeze_layer_pattern, then exit.",
            ),
        ] = False,
    ) -> None:
        """Train a detector (SSD, gfl) with SageMaker's object-detection hyperparameters (torchrun: many
        GPUs); ``--resume RUN`` continues an interrupted run."""
        from rich.console import Console

        from detforge.training.hyperparams import parse_overrides
        from detforge.training.train import TrainConfig
        from detforge.training.train import train as run_training

        if list_layers:
            _print_layers(hyperparameters, parse_overrides(set_ or []))
            return
        result = run_training(
            TrainConfig(
                train=train,
                validation=validation,
                out=out,
                hyperparameters=hyperparameters,
                overrides=parse_overrides(set_ or []),
                weights=weights,
                resume=resume or False,
                classes=classes,
                label_attribute=label_attribute,
                progress=progress,
                console=True,
            )
        )
        if result.main:
            Console().print(result.summary())


def _print_layers(hyperparameters: str | None, overrides: dict) -> None:
    """``train --list-layers``: every parameter of the model the hyperparameters build, with the
    SageMaker MXNet name ``freeze_layer_pattern`` may use (``detforge.training.layers``)."""
    from detforge.models import build_model
    from detforge.training.hyperparams import load_hyperparameters
    from detforge.training.layers import layer_table

    hp = load_hyperparameters(
        hyperparameters, overrides={**overrides, "use_pretrained_model": "0"}, defaults={"num_classes": "1"}
    )
    model = build_model(hp.base_network, num_classes=hp.num_classes, image_size=hp.image_shape)
    table = layer_table(model, hp.base_network)
    width = max(len(name) for name, _, _ in table)
    mx_width = max([len(mx) for _, mx, _ in table] + [len("MXNet name")])
    typer.echo(f"{'parameter (torch)':{width}}  {'MXNet name':{mx_width}}  shape")
    for name, mx, shape in table:
        typer.echo(f"{name:{width}}  {mx or '-':{mx_width}}  {'x'.join(str(s) for s in shape)}")
    typer.echo(
        f"{hp.base_network} at {hp.image_shape} px: freeze_layer_pattern (re.search) matches either name"
    )
