"""``detforge edge DEPLOY --source ... --broker ...`` and ``detforge edge package DEPLOY --out DIR``."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup

from detforge.cli.tile_options import Overlap, Tile, TileFullPass


class _RunByDefault(TyperGroup):
    """``detforge edge DEPLOY ...`` means ``detforge edge run DEPLOY ...``; ``package`` is the other."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _deploy_dir(path: str) -> str:
    return path[: -len("/model.onnx")] if path.endswith("/model.onnx") else path


# ``edge run``'s parameters whose ``EdgeConfig`` field has another name; every other one has the same name
# (tests/edge checks that the options and the fields match one to one, defaults included)
OPTION_FIELDS = {
    "deploy": "deploy_dir",
    "allow_path": "allow_paths",
    "heartbeat": "heartbeat_s",
    "drain_timeout": "drain_timeout_s",
    "reconnect_max": "reconnect_max_s",
}


def config_fields(params: dict) -> dict:
    """``EdgeConfig`` keyword arguments from ``edge run``'s parsed parameters."""
    fields = {OPTION_FIELDS.get(name, name): value for name, value in params.items()}
    fields["deploy_dir"] = _deploy_dir(fields["deploy_dir"])
    fields["allow_paths"] = tuple(fields["allow_paths"] or ())
    return fields


def register(app: typer.Typer) -> None:
    """Add the ``edge`` command group."""
    edge = typer.Typer(
        cls=_RunByDefault,
        no_args_is_help=True,
        help="Run the model on camera/video/folder frames and publish detections over MQTT "
        "(`detforge edge DEPLOY --source ... --broker ...`), or package it for Greengrass.",
    )
    app.add_typer(edge, name="edge")

    @edge.command("run")
    def run_command(
        ctx: typer.Context,
        deploy: Annotated[str, typer.Argument(help="The deploy folder (model.onnx + model.json).")],
        broker: Annotated[
            str, typer.Option("--broker", help="mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS.")
        ],
        source: Annotated[
            str | None,
            typer.Option(
                "--source",
                help="camera:N, a video file, rtsp://..., or watch:DIR (new images in DIR). "
                "Without it only requests are answered.",
            ),
        ] = None,
        topic: Annotated[
            str, typer.Option("--topic", help="Where detections are published.")
        ] = "detforge/infer/output",
        request_topic: Annotated[
            str, typer.Option("--request-topic", help='Where {"filepath": ...} requests arrive.')
        ] = "detforge/infer/input",
        status_topic: Annotated[
            str, typer.Option("--status-topic", help="Retained heartbeat/status, 'offline' as last will.")
        ] = "detforge/infer/status",
        fps: Annotated[
            float,
            typer.Option(
                "--fps",
                help="Frames a second to run (newer frames replace older ones; a video file is sampled).",
            ),
        ] = 5.0,
        threshold: Annotated[
            float | None,
            typer.Option(
                "--threshold",
                help="Drop detections below this score (default: the deploy folder's default_threshold).",
            ),
        ] = None,
        allow_path: Annotated[
            list[str] | None,
            typer.Option("--allow-path", help="Folder that requests may read images from (repeatable)."),
        ] = None,
        buffer_dir: Annotated[
            str | None,
            typer.Option(
                "--buffer-dir",
                help="Results wait here until the broker acknowledges them "
                "(default ~/.cache/detforge/edge-buffer/<source>).",
            ),
        ] = None,
        buffer_max: Annotated[
            int,
            typer.Option("--buffer-max", help="Most results kept while disconnected; the oldest go first."),
        ] = 10000,
        save_every: Annotated[
            int, typer.Option("--save-every", help="Save every Nth frame with its boxes drawn (0: never).")
        ] = 0,
        save_dir: Annotated[
            str, typer.Option("--save-dir", help="Where --save-every writes.")
        ] = "edge-frames",
        heartbeat: Annotated[
            float, typer.Option("--heartbeat", help="Seconds between status messages.")
        ] = 10.0,
        drain_timeout: Annotated[
            float, typer.Option("--drain-timeout", help="Seconds to wait for acknowledgements when stopping.")
        ] = 10.0,
        reconnect_max: Annotated[
            float,
            typer.Option(
                "--reconnect-max",
                help="Longest pause between reconnection attempts in seconds "
                "(it starts at 0.5 s and doubles).",
            ),
        ] = 30.0,
        client_id: Annotated[str | None, typer.Option("--client-id", help="MQTT client id.")] = None,
        threads: Annotated[int | None, typer.Option("--threads", help="ONNX Runtime threads.")] = None,
        username: Annotated[str | None, typer.Option("--username", help="MQTT user name.")] = None,
        password: Annotated[
            str | None, typer.Option("--password", help="MQTT password (better: DETFORGE_MQTT_PASSWORD).")
        ] = None,
        tls: Annotated[bool, typer.Option("--tls", help="Use TLS (implied by mqtts://).")] = False,
        ca_file: Annotated[
            str | None, typer.Option("--ca-file", help="CA certificate (PEM) for TLS.")
        ] = None,
        cert_file: Annotated[
            str | None, typer.Option("--cert-file", help="Client certificate (PEM).")
        ] = None,
        key_file: Annotated[str | None, typer.Option("--key-file", help="Client private key (PEM).")] = None,
        mqtt_version: Annotated[
            str,
            typer.Option("--mqtt-version", help="5 (the broker says which message it refused) or 3.1.1."),
        ] = "5",
        tile: Tile = None,
        overlap: Overlap = None,
        tile_full_pass: TileFullPass = None,
    ) -> None:
        """Run the model on frames, publish one JSON message per frame (QoS 1) until the end or SIGTERM."""
        from detforge.edge import EdgeConfig, run_edge

        config = EdgeConfig(**config_fields(ctx.params))
        stats = run_edge(config)
        typer.echo(
            f"{stats.frames} frames, {stats.requests} requests, {stats.published} results published, "
            f"{stats.errors} errors, {stats.buffered_at_exit} still buffered"
            + (
                f", {stats.lost_results} lost (the buffer folder could not be written)"
                if stats.lost_results
                else ""
            )
        )

    @edge.command("package")
    def package_command(
        deploy: Annotated[str, typer.Argument(help="The deploy folder (model.onnx + model.json).")],
        out: Annotated[str, typer.Option("--out", help="Folder for recipes/ and artifacts/.")],
        name: Annotated[str, typer.Option("--name", help="Component name.")] = "com.detforge.EdgeDetector",
        version: Annotated[
            str, typer.Option("--version", help="Component version MAJOR.MINOR.PATCH.")
        ] = "1.0.0",
        artifact_uri: Annotated[
            str | None,
            typer.Option(
                "--artifact-uri", help="s3:// URI the zip will be uploaded to (for cloud deployments)."
            ),
        ] = None,
        source: Annotated[str, typer.Option("--source", help="Default source setting.")] = "camera:0",
        broker: Annotated[
            str, typer.Option("--broker", help="Default broker setting.")
        ] = "mqtt://127.0.0.1:1883",
        fps: Annotated[float, typer.Option("--fps", help="Default fps setting.")] = 5.0,
        threshold: Annotated[
            float | None,
            typer.Option("--threshold", help="Threshold setting (default: the model's default_threshold)."),
        ] = None,
        allow_path: Annotated[
            str | None, typer.Option("--allow-path", help="Default folder that requests may read from.")
        ] = None,
    ) -> None:
        """Write a Greengrass v2 component (recipe YAML + artifact zip) that runs `detforge edge`."""
        from detforge.edge.greengrass import package_component

        component = package_component(
            _deploy_dir(deploy),
            out_dir=out,
            name=name,
            version=version,
            artifact_uri=artifact_uri,
            source=source,
            broker=broker,
            fps=fps,
            threshold=threshold,
            allow_path=allow_path,
        )
        typer.echo(f"recipe {component.recipe}\nartifact {component.artifact}")
