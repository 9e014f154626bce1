"""The main job, as a user runs it: ``detforge demo --tiny`` end to end, then a re-run that reuses every
step, then ``--from export``; every artifact exists and is valid (no accuracy target in the tiny variant)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_binary

pytest.importorskip("torch")

from detforge.data.groundtruth import read_manifest  # noqa: E402
from detforge.runtime import Predictor  # noqa: E402


def run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "detforge", "demo", "--tiny", "--out", str(out), "--no-progress", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    done = run_demo(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_every_step_runs_and_says_so(demo):
    out, stdout = demo
    for i, step in enumerate(
        ("synth", "prepare", "augment", "train", "evaluate", "export", "predict", "summary"), start=1
    ):
        assert f"{i}/8 {step}" in stdout
    assert "validation:mAP" in stdout and "summary.json" in stdout


def test_the_artifacts_are_valid(demo):
    out, _ = demo
    train = list(read_manifest(str(out / "prepared" / "train.manifest")))
    validation = list(read_manifest(str(out / "prepared" / "validation.manifest")))
    augmented = list(read_manifest(str(out / "augmented" / "augmented.manifest")))
    assert train and validation and len(augmented) == 2 * len(train)
    assert not {r.source_ref for r in train} & {r.source_ref for r in validation}
    assert json.loads((out / "prepared" / "classes.json").read_text()) == ["blue box", "yellow box"]
    with open(out / "runs" / "demo" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["validation:mAP"]) <= 1.0
    assert (out / "runs" / "demo" / "metrics.png").stat().st_size > 1000
    predictor = Predictor(str(out / "deploy"))
    assert predictor.class_names == ["blue box", "yellow box"]
    lines = (out / "predictions" / "heldout.jsonl").read_text().splitlines()
    assert lines and all("prediction" in json.loads(line) for line in lines)
    pdf = out / "report.pdf"
    info = subprocess.run([need_binary("pdfinfo"), str(pdf)], capture_output=True, text=True, check=True)
    assert int(next(line.split()[-1] for line in info.stdout.splitlines() if line.startswith("Pages:"))) >= 2
    assert "<html" in (out / "report.html").read_text()[:500].lower()
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "validation:mAP",
        "onnx_validation:mAP",
        "seconds",
        "step_seconds",
        "latency_ms",
        "artifacts",
    ):
        assert key in summary
    assert set(summary["step_seconds"]) >= {
        "synth",
        "prepare",
        "augment",
        "train",
        "evaluate",
        "export",
        "predict",
    }
    # the deployed model scores the validation split as the PyTorch run does
    assert summary["onnx_validation:mAP"] == pytest.approx(summary["validation:mAP"], abs=0.02)


def test_a_second_run_reuses_and_from_reruns(demo):
    out, _ = demo
    again = run_demo(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reused (already done): synth, prepare, augment, train, evaluate, export, predict" in again.stdout
    assert "1/8 synth" not in again.stdout
    before = (out / "deploy" / "model.json").stat().st_mtime_ns
    partial = run_demo(out, "--from", "export")
    assert partial.returncode == 0, partial.stderr[-2000:]
    assert "6/8 export" in partial.stdout and "4/8 train" not in partial.stdout
    assert (out / "deploy" / "model.json").stat().st_mtime_ns > before


def test_an_unknown_step_is_a_clear_error(tmp_path):
    done = run_demo(tmp_path / "d", "--from", "deploy")
    assert done.returncode == 2 and "unknown step 'deploy'" in done.stderr and "Traceback" not in done.stderr
