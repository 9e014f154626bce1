"""Training: a tiny synthetic run writes the whole run folder; resume after SIGKILL gives the same weights;
freezing, incremental weights, the NaN guard, early stopping and the learning-rate schedule."""

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

import pytest
from conftest import make_tiny_set

torch = pytest.importorskip("torch")

from detforge.errors import ConfigError, ManifestError, ModelError  # noqa: E402
from detforge.training import checkpoint, engine  # noqa: E402
from detforge.training.dataset import ManifestDataset, load_split  # noqa: E402
from detforge.training.hyperparams import parse_hyperparameters  # noqa: E402
from detforge.training.train import TrainConfig, _early_stopping_update, lr_multiplier, train  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HP = {
    "num_classes": "2",
    "base_network": "mobilenet-v3",
    "use_pretrained_model": "0",
    "epochs": "3",
    "mini_batch_size": "4",
    "image_shape": "64",
    "workers": "0",
    "learning_rate": "0.01",
    "augmentation": "none",
    "deterministic": "1",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_set(root / "train", 8, 1), make_tiny_set(root / "val", 4, 2)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """An uninterrupted 3-epoch run (shared by the tests that read its folder)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "reference"
    result = train(
        TrainConfig(
            train=str(tiny[0]), validation=str(tiny[1]), out=str(out), hyperparameters=HP, progress=False
        )
    )
    return out, result


def test_run_folder_metrics_and_loss(reference_run):
    out, result = reference_run
    assert sorted(p.name for p in out.iterdir()) == [
        "best.json",
        "best.safetensors",
        "checkpoints",
        "classes.json",
        "hyperparams.json",
        "inputs.json",
        "metrics.csv",
        "metrics.jsonl",
        "metrics.png",
        "model.json",
        "model.safetensors",
        "train.log",
    ]
    assert os.listdir(out / "checkpoints") == ["last.pt"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and result.epochs == 3
    fields = {
        "epoch",
        "train_loss",
        "train_loss_bbox_regression",
        "train_loss_classification",
        "lr",
        "epoch_time_s",
        "images_per_s",
        "validation:mAP",
        "all_point_map",
        "coco_AP",
        "coco_AP50",
        "AP/red",
        "AP/blue",
        "validation_images",
        "validation_time_s",
        "train_time_s",
    }
    assert all(set(r) == fields for r in rows)
    assert all(r["validation_images"] == 4 and r["lr"] == 0.01 for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    with open(out / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert (
        len(table) == 3 and set(table[0]) == fields and float(table[2]["train_loss"]) == rows[2]["train_loss"]
    )
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "classes.json").read_text()) == ["red", "blue"]
    saved = json.loads((out / "hyperparams.json").read_text())
    assert saved["epochs"] == 3 and saved["base_network"] == "mobilenet-v3" and saved["seed"] == 0
    log = (out / "train.log").read_text()
    assert "8 training images, 2 classes, at most 1 boxes per image" in log
    assert f"epoch 3: validation:mAP={rows[2]['validation:mAP']:.3f}" in log
    maps = [r["validation:mAP"] for r in rows]
    assert result.best_map == max(maps) and result.best_epoch == maps.index(max(maps)) + 1
    assert json.loads((out / "best.json").read_text())["epoch"] == result.best_epoch
    model, info = checkpoint.load_run_model(out)
    assert info.classes == ["red", "blue"] and info.epoch == 3 and info.thresholds["overlap_threshold"] == 0.5


def test_the_run_folder_names_its_inputs_in_json(tiny, reference_run, tmp_path):
    import shutil

    out = reference_run[0]
    assert json.loads((out / "inputs.json").read_text()) == {
        "format_version": 1,
        "train": str(tiny[0]),
        "validation": str(tiny[1]),
        "label_attribute": None,
        "weights": None,
    }
    assert checkpoint.read_inputs(out) == checkpoint.RunInputs(train=str(tiny[0]), validation=str(tiny[1]))
    assert "data" not in checkpoint.load_state(out)  # the resume state holds training state only
    old = tmp_path / "old"  # a run folder from before inputs.json: its resume state names the manifests
    shutil.copytree(out, old)
    (old / "inputs.json").unlink()
    with pytest.raises(ModelError, match="the resume state does not name the training manifest"):
        checkpoint.read_inputs(old)
    state = checkpoint.load_state(old)
    checkpoint.save_state(old, state | {"data": {"train": str(tiny[0]), "validation": str(tiny[1])}})
    assert checkpoint.read_inputs(old) == checkpoint.RunInputs(train=str(tiny[0]), validation=str(tiny[1]))
    (old / "checkpoints" / "last.pt").unlink()
    with pytest.raises(ModelError, match="inputs.json is missing"):
        checkpoint.read_inputs(old)
    (old / "inputs.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON") as info:
        checkpoint.read_inputs(old)
    assert info.value.path == str(old / "inputs.json")


def _weights(path: Path) -> dict:
    return checkpoint.load_state_dict(str(path))


def test_resume_after_sigkill_gives_the_same_weights(tiny, reference_run, tmp_path):
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from detforge.training.train import TrainConfig, train
        train(TrainConfig(train={str(tiny[0])!r}, validation={str(tiny[1])!r}, out={str(out)!r},
                          hyperparameters={HP!r} | {{"mini_batch_size": "2"}}, progress=False))
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 600  # a hang guard (the first epoch took over 120 s at load average 25)
    while not (out / "checkpoints" / "last.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert checkpoint.load_state(out)["epoch"] == 1  # killed during epoch 2
    result = train(
        TrainConfig(train=str(tiny[0]), validation=str(tiny[1]), out=str(out), resume=True, progress=False)
    )
    assert result.epochs == 3 and [r["epoch"] for r in result.history] == [1, 2, 3]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    straight = tmp_path / "straight"
    uninterrupted_run = train(
        TrainConfig(
            train=str(tiny[0]),
            validation=str(tiny[1]),
            out=str(straight),
            hyperparameters=HP | {"mini_batch_size": "2"},
            progress=False,
        )
    )
    resumed, uninterrupted = _weights(out / "model.safetensors"), _weights(straight / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    def untimed(history):  # what a run computes, without the seconds it took
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in history]

    assert untimed(result.history) == untimed(uninterrupted_run.history)
    assert {"train_loss", "lr", "validation:mAP", "coco_AP"} <= set(untimed(result.history)[2])


def test_cli_resume_continues_for_more_epochs(tiny, reference_run, tmp_path):
    import shutil

    import typer
    from typer.testing import CliRunner

    from detforge.cli.train import register

    out = tmp_path / "more"
    shutil.copytree(reference_run[0], out)
    # as a run folder from before inputs.json: the resume state names the manifests
    (out / "inputs.json").unlink()
    state = checkpoint.load_state(out)
    inputs = {"train": str(tiny[0]), "validation": str(tiny[1])}
    checkpoint.save_state(out, state | {"data": inputs})
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand layout
    outcome = CliRunner().invoke(app, ["train", "--resume", str(out), "--set", "epochs=4", "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    assert "4 epochs -> " in outcome.output and "epoch 4: validation:mAP=" in outcome.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert checkpoint.read_inputs(out) == checkpoint.RunInputs(**inputs)  # written on resume
    assert json.loads((out / "hyperparams.json").read_text())["epochs"] == 4  # --set is kept


def test_freeze_and_incremental_weights(tiny, reference_run, tmp_path):
    start = _weights(reference_run[0] / "model.safetensors")
    out = tmp_path / "frozen"
    result = train(
        TrainConfig(
            train=str(tiny[0]),
            out=str(out),
            weights=str(reference_run[0]),
            progress=False,
            hyperparameters=HP | {"epochs": "1", "freeze_layer_pattern": r"^backbone\.features\."},
        )
    )
    after = _weights(out / "model.safetensors")
    frozen = [k for k in start if k.startswith("backbone.features.") and k.endswith(".weight")]
    assert frozen and all(torch.equal(start[k], after[k]) for k in frozen)
    assert not torch.equal(
        start["head.classification_head.module_list.0.1.weight"],
        after["head.classification_head.module_list.0.1.weight"],
    )
    assert result.best_map is None and "validation:mAP" not in result.last  # no validation manifest
    assert "started from" in (out / "train.log").read_text()
    with pytest.raises(ConfigError, match="matches no parameter"):
        train(
            TrainConfig(
                train=str(tiny[0]),
                out=str(tmp_path / "x"),
                progress=False,
                hyperparameters=HP | {"freeze_layer_pattern": "^nothing"},
            )
        )


def test_incremental_weights_with_another_class_count(reference_run):
    from detforge.models import build_model
    from detforge.training.train import load_initial_weights

    model = build_model("mobilenet-v3", num_classes=3, image_size=64)
    note = load_initial_weights(model, str(reference_run[0]), base_network="mobilenet-v3", num_classes=3)
    assert note.endswith("initialised afresh (classes 2 -> 3)")
    start = _weights(reference_run[0] / "model.safetensors")
    assert torch.equal(
        model.state_dict()["backbone.features.0.0.0.weight"], start["backbone.features.0.0.0.weight"]
    )

    with pytest.raises(ModelError, match="is a mobilenet-v3 model but base_network is resnet-50"):
        load_initial_weights(model, str(reference_run[0]), base_network="resnet-50", num_classes=3)


def test_data_checks(tiny, tmp_path):
    with pytest.raises(ConfigError) as info:
        train(
            TrainConfig(
                train=str(tiny[0]),
                out=str(tmp_path / "r"),
                hyperparameters=HP | {"num_classes": "3"},
                progress=False,
            )
        )
    assert info.value.field == "num_classes" and "class map has 2 classes" in str(info.value)
    with pytest.raises(ConfigError) as info:
        train(
            TrainConfig(
                train=str(tiny[0]),
                out=str(tmp_path / "r"),
                hyperparameters=HP | {"mini_batch_size": "3"},
                progress=False,
                overrides={"label_width": "0"},
            )
        )
    assert info.value.field == "label_width"
    with pytest.raises(ManifestError, match="class 'blue' is not in the class list"):
        load_split(tiny[0], classes=["red"])


def test_on_epoch_end_stops_the_run(tiny, tmp_path):
    seen = []
    result = train(
        TrainConfig(
            train=str(tiny[0]),
            validation=str(tiny[1]),
            out=str(tmp_path / "pruned"),
            hyperparameters=HP,
            progress=False,
            on_epoch_end=lambda epoch, row: seen.append((epoch, row["validation:mAP"])) or True,
        )
    )
    assert result.epochs == 1 and result.stopped_early and result.stop_reason == "stopped by on_epoch_end"
    assert seen == [(1, result.history[0]["validation:mAP"])]


def test_nan_loss_stops_with_a_clear_message(tiny):
    from detforge.models import build_model
    from detforge.training.dataset import collate

    model = build_model("mobilenet-v3", num_classes=2, image_size=64)
    with torch.no_grad():
        model.head.regression_head.module_list[0][1].weight.fill_(float("nan"))
    samples, _ = load_split(tiny[0])
    loader = torch.utils.data.DataLoader(
        ManifestDataset(samples, image_size=64), batch_size=4, collate_fn=collate
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(ConfigError) as info:
        engine.train_one_epoch(model, loader, optimizer, scheduler, device=torch.device("cpu"), epoch=2)
    assert "the training loss became nan at epoch 2, step 1" in str(info.value)
    assert info.value.field == "learning_rate" and "lower learning_rate" in info.value.hint


def test_learning_rate_schedule_and_early_stopping_rule():
    hp = parse_hyperparameters(
        {"num_classes": 1, "lr_scheduler_step": "2,3", "lr_scheduler_factor": "0.5", "warmup_epochs": "1"}
    )
    factors = [lr_multiplier(step, steps_per_epoch=4, hp=hp) for step in range(14)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    hp = parse_hyperparameters({"num_classes": 1, "early_stopping_tolerance": "0.1"})
    state = {"best": None, "bad_epochs": 0}
    trail = []
    for score in (0.5, 0.54, 0.545, 0.7, 0.0):  # +8%, +9%: within the 10% tolerance
        state = _early_stopping_update(state, score, hp)
        trail.append((state["best"], state["bad_epochs"]))
    assert trail == [(0.5, 0), (0.5, 1), (0.5, 2), (0.7, 0), (0.7, 1)]


def test_remote_images_are_cached_on_first_read(s3_server, make_bucket, tiny, tmp_path):
    import fsspec

    bucket = make_bucket()
    fs = fsspec.filesystem("s3")
    for path in tiny[0].parent.iterdir():
        fs.put_file(str(path), f"{bucket}/data/{path.name}")
    samples, names = load_split(f"s3://{bucket}/data/data.manifest")
    assert names == ["red", "blue"] and samples[0].image == f"s3://{bucket}/data/img_1_000.png"
    dataset = ManifestDataset(samples, image_size=32, cache_dir=str(tmp_path / "cache"))
    image, target, index = dataset[0]
    assert image.shape == (3, 32, 32) and index == 0 and target["labels"].tolist() == [1]
    from detforge import storage

    cached = Path(storage.cache_path(f"s3://{bucket}/data/img_1_000.png", str(tmp_path / "cache")))
    assert cached.exists() and cached.is_relative_to(tmp_path / "cache") and cached.name == "img_1_000.png"
    fs.rm(f"{bucket}/data/img_1_000.png")
    assert torch.equal(dataset[0][0], image)  # served from the local cache now


def test_augmented_items_depend_only_on_seed_epoch_and_index(tiny):
    samples, _ = load_split(tiny[0])
    dataset = ManifestDataset(samples, image_size=48, preset="ssd+rot", train=True, seed=3)
    dataset.set_epoch(1)
    first = [dataset[i] for i in range(4)]
    torch.rand(5)  # the global generator does not matter
    again = [dataset[i] for i in range(4)]
    for (image_a, target_a, _), (image_b, target_b, _) in zip(first, again, strict=True):
        assert image_a.shape == (3, 48, 48) and torch.equal(image_a, image_b)
        assert torch.equal(target_a["boxes"], target_b["boxes"])
        assert torch.equal(target_a["labels"], target_b["labels"])
        assert set(target_a["labels"].tolist()) <= {1, 2}
    dataset.set_epoch(2)
    assert not all(torch.equal(dataset[i][0], first[i][0]) for i in range(4))


def test_early_stopping_stops_a_run(tiny, tmp_path):
    hp = HP | {
        "epochs": "4",
        "early_stopping": "True",
        "early_stopping_min_epochs": "2",
        "early_stopping_patience": "1",
        "early_stopping_tolerance": "0.99",
    }
    result = train(
        TrainConfig(
            train=str(tiny[0]),
            validation=str(tiny[1]),
            out=str(tmp_path / "early"),
            hyperparameters=hp,
            progress=False,
        )
    )
    maps = [row["validation:mAP"] for row in result.history]
    assert len(maps) == 2 and maps[0] > 0 and maps[1] < maps[0] * 1.99  # epoch 2 is no 99% improvement
    assert result.stopped_early and result.epochs == 2
    assert result.stop_reason == "validation:mAP did not improve by more than 0.99 (relative) for 1 epochs"
    assert "early stop after epoch" in (tmp_path / "early" / "train.log").read_text()


@pytest.mark.parametrize(
    "extra,option,why",
    [
        (["--hyperparameters", "hp.json"], "--hyperparameters", "the run's hyperparams.json is used"),
        (["--weights", "other"], "--weights", "the weights come from the run's checkpoint"),
        (["--classes", "classes.json"], "--classes", "the run's classes.json is used"),
        (["--out", "elsewhere"], "--out", "the run continues in"),
        (["--train", "other.manifest"], "--train", "the run was started on"),
    ],
)
def test_resume_refuses_conflicting_options(reference_run, tmp_path, extra, option, why):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out)
    before = sorted(p.name for p in out.iterdir())
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "detforge", "train", "--resume", str(out), *extra, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: field '{option}': cannot be combined with --resume: {why}")
    assert sorted(p.name for p in out.iterdir()) == before
    with pytest.raises(ConfigError, match="cannot be combined with --resume") as info:
        train(TrainConfig(train="x", out=str(out), resume=True, weights="other", progress=False))
    assert info.value.field == "--weights"
