"""``detforge weights list|download NETWORK...``: the ImageNet backbone weights of use_pretrained_model=1."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``weights`` command group."""
    group = typer.Typer(
        help="ImageNet backbone weights for use_pretrained_model=1 (downloaded only here).",
        no_args_is_help=True,
    )

    @group.command("list")
    def list_command() -> None:
        """Each base_network's weights file: cached or not, its path and where it comes from."""
        from detforge.models import BASE_NETWORKS
        from detforge.models.weights import weights_status

        for name in BASE_NETWORKS:
            status = weights_status(name)
            typer.echo(f"{name:13} {'cached ' if status.cached else 'missing'} {status.path}  ({status.url})")

    @group.command("download")
    def download_command(
        networks: Annotated[
            list[str], typer.Argument(help="base_network names: vgg-16 resnet-50 mobilenet-v3.")
        ],
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="A progress bar.")] = True,
    ) -> None:
        """Download the ImageNet weights of each NETWORK into the torch hub cache (TORCH_HOME)."""
        from detforge.models.weights import download_backbone, weights_status

        for name in networks:
            status = weights_status(name)
            if status.cached:
                typer.echo(f"{name}: already cached at {status.path}")
                continue
            typer.echo(f"{name}: downloading {status.url} -> {status.path}")
            download_backbone(name, progress=progress)
            typer.echo(f"{name}: done")

    app.add_typer(group, name="weights")
