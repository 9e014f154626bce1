"""``detforge train``: its options are ``TrainConfig``'s fields (names and defaults from one place);
importing the CLI changes nothing, running a command sets ``OMP_WAIT_POLICY``."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import typer
from typer.main import get_command

from detforge.cli.train import register
from detforge.training.train import TrainConfig

SRC = Path(__file__).resolve().parents[2] / "src"
# set by Python callers (on_epoch_end) or by the command itself (console; overrides come from --set)
CONFIG_ONLY = {"on_epoch_end", "console", "overrides"}
COMMAND_ONLY = {"set_", "list_layers"}  # --set (parsed into overrides), --list-layers (prints, no run)


def _train_options() -> dict:
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand layout
    return {param.name: param for param in get_command(app).commands["train"].params}


def test_the_train_options_are_the_config_fields():
    options = _train_options()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(options) - COMMAND_ONLY == set(fields) - CONFIG_ONLY
    for name in set(options) - COMMAND_ONLY:
        option, default = options[name], fields[name].default
        assert "--" + name.replace("_", "-") in option.opts, name
        assert option.help, name
        if default is dataclasses.MISSING or name == "resume":  # required in Python / False: not given
            assert option.default is None, name
        else:
            assert option.default == default, name
    assert options["set_"].opts == ["--set"] and options["set_"].multiple
    assert options["hyperparameters"].opts == ["--hyperparameters", "-p"]


def test_importing_the_cli_changes_nothing_and_a_command_sets_the_thread_policy():
    code = (
        "import os, detforge.cli as cli\n"
        "before = os.environ.get('OMP_WAIT_POLICY')\n"
        "code = cli.main(['--help'])\n"
        "print(code, before, os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 None PASSIVE"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env | {"OMP_WAIT_POLICY": "ACTIVE"},
    )
    assert done.stdout.splitlines()[-1] == "0 ACTIVE ACTIVE"  # the user's own setting stays
