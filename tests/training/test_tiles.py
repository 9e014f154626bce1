"""Tests for ``detforge.training.tiles``: training crops at the photo's resolution, boxes cut by the crop's
edge kept or dropped (and greyed), the window choice, and the dataset's hook (mosaic, the image cache)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from detforge.training.tiles import FILL, TileCrops, crop, crop_at, visible_fraction


def test_visible_fraction():
    boxes = [[0, 0, 10, 10], [90, 0, 110, 10], [200, 0, 210, 10], [5, 5, 5, 5]]
    assert visible_fraction(boxes, (0, 0, 100, 100)).tolist() == [1.0, 0.5, 0.0, 0.0]


def test_a_box_cut_by_the_crop_edge_is_kept_or_dropped_and_greyed():
    image = np.full((100, 200, 3), 50, np.uint8)
    boxes = [
        [10, 10, 30, 30],  # inside
        [90, 40, 110, 60],  # 50% inside the window [0, 100): dropped, its visible part greyed
        [80, 70, 105, 80],  # 80% inside: kept, clipped to 100
        [150, 10, 170, 30],
    ]  # outside
    pixels, kept, labels = crop_at(image, boxes, [0, 1, 2, 3], (0, 0, 100, 100), min_visible=0.6)
    assert pixels.shape == (100, 100, 3)
    assert kept.tolist() == [[10, 10, 30, 30], [80, 70, 100, 80]] and labels.tolist() == [0, 2]
    assert (pixels[40:60, 90:100] == FILL).all()  # the dropped fragment
    assert (pixels[:40] == 50).all() and (pixels[60:] == 50).all() and (pixels[40:60, :90] == 50).all()


def test_greying_spares_the_kept_boxes():
    image = np.full((60, 60, 3), 50, np.uint8)
    # the dropped box overlaps a kept one: the kept one's pixels stay
    pixels, kept, _ = crop_at(image, [[20, 20, 40, 40], [30, 30, 100, 50]], [0, 1], (0, 0, 60, 60))
    assert kept.tolist() == [[20, 20, 40, 40]]
    assert (pixels[20:40, 20:40] == 50).all() and (pixels[40:50, 30:60] == FILL).all()
    assert (pixels[30:40, 40:60] == FILL).all()


def test_crop_takes_the_window_cutting_fewest_boxes():
    image = np.zeros((100, 300, 3), np.uint8)
    boxes = [[95, 10, 115, 30], [195, 10, 215, 30]]
    seed = 3
    xs = np.random.default_rng(seed).integers(0, 201, 4).tolist()
    cuts = [sum(0 < v < 0.6 for v in visible_fraction(boxes, (x, 0, x + 100, 100))) for x in xs]
    best = xs[int(np.argmin(cuts))]  # the first of the fewest
    pixels, kept, _ = crop(image, boxes, [0, 1], side=100, rng=np.random.default_rng(seed))
    expected = crop_at(image, boxes, [0, 1], (best, 0, best + 100, 100))
    assert pixels.shape == (100, 100, 3) and kept.tolist() == expected[1].tolist()
    assert (pixels == expected[0]).all()


def test_a_photo_smaller_than_the_tile_is_taken_whole():
    image = np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3)
    pixels, kept, labels = crop(image, [[1, 2, 10, 12]], [1], side=64, rng=np.random.default_rng(0))
    assert (pixels == image).all() and kept.tolist() == [[1, 2, 10, 12]] and labels.tolist() == [1]


def test_sample_scales_the_tile_to_a_cached_image_and_keeps_some_whole():
    image = np.zeros((50, 100, 3), np.uint8)  # a 200 x 100 photo cached at half size
    tiles = TileCrops(64, probability=1.0)
    pixels, _, _ = tiles.sample(image, np.zeros((0, 4)), [], scale=0.5, rng=np.random.default_rng(0))
    assert pixels.shape == (32, 32, 3)
    whole = TileCrops(64, probability=0.0)
    pixels, _, _ = whole.sample(image, np.zeros((0, 4)), [], scale=0.5, rng=np.random.default_rng(0))
    assert pixels.shape == (50, 100, 3)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tile_size", 16, "must be 0 (off) or at least 32"),
        ("tile_min_visible", 0.0, "must be > 0"),
        ("tile_probability", 1.5, "must be <= 1"),
    ],
)
def test_hyperparameters_are_checked(key, value, message):
    from detforge.errors import ConfigError
    from detforge.training.hyperparams import parse_hyperparameters

    with pytest.raises(ConfigError, match=re.escape(f"field '{key}': {message}")):
        parse_hyperparameters({"num_classes": 2, key: value})
    hp = parse_hyperparameters({"num_classes": 2, "tile_size": "640"})
    assert TileCrops.from_hyperparameters(hp) == TileCrops(640, 0.6, 1.0)
    assert TileCrops.from_hyperparameters(parse_hyperparameters({"num_classes": 2})) is None


def test_dataset_items_are_tiles_with_mosaic_and_the_cache(tmp_path):
    pytest.importorskip("torch")
    from PIL import Image

    from detforge.data.groundtruth import make_record, write_manifest
    from detforge.training.dataset import ManifestDataset, load_split

    pixels = np.full((120, 240, 3), 100, np.uint8)
    pixels[10:20, 10:20] = (220, 30, 30)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    write_manifest(
        tmp_path / "m.manifest",
        [
            make_record(
                "big.png",
                width=240,
                height=120,
                boxes_xyxy=[[10, 10, 20, 20]],
                class_ids=[0],
                class_map={0: "red"},
                creation_date="2024-01-01T00:00:00",
            )
        ],
    )
    samples, _ = load_split(str(tmp_path / "m.manifest"))
    for mosaic, cache in ((0.0, False), (0.0, True), (1.0, True)):
        data = ManifestDataset(
            samples,
            image_size=32,
            preset="none",
            train=True,
            mosaic=mosaic,
            cache_images=cache,
            tiles=TileCrops(60),
        )
        data.fill_cache()
        if cache:  # kept at the resolution the 60 px tiles need (1.5 x 32 / 60 of the photo), not 48 px
            assert data.decoded(0)[0].shape == (96, 192, 3)
        for epoch in range(6):
            data.set_epoch(epoch)
            image, target, _ = data[0]
            assert tuple(image.shape) == (3, 32, 32)
            low, high = (2.0, 8.0) if mosaic else (3.0, 6.0)  # a 10 px box of a 60 px tile is ~5 px at 32
            for box in target["boxes"].tolist():
                assert low <= box[2] - box[0] <= high, (mosaic, cache, box)


def test_tiled_training_then_export_and_predict_through_the_cli(tmp_path):
    """A tiny model trained on 64 px tiles of 128 px photos (mosaic, the image cache): its deploy folder
    carries the tiling, and `detforge predict` runs it tiled by default."""
    pytest.importorskip("torch")
    import json
    import subprocess
    import sys

    from conftest import make_tiny_set

    from detforge.runtime import Predictor
    from detforge.tiling import Tiling

    train = make_tiny_set(tmp_path / "train", 8, 1, size=128)
    validation = make_tiny_set(tmp_path / "val", 2, 2, size=128)
    hp = {
        "num_classes": "2",
        "base_network": "mobilenet-v3",
        "use_pretrained_model": "0",
        "epochs": "2",
        "mini_batch_size": "4",
        "image_shape": "64",
        "workers": "0",
        "learning_rate": "0.002",
        "optimizer": "adam",
        "augmentation": "flip",
        "deterministic": "1",
        "mosaic": "0.5",
        "cache_images": "True",
        "tile_size": "64",
        "tile_min_visible": "0.6",
        "tile_probability": "0.75",
    }
    (tmp_path / "hp.json").write_text(json.dumps(hp))

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "detforge", *args], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli(
        "train",
        "--train",
        str(train),
        "--validation",
        str(validation),
        "--hyperparameters",
        str(tmp_path / "hp.json"),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    )
    saved = json.loads((tmp_path / "run" / "hyperparams.json").read_text())
    assert (saved["tile_size"], saved["tile_min_visible"], saved["tile_probability"]) == (64, 0.6, 0.75)
    cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "deploy"))
    metadata = json.loads((tmp_path / "deploy" / "model.json").read_text())
    assert metadata["tiling"] == {"tile": 64, "overlap": 0.2, "full_pass": True}
    assert metadata["verification"]["verified"] is True  # the graph is the plain one: tiling is the runtime's
    cli("predict", str(tmp_path / "deploy"), str(validation), "--out", str(tmp_path / "p.jsonl"))
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    predictor = Predictor(tmp_path / "deploy", threads=1)
    assert predictor.tiling == Tiling(64, 0.2, True)
    for line in lines:
        photo = str(tmp_path / "val" / line["image"].split("/")[-1])
        assert line["prediction"] == json.loads(json.dumps(predictor.predict([photo])[0].to_sagemaker()))
    assert len(lines) == 2
