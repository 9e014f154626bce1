"""The command line's usage errors: a mistyped option or command and a missing argument print click's
usage message (usage line, where to get help, the error with a "Did you mean" suggestion) and exit 2,
never a traceback; through the installed ``detforge`` script, running this checkout's code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def detforge_script() -> list[str]:
    """The installed console script (``pip install -e .`` writes it beside the interpreter)."""
    script = Path(sys.executable).parent / "detforge"
    if not script.exists():
        found = shutil.which("detforge")
        if found is None:
            pytest.fail("the `detforge` script is not installed (pip install -e .)")
        script = Path(found)
    return [str(script)]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*detforge_script(), *args], capture_output=True, text=True, timeout=60, env=env)


def test_the_script_runs_this_checkout():
    done = run("--help")
    assert done.returncode == 0 and "Usage: detforge [OPTIONS] COMMAND" in done.stdout
    code = "import detforge, sys; print(detforge.__file__)"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert where.stdout.strip() == str(REPO / "src" / "detforge" / "__init__.py")


@pytest.mark.parametrize(
    "args,usage,error",
    [
        (
            ["export", "run", "--int9"],
            "Usage: detforge export [OPTIONS]",
            "Error: No such option: --int9. Did you mean --int8?",
        ),
        (
            ["prepare", "m.manifest", "--valdation-fraction", "0.2"],
            "Usage: detforge prepare [OPTIONS]",
            "Error: No such option: --valdation-fraction. Did you mean --validation-fraction?",
        ),
        (
            ["trian"],
            "Usage: detforge [OPTIONS] COMMAND [ARGS]...",
            "Error: No such command 'trian'. Did you mean 'train'?",
        ),
        (["export"], "Usage: detforge export [OPTIONS]", "Error: Missing argument 'run'."),
    ],
)
def test_usage_errors_print_the_usage_message_and_exit_2(args, usage, error):
    done = run(*args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(usage)
    assert lines[1] == f"Try '{usage.split(' [')[0].removeprefix('Usage: ')} -h' for help."
    assert lines[-1] == error and len(lines) == 4
    assert "Traceback" not in done.stderr and done.stdout == ""
