"""Hyperparameters: SageMaker defaults, string parsing, ranges, unknown keys, checks against the data."""

from __future__ import annotations

import json

import pytest

from detforge.errors import ConfigError
from detforge.training.hyperparams import (
    EXTENSION_KEYS,
    SAGEMAKER_KEYS,
    Hyperparameters,
    check_against_data,
    label_values,
    load_hyperparameters,
    parse_hyperparameters,
    parse_overrides,
)


def test_sagemaker_defaults():
    hp = parse_hyperparameters({"num_classes": "3"})
    assert hp.num_classes == 3
    assert (hp.base_network, hp.use_pretrained_model, hp.epochs, hp.mini_batch_size) == ("vgg-16", 1, 30, 32)
    assert (hp.learning_rate, hp.lr_scheduler_step, hp.lr_scheduler_factor) == (0.001, (), 0.1)
    assert (hp.optimizer, hp.momentum, hp.weight_decay) == ("sgd", 0.9, 0.0005)
    assert (hp.image_shape, hp.label_width, hp.freeze_layer_pattern) == (300, 350, "")
    assert (hp.nms_threshold, hp.nms_topk, hp.overlap_threshold) == (0.45, 400, 0.5)
    assert (
        hp.early_stopping,
        hp.early_stopping_min_epochs,
        hp.early_stopping_patience,
        hp.early_stopping_tolerance,
    ) == (False, 10, 5, 0.0)
    assert hp.num_training_samples is None
    assert len(SAGEMAKER_KEYS) == 22 and SAGEMAKER_KEYS[-1] == "early_stopping_tolerance"
    assert EXTENSION_KEYS[0] == "augmentation" and "workers" in EXTENSION_KEYS and "seed" in EXTENSION_KEYS


def test_real_sagemaker_file_is_accepted_with_notes(shared_data):
    hp = load_hyperparameters(shared_data / "sagemaker" / "hyperparams.json")
    assert (hp.num_classes, hp.num_training_samples) == (4, 1408)
    assert (hp.base_network, hp.image_shape) == ("resnet-50", 512)
    assert (hp.epochs, hp.mini_batch_size, hp.lr_scheduler_step, hp.label_width) == (50, 16, (10,), 150)
    assert hp.early_stopping is False and hp.use_pretrained_model == 1
    ignored = sorted(note.split(" ")[-1].split("=")[0] for note in hp.notes)
    assert ignored == ["_kvstore", "_num_kv_servers", "_tuning_objective_metric", "kv_store"]


@pytest.mark.parametrize(
    ("raw", "field", "expected"),
    [
        ({"early_stopping": "True"}, "early_stopping", True),
        ({"early_stopping": "false"}, "early_stopping", False),
        ({"early_stopping": 1}, "early_stopping", True),
        ({"use_pretrained_model": "0"}, "use_pretrained_model", 0),
        ({"use_pretrained_model": True}, "use_pretrained_model", 1),
        ({"lr_scheduler_step": "10,20"}, "lr_scheduler_step", (10, 20)),
        ({"lr_scheduler_step": " 5, 7 "}, "lr_scheduler_step", (5, 7)),
        ({"lr_scheduler_step": ""}, "lr_scheduler_step", ()),
        ({"epochs": "12"}, "epochs", 12),
        ({"epochs": 12.0}, "epochs", 12),
        ({"learning_rate": "1e-4"}, "learning_rate", 0.0001),
        ({"optimizer": "ADAM"}, "optimizer", "adam"),
        ({"base_network": "mobilenet-v3"}, "base_network", "mobilenet-v3"),
        ({"device": "cuda:1"}, "device", "cuda:1"),
        ({"augmentation": "ssd+rot"}, "augmentation", "ssd+rot"),
    ],
)
def test_string_parsing(raw, field, expected):
    assert getattr(parse_hyperparameters({"num_classes": 2, **raw}), field) == expected


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", "0", "must be >= 1, got '0'"),
        ("epochs", "ten", "expected a whole number, got 'ten'"),
        ("epochs", "2.5", "expected a whole number, got 2.5"),
        ("mini_batch_size", "-1", "must be >= 1"),
        ("learning_rate", "0", "must be > 0, got '0'"),
        ("learning_rate", "1.5", "must be <= 1"),
        ("learning_rate", "nan", "expected a number"),
        ("momentum", "1", "must be < 1"),
        ("weight_decay", "-0.1", "must be >= 0"),
        ("lr_scheduler_step", "20,10", "expected increasing epoch numbers >= 1 like '10,20', got '20,10'"),
        ("lr_scheduler_step", "a,b", "expected a whole number"),
        ("lr_scheduler_factor", "0", "must be > 0"),
        ("optimizer", "lamb", "expected one of sgd, adam, rmsprop, adadelta, adamw, got 'lamb'"),
        ("base_network", "resnet-101", "expected one of vgg-16, resnet-50, mobilenet-v3, shufflenet-v2"),
        ("use_pretrained_model", "2", "expected 0 or 1, got '2'"),
        ("early_stopping", "maybe", "expected True or False, got 'maybe'"),
        ("image_shape", "16", "must be >= 32"),
        ("nms_threshold", "0", "must be > 0"),
        ("nms_topk", "0", "must be >= 1"),
        ("overlap_threshold", "1.2", "must be <= 1"),
        ("early_stopping_tolerance", "1", "must be < 1"),
        ("freeze_layer_pattern", "backbone.(", "not a valid regular expression"),
        ("label_width", "0", "must be >= 1"),
        ("device", "tpu", "expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        ("augmentation", "heavy", "expected one of none, flip, ssd, ssd+rot"),
        ("workers", "-2", "must be >= 0"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as info:
        parse_hyperparameters({"num_classes": "2", key: value})
    assert info.value.field == key
    assert message in str(info.value)
    assert str(info.value).startswith(f"field '{key}': ")


def test_a_detector_without_that_backbone_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text('{"num_classes": "2", "base_network": "shufflenet-v2"}')  # detector defaults to ssd
    with pytest.raises(ConfigError) as info:
        load_hyperparameters(path)
    assert info.value.field == "base_network" and str(path) in str(info.value)
    assert "detector=ssd has no shufflenet-v2 backbone; choose one of vgg-16, resnet-50, mobilenet-v3" in str(
        info.value
    )
    hp = parse_hyperparameters({"num_classes": "2", "detector": "gfl", "base_network": "shufflenet-v2"})
    assert (hp.detector, hp.base_network) == ("gfl", "shufflenet-v2")


def test_unknown_and_missing_keys(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_hyperparameters({"num_classes": 2, "learningrate": "0.1"})
    assert info.value.field == "learningrate" and info.value.hint == "did you mean learning_rate?"
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        parse_hyperparameters({"num_classes": 2, "dropout": "0.1"})
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"epochs": "3"}))
    with pytest.raises(ConfigError) as info:
        load_hyperparameters(path)
    assert info.value.field == "num_classes" and info.value.path == str(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_hyperparameters(path)


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"num_classes": "2", "epochs": "3"}))
    hp = load_hyperparameters(path, overrides=parse_overrides(["epochs=5", "lr_scheduler_step=2,4"]))
    assert (hp.epochs, hp.lr_scheduler_step) == (5, (2, 4))
    saved = hp.to_json()
    assert saved["lr_scheduler_step"] == "2,4" and "notes" not in saved
    assert parse_hyperparameters(saved) == hp
    assert isinstance(hp.replace(epochs=7), Hyperparameters) and hp.replace(epochs=7).epochs == 7
    with pytest.raises(ConfigError, match="expected name=value"):
        parse_overrides(["epochs"])


def test_checks_against_the_data():
    hp = parse_hyperparameters({"num_classes": "2", "num_training_samples": "10", "label_width": "17"})
    notes = check_against_data(hp, num_classes=2, num_samples=8, max_boxes=3)
    assert notes == [
        "8 training images, 2 classes, at most 3 boxes per image",
        "num_training_samples is 10 but the training manifest has 8 images (informative only; using 8)",
    ]
    with pytest.raises(ConfigError) as info:
        check_against_data(hp, num_classes=4, num_samples=8, max_boxes=1)
    assert info.value.field == "num_classes" and "has 4 classes" in str(info.value)
    with pytest.raises(ConfigError) as info:
        check_against_data(hp, num_classes=2, num_samples=8, max_boxes=4)  # SageMaker counts 2 + 5 x 4
    assert info.value.field == "label_width" and info.value.hint == "set label_width to at least 22"
    assert "4 boxes: 22 label values (2 + 5 per box" in str(info.value)
    # SageMaker's own example: at most 10 objects need at least 10 x 5 + 2
    assert label_values(10) == 52 and label_values(0) == 2


def test_names_and_defaults_come_from_their_modules():
    pytest.importorskip("torch")
    from detforge.models import MODEL_TABLE
    from detforge.training import transforms

    assert parse_hyperparameters({"num_classes": "1"}).augmentation == transforms.DEFAULT_PRESET
    for preset in transforms.PRESETS:  # the one preset list decides what augmentation takes
        assert parse_hyperparameters({"num_classes": "1", "augmentation": preset}).augmentation == preset
    with pytest.raises(ConfigError) as info:
        parse_hyperparameters({"num_classes": "1", "augmentation": "mixup"})
    assert info.value.message == f"expected one of {', '.join(transforms.PRESETS)}, got 'mixup'"
    for detector, base_network in MODEL_TABLE:
        hp = parse_hyperparameters({"num_classes": "1", "detector": detector, "base_network": base_network})
        assert (hp.detector, hp.base_network) == (detector, base_network)
    from detforge.models import gfl

    # the torch-free table hyperparams checks against names what gfl can build, no more, no less
    assert [b for d, b in MODEL_TABLE if d == "gfl"] == list(gfl.BACKBONES)
