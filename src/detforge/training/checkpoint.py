"""Model weights and training state in a run folder, stored without pickle.

- ``save_model(run_dir, model, info, name="model")`` -> ``<name>.safetensors`` + ``<name>.json``
  (``RunInfo`` fields: base_network, image_shape, num_classes, classes, thresholds, hyperparams, detector);
  ``name="best"`` gives ``best.safetensors``/``best.json``.
- ``load_run_model(run_dir, *, which="model", device="cpu") -> (model, RunInfo)``; ``run_dir`` may also be
  a ``.safetensors`` file with its ``.json`` beside it; ``read_run_info`` reads the JSON alone and
  ``weights_file`` names the ``.safetensors`` file.
- ``write_inputs``/``read_inputs``: ``inputs.json``, the run's data as plain JSON (``RunInputs``: the
  train and validation manifests, the label attribute, the ``--weights`` it started from); with
  ``classes.json`` and ``hyperparams.json`` beside it, what export, evaluate and ``--resume`` read
  instead of the checkpoint. Run folders from before ``inputs.json``: read from ``checkpoints/last.pt``.
- ``save_state``/``load_state``: ``checkpoints/last.pt`` for ``--resume``: plain tensors, numbers and
  dicts written with ``torch.save`` and read back with ``torch.load(weights_only=True)``;
  ``rng_state``/``set_rng_state`` capture and restore the random generators for it.

Every write is atomic (``storage.write_bytes``), so a run killed mid-write keeps the previous file.
Not here: building models (``models``), the training loop (``train``).
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass, field

import orjson

from detforge import storage
from detforge.errors import ModelError

FORMAT_VERSION = 1
STATE_FILE = "checkpoints/last.pt"
INPUTS_FILE = "inputs.json"


@dataclass
class RunInfo:
    """What a saved model needs besides its weights (``model.json``)."""

    base_network: str
    image_shape: int
    num_classes: int
    classes: list[str]
    thresholds: dict = field(default_factory=dict)  # nms_threshold, nms_topk, score/overlap_threshold
    hyperparams: dict = field(default_factory=dict)
    epoch: int | None = None
    metrics: dict = field(default_factory=dict)
    source_run: str | None = None
    detector: str = "ssd"  # the detector family (models.DETECTORS); older runs are all SSD

    def to_json(self) -> dict:
        """JSON-ready dict (what ``model.json`` holds)."""
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict, *, path: str = "model.json") -> RunInfo:
        """Read back ``to_json``; ModelError naming the missing field."""
        for key in ("base_network", "image_shape", "num_classes", "classes"):
            if key not in obj:
                raise ModelError("missing", path=path, field=key)
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        known["image_shape"] = int(known["image_shape"])
        known["num_classes"] = int(known["num_classes"])
        known["classes"] = [str(c) for c in known["classes"]]
        return cls(**known)


@dataclass(frozen=True)
class RunInputs:
    """What a run was trained on (``inputs.json``); local manifest paths are absolute."""

    train: str
    validation: str | None = None
    label_attribute: str | None = None
    weights: str | None = None  # --weights: the model it started from

    def to_json(self) -> dict:
        """JSON-ready dict (what ``inputs.json`` holds)."""
        return {"format_version": FORMAT_VERSION, **asdict(self)}


def _absolute(path: str | os.PathLike | None) -> str | None:
    if path is None:
        return None
    path = os.fspath(path)
    return path if storage.is_remote(path) else os.path.abspath(path)


def write_inputs(run_dir: str | os.PathLike, inputs: RunInputs) -> RunInputs:
    """Write ``inputs.json`` (atomically) with local paths made absolute, so that the run folder can be
    read from anywhere; returns what it wrote."""
    inputs = RunInputs(
        train=_absolute(inputs.train),
        validation=_absolute(inputs.validation),
        label_attribute=inputs.label_attribute,
        weights=_absolute(inputs.weights),
    )
    storage.write_bytes(
        storage.join(os.fspath(run_dir), INPUTS_FILE),
        orjson.dumps(inputs.to_json(), option=orjson.OPT_INDENT_2),
    )
    return inputs


def read_inputs(run_dir: str | os.PathLike, *, state: dict | None = None) -> RunInputs:
    """The ``RunInputs`` of a run folder: ``inputs.json``; a run folder written before it existed: the
    manifests its resume state names (``state`` when already read, else ``checkpoints/last.pt``);
    ModelError when neither says."""
    run_dir = os.fspath(run_dir)
    path = storage.join(run_dir, INPUTS_FILE)
    if storage.exists(path):
        try:
            obj = orjson.loads(storage.read_bytes(path))
        except orjson.JSONDecodeError as exc:
            raise ModelError(f"not valid JSON: {exc}", path=path) from None
        if not isinstance(obj, dict) or not obj.get("train"):
            raise ModelError("does not name the training manifest", path=path, field="train")
        return RunInputs(**{k: obj.get(k) for k in RunInputs.__dataclass_fields__})
    if state is None and not storage.exists(storage.join(run_dir, STATE_FILE)):
        raise ModelError(
            "the run folder does not say what it was trained on: inputs.json is missing",
            path=path,
            hint="give a run folder written by `detforge train`",
        )
    data = (state if state is not None else load_state(run_dir)).get("data") or {}
    if not data.get("train"):
        raise ModelError(
            "the resume state does not name the training manifest",
            path=run_dir,
            hint="give --train and --validation",
        )
    return RunInputs(train=data["train"], validation=data.get("validation"))


def _state_to_bytes(state_dict: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    return save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})


def unwrap(model):
    """The plain model inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_model(run_dir: str | os.PathLike, model, info: RunInfo, *, name: str = "model") -> str:
    """Write ``<name>.safetensors`` and ``<name>.json`` into ``run_dir``; returns the weights path."""
    run_dir = os.fspath(run_dir)
    path = storage.join(run_dir, f"{name}.safetensors")
    storage.write_bytes(path, _state_to_bytes(unwrap(model).state_dict(), {"format": "pt"}))
    storage.write_bytes(
        storage.join(run_dir, f"{name}.json"),
        orjson.dumps(info.to_json(), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY),
    )
    return path


def _locate(run_dir: str, which: str) -> tuple[str, str]:
    """(weights path, json path) for a run folder + which, or a .safetensors file."""
    if run_dir.endswith(".safetensors"):
        weights = run_dir
        meta = weights[: -len(".safetensors")] + ".json"
        if not storage.exists(meta):
            meta = storage.join(os.path.dirname(weights) or ".", "model.json")
        return weights, meta
    weights = storage.join(run_dir, f"{which}.safetensors")
    meta = storage.join(run_dir, f"{which}.json")
    if not storage.exists(meta):
        meta = storage.join(run_dir, "model.json")
    return weights, meta


def weights_file(source: str | os.PathLike, *, which: str = "model") -> str:
    """The ``.safetensors`` file of a run folder (``<which>.safetensors``) or the file ``source`` itself."""
    return _locate(os.fspath(source), which)[0]


def read_run_info(run_dir: str | os.PathLike, *, which: str = "model") -> RunInfo:
    """The ``RunInfo`` of a saved model without loading its weights."""
    _, meta = _locate(os.fspath(run_dir), which)
    if not storage.exists(meta):
        raise ModelError(
            "not a detforge model: model.json is missing",
            path=meta,
            hint="give a run folder written by `detforge train` or its .safetensors file",
        )
    try:
        obj = orjson.loads(storage.read_bytes(meta))
    except orjson.JSONDecodeError as exc:
        raise ModelError(f"not valid JSON: {exc}", path=meta) from None
    return RunInfo.from_json(obj, path=meta)


def load_state_dict(path: str) -> dict:
    """The tensors of a ``.safetensors`` file (local or remote)."""
    from safetensors.torch import load

    if not storage.exists(path):
        raise ModelError(
            "no such weights file",
            path=path,
            hint="a run folder holds model.safetensors (best.safetensors for the best epoch)",
        )
    try:
        return load(storage.read_bytes(path))
    except Exception as exc:  # safetensors raises its own SafetensorError / ValueError
        raise ModelError(f"cannot read the weights: {exc}", path=path) from None


def load_run_model(run_dir: str | os.PathLike, *, which: str = "model", device: str = "cpu"):
    """Rebuild a trained model from a run folder: ``(model in eval mode on device, RunInfo)``."""
    from detforge.models import build_model

    run_dir = os.fspath(run_dir)
    info = read_run_info(run_dir, which=which)
    weights = weights_file(run_dir, which=which)
    state = load_state_dict(weights)
    thresholds = info.thresholds or {}
    model = build_model(
        info.base_network,
        detector=info.detector,
        num_classes=info.num_classes,
        image_size=info.image_shape,
        nms_threshold=thresholds.get("nms_threshold", 0.45),
        nms_topk=thresholds.get("nms_topk", 400),
        score_threshold=thresholds.get("score_threshold", 0.01),
        nms_candidates=thresholds.get("nms_candidates", 0),
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"weights do not fit a {_name(info)} model at {info.image_shape} px with "
            f"{info.num_classes} classes: {str(exc).splitlines()[0]}",
            path=weights,
        ) from None
    model.to(device).eval()
    return model, info


def _name(info: RunInfo) -> str:
    return info.base_network if info.detector == "ssd" else f"{info.detector} {info.base_network}"


def save_state(run_dir: str | os.PathLike, state: dict) -> str:
    """Write the resume state (plain tensors/numbers/dicts) to ``checkpoints/last.pt`` atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = storage.join(os.fspath(run_dir), STATE_FILE)
    storage.write_bytes(path, buffer.getvalue())
    return path


def load_state(run_dir: str | os.PathLike) -> dict:
    """Read ``checkpoints/last.pt`` with ``weights_only=True`` (no arbitrary pickle)."""
    import torch

    path = storage.join(os.fspath(run_dir), STATE_FILE)
    if not storage.exists(path):
        raise ModelError(
            "nothing to resume: checkpoints/last.pt is missing",
            path=path,
            hint="--resume needs a run folder that finished at least one epoch",
        )
    try:
        return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the resume state: {exc}", path=path) from None


def rng_state() -> dict:
    """torch, Python, numpy and CUDA random states as plain tensors/tuples (for ``save_state``)."""
    import random

    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
