"""Tuning: SageMaker ParameterRanges (every scaling type, bad files by field), a tiny real search through
the CLI, pruning forced by a range that cannot score, failed trials recorded, resume after SIGKILL,
two worker processes sharing one SQLite study, and a study shared in a real PostgreSQL server (started
by the test) that survives a worker killed mid-trial."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, make_tiny_set, missing, wait_for_port

from detforge.errors import ConfigError
from detforge.tune.ranges import DEFAULT_RANGES, load_tuning_config, parse_tuning_config

REPO = Path(__file__).resolve().parents[2]
HP = {
    "num_classes": "2",
    "base_network": "mobilenet-v3",
    "use_pretrained_model": "0",
    "epochs": "1",
    "mini_batch_size": "4",
    "image_shape": "64",
    "workers": "0",
    "learning_rate": "0.05",
    "augmentation": "none",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return str(make_tiny_set(root / "train", 8, 1)), str(make_tiny_set(root / "val", 4, 2))


@pytest.fixture
def _one_thread():
    torch = pytest.importorskip("torch")
    pytest.importorskip("optuna")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ ranges


def test_default_ranges_are_sagemakers_object_detection_ranges():
    spec = load_tuning_config(None)
    table = {r.name: (r.kind, r.low, r.high, r.scaling, r.values) for r in spec.ranges}
    assert table == {
        "learning_rate": ("continuous", 1e-6, 0.5, "Logarithmic", ()),  # Auto: 5.7 decades
        "momentum": ("continuous", 0.0, 0.999, "Linear", ()),
        "weight_decay": ("continuous", 0.0, 0.999, "Linear", ()),
        "mini_batch_size": ("integer", 8, 64, "Linear", ()),
        "optimizer": ("categorical", None, None, "Linear", ("sgd", "adam", "rmsprop", "adadelta")),
    }
    assert parse_tuning_config(spec.parameter_ranges()) == spec == parse_tuning_config(DEFAULT_RANGES)
    assert spec.strategy == "Bayesian" and spec.max_trials is None


def test_every_scaling_type_samples_where_it_should():
    optuna = pytest.importorskip("optuna")
    spec = parse_tuning_config(
        {
            "ContinuousParameterRanges": [
                {
                    "Name": "learning_rate",
                    "MinValue": "1e-4",
                    "MaxValue": "0.1",
                    "ScalingType": "Logarithmic",
                },
                {
                    "Name": "momentum",
                    "MinValue": "0",
                    "MaxValue": "0.999",
                    "ScalingType": "ReverseLogarithmic",
                },
                {"Name": "weight_decay", "MinValue": "0", "MaxValue": "0.5", "ScalingType": "Linear"},
                {"Name": "score_threshold", "MinValue": "0.001", "MaxValue": "0.5"},  # Auto -> log
                {"Name": "nms_threshold", "MinValue": "0.3", "MaxValue": "0.7", "ScalingType": "Auto"},
            ],
            "IntegerParameterRanges": [
                {"Name": "nms_topk", "MinValue": "1", "MaxValue": "1000", "ScalingType": "Logarithmic"},
                {"Name": "mini_batch_size", "MinValue": 8, "MaxValue": 64},
            ],
            "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["sgd", "adam"]}],
        }
    )
    by_name = {r.name: r for r in spec.ranges}
    assert [by_name[n].scaling for n in ("score_threshold", "nms_threshold", "mini_batch_size")] == [
        "Logarithmic",
        "Linear",
        "Linear",
    ]
    assert (
        by_name["momentum"].optuna_name == "1-momentum"
        and by_name["learning_rate"].optuna_name == "learning_rate"
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws: dict[str, list] = {r.name: [] for r in spec.ranges}
    for _ in range(400):
        trial = study.ask()
        values = {r.name: r.suggest(trial) for r in spec.ranges}
        assert all(isinstance(v, str) for v in values.values())  # as SageMaker passes them
        assert {r.name: r.value_from_params(trial.params) for r in spec.ranges} == values
        for name, value in values.items():
            draws[name].append(value)
        study.tell(trial, 0.0)
    numbers = {n: np.array([float(v) for v in draws[n]]) for n in draws if n != "optimizer"}
    for r in spec.ranges:
        if r.kind != "categorical":
            assert numbers[r.name].min() >= r.low and numbers[r.name].max() <= r.high
    assert all(float(v).is_integer() for v in draws["nms_topk"] + draws["mini_batch_size"])
    share = {
        "lr < 1e-2 (log: 2/3, linear: 1/10)": np.mean(numbers["learning_rate"] < 1e-2),
        "momentum >= 0.9 (reverse log: 2/3, linear: 1/10)": np.mean(numbers["momentum"] >= 0.9),
        "weight_decay < 0.25 (linear: 1/2)": np.mean(numbers["weight_decay"] < 0.25),
        "nms_topk <= 31 (log: 1/2, linear: 3/100)": np.mean(numbers["nms_topk"] <= 31),
    }
    assert list(share.values()) == pytest.approx([2 / 3, 2 / 3, 1 / 2, 1 / 2], abs=0.08), share
    assert set(draws["optimizer"]) == {"sgd", "adam"}
    fixed = optuna.trial.FixedTrial({"1-momentum": 0.01, "learning_rate": 0.001, "nms_topk": 7})
    assert by_name["momentum"].suggest(fixed) == "0.99"
    assert by_name["learning_rate"].suggest(fixed) == "0.001" and by_name["nms_topk"].suggest(fixed) == "7"


def test_tuning_job_config_and_request_shapes():
    ranges = {"CategoricalParameterRanges": [{"Name": "base_network", "Values": ["vgg-16", "mobilenet-v3"]}]}
    spec = parse_tuning_config(
        {
            "ParameterRanges": ranges,
            "Strategy": "Random",
            "ResourceLimits": {"MaxNumberOfTrainingJobs": 7, "MaxParallelTrainingJobs": 2},
            "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": "validation:mAP"},
            "TrainingJobEarlyStoppingType": "Off",
        }
    )
    assert (spec.strategy, spec.max_trials, spec.early_stopping) == ("Random", 7, "Off")
    assert spec.parameter_ranges() == ranges and spec.static_hyperparameters is None
    request = {
        "HyperParameterTuningJobName": "boxes",
        "HyperParameterTuningJobConfig": {"ParameterRanges": ranges, "Strategy": "Grid"},
        "TrainingJobDefinition": {"StaticHyperParameters": {"num_classes": "2", "epochs": "3"}},
    }
    spec = parse_tuning_config(request)
    assert spec.strategy == "Grid" and spec.grid_size() == 2
    assert spec.static_hyperparameters == {"num_classes": "2", "epochs": "3"}


def _continuous(**entry):
    lr = {"Name": "learning_rate", "MinValue": "0.001", "MaxValue": "0.1"}
    return {"ContinuousParameterRanges": [lr | entry]}


def _integer(name: str, low: str, high: str, **entry):
    return {"IntegerParameterRanges": [{"Name": name, "MinValue": low, "MaxValue": high} | entry]}


def _categorical(*ranges: tuple[str, list]):
    return {"CategoricalParameterRanges": [{"Name": name, "Values": values} for name, values in ranges]}


C0, I0, K0 = "ContinuousParameterRanges[0]", "IntegerParameterRanges[0]", "CategoricalParameterRanges[0]"
REVERSE = {"ScalingType": "ReverseLogarithmic"}
BAD_RANGES = [
    (_continuous(MinValue="0.1", MaxValue="0.01"), f"{C0}.MinValue", "must be less than MaxValue (0.01)"),
    (_continuous(MinValue="0"), f"{C0}.MinValue", "must be > 0, got 0.0 (for learning_rate)"),
    (
        _continuous(Name="momentum", MinValue="0", MaxValue="0.9", ScalingType="Logarithmic"),
        f"{C0}.ScalingType",
        "Logarithmic scaling needs MinValue > 0, got 0",
    ),
    (
        _continuous(MaxValue="1", **REVERSE),
        f"{C0}.ScalingType",
        "needs 0 <= MinValue < MaxValue < 1, got 0.001",
    ),
    (
        _continuous(ScalingType="Exponential"),
        f"{C0}.ScalingType",
        "expected one of Auto, Linear, Logarithmic",
    ),
    (_continuous(MaxValue="2"), f"{C0}.MaxValue", "must be <= 1, got 2.0 (for learning_rate)"),
    (_continuous(MinValue="abc"), f"{C0}.MinValue", "expected a number, got 'abc'"),
    (_continuous(Minvalue="0.1"), C0, "unknown key 'Minvalue'"),
    (_continuous(Name="learning_rat"), f"{C0}.Name", "'learning_rat' is not a hyperparameter"),
    (
        _continuous(Name="mini_batch_size", MinValue="8", MaxValue="64"),
        f"{C0}.Name",
        "use IntegerParameterRanges",
    ),
    (_integer("epochs", "1", "9", **REVERSE), f"{I0}.ScalingType", "continuous ranges only"),
    (_integer("epochs", "1.5", "9"), f"{I0}.MinValue", "expected a whole number"),
    (_integer("num_classes", "1", "3"), f"{I0}.Name", "fixed by the data"),
    (_integer("optimizer", "1", "3"), f"{I0}.Name", "use CategoricalParameterRanges"),
    (_categorical(("optimizer", ["sgd", "sgdd"])), f"{K0}.Values[1]", "expected one of sgd, adam, rmsprop"),
    (_categorical(("optimizer", [])), f"{K0}.Values", "expected a non-empty list"),
    (_categorical(("optimizer", ["sgd", "sgd"])), f"{K0}.Values", "lists a value twice"),
    (
        _categorical(("optimizer", ["sgd"]), ("optimizer", ["adam"])),
        "CategoricalParameterRanges[1].Name",
        "more than one",
    ),
    ({"ContinuousRanges": []}, "ParameterRanges", "unknown key 'ContinuousRanges'"),
    ({}, "ParameterRanges", "no hyperparameter ranges"),
    ({"ParameterRanges": _continuous(), "Strategy": "Grid"}, "Strategy", "CategoricalParameterRanges only"),
    ({"ParameterRanges": _continuous(), "Strategy": "Smart"}, "Strategy", "expected one of Bayesian, Random"),
    (
        {
            "ParameterRanges": _continuous(),
            "HyperParameterTuningJobObjective": {"MetricName": "validation:loss"},
        },
        "HyperParameterTuningJobObjective",
        "detforge tunes validation:mAP (Maximize), got 'validation:loss' (Maximize)",
    ),
    (
        {"ParameterRanges": _continuous(), "ResourceLimits": {"MaxNumberOfTrainingJobs": 0}},
        "ResourceLimits.MaxNumberOfTrainingJobs",
        "must be >= 1",
    ),
    (
        {"HyperParameterTuningJobConfig": {"ParameterRanges": _integer("epochs", "0", "3")}},
        f"HyperParameterTuningJobConfig.ParameterRanges.{I0}.MinValue",
        "must be >= 1",
    ),
]


@pytest.mark.parametrize(("raw", "field", "message"), BAD_RANGES)
def test_bad_ranges_name_the_field(raw, field, message):
    with pytest.raises(ConfigError) as info:
        parse_tuning_config(raw, source="ranges.json")
    assert info.value.field == field and message in str(info.value) and info.value.path == "ranges.json"


def test_bad_ranges_file_through_the_cli(tiny, tmp_path, capsys):
    from detforge.cli import main

    broken = tmp_path / "ranges.json"
    broken.write_text('{"ContinuousParameterRanges": [')
    base = tmp_path / "hp.json"
    base.write_text(json.dumps(HP))
    args = [
        "tune",
        "--train",
        tiny[0],
        "--validation",
        tiny[1],
        "-p",
        str(base),
        "--out",
        str(tmp_path / "t"),
    ]
    assert main([*args, "--ranges", str(broken)]) == 2
    assert f"error: {broken}: not valid JSON" in capsys.readouterr().err
    broken.write_text(json.dumps(_continuous(MinValue="0.5")))
    assert main([*args, "--ranges", str(broken)]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {broken}, field 'ContinuousParameterRanges[0].MinValue': must be less than MaxValue" in err
    )
    assert main([*args, "--set", "epochs=0"]) == 2
    assert "field 'epochs': must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # nothing started


# -------------------------------------------------------------------------------------------- runs


def test_tiny_search_through_the_cli_writes_the_best_hyperparameters(tiny, tmp_path, _one_thread, capsys):
    from detforge.cli import main
    from detforge.training.hyperparams import load_hyperparameters

    base = tmp_path / "hp.json"
    base.write_text(json.dumps(HP | {"_tuning_objective_metric": ""}))  # SageMaker's own keys pass
    ranges = tmp_path / "ranges.json"
    ranges.write_text(
        json.dumps(
            {
                "ContinuousParameterRanges": [
                    {
                        "Name": "learning_rate",
                        "MinValue": "0.005",
                        "MaxValue": "0.1",
                        "ScalingType": "Logarithmic",
                    },
                    {
                        "Name": "momentum",
                        "MinValue": "0.5",
                        "MaxValue": "0.99",
                        "ScalingType": "ReverseLogarithmic",
                    },
                ],
                "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["sgd", "adam"]}],
            }
        )
    )
    out = tmp_path / "tune"
    args = ["tune", "--train", tiny[0], "--validation", tiny[1], "-p", str(base), "--ranges", str(ranges)]
    assert main([*args, "--trials", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 trials (3 complete) -> " in printed and "best: trial " in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "best-hyperparams.json",
        "optimization-history.png",
        "param-importances.png",
        "study.db",
        "summary.json",
        "trial-000",
        "trial-001",
        "trial-002",
        "trials.csv",
    ]
    rows = _rows(out / "trials.csv")
    assert list(rows[0]) == [
        "trial", "state", "validation:mAP", "best_epoch", "epochs", "learning_rate", "momentum", "optimizer",
        "seconds", "worker", "run_dir", "error",
    ]  # fmt: skip
    assert [(r["trial"], r["state"], r["epochs"], r["error"]) for r in rows] == [
        (str(i), "complete", "1", "") for i in range(3)
    ]
    for row in rows:  # each trial is a normal run folder trained with the sampled values
        run = Path(row["run_dir"])
        assert run.name == f"trial-{int(row['trial']):03d}" and (run / "best.safetensors").exists()
        resolved = json.loads((run / "hyperparams.json").read_text())
        assert (
            resolved["learning_rate"] == float(row["learning_rate"])
            and resolved["optimizer"] == row["optimizer"]
        )
        assert 0.005 <= resolved["learning_rate"] <= 0.1 and 0.5 <= resolved["momentum"] <= 0.99
        assert json.loads((run / "metrics.jsonl").read_text())["validation:mAP"] == float(
            row["validation:mAP"]
        )
    best = max(rows, key=lambda r: (float(r["validation:mAP"]), -int(r["trial"])))
    written = json.loads((out / "best-hyperparams.json").read_text())
    assert written == HP | {"_tuning_objective_metric": ""} | {
        k: best[k] for k in ("learning_rate", "momentum", "optimizer")
    }
    hp = load_hyperparameters(out / "best-hyperparams.json")  # ready for detforge train
    assert hp.learning_rate == float(best["learning_rate"]) and hp.optimizer == best["optimizer"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == {"complete": 3} and summary["best"]["trial"] == int(best["trial"])
    assert summary["storage"] == f"sqlite:///{out / 'study.db'}" and summary["pruner"] == "median"
    for png in ("optimization-history.png", "param-importances.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same command again: the study already has its 3 trials, nothing runs, the summary stays
    assert main([*args, "--trials", "3", "--out", str(out)]) == 0
    assert _rows(out / "trials.csv") == rows
    # other ranges under the same study name: refused
    ranges.write_text(json.dumps({"CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["sgd"]}]}))
    assert main([*args, "--trials", "4", "--out", str(out)]) == 2
    assert "was started with other parameter ranges" in capsys.readouterr().err


def test_a_range_that_cannot_score_is_pruned_and_failures_are_recorded(tiny, tmp_path, _one_thread):
    from detforge.tune import TuneConfig, tune

    # Grid over 2 x 2: score_threshold 0.99 leaves no detection (mAP 0), mini_batch_size 1 cannot train.
    ranges = {
        "ParameterRanges": {
            "CategoricalParameterRanges": [
                {"Name": "score_threshold", "Values": ["0.01", "0.99"]},
                {"Name": "mini_batch_size", "Values": ["4", "1"]},
            ]
        },
        "Strategy": "Grid",
        "ResourceLimits": {"MaxNumberOfTrainingJobs": 10},  # the grid has 4
    }
    result = tune(
        TuneConfig(
            train=tiny[0],
            validation=tiny[1],
            out=str(tmp_path / "tune"),
            hyperparameters=HP | {"epochs": "2"},
            ranges=ranges,
            prune_startup_trials=1,
            prune_after_epochs=1,
            seed=1,
        )
    )
    table = {(r["score_threshold"], r["mini_batch_size"]): r for r in result.rows}
    assert len(result.rows) == 4 and len(table) == 4
    assert [r["trial"] for r in result.rows] == [0, 1, 2, 3]
    good, hopeless = table[("0.01", "4")], table[("0.99", "4")]
    order = [(r["score_threshold"], r["mini_batch_size"]) for r in result.rows]
    assert order == [("0.99", "1"), ("0.01", "4"), ("0.99", "4"), ("0.01", "1")]  # seed 1: every point once
    assert good["state"] == "complete" and good["epochs"] == 2 and good["validation:mAP"] > 0
    assert hopeless["state"] == "pruned" and hopeless["epochs"] == 1 and hopeless["validation:mAP"] == 0.0
    for key in (("0.01", "1"), ("0.99", "1")):
        failed = table[key]
        assert failed["state"] == "failed"
        assert failed["error"] == (
            "field 'mini_batch_size': gives 1 image per process and step; BatchNorm needs at least 2 "
            "(use mini_batch_size >= 2)"
        )
        assert "Traceback" in (Path(failed["run_dir"]) / "error.txt").read_text()
    assert result.count("pruned") == 1 and result.count("failed") == 2 and result.count("complete") == 1
    assert result.best["trial"] == good["trial"]
    assert result.best_hyperparameters == HP | {
        "epochs": "2",
        "score_threshold": "0.01",
        "mini_batch_size": "4",
    }
    assert len((Path(hopeless["run_dir"]) / "metrics.jsonl").read_text().splitlines()) == 1


def _tune_script(tiny, out: Path, trials: int, **extra) -> str:
    return textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from detforge.tune import TuneConfig, tune
        tune(TuneConfig(train={tiny[0]!r}, validation={tiny[1]!r}, out={str(out)!r}, trials={trials},
                        hyperparameters={HP | {"epochs": "2"}!r}, ranges={RESUME_RANGES!r}, pruner="none",
                        heartbeat_s=1, **{extra!r}))
    """)


RESUME_RANGES = {
    "ContinuousParameterRanges": [
        {"Name": "learning_rate", "MinValue": "0.01", "MaxValue": "0.1", "ScalingType": "Logarithmic"}
    ]
}


def test_resume_after_the_process_is_killed(tiny, tmp_path, _one_thread):
    from detforge.tune import TuneConfig, tune

    out = tmp_path / "tune"
    process = subprocess.Popen(
        [sys.executable, "-c", _tune_script(tiny, out, 3)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (out / "trial-001" / "checkpoints" / "last.pt").exists():  # trial 1 is in its 2nd epoch
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert [r["state"] for r in _rows(out / "trials.csv")] == ["complete"]  # written after trial 0
    result = tune(
        TuneConfig(
            train=tiny[0],
            validation=tiny[1],
            out=str(out),
            trials=3,
            hyperparameters=HP | {"epochs": "2"},
            ranges=RESUME_RANGES,
            pruner="none",
            heartbeat_s=1,
        )
    )
    # the killed trial's heartbeat stopped: it is marked interrupted, does not count, and is replaced
    assert [(r["trial"], r["state"]) for r in result.rows] == [
        (0, "complete"),
        (1, "interrupted"),
        (2, "complete"),
        (3, "complete"),
    ]
    assert [r["epochs"] for r in result.rows if r["state"] == "complete"] == [2, 2, 2]
    assert len({r["learning_rate"] for r in result.rows}) == 4  # the resumed sampler draws afresh
    assert [r["state"] for r in _rows(out / "trials.csv")] == [
        "complete",
        "interrupted",
        "complete",
        "complete",
    ]


def test_two_worker_processes_share_one_sqlite_study(tiny, tmp_path, _one_thread):
    optuna = pytest.importorskip("optuna")
    from detforge.tune import TuneConfig, tune

    out = tmp_path / "tune"
    result = tune(
        TuneConfig(
            train=tiny[0],
            validation=tiny[1],
            out=str(out),
            trials=3,
            parallel=2,
            hyperparameters=HP,
            ranges=RESUME_RANGES,
            pruner="none",
        )
    )
    # when both workers claim the last place at the same moment, one records a "skipped" row that trains
    # nothing and does not count (docs/tuning.md)
    rows = [r for r in result.rows if r["state"] != "skipped"]
    assert len(result.rows) - len(rows) <= 1
    assert [r["state"] for r in rows] == ["complete"] * 3
    assert {r["worker"].rsplit("/", 1)[1] for r in rows} == {"0", "1"}
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    done = {r["trial"] for r in rows}
    spans: dict = {}  # each worker's trials; some overlap in time with the other worker's
    for t in study.trials:
        if t.number in done:
            spans.setdefault(t.user_attrs["worker"], []).append((t.datetime_start, t.datetime_complete))
    first, second = spans.values()
    assert any(a0 < b1 and b0 < a1 for a0, a1 in first for b0, b1 in second)
    assert len({r["learning_rate"] for r in rows}) == 3  # the workers draw different values
    assert (out / "optimization-history.png").exists() and (out / "best-hyperparams.json").exists()


# ------------------------------------------------------------------------------------------ PostgreSQL


def _postgres_binary(name: str) -> str:
    import glob
    import shutil

    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        missing(f"PostgreSQL's '{name}' is not installed (Debian package postgresql; `make system` has it)")
    return found


@pytest.fixture
def postgres_url():
    """A PostgreSQL server of its own (initdb + pg_ctl on a temp folder, 127.0.0.1 and a free port, trust
    auth for the loopback only), stopped and deleted after the test. As root it runs as the ``postgres``
    user (or ``nobody``): PostgreSQL refuses to run as root."""
    import pwd
    import shutil
    import tempfile

    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("the PostgreSQL driver psycopg is not installed (pip install 'detforge[postgres]')")
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    user = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
    folder = tempfile.mkdtemp(prefix="detforge-pg-")
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, port = os.path.join(folder, "data"), free_port()
    as_user = {"user": user.pw_uid, "group": user.pw_gid} if user is not None else {}

    def run(*args: str) -> None:
        result = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=folder, **as_user)
        assert result.returncode == 0, result.stdout + result.stderr

    run(initdb, "-D", data, "-U", "detforge", "--auth=trust", "--no-sync", "-E", "UTF8")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
    run(pg_ctl, "-D", data, "-l", os.path.join(folder, "server.log"), "-o", options, "-w", "start")
    try:
        wait_for_port(port)
        yield f"postgresql://detforge@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [pg_ctl, "-D", data, "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            cwd=folder,
            **as_user,
        )
        shutil.rmtree(folder, ignore_errors=True)


def test_a_postgresql_study_survives_a_killed_worker_and_two_workers_finish_it(
    tiny, tmp_path, _one_thread, postgres_url
):
    optuna = pytest.importorskip("optuna")
    from detforge.tune import TuneConfig, tune

    out = tmp_path / "tune"
    process = subprocess.Popen(
        [sys.executable, "-c", _tune_script(tiny, out, 4, storage=postgres_url)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while not (out / "trial-001" / "checkpoints" / "last.pt").exists():  # trial 1 is in its 2nd epoch
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # a worker dies mid-trial: its trial stays "running" in the server
    process.wait()
    study = optuna.load_study(study_name="tune", storage=postgres_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    result = tune(
        TuneConfig(
            train=tiny[0],
            validation=tiny[1],
            out=str(out),
            trials=4,
            parallel=2,
            storage=postgres_url,
            hyperparameters=HP | {"epochs": "2"},
            ranges=RESUME_RANGES,
            pruner="none",
            heartbeat_s=1,
        )
    )
    # the killed trial's heartbeat stopped: it is marked failed-stale (interrupted), does not count, and two
    # new workers finish the study; at most one "skipped" row when both claim the last place at once
    rows = [r for r in result.rows if r["state"] != "skipped"]
    assert len(result.rows) - len(rows) <= 1
    assert [(r["trial"], r["state"]) for r in rows[:2]] == [(0, "complete"), (1, "interrupted")]
    assert [r["state"] for r in rows[2:]] == ["complete"] * 3
    assert len({r["trial"] for r in result.rows}) == len(result.rows)  # no trial counted twice
    assert {r["worker"].rsplit("/", 1)[1] for r in rows[2:]} == {"0", "1"}
    assert len({r["learning_rate"] for r in rows}) == 5
    again = optuna.load_study(study_name="tune", storage=postgres_url)  # what the server holds
    states = [t.state.name for t in again.trials]
    assert states.count("COMPLETE") == 4 and states[1] == "FAIL" and "RUNNING" not in states
    summary = json.loads((out / "summary.json").read_text())
    from detforge.tune.summary import public_url

    assert summary["storage"] == public_url(postgres_url)  # never a password, in any form


@pytest.mark.parametrize(
    ("form", "shown"),
    [
        ("postgresql://alice:Hunter2@Secret@db.example/study", "postgresql://***@db.example/study"),
        (
            "postgresql://alice@db.example/study?password=Hunter2&sslmode=require",
            "postgresql://***@db.example/study?password=***&sslmode=require",
        ),
        ("postgresql://alice:Hunter2%40Secret@db.example/study", "postgresql://***@db.example/study"),
        (
            "host=db.example user=alice password=Hunter2 dbname=study",
            "host=db.example user=alice password=*** dbname=study",
        ),
        (
            "host=db.example password='Hunter2 \\' Secret' dbname=study",
            "host=db.example password=*** dbname=study",
        ),
        ("sqlite:////data/a@b/study.db", "sqlite:////data/a@b/study.db"),  # a path, no user in it
    ],
)
def test_public_url_hides_every_form_of_password(form, shown):
    from detforge.tune.summary import public_url

    assert public_url(form) == shown


def test_a_storage_that_cannot_be_opened_never_shows_its_password(tiny, tmp_path, _one_thread, postgres_url):
    """Against a real PostgreSQL: a database that does not exist, reached with the password in each form
    psycopg accepts, and a key=value string SQLAlchemy cannot parse: the one-line error names the storage,
    never the password or any piece of it."""
    from detforge.errors import ConfigError
    from detforge.tune import TuneConfig, tune

    server = postgres_url.split("@")[1].split("/")[0]  # 127.0.0.1:PORT
    host, port = server.split(":")
    forms = {
        f"postgresql://detforge:Hunter2@Secret@{server}/nope": f"postgresql://***@{server}/nope",
        f"postgresql://detforge@{server}/nope?password=Hunter2Secret": f"postgresql://***@{server}/nope?password=***",
        f"postgresql://detforge:Hunter2%40Secret@{server}/nope": f"postgresql://***@{server}/nope",
        f"host={host} port={port} user=detforge password=Hunter2Secret dbname=nope": (
            f"host={host} port={port} user=detforge password=*** dbname=nope"
        ),
    }
    for form, shown in forms.items():
        with pytest.raises(ConfigError) as info:
            tune(
                TuneConfig(
                    train=tiny[0],
                    validation=tiny[1],
                    out=str(tmp_path / "tune"),
                    trials=1,
                    hyperparameters=HP,
                    ranges=RESUME_RANGES,
                    storage=form,
                )
            )
        message = str(info.value)
        assert message.startswith(f"field '--storage': cannot open {shown}: "), message
        assert "Hunter2" not in message and "Secret" not in message and "\n" not in message.strip(), message
