"""The ``detforge`` command line: one thin module per command, each calling one library function.

Each module in ``COMMANDS`` defines ``register(app)``; heavy imports (torch, onnxruntime) happen
inside the command functions so that ``detforge --help`` and the edge commands stay light.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from detforge.errors import DetforgeError

# OpenMP threads that sleep instead of spinning while they wait: on a machine whose cores are busy with
# other work, torch's default spin-waiting made a training epoch 6.7x slower with 2 threads on 2 cores
# (37.0 s vs 5.5 s, measured on this project's 2-core CI-size machine under load); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Command modules, in the order of the workflow (docs/DESIGN.md). A new command adds its module here.
COMMANDS = [
    "frames",
    "synth",
    "label",
    "prepare",
    "convert",
    "stats",
    "augment",
    "train",
    "tune",
    "evaluate",
    "export",
    "predict",
    "review",
    "serve",
    "edge",
    "demo",
]


def build_app() -> typer.Typer:
    """The Typer application with every command registered."""
    app = typer.Typer(
        name="detforge",
        help="From Ground Truth labels to a fast object detector on the edge.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    for name in COMMANDS:
        importlib.import_module(f"detforge.cli.{name}").register(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; DetforgeErrors are printed as one line without a traceback (exit 2)."""
    app = build_app()
    try:
        # Outside standalone mode click hands a command's `typer.Exit(code)` back as the return value.
        code = app(args=argv, standalone_mode=False)
    except DetforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer/click exits for --help and usage errors
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            return 1
        raise
    return code if isinstance(code, int) else 0
