"""``detforge serve DEPLOY``: a real-time HTTP endpoint that answers like a SageMaker object-detection one."""

from __future__ import annotations

from typing import Annotated

import typer

from detforge.cli.tile_options import Overlap, Tile, TileFullPass


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command."""

    @app.command("serve")
    def serve_command(
        deploy: Annotated[
            str, typer.Argument(help="The deploy folder (model.onnx + model.json) or its model.onnx.")
        ],
        host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8080,
        workers: Annotated[
            int, typer.Option("--workers", help="Server processes, each with its own model.")
        ] = 1,
        max_batch: Annotated[
            int, typer.Option("--max-batch", help="Most images folded into one model run.")
        ] = 8,
        max_wait_ms: Annotated[
            float,
            typer.Option(
                "--max-wait-ms",
                help="Longest a batch waits for requests still arriving (a lone request never waits).",
            ),
        ] = 5.0,
        threads: Annotated[
            int | None,
            typer.Option("--threads", help="ONNX Runtime threads per model run (default: its own choice)."),
        ] = None,
        threshold: Annotated[
            float | None,
            typer.Option("--threshold", help="Drop detections scoring below this (default: the model's)."),
        ] = None,
        max_body_mb: Annotated[
            float, typer.Option("--max-body-mb", help="Largest request body in MiB (SageMaker's limit is 6).")
        ] = 6.0,
        max_pixels: Annotated[
            int,
            typer.Option("--max-pixels", help="Largest image (width x height) decoded; bigger ones get 413."),
        ] = 40_000_000,
        allow_path: Annotated[
            list[str] | None,
            typer.Option(
                "--allow-path",
                help='Folder whose files application/jsonlines {"source-ref": ...} requests may '
                "name (repeatable). Without it such requests are refused.",
            ),
        ] = None,
        max_images: Annotated[
            int, typer.Option("--max-images", help="Most images one JSON Lines request may name (413 above).")
        ] = 64,
        max_queue: Annotated[
            int,
            typer.Option(
                "--max-queue",
                help="Most images accepted and not yet answered, all requests "
                "together; a request whose images do not fit gets 503 with "
                "Retry-After.",
            ),
        ] = 100,
        max_in_flight: Annotated[
            int,
            typer.Option(
                "--max-in-flight",
                help="Most /invocations requests between their headers and their answer (503 above).",
            ),
        ] = 128,
        max_connections: Annotated[
            int, typer.Option("--max-connections", help="Most open connections (a new one gets 503 above).")
        ] = 256,
        max_client_connections: Annotated[
            int,
            typer.Option(
                "--max-client-connections",
                help="Most open connections from one client address (a new one gets 503 above; "
                "raise it to --max-connections behind a proxy).",
            ),
        ] = 64,
        header_timeout: Annotated[
            float,
            typer.Option("--header-timeout", help="Seconds a request's headers may take (408 after)."),
        ] = 10.0,
        body_timeout: Annotated[
            float,
            typer.Option(
                "--body-timeout",
                help="Seconds a request body may take, plus 1 s per 64 KiB received (408 after).",
            ),
        ] = 10.0,
        graceful_timeout: Annotated[
            int, typer.Option("--graceful-timeout", help="Seconds SIGTERM waits for requests in flight.")
        ] = 30,
        log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
        tile: Tile = None,
        overlap: Overlap = None,
        tile_full_pass: TileFullPass = None,
    ) -> None:
        """Serve GET /ping, POST /invocations, GET /metrics and GET /model until SIGTERM."""
        from detforge.deploy.serve import ServeConfig, serve

        deploy_dir = deploy[: -len("/model.onnx")] if deploy.endswith("/model.onnx") else deploy
        config = ServeConfig(
            deploy_dir=deploy_dir,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            max_pixels=max_pixels,
            threads=threads,
            threshold=threshold,
            allow_paths=tuple(allow_path or ()),
            max_images=max_images,
            max_queue=max_queue,
            max_in_flight=max_in_flight,
            max_connections=max_connections,
            max_client_connections=max_client_connections,
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            tile=tile,
            overlap=overlap,
            tile_full_pass=tile_full_pass,
        )
        typer.echo(
            f"serving {deploy_dir} on http://{host}:{port} (batch <= {max_batch}, wait <= {max_wait_ms:g} ms)"
        )
        serve(
            config,
            host=host,
            port=port,
            workers=workers,
            graceful_timeout=graceful_timeout,
            log_level=log_level,
        )
        typer.echo("stopped")
