"""The ``detforge`` command line: one thin module per command, each calling one library function.

Each module in ``COMMANDS`` defines ``register(app)``; heavy imports (torch, onnxruntime) happen
inside the command functions so that ``detforge --help`` and the edge commands stay light. Importing
this package changes nothing; ``main`` sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set) when a command runs.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from detforge.errors import DetforgeError

# Command modules, in the order of the workflow (docs/DESIGN.md). A new command adds its module here.
COMMANDS = [
    "frames",
    "synth",
    "label",
    "prepare",
    "convert",
    "stats",
    "augment",
    "weights",
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


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """``(ClickException classes, Abort classes)``: typer's vendored click (``typer._click``, what it
    raises since typer 0.2x) and, when installed, click itself (what older typers raise)."""
    usage: list[type] = []
    abort: list[type] = [typer.Abort]
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        usage.append(found.ClickException)
        if hasattr(found, "Abort"):
            abort.append(found.Abort)
    return tuple(usage), tuple(abort)


def _show_usage_error(exc) -> None:
    """Click's usage message (usage line, "Try ... -h for help.", the error) with a mistyped option's
    closest options as "Did you mean ...?" (typer already says it for a mistyped command)."""
    possibilities = getattr(exc, "possibilities", None)
    if possibilities and getattr(exc, "option_name", None):
        exc.possibilities = None
        exc.message = f"{exc.message.rstrip('.')}. Did you mean {' or '.join(sorted(possibilities))}?"
    exc.show()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; DetforgeErrors are printed as one line without a traceback (exit 2)."""
    # OpenMP threads that sleep instead of spinning while they wait: on a machine whose cores are busy with
    # other work, torch's default spin-waiting made a training epoch 6.7x slower with 2 threads on 2 cores
    # (37.0 s vs 5.5 s, measured on this project's 2-core CI-size machine under load). Set here, when a
    # command runs and before it loads torch, not at import (importing detforge changes nothing).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app = build_app()
    try:
        # Outside standalone mode click hands a command's `typer.Exit(code)` back as the return value.
        code = app(args=argv, prog_name="detforge", standalone_mode=False)
    except DetforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # typer/click exits for --help and usage errors
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        usage, abort = _click_exceptions()
        if isinstance(exc, usage):  # a usage error: usage line, "Try ... -h", the message (did you mean)
            _show_usage_error(exc)
            return exc.exit_code
        if isinstance(exc, abort):
            print("aborted", file=sys.stderr)
            return 1
        raise
    return code if isinstance(code, int) else 0
