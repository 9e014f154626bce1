"""int8 for an exported graph: ONNX Runtime's static QDQ quantization of the network, and its gate.

``quantize_int8(fp32_path, int8_path, calibration, image_size=)`` quantizes every operator of the network
(what feeds the detector's ``head``: backbone, neck, head) and the input normalisation, calibrated on
``calibration`` images (the run's training images: ``export`` never calibrates on the images it then
measures). ``compare_int8`` times both graphs at batch 1 and measures their validation:mAP on every image of
a validation manifest; ``refusals`` says why an int8 graph is not kept (more than ``max_map_drop`` mAP
points lost, or slower than ``min_speedup`` x fp32). Nothing here asks which family a model is: the
network is found by the ONNX node names of ``export``'s wrapper (``HEAD_SCOPE``).

Not here: writing the graph (``export``), checking it against PyTorch (``verify``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import orjson

from detforge.images import resize_rgb
from detforge.runtime import METADATA_FILE, MODEL_FILE

# --int8 keeps the fp32 model when int8 loses more validation:mAP points than this.
DEFAULT_MAX_MAP_DROP = 1.0
# ... and when it is not at least this much faster than fp32 at batch 1 (a slower int8 model is no gain).
DEFAULT_MIN_SPEEDUP = 1.0
# The int8 graph's input normalisation, as one depthwise Conv (quantize_int8).
NORMALIZE_NODE = "/detforge_normalize/Conv"
# The ONNX scope of the detector's ``head`` module in export's wrapper (``DeployableDetector.detector``):
# the network is everything that feeds it.
HEAD_SCOPE = "/detector/head/"


def _constant(model, name: str):
    """The value of an initializer or Constant node output ``name`` (numpy), or None."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def _normalization_as_conv(model) -> str | None:
    """Replace the graph's ``x / 255 -> - mean -> / std`` by one 1 x 1 depthwise ``Conv`` (same values).

    Left as they are in an int8 graph, these per-channel broadcasts took a tenth of mobilenet-v3's
    int8 time (measured; ~20x their fp32 time, likely as ONNX Runtime moves them to the NHWC layout of
    its int8 convolutions). As a Conv on the uint8 pixel values they quantize exactly (scale 1).
    Returns the Conv's input tensor (the pixels), None when the pattern is not found.
    """
    from onnx import helper, numpy_helper

    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(node, op_type: str):
        found = consumers.get(node.output[0], [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    for first in list(model.graph.node):
        scale = _constant(model, first.input[1]) if first.op_type == "Div" and len(first.input) == 2 else None
        if scale is None or scale.size != 1 or float(scale.reshape(-1)[0]) != 255.0:
            continue
        sub = only_consumer(first, "Sub")
        div = only_consumer(sub, "Div") if sub is not None else None
        if div is None:
            continue
        mean, std = _constant(model, sub.input[1]), _constant(model, div.input[1])
        if mean is None or std is None or mean.size != 3 or std.size != 3:
            continue
        mean, std = mean.reshape(3).astype(np.float64), std.reshape(3).astype(np.float64)
        weight = (1.0 / (255.0 * std)).astype(np.float32).reshape(3, 1, 1, 1)
        bias = (-mean / std).astype(np.float32)
        names = ("detforge_normalize_weight", "detforge_normalize_bias")
        model.graph.initializer.extend(
            [numpy_helper.from_array(weight, names[0]), numpy_helper.from_array(bias, names[1])]
        )
        conv = helper.make_node(
            "Conv",
            [first.input[0], *names],
            [div.output[0]],
            name=NORMALIZE_NODE,
            group=3,
            kernel_shape=[1, 1],
        )
        index = list(model.graph.node).index(first)
        for node in (first, sub, div):
            model.graph.node.remove(node)
        model.graph.node.insert(index, conv)
        return first.input[0]
    return None


def _network_nodes(model) -> list[str]:
    """Names of the nodes of backbone, neck and head: ancestors of the ``HEAD_SCOPE`` nodes that do not
    feed the input ``Resize`` (pre-processing: a ``Resize`` with no ``Conv`` before it; the neck's upsampling
    ``Resize`` nodes are network). Box decoding, softmax, top-k and NMS come after the head."""
    producers = {output: node for node in model.graph.node for output in node.output}

    def ancestors(seeds) -> set[int]:
        seen: set[int] = set()
        stack = list(seeds)
        while stack:
            node = stack.pop()
            if id(node) not in seen:
                seen.add(id(node))
                stack += [producers[name] for name in node.input if name in producers]
        return seen

    network = ancestors(n for n in model.graph.node if n.name.startswith(HEAD_SCOPE))
    by_id = {id(node): node for node in model.graph.node}
    input_resizes = [
        n
        for n in model.graph.node
        if n.op_type == "Resize" and not any(by_id[i].op_type == "Conv" for i in ancestors([n]))
    ]
    network -= ancestors(input_resizes)
    return [node.name for node in model.graph.node if id(node) in network]


def quantize_int8(
    fp32_path: str, int8_path: str, calibration: Sequence[np.ndarray], *, image_size: int
) -> None:
    """Static QDQ int8 quantization of the network, calibrated on ``calibration`` images.

    Quantized: every operator of backbone and head (convolutions per channel, residual adds, the
    activations, squeeze-excitation products, pooling, the head's reshapes and concatenations) and the
    input normalisation (as a 1 x 1 depthwise Conv, exact on uint8 pixels). Left in float: the input
    resize, box decoding, softmax, top-k and NMS, so scores and boxes keep their precision. Quantizing
    the convolutions only (each one wrapped in its own quantize/dequantize pair) made mobilenet-v3
    slower than fp32 at batch 8 (measured: docs/deploy.md, Benchmark).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": resize_rgb(image, image_size)[None]} for image in calibration])

        def get_next(self):
            return next(self.items, None)

    ort.set_default_logger_severity(3)  # the quantizer's sessions warn about every unused initializer
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = os.path.join(tmp, "prepared.onnx")
            quant_pre_process(fp32_path, prepared, skip_symbolic_shape=True)
            model = onnx.load(prepared)
            pixels = _normalization_as_conv(model)
            for k, node in enumerate(model.graph.node):  # inlined functions (HardSwish) have no names
                if not node.name:
                    node.name = f"/detforge_inlined/{node.op_type}_{k}"
            network = _network_nodes(model)
            options: dict = {
                "quant_format": QuantFormat.QDQ,
                "per_channel": True,
                "activation_type": QuantType.QUInt8,
                "weight_type": QuantType.QInt8,
            }
            if network:
                if pixels is not None:
                    network.append(NORMALIZE_NODE)
                    pixel_range = {"rmin": np.float32(0.0), "rmax": np.float32(255.0)}  # scale 1: exact
                    options["extra_options"] = {"TensorQuantOverrides": {pixels: [pixel_range]}}
                options["nodes_to_quantize"] = network
            else:  # not a graph export_run wrote: its convolutions only
                options["op_types_to_quantize"] = ["Conv"]
            onnx.save(model, prepared)
            quantize_static(prepared, int8_path, Reader(), **options)
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default (warnings)


def compare_int8(
    staging: str,
    sample: np.ndarray,
    *,
    classes: list[str],
    image_size: int,
    validation: str,
    int8_file: str = "model-int8.onnx",
    repeats: int = 15,
) -> dict:
    """Latency (batch 1, median) and validation:mAP (VOC07, on every image of ``validation``) of
    ``staging/model.onnx`` (fp32) and ``staging/<int8_file>``; ``map_points_lost`` = 100 x the mAP drop."""
    import onnxruntime as ort

    from detforge.evaluation.evaluate import evaluate

    files = (("fp32", MODEL_FILE), ("int8", int8_file))
    batch = resize_rgb(sample, image_size)[None]
    sessions = {
        kind: ort.InferenceSession(os.path.join(staging, name), providers=["CPUExecutionProvider"])
        for kind, name in files
    }
    times: dict[str, list[float]] = {kind: [] for kind in sessions}
    for _ in range(repeats + 1):  # interleaved, the first call of each is a warm-up
        for kind, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"images": batch})
            times[kind].append(time.perf_counter() - start)
    result: dict = {f"{kind}_ms": round(float(np.median(t[1:])) * 1000.0, 2) for kind, t in times.items()}
    result["speedup"] = round(result["fp32_ms"] / max(result["int8_ms"], 1e-9), 2)
    for kind, name in files:
        folder = os.path.join(staging, f".{kind}")
        os.makedirs(folder)
        os.link(os.path.join(staging, name), os.path.join(folder, MODEL_FILE))
        with open(os.path.join(folder, METADATA_FILE), "wb") as handle:
            handle.write(orjson.dumps({"classes": classes, "input_size": image_size, "score_threshold": 0.0}))
        evaluation = evaluate(folder, validation, coco=False)
        result[f"{kind}_map"] = round(evaluation.metrics.voc07_map, 4)
        result["validation_images"] = evaluation.metrics.num_images
        shutil.rmtree(folder)
    result["validation"] = validation
    result["map_points_lost"] = round(100.0 * (result["fp32_map"] - result["int8_map"]), 2)
    return result


def refusals(figures: dict, *, max_map_drop: float, min_speedup: float) -> list[str]:
    """Why an int8 graph with ``compare_int8``'s ``figures`` is not kept (empty: it is)."""
    refused = []
    if figures["map_points_lost"] > max_map_drop:
        refused.append(
            f"it loses {figures['map_points_lost']:.2f} mAP points, more than --max-map-drop {max_map_drop:g}"
        )
    if figures["speedup"] < min_speedup:
        refused.append(
            f"it is {figures['speedup']:.2f}x as fast as fp32 at batch 1, less than "
            f"--min-speedup {min_speedup:g}"
        )
    return refused
