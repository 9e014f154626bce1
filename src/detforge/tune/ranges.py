"""SageMaker ``ParameterRanges`` for ``detforge tune``: parsing, checking and sampling (no torch, no optuna).

``parse_tuning_config(raw)`` reads what a SageMaker tuning job is configured with, in any of three
shapes: a ``ParameterRanges`` object, a ``HyperParameterTuningJobConfig`` (adds ``Strategy``,
``ResourceLimits``, ``HyperParameterTuningJobObjective``, ``TrainingJobEarlyStoppingType``) or a whole
``CreateHyperParameterTuningJob`` request (adds ``TrainingJobDefinition.StaticHyperParameters``).
Every range is checked against the hyperparameter it tunes; a bad file is a ``ConfigError`` naming
the field, e.g. ``ParameterRanges.ContinuousParameterRanges[1].MinValue``.

``ParamRange.suggest(trial)`` draws a value through an Optuna trial: ``Logarithmic`` samples
``log(x)`` uniformly, ``ReverseLogarithmic`` samples ``log(1 - x)`` uniformly (Optuna parameter
``1-<name>``), ``Auto`` is ``Logarithmic`` when ``0 < MinValue`` and ``MaxValue / MinValue >= 100``,
else ``Linear``. ``DEFAULT_RANGES`` are the ranges SageMaker documents for its object-detection
algorithm.

Not here: running trials, the study and its storage (``tune``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson

from detforge import storage
from detforge.errors import ConfigError
from detforge.training.hyperparams import EXTENSION_KEYS, SAGEMAKER_KEYS, parse_hyperparameters

OBJECTIVE = "validation:mAP"
SCALING_TYPES = ("Auto", "Linear", "Logarithmic", "ReverseLogarithmic")
STRATEGIES = ("Bayesian", "Random", "Hyperband", "Grid")
RANGE_LISTS = {
    "ContinuousParameterRanges": "continuous",
    "IntegerParameterRanges": "integer",
    "CategoricalParameterRanges": "categorical",
}
UNTUNABLE = ("num_classes", "num_training_samples")  # fixed by the data
_FLOAT_KEYS = {
    "learning_rate", "lr_scheduler_factor", "momentum", "weight_decay", "nms_threshold",
    "overlap_threshold", "early_stopping_tolerance", "score_threshold", "warmup_epochs", "grad_clip_norm",
}  # fmt: skip
_INT_KEYS = {
    "epochs", "mini_batch_size", "image_shape", "label_width", "nms_topk", "early_stopping_min_epochs",
    "early_stopping_patience", "workers", "seed",
}  # fmt: skip

# "Tune an Object Detection Model" in the SageMaker developer guide: the recommended ranges.
DEFAULT_RANGES = {
    "ContinuousParameterRanges": [
        {"Name": "learning_rate", "MinValue": "1e-6", "MaxValue": "0.5", "ScalingType": "Auto"},
        {"Name": "momentum", "MinValue": "0.0", "MaxValue": "0.999", "ScalingType": "Auto"},
        {"Name": "weight_decay", "MinValue": "0.0", "MaxValue": "0.999", "ScalingType": "Auto"},
    ],
    "IntegerParameterRanges": [
        {"Name": "mini_batch_size", "MinValue": "8", "MaxValue": "64", "ScalingType": "Auto"},
    ],
    "CategoricalParameterRanges": [
        {"Name": "optimizer", "Values": ["sgd", "adam", "rmsprop", "adadelta"]},
    ],
}


@dataclass(frozen=True)
class ParamRange:
    """One tuned hyperparameter. ``scaling`` is resolved (never ``Auto``); ``declared`` is as written."""

    name: str
    kind: str  # continuous | integer | categorical
    low: float | int | None = None
    high: float | int | None = None
    scaling: str = "Linear"
    declared: str = "Auto"
    values: tuple[str, ...] = ()

    @property
    def optuna_name(self) -> str:
        """The Optuna parameter: ``1-<name>`` for reverse-logarithmic ranges (Optuna samples 1 - x)."""
        return f"1-{self.name}" if self.scaling == "ReverseLogarithmic" else self.name

    def suggest(self, trial) -> str:
        """Draw a value through an Optuna trial; returned as SageMaker passes it: a string."""
        if self.kind == "categorical":
            return str(trial.suggest_categorical(self.name, list(self.values)))
        if self.kind == "integer":
            return str(
                trial.suggest_int(self.name, int(self.low), int(self.high), log=self.scaling == "Logarithmic")
            )
        if self.scaling == "ReverseLogarithmic":
            complement = trial.suggest_float(self.optuna_name, 1.0 - self.high, 1.0 - self.low, log=True)
            return repr(min(max(1.0 - complement, self.low), self.high))
        return repr(trial.suggest_float(self.name, self.low, self.high, log=self.scaling == "Logarithmic"))

    def value_from_params(self, params: Mapping) -> str | None:
        """The hyperparameter value of an Optuna trial's ``params`` (undoing ``1 - x``)."""
        if self.optuna_name not in params:
            return None
        value = params[self.optuna_name]
        if self.scaling == "ReverseLogarithmic":
            return repr(min(max(1.0 - value, self.low), self.high))
        return str(value) if self.kind != "continuous" else repr(float(value))

    def to_sagemaker(self) -> dict:
        """The range as an entry of SageMaker's ``ParameterRanges``."""
        if self.kind == "categorical":
            return {"Name": self.name, "Values": list(self.values)}
        return {
            "Name": self.name,
            "MinValue": str(self.low),
            "MaxValue": str(self.high),
            "ScalingType": self.declared,
        }


@dataclass(frozen=True)
class TuningSpec:
    """What a SageMaker tuning configuration says that detforge uses."""

    ranges: tuple[ParamRange, ...]
    strategy: str = "Bayesian"
    max_trials: int | None = None  # ResourceLimits.MaxNumberOfTrainingJobs
    early_stopping: str | None = None  # TrainingJobEarlyStoppingType: Off | Auto
    static_hyperparameters: dict | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)

    def parameter_ranges(self) -> dict:
        """The ranges back as SageMaker's ``ParameterRanges`` object."""
        out: dict[str, list] = {}
        for list_name, kind in RANGE_LISTS.items():
            entries = [r.to_sagemaker() for r in self.ranges if r.kind == kind]
            if entries:
                out[list_name] = entries
        return out

    def grid_size(self) -> int:
        """The number of combinations (``Grid`` strategy: categorical ranges only)."""
        return math.prod(len(r.values) for r in self.ranges)


def _number(value, *, kind: str, where: str, source: str | None) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(
            f"expected a number (a string such as '0.001'), got {value!r}", path=source, field=where
        )
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"expected a number, got {value!r}", path=source, field=where) from None
    if not math.isfinite(number):
        raise ConfigError(f"expected a finite number, got {value!r}", path=source, field=where)
    if kind == "integer":
        if number != int(number):
            raise ConfigError(f"expected a whole number, got {value!r}", path=source, field=where)
        return int(number)
    return number


def _check_value(name: str, value, *, where: str, source: str | None) -> None:
    """A value must be one the hyperparameter accepts (as ``detforge train`` checks it)."""
    try:
        parse_hyperparameters({"num_classes": 1, name: value})
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} (for {name})", path=source, field=where) from None


def _resolve_scaling(declared: str, low: float, high: float) -> str:
    if declared != "Auto":
        return declared
    return "Logarithmic" if low > 0 and high / low >= 100 else "Linear"


def _parse_entry(entry, *, kind: str, where: str, source: str | None, seen: set) -> ParamRange:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"expected an object with Name, got {entry!r}", path=source, field=where)
    allowed = {"Name", "Values"} if kind == "categorical" else {"Name", "MinValue", "MaxValue", "ScalingType"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r}",
            path=source,
            field=where,
            hint=f"expected {', '.join(sorted(allowed))}",
        )
    name = entry.get("Name")
    if not isinstance(name, str) or not name:
        raise ConfigError("missing (the hyperparameter to tune)", path=source, field=f"{where}.Name")
    if name not in SAGEMAKER_KEYS + EXTENSION_KEYS:
        raise ConfigError(
            f"{name!r} is not a hyperparameter of detforge train",
            path=source,
            field=f"{where}.Name",
            hint="see docs/training.md for the list",
        )
    if name in UNTUNABLE:
        raise ConfigError(
            f"{name} is fixed by the data and cannot be tuned", path=source, field=f"{where}.Name"
        )
    if name in seen:
        raise ConfigError(f"{name} has more than one range", path=source, field=f"{where}.Name")
    seen.add(name)
    if kind == "categorical":
        values = entry.get("Values")
        if not isinstance(values, list) or not values:
            raise ConfigError("expected a non-empty list of values", path=source, field=f"{where}.Values")
        texts = []
        for i, value in enumerate(values):
            if isinstance(value, (dict, list)) or value is None:
                raise ConfigError(
                    f"expected a string, got {value!r}", path=source, field=f"{where}.Values[{i}]"
                )
            text = str(value).lower() if isinstance(value, bool) else str(value)
            _check_value(name, text, where=f"{where}.Values[{i}]", source=source)
            texts.append(text)
        if len(set(texts)) != len(texts):
            raise ConfigError("lists a value twice", path=source, field=f"{where}.Values")
        return ParamRange(name=name, kind=kind, values=tuple(texts))
    if kind == "continuous" and name not in _FLOAT_KEYS:
        hint = "use IntegerParameterRanges" if name in _INT_KEYS else "use CategoricalParameterRanges"
        raise ConfigError(
            f"{name} does not take continuous values", path=source, field=f"{where}.Name", hint=hint
        )
    if kind == "integer" and name not in _FLOAT_KEYS | _INT_KEYS:
        raise ConfigError(
            f"{name} does not take numbers",
            path=source,
            field=f"{where}.Name",
            hint="use CategoricalParameterRanges",
        )
    bounds = {}
    for key in ("MinValue", "MaxValue"):
        if key not in entry:
            raise ConfigError("missing", path=source, field=f"{where}.{key}")
        bounds[key] = _number(entry[key], kind=kind, where=f"{where}.{key}", source=source)
        _check_value(name, bounds[key], where=f"{where}.{key}", source=source)
    low, high = bounds["MinValue"], bounds["MaxValue"]
    if not low < high:
        raise ConfigError(
            f"must be less than MaxValue ({high}), got {low}",
            path=source,
            field=f"{where}.MinValue",
            hint="a fixed value belongs in the hyperparameters file",
        )
    declared = entry.get("ScalingType", "Auto")
    if declared not in SCALING_TYPES:
        raise ConfigError(
            f"expected one of {', '.join(SCALING_TYPES)}, got {declared!r}",
            path=source,
            field=f"{where}.ScalingType",
        )
    if declared == "Logarithmic" and low <= 0:
        raise ConfigError(
            f"Logarithmic scaling needs MinValue > 0, got {low}", path=source, field=f"{where}.ScalingType"
        )
    if declared == "ReverseLogarithmic":
        if kind == "integer":
            raise ConfigError(
                "ReverseLogarithmic scaling is for continuous ranges only (as in SageMaker)",
                path=source,
                field=f"{where}.ScalingType",
            )
        if not (0 <= low and high < 1):
            raise ConfigError(
                f"ReverseLogarithmic scaling needs 0 <= MinValue < MaxValue < 1, got {low} to {high}",
                path=source,
                field=f"{where}.ScalingType",
            )
    return ParamRange(
        name=name,
        kind=kind,
        low=low,
        high=high,
        scaling=_resolve_scaling(declared, low, high),
        declared=declared,
    )


def _parse_parameter_ranges(raw, *, prefix: str, source: str | None) -> tuple[ParamRange, ...]:
    where = prefix or "ParameterRanges"
    if not isinstance(raw, Mapping):
        raise ConfigError("expected an object of ContinuousParameterRanges, ...", path=source, field=where)
    for key in raw:
        if key == "AutoParameters":
            raise ConfigError(
                "SageMaker's Autotune parameters are not supported", path=source, field=f"{where}.{key}"
            )
        if key not in RANGE_LISTS:
            raise ConfigError(
                f"unknown key {key!r}", path=source, field=where, hint=f"expected {', '.join(RANGE_LISTS)}"
            )
    ranges: list[ParamRange] = []
    seen: set[str] = set()
    for list_name, kind in RANGE_LISTS.items():
        entries = raw.get(list_name, [])
        list_where = f"{prefix}.{list_name}" if prefix else list_name
        if not isinstance(entries, list):
            raise ConfigError("expected a list", path=source, field=list_where)
        for i, entry in enumerate(entries):
            ranges.append(
                _parse_entry(entry, kind=kind, where=f"{list_where}[{i}]", source=source, seen=seen)
            )
    if not ranges:
        raise ConfigError("no hyperparameter ranges", path=source, field=where)
    return tuple(ranges)


def _positive_int(value, *, where: str, source: str | None) -> int:
    number = _number(value, kind="integer", where=where, source=source)
    if number < 1:
        raise ConfigError(f"must be >= 1, got {value!r}", path=source, field=where)
    return int(number)


def parse_tuning_config(raw, *, source: str | None = None) -> TuningSpec:
    """A ``ParameterRanges`` object, a ``HyperParameterTuningJobConfig`` or a tuning-job request."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected a JSON object, got {type(raw).__name__}", path=source)
    static = None
    prefix = ""
    if "HyperParameterTuningJobConfig" in raw:  # the whole CreateHyperParameterTuningJob request
        definition = raw.get("TrainingJobDefinition") or {}
        static = definition.get("StaticHyperParameters") if isinstance(definition, Mapping) else None
        if static is not None and not isinstance(static, Mapping):
            raise ConfigError(
                "expected an object", path=source, field="TrainingJobDefinition.StaticHyperParameters"
            )
        raw, prefix = raw["HyperParameterTuningJobConfig"], "HyperParameterTuningJobConfig."
        if not isinstance(raw, Mapping):
            raise ConfigError("expected an object", path=source, field=prefix[:-1])
    if "ParameterRanges" not in raw:  # the ParameterRanges object itself
        return TuningSpec(
            ranges=_parse_parameter_ranges(raw, prefix=prefix[:-1], source=source), source=source
        )
    ranges = _parse_parameter_ranges(raw["ParameterRanges"], prefix=f"{prefix}ParameterRanges", source=source)
    strategy = raw.get("Strategy", "Bayesian")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"expected one of {', '.join(STRATEGIES)}, got {strategy!r}",
            path=source,
            field=f"{prefix}Strategy",
        )
    if strategy == "Grid" and any(r.kind != "categorical" for r in ranges):
        raise ConfigError(
            "the Grid strategy takes CategoricalParameterRanges only (as in SageMaker)",
            path=source,
            field=f"{prefix}Strategy",
        )
    objective = raw.get("HyperParameterTuningJobObjective")
    if objective is not None:
        metric = objective.get("MetricName") if isinstance(objective, Mapping) else objective
        direction = objective.get("Type", "Maximize") if isinstance(objective, Mapping) else None
        if metric != OBJECTIVE or direction != "Maximize":
            raise ConfigError(
                f"detforge tunes {OBJECTIVE} (Maximize), got {metric!r} ({direction})",
                path=source,
                field=f"{prefix}HyperParameterTuningJobObjective",
            )
    max_trials = None
    limits = raw.get("ResourceLimits")
    if isinstance(limits, Mapping) and "MaxNumberOfTrainingJobs" in limits:
        max_trials = _positive_int(
            limits["MaxNumberOfTrainingJobs"],
            where=f"{prefix}ResourceLimits.MaxNumberOfTrainingJobs",
            source=source,
        )
    early = raw.get("TrainingJobEarlyStoppingType")
    if early is not None and early not in ("Off", "Auto"):
        raise ConfigError(
            f"expected Off or Auto, got {early!r}", path=source, field=f"{prefix}TrainingJobEarlyStoppingType"
        )
    return TuningSpec(
        ranges=ranges,
        strategy=strategy,
        max_trials=max_trials,
        early_stopping=early,
        static_hyperparameters=dict(static) if static is not None else None,
        source=source,
    )


def load_tuning_config(path: str | os.PathLike | None) -> TuningSpec:
    """Read a ranges file (any of the three shapes); ``None``: SageMaker's documented default ranges."""
    if path is None:
        return parse_tuning_config(DEFAULT_RANGES, source="<SageMaker's object-detection ranges>")
    source = os.fspath(path)
    try:
        raw = orjson.loads(storage.read_bytes(source))
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc}", path=source) from None
    return parse_tuning_config(raw, source=source)
