"""The small-data recipe: EMA of weights, the cosine schedule, multi-scale batches, mosaic, the time budget,
and a tiny detector=gfl run that validates and saves the averaged weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_set

torch = pytest.importorskip("torch")

from detforge.errors import ConfigError  # noqa: E402
from detforge.training import checkpoint, recipe  # noqa: E402
from detforge.training.dataset import ManifestDataset, load_split  # noqa: E402
from detforge.training.hyperparams import (  # noqa: E402
    load_hyperparameters,
    parse_hyperparameters,
    read_hyperparameters_file,
)
from detforge.training.mosaic import mosaic  # noqa: E402
from detforge.training.train import TrainConfig, lr_multiplier, train  # noqa: E402

HP = {
    "num_classes": "2",
    "detector": "gfl",
    "base_network": "mobilenet-v3",
    "use_pretrained_model": "0",
    "epochs": "3",
    "mini_batch_size": "4",
    "image_shape": "64",
    "workers": "0",
    "learning_rate": "0.002",
    "optimizer": "adamw",
    "augmentation": "flip",
    "deterministic": "1",
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return make_tiny_set(root / "train", 8, 1), make_tiny_set(root / "val", 4, 2)


def test_ema_follows_the_ramped_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = recipe.ModelEMA(model, 0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay min(0.5, 1/10) = 0.1
    assert float(ema.module.weight) == pytest.approx(0.9)
    ema.update(model)  # decay min(0.5, 2/11)
    assert float(ema.module.weight) == pytest.approx(1 - 0.1 * 2 / 11)
    for _ in range(20):
        ema.update(model)
    assert ema.current_decay() == 0.5 and ema.updates == 22 and not ema.module.weight.requires_grad


def test_cosine_schedule_with_warmup_and_the_budget_plan():
    hp = parse_hyperparameters(
        {"num_classes": 1, "lr_schedule": "cosine", "lr_min_factor": "0.1", "warmup_epochs": "1"}
    )
    factors = [lr_multiplier(step, steps_per_epoch=2, hp=hp, epochs=2) for step in range(5)]
    assert factors == pytest.approx(
        [
            0.5,
            0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4)),
            0.55,
            0.1 + 0.9 * 0.5 * (1 + np.cos(3 * np.pi / 4)),
            0.1,
        ]
    )
    assert recipe.plan_epochs(epochs=30, done=2, seconds_so_far=120, budget_minutes=10) == 10
    assert recipe.plan_epochs(epochs=30, done=1, seconds_so_far=330, budget_minutes=10) == 2  # 1.8 -> 2
    assert recipe.plan_epochs(epochs=30, done=1, seconds_so_far=450, budget_minutes=10) == 1  # 1.33 -> 1
    assert recipe.plan_epochs(epochs=8, done=2, seconds_so_far=120, budget_minutes=10) == 8
    assert recipe.plan_epochs(epochs=30, done=3, seconds_so_far=600, budget_minutes=1) == 3
    assert recipe.plan_epochs(epochs=30, done=3, seconds_so_far=600, budget_minutes=0) == 30


def test_multiscale_batches_are_multiples_of_32_and_scale_the_boxes():
    sizes = {recipe.multiscale_size(320, 0.5, seed=0, epoch=1, step=s) for s in range(200)}
    assert sizes == set(range(160, 481, 32))
    assert recipe.multiscale_size(64, 0.5, seed=0, epoch=1, step=0) in (32, 64, 96)
    batch = [
        (
            [torch.zeros(3, 64, 64)] * 2,
            [{"boxes": torch.tensor([[8.0, 16.0, 32.0, 48.0]]), "labels": torch.tensor([1])}] * 2,
            [0, 1],
        )
    ]
    loader = recipe.MultiScaleLoader(batch, image_size=64, multiscale=0.5, seed=0)
    images, targets, _ = next(iter(loader))
    size = recipe.multiscale_size(64, 0.5, seed=0, epoch=0, step=0)
    assert images[0].shape == (3, size, size) and len(loader) == 1
    assert torch.allclose(targets[1]["boxes"], torch.tensor([[8.0, 16.0, 32.0, 48.0]]) * size / 64)


def test_mosaic_moves_boxes_exactly():
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    image[10:30, 20:60] = 255
    piece = (image, np.array([[20.0, 10.0, 60.0, 30.0]]), np.array([1]))
    out, boxes, labels = mosaic([piece] * 4, size=80, rng=np.random.default_rng(0), scale_jitter=0.0)
    assert out.shape == (80, 80, 3) and out.dtype == np.uint8
    assert len(boxes) == len(labels) and set(labels.tolist()) == {1}
    for x1, y1, x2, y2 in boxes.round().astype(int):  # each kept box covers white pixels only
        assert x2 - x1 >= 2 and y2 - y1 >= 2
        assert out[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].min() >= 250
    again = mosaic([piece] * 4, size=80, rng=np.random.default_rng(0), scale_jitter=0.0)
    assert np.array_equal(again[0], out) and np.array_equal(again[1], boxes)
    with pytest.raises(ValueError, match="mosaic needs 4 images"):
        mosaic([piece], size=80, rng=np.random.default_rng(0))


def test_mosaic_items_and_the_image_cache(tiny):
    samples, _ = load_split(tiny[0])
    data = ManifestDataset(samples, image_size=32, preset="flip", train=True, mosaic=1.0, cache_images=True)
    data.fill_cache()
    assert len(data._decoded) == 8 and data._decoded[0][0].shape[0] <= 48  # 1.5 x 32 long side at most
    data.set_epoch(1)
    image, target, _ = data[0]
    assert image.shape == (3, 32, 32) and torch.equal(data[0][0], image)
    assert set(target["labels"].tolist()) <= {1, 2}


def test_bad_recipe_combinations():
    with pytest.raises(ConfigError) as info:
        parse_hyperparameters({"num_classes": 1, "multiscale": "0.25"})
    assert info.value.field == "multiscale" and "detector=gfl" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_hyperparameters({"num_classes": 1, "detector": "gfl"})  # base_network defaults to vgg-16
    assert info.value.field == "base_network"
    with pytest.raises(ConfigError) as info:
        parse_hyperparameters({"num_classes": 1, "mosaic": "1.5"})
    assert info.value.field == "mosaic"


def test_a_gfl_run_with_the_recipe_saves_the_averaged_weights(tiny, tmp_path):
    hp = HP | {
        "mosaic": "0.5",
        "mosaic_off_epochs": "1",
        "ema_decay": "0.9",
        "lr_schedule": "cosine",
        "warmup_epochs": "1",
        "multiscale": "0.5",
        "cache_images": "1",
        "validation_interval": "2",
    }
    out = tmp_path / "gfl"
    result = train(
        TrainConfig(
            train=str(tiny[0]), validation=str(tiny[1]), out=str(out), hyperparameters=hp, progress=False
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert ["validation:mAP" in r for r in rows] == [False, True, True]  # every 2nd epoch and the last
    assert {"train_loss_quality_focal", "train_loss_giou", "train_loss_distribution_focal"} <= set(rows[0])
    assert rows[-1]["lr"] == pytest.approx(0.002 * 0.01)  # the cosine ends at lr_min_factor
    model, info = checkpoint.load_run_model(out)
    assert info.detector == "gfl" and info.base_network == "mobilenet-v3"
    averaged = result.model.state_dict()
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())
    state = checkpoint.load_state(out)
    assert state["ema"]["updates"] == 3 * 2 and state["plan"]["epochs"] == 3
    assert not torch.equal(state["model"]["head.cls_out.0.weight"], averaged["head.cls_out.0.weight"])
    from detforge.errors import ModelError
    from detforge.models import build_model
    from detforge.training.train import load_initial_weights

    ssd = build_model("mobilenet-v3", num_classes=2, image_size=64)
    with pytest.raises(ModelError, match="is a detector=gfl model but detector is ssd"):
        load_initial_weights(ssd, str(out), base_network="mobilenet-v3", num_classes=2)
    note = load_initial_weights(model, str(out), base_network="mobilenet-v3", num_classes=2, detector="gfl")
    assert note.endswith(f"{len(model.state_dict())} tensors loaded")


def test_the_time_budget_stops_cleanly(tiny, tmp_path):
    hp = HP | {"epochs": "50", "max_train_minutes": "0.0001"}
    out = tmp_path / "budget"
    result = train(
        TrainConfig(
            train=str(tiny[0]), validation=str(tiny[1]), out=str(out), hyperparameters=hp, progress=False
        )
    )
    assert result.epochs == 1 and result.stopped_early
    assert result.stop_reason == "the time budget (max_train_minutes=0.0001) is spent"
    assert result.history[0]["planned_epochs"] == 1 and "validation:mAP" in result.history[0]
    assert (out / "model.safetensors").exists() and checkpoint.load_state(out)["epoch"] == 1


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = {  # file -> (detector, base_network, image_shape, epochs, optimizer)
    "cpu-small-data.json": ("gfl", "shufflenet-v2", 320, 300, "adamw"),
    "gpu.json": ("gfl", "mobilenet-v3", 416, 300, "adamw"),
    "demo-cpu.json": ("ssd", "mobilenet-v3", 128, 7, "adam"),
    "demo-gpu.json": ("ssd", "mobilenet-v3", 320, 30, "adam"),
    "demo-tiny.json": ("ssd", "mobilenet-v3", 64, 1, "adam"),
}


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.json")), ids=lambda path: path.name)
def test_every_recipe_file_parses(path):
    raw = read_hyperparameters_file(path)
    assert "num_classes" not in raw  # the data decides it
    hp = parse_hyperparameters(raw | {"num_classes": "7"}, source=str(path))
    assert hp.num_classes == 7 and parse_hyperparameters(hp.to_json()) == hp
    given = parse_hyperparameters({"num_classes": "7", **{k: v for k, v in raw.items() if k != "seed"}})
    assert given.seed == 0 and hp.seed == int(raw.get("seed", 0))  # the file's values, not defaults
    if path.name in SHIPPED:
        assert (hp.detector, hp.base_network, hp.image_shape, hp.epochs, hp.optimizer) == SHIPPED[path.name]


def test_the_shipped_recipes():
    assert set(SHIPPED) <= {path.name for path in RECIPES.glob("*.json")}
    for name in ("cpu-small-data.json", "gpu.json"):
        hp = load_hyperparameters(RECIPES / name, overrides={"num_classes": "7"})
        assert hp.lr_schedule == "cosine" and hp.ema_decay > 0 and hp.mosaic > 0
    from detforge.demo import DEMO_PROFILES, demo_hyperparameters

    assert {profile["recipe"] for profile in DEMO_PROFILES.values()} == {
        "demo-cpu.json",
        "demo-gpu.json",
        "demo-tiny.json",
    }
    cpu = load_hyperparameters(RECIPES / "demo-cpu.json", overrides={"num_classes": "2"})
    assert cpu.lr_scheduler_step == (5, 6) and cpu.learning_rate == 0.003 and cpu.mini_batch_size == 16
    assert cpu.augmentation == "none" and cpu.seed == 1 and cpu.warmup_epochs == 1
    assert demo_hyperparameters(DEMO_PROFILES["tiny"]) == json.loads((RECIPES / "demo-tiny.json").read_text())
