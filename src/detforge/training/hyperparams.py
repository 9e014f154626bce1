"""SageMaker object-detection hyperparameters: names, defaults, ranges and string parsing (no torch at
import; a given ``augmentation`` is checked against ``transforms.PRESETS``, the one preset list, which
loads torch).

``parse_hyperparameters(raw)`` takes the dict SageMaker takes (``hyperparams.json``: every value a
string such as ``"False"``, ``"1"``, ``"10,20"``; numbers and booleans work too) and returns a frozen
``Hyperparameters``. Unknown keys and values out of range raise ``ConfigError`` naming the key; keys
SageMaker adds for itself (``_kvstore``, ``_num_kv_servers``, ``_tuning_objective_metric``,
``kv_store``) are ignored with a note in ``Hyperparameters.notes``.

``SAGEMAKER_KEYS`` are the built-in algorithm's own; ``EXTENSION_KEYS`` are detforge's additions
(augmentation preset, data-loader workers, device, seed, ...), documented apart in docs/training.md.
``check_against_data`` compares ``num_classes``, ``num_training_samples`` and ``label_width`` (label values:
2 + 5 per box, ``label_values``) with the data.

Not here: the training loop (``train``), models (``models``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson

from detforge import storage
from detforge.errors import ConfigError
from detforge.models import BASE_NETWORKS, DETECTORS, MODEL_TABLE

OPTIMIZERS = ("sgd", "adam", "rmsprop", "adadelta", "adamw")  # adamw: a detforge addition
LR_SCHEDULES = ("step", "cosine")
AUGMENTATIONS = ("none", "flip", "ssd", "ssd+rot", "flip+hsv")
# SageMaker's label_width counts label values: a header of 2 and 5 values per box.
LABEL_HEADER = 2
LABEL_VALUES_PER_BOX = 5
IGNORED_KEYS = ("kv_store",)  # SageMaker's MXNet kvstore choice; torch DDP decides this itself


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved hyperparameters (native types). ``notes`` lists ignored keys, not a hyperparameter."""

    # SageMaker's keys
    num_classes: int
    num_training_samples: int | None = None
    base_network: str = "vgg-16"
    use_pretrained_model: int = 1
    epochs: int = 30
    mini_batch_size: int = 32
    learning_rate: float = 0.001
    lr_scheduler_step: tuple[int, ...] = ()
    lr_scheduler_factor: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0005
    image_shape: int = 300
    label_width: int = 350
    freeze_layer_pattern: str = ""
    nms_threshold: float = 0.45
    nms_topk: int = 400
    overlap_threshold: float = 0.5
    early_stopping: bool = False
    early_stopping_min_epochs: int = 10
    early_stopping_patience: int = 5
    early_stopping_tolerance: float = 0.0
    # detforge's extensions
    augmentation: str = "ssd"
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    score_threshold: float = 0.01
    warmup_epochs: float = 0.0
    image_cache: str = ""
    grad_clip_norm: float = 10.0
    sync_batchnorm: bool = False
    deterministic: bool = False
    # detforge's modern detector and small-data recipe (docs/training.md)
    detector: str = "ssd"
    mosaic: float = 0.0
    mosaic_off_epochs: int = 0
    scale_jitter: float = 0.5
    multiscale: float = 0.0
    ema_decay: float = 0.0
    lr_schedule: str = "step"
    lr_min_factor: float = 0.01
    cache_images: bool = False
    validation_interval: int = 1
    max_train_minutes: float = 0.0
    # candidates per class before NMS (0: nms_topk); crowded scenes need more than the detections kept
    nms_candidates: int = 0
    # tiled training (detforge.training.tiles): crops of tile_size photo pixels, 0 = whole photos
    tile_size: int = 0
    tile_min_visible: float = 0.6
    tile_probability: float = 1.0
    notes: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict:
        """The resolved values as JSON-ready Python values (``hyperparams.json`` of a run)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "notes"}
        out["lr_scheduler_step"] = ",".join(str(s) for s in self.lr_scheduler_step)
        return out

    def replace(self, **changes) -> Hyperparameters:
        """A copy with some values changed (re-checked)."""
        raw = self.to_json() | changes
        return parse_hyperparameters(raw)


def _augmentation_presets() -> tuple[str, ...]:
    from detforge.training.transforms import PRESETS

    return PRESETS


# key -> (kind, check) ; kinds: int, float, bool, str, choice (a tuple, or a function giving it), steps, regex
def _range(low=None, high=None, *, low_open=False, high_open=False):
    def check(value):
        if low is not None and (value < low or (low_open and value == low)):
            return f"must be {'>' if low_open else '>='} {low}"
        if high is not None and (value > high or (high_open and value == high)):
            return f"must be {'<' if high_open else '<='} {high}"
        return None

    return check


_SPEC: dict[str, tuple] = {
    "num_classes": ("int", _range(1)),
    "num_training_samples": ("int", _range(1)),
    "base_network": ("choice", BASE_NETWORKS),
    "use_pretrained_model": ("choice01", None),
    "epochs": ("int", _range(1)),
    "mini_batch_size": ("int", _range(1)),
    "learning_rate": ("float", _range(0, 1, low_open=True)),
    "lr_scheduler_step": ("steps", None),
    "lr_scheduler_factor": ("float", _range(0, 1, low_open=True)),
    "optimizer": ("choice", OPTIMIZERS),
    "momentum": ("float", _range(0, 1, high_open=True)),
    "weight_decay": ("float", _range(0, 1, high_open=True)),
    "image_shape": ("int", _range(32, 4096)),
    "label_width": ("int", _range(1)),
    "freeze_layer_pattern": ("regex", None),
    "nms_threshold": ("float", _range(0, 1, low_open=True)),
    "nms_topk": ("int", _range(1, 10000)),
    "overlap_threshold": ("float", _range(0, 1, low_open=True)),
    "early_stopping": ("bool", None),
    "early_stopping_min_epochs": ("int", _range(1)),
    "early_stopping_patience": ("int", _range(1)),
    "early_stopping_tolerance": ("float", _range(0, 1, high_open=True)),
    "augmentation": ("choice", _augmentation_presets),
    "workers": ("int", _range(0, 64)),
    "device": ("device", None),
    "seed": ("int", _range(0)),
    "score_threshold": ("float", _range(0, 1, high_open=True)),
    "warmup_epochs": ("float", _range(0)),
    "image_cache": ("str", None),
    "grad_clip_norm": ("float", _range(0)),
    "sync_batchnorm": ("bool", None),
    "deterministic": ("bool", None),
    "detector": ("choice", DETECTORS),
    "mosaic": ("float", _range(0, 1)),
    "mosaic_off_epochs": ("int", _range(0)),
    "scale_jitter": ("float", _range(0, 1, high_open=True)),
    "multiscale": ("float", _range(0, 0.5)),
    "ema_decay": ("float", _range(0, 1, high_open=True)),
    "lr_schedule": ("choice", LR_SCHEDULES),
    "lr_min_factor": ("float", _range(0, 1)),
    "cache_images": ("bool", None),
    "validation_interval": ("int", _range(1)),
    "max_train_minutes": ("float", _range(0)),
    "nms_candidates": ("int", _range(0, 100000)),
    "tile_size": ("int", lambda v: "must be 0 (off) or at least 32" if 0 < v < 32 or v < 0 else None),
    "tile_min_visible": ("float", _range(0, 1, low_open=True)),
    "tile_probability": ("float", _range(0, 1)),
}
SAGEMAKER_KEYS = tuple(list(_SPEC)[:22])
EXTENSION_KEYS = tuple(list(_SPEC)[22:])
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def _number(key: str, value, kind: str):
    if isinstance(value, bool):
        raise ConfigError(f"expected a number, got {value!r}", field=key)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text) if kind == "float" or any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ConfigError(
                f"expected {'a number' if kind == 'float' else 'a whole number'}, got {value!r}", field=key
            ) from None
    if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"expected a number, got {value!r}", field=key)
    if kind == "int":
        if float(value) != int(value):
            raise ConfigError(f"expected a whole number, got {value!r}", field=key)
        return int(value)
    return float(value)


def _parse_value(key: str, value):
    kind, extra = _SPEC[key]
    if kind in ("int", "float"):
        parsed = _number(key, value, kind)
        problem = extra(parsed) if extra else None
        if problem:
            raise ConfigError(f"{problem}, got {value!r}", field=key)
        return parsed
    if kind == "bool":
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"expected True or False, got {value!r}", field=key)
    if kind == "choice01":
        text = str(int(value)) if isinstance(value, (bool, int)) else str(value).strip()
        if text not in ("0", "1"):
            raise ConfigError(f"expected 0 or 1, got {value!r}", field=key)
        return int(text)
    if kind == "choice":
        text = str(value).strip().lower()
        choices = extra() if callable(extra) else extra
        if text not in choices:
            raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", field=key)
        return text
    if kind == "steps":
        items = (
            list(value)
            if isinstance(value, (list, tuple))
            else [s for s in str(value).replace(" ", "").split(",") if s]
        )
        steps = tuple(_number(key, s, "int") for s in items)
        if any(s < 1 for s in steps) or list(steps) != sorted(set(steps)):
            raise ConfigError(
                f"expected increasing epoch numbers >= 1 like '10,20', got {value!r}", field=key
            )
        return steps
    if kind == "regex":
        text = str(value)
        try:
            re.compile(text)
        except re.error as exc:
            raise ConfigError(f"not a valid regular expression: {exc}", field=key) from None
        return text
    if kind == "device":
        text = str(value).strip().lower()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text):
            raise ConfigError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}", field=key)
        return text
    return str(value)


def parse_hyperparameters(raw: Mapping, *, source: str | None = None) -> Hyperparameters:
    """Check and convert a hyperparameter dict; ConfigError naming the key (and ``source`` file)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a JSON object of name -> value, got {type(raw).__name__}", path=source)
    values, notes = {}, []
    for key, value in raw.items():
        key = str(key)
        if key.startswith("_") or key in IGNORED_KEYS:
            notes.append(f"ignored SageMaker's internal hyperparameter {key}={value!r}")
            continue
        if key not in _SPEC:
            close = [k for k in _SPEC if k.replace("_", "") == key.replace("_", "").replace("-", "").lower()]
            raise ConfigError(
                "unknown hyperparameter",
                path=source,
                field=key,
                hint=f"did you mean {close[0]}?" if close else "see docs/training.md for the list",
            )
        if value is None or (key == "num_training_samples" and value == ""):
            continue  # unset: the default
        try:
            values[key] = _parse_value(key, value)
        except ConfigError as exc:
            raise ConfigError(exc.message, path=source, field=key) from None
    if "num_classes" not in values:
        raise ConfigError(
            "required (the number of object classes in the data)", path=source, field="num_classes"
        )
    _check_combination(values, source)
    return Hyperparameters(**values, notes=tuple(notes))


def _check_combination(values: dict, source: str | None) -> None:
    """Values that are fine alone but not together."""
    detector = values.get("detector", "ssd")
    base_network = values.get("base_network", "vgg-16")
    if (detector, base_network) not in MODEL_TABLE:
        raise ConfigError(
            f"detector={detector} has no {base_network} backbone; choose one of "
            f"{', '.join(b for d, b in MODEL_TABLE if d == detector)}",
            path=source,
            field="base_network",
        )
    if detector == "ssd" and values.get("multiscale", 0.0) > 0:
        raise ConfigError(
            "needs detector=gfl (SSD's anchors are fixed to image_shape)",
            path=source,
            field="multiscale",
            hint="set multiscale=0 or detector=gfl",
        )


def parse_overrides(items: Iterable[str]) -> dict:
    """``["epochs=3", "lr_scheduler_step=10,20"]`` -> dict of strings (``--set`` options)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected name=value, got {item!r}", field="--set")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def read_hyperparameters_file(path: str | os.PathLike) -> dict:
    """The raw name -> value object of a ``hyperparams.json`` (local or ``s3://``), not yet checked."""
    source = os.fspath(path)
    try:
        loaded = orjson.loads(storage.read_bytes(source))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc}", path=source) from None
    if not isinstance(loaded, dict):
        raise ConfigError("expected a JSON object of name -> value", path=source)
    return loaded


def load_hyperparameters(
    path: str | os.PathLike | None = None,
    *,
    overrides: Mapping | None = None,
    defaults: Mapping | None = None,
) -> Hyperparameters:
    """Read a ``hyperparams.json`` (optional), apply ``defaults`` under it and ``overrides`` over it."""
    raw: dict = dict(defaults or {})
    source = None
    if path is not None:
        source = os.fspath(path)
        raw.update(read_hyperparameters_file(source))
    raw.update(overrides or {})
    return parse_hyperparameters(raw, source=source)


def label_values(boxes: int) -> int:
    """The label values SageMaker stores for an image with ``boxes`` boxes: a 2-value header (header
    length, values per box) and 5 values per box (class, xmin, ymin, xmax, ymax): what ``label_width``
    must hold."""
    return LABEL_HEADER + LABEL_VALUES_PER_BOX * int(boxes)


def check_against_data(
    hp: Hyperparameters, *, num_classes: int, num_samples: int, max_boxes: int
) -> list[str]:
    """Compare with the data (``max_boxes``: the most boxes on one training or validation image);
    ConfigError on a mismatch, else notes to report."""
    if hp.num_classes != num_classes:
        raise ConfigError(
            f"is {hp.num_classes} but the training data's class map has {num_classes} classes",
            field="num_classes",
            hint=f"set num_classes={num_classes}",
        )
    if label_values(max_boxes) > hp.label_width:
        raise ConfigError(
            f"is {hp.label_width} but an image of the data has {max_boxes} boxes: "
            f"{label_values(max_boxes)} label values ({LABEL_HEADER} + {LABEL_VALUES_PER_BOX} per box, "
            "as SageMaker counts them)",
            field="label_width",
            hint=f"set label_width to at least {label_values(max_boxes)}",
        )
    notes = [f"{num_samples} training images, {num_classes} classes, at most {max_boxes} boxes per image"]
    if hp.num_training_samples is not None and hp.num_training_samples != num_samples:
        notes.append(
            f"num_training_samples is {hp.num_training_samples} but the training manifest has "
            f"{num_samples} images (informative only; using {num_samples})"
        )
    return notes
