"""``detforge predict --engine ray``: the same batch inference spread over a Ray cluster (Ray Data).

What SageMaker Batch Transform did, on an existing engine rather than a scheduler of our own. The
driver (this process) resolves the inputs as ``predict`` does and cuts them into **blocks** of
``block_size`` images in input order: a folder's paths, or a manifest's byte range (the manifest is
read once here, every line checked as ``predict`` checks it, so a bad line stops the job before any
image is read; images are never read here). Ray Data hands each block to an actor of a pool; each
actor holds one torch-free ``runtime.Predictor`` (the deploy folder's two files travel through Ray's
object store, so nodes need no copy of it) and runs ``predict.predict_stream`` on the block: images
read and decoded in the actor, the same lines written. Output, under ``out`` (a folder or prefix):

- ``part-00000.jsonl`` ... one per block, SageMaker-format lines, written atomically; the parts in
  order are exactly the file single-process ``predict`` writes;
- ``_blocks/part-00000.json``: what the block counted (images, detections, skipped images, its
  ground-truth matches as a ``DetectionAccumulator`` state), written after its part;
- ``_job.json``: the job (model sha256, settings, a digest of the block plan), written first;
- ``_SUCCESS``: written last, JSON naming the parts in order with the totals and the batch mAP.

A killed actor is restarted by Ray and its block retried; a block's part has one fixed name and is
replaced whole, and the driver keeps one summary per block, so every input is in the output once.
Rerunning the same job skips the blocks whose ``_blocks/`` summary exists (resume); another job
into the same ``out`` is refused. Reports (PDF/HTML) are drawn here, on one machine, for a sample: the
first ``report_sample`` images, their predictions read back from the parts (the model is not run again).

Needs ``pip install 'detforge[ray]'`` (``ray[data]``). Not here: the per-image work (``predict``),
the model (``runtime``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import orjson

from detforge import storage
from detforge.data.groundtruth import find_label_attribute, parse_record, resolve_source_ref
from detforge.deploy.predict import (
    ImageResult,
    InputSpec,
    PredictResult,
    Source,
    _check_truth,
    _decode,
    _report_item,
    _summary,
    check_options,
    match_truth,
    predict_stream,
    resolve_inputs,
)
from detforge.errors import ConfigError, DetforgeError, ManifestError, require
from detforge.evaluation.metrics import DetectionAccumulator

DEFAULT_BLOCK_SIZE = 256
SUCCESS_FILE = "_SUCCESS"
JOB_FILE = "_job.json"
BLOCKS_DIR = "_blocks"
JOB_FORMAT = "detforge-predict-ray/1"


@dataclass
class Block:
    """A run of consecutive input images: listed paths, or ``count`` lines of a manifest from ``offset``."""

    index: int
    refs: list[str] = field(default_factory=list)  # image paths/URIs (image and folder inputs)
    manifest: str | None = None
    offset: int = 0  # byte offset of the block's first line in the manifest
    line: int = 0  # that line's number (from 1)
    count: int = 0  # non-blank manifest lines in the block
    labeled: bool = False

    @property
    def size(self) -> int:
        return len(self.refs) if self.manifest is None else self.count


def part_name(index: int) -> str:
    """The file name of block ``index``'s predictions."""
    return f"part-{index:05d}.jsonl"


def _manifest_lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset of the line, the line without its newline), streaming."""
    with storage.open_file(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            yield number, offset, raw.rstrip(b"\r\n")
            offset += len(raw)


def _manifest_object(raw: bytes, *, path: str, line: int) -> dict:
    """One manifest line as ``predict`` reads it (same errors, same line numbers)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ManifestError(f"not valid JSON: {exc}", path=path, line=line) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("source-ref"), str) or not obj["source-ref"]:
        raise ManifestError(
            "missing or not a string",
            path=path,
            line=line,
            field="source-ref",
            hint='a manifest line is {"source-ref": "path or s3:// URI", ...}',
        )
    return obj


def plan_blocks(
    specs: Sequence[InputSpec],
    *,
    block_size: int,
    class_names: list[str],
    label_attribute: str | None = None,
    warnings: list[str] | None = None,
) -> list[Block]:
    """Cut resolved inputs into blocks of at most ``block_size`` images, in input order.

    Consecutive images and folders share blocks; a manifest's lines make blocks of their own (a byte
    range each). Every manifest line is checked here as ``predict`` checks it (JSON, ``source-ref``,
    labels, class ids against ``class_names``; class names that differ are appended to ``warnings``).
    """
    blocks: list[Block] = []
    pending: list[str] = []
    warned: set[int] = set()
    warnings = [] if warnings is None else warnings

    def flush_files() -> None:
        while pending:
            blocks.append(Block(len(blocks), refs=pending[:block_size]))
            del pending[:block_size]

    for spec in specs:
        if spec.kind != "manifest":
            pending.extend([spec.path] if spec.kind == "image" else spec.files)
            while len(pending) >= block_size:
                blocks.append(Block(len(blocks), refs=pending[:block_size]))
                del pending[:block_size]
            continue
        flush_files()
        labeled: bool | None = None
        current: Block | None = None
        for number, offset, raw in _manifest_lines(spec.path):
            if not raw.strip():
                continue
            obj = _manifest_object(raw, path=spec.path, line=number)
            if labeled is None:  # the first line tells whether the manifest carries labels (as predict)
                labeled = label_attribute is not None or find_label_attribute(obj) is not None
            if labeled:
                truth = parse_record(obj, path=spec.path, line=number, label_attribute=label_attribute)
                _check_truth(truth, class_names, warned, warnings)
            if current is None or current.count == block_size:
                current = Block(len(blocks), manifest=spec.path, offset=offset, line=number, labeled=labeled)
                blocks.append(current)
            current.count += 1
    flush_files()
    return blocks


def block_sources(block: Block, *, label_attribute: str | None = None) -> Iterator[Source]:
    """The images of one block, read where the block says (in a worker)."""
    if block.manifest is None:
        yield from (Source(ref, ref) for ref in block.refs)
        return
    path = block.manifest
    with storage.open_file(path, "rb") as handle:
        handle.seek(block.offset)
        number, left = block.line - 1, block.count
        while left:
            raw = handle.readline()
            number += 1
            if not raw:
                raise ManifestError(
                    "the manifest ended early: it changed since the job started", path=path, line=number
                )
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            left -= 1
            obj = _manifest_object(raw, path=path, line=number)
            truth = (
                parse_record(obj, path=path, line=number, label_attribute=label_attribute)
                if block.labeled
                else None
            )
            ref = obj["source-ref"]
            yield Source(ref=resolve_source_ref(ref, path), source_ref=ref, truth=truth)


def run_block(predictor, block: Block, *, out: str, settings: dict) -> dict:
    """Predict one block: write its part, then its summary (``_blocks/``); return the summary.

    A DetforgeError (``on_error="stop"`` and an unreadable image, a storage failure) is returned as
    ``{"block": i, "error": {...}}`` with nothing of the block written, for the driver to raise.
    """
    names = list(settings["class_names"])
    threshold = float(settings["threshold"])
    result = PredictResult(
        images=0,
        detections_per_class=[0] * len(names),
        skipped=[],
        seconds=0.0,
        class_names=names,
        threshold=threshold,
    )
    accumulator = DetectionAccumulator(
        len(names), iou_threshold=settings["iou_threshold"], score_threshold=threshold
    )
    started = time.perf_counter()
    name = part_name(block.index)
    try:
        with storage.atomic_writer(storage.join(out, name), "wb") as writer:
            sources = block_sources(block, label_attribute=settings["label_attribute"])
            predict_stream(
                predictor,
                sources,
                writer,
                result=result,
                accumulator=accumulator,
                warned=set(),
                batch_size=settings["batch_size"],
                on_error=settings["on_error"],
                iou_threshold=settings["iou_threshold"],
                decode_workers=settings["decode_workers"],
            )
    except DetforgeError as exc:
        return {"block": block.index, "error": _error_record(exc)}
    summary = {
        "block": block.index,
        "part": name,
        "images": result.images,
        "detections_per_class": result.detections_per_class,
        "skipped": [list(item) for item in result.skipped],
        "images_with_truth": result.images_with_truth,
        "accumulator": accumulator.state_dict() if result.images_with_truth else None,
        "seconds": round(time.perf_counter() - started, 3),
        "worker": f"{os.uname().nodename}:{os.getpid()}",
    }
    data = orjson.dumps(summary, option=orjson.OPT_SERIALIZE_NUMPY)
    storage.write_bytes(storage.join(out, BLOCKS_DIR, f"part-{block.index:05d}.json"), data)
    return orjson.loads(data)


class BlockWorker:
    """A Ray Data actor: one ``Predictor`` for the actor's life (loaded from the deploy folder's files
    written to a temporary folder, removed once loaded), then whole blocks (one per call)."""

    def __init__(self, *, model_files: dict[str, bytes], settings: dict, out: str) -> None:
        from detforge.runtime import Predictor

        if os.path.isdir(settings["cwd"]):  # relative paths of the job are relative to the driver's folder
            os.chdir(settings["cwd"])
        self.settings = settings
        self.out = out
        self.error: dict | None = None  # a model that cannot be loaded: said for every block, not retried
        folder = tempfile.mkdtemp(prefix="detforge-deploy-")
        try:
            for name, data in model_files.items():
                with open(os.path.join(folder, name), "wb") as handle:
                    handle.write(data)
            # the session holds the model once loaded: the files are not needed after this
            self.predictor = Predictor(folder, threads=settings["threads"], providers=settings["providers"])
        except DetforgeError as exc:
            self.error = _error_record(exc, model=True)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:
            summaries = [
                {"block": int(orjson.loads(task)["index"]), "error": self.error} for task in batch["task"]
            ]
        else:
            summaries = [
                run_block(self.predictor, Block(**orjson.loads(task)), out=self.out, settings=self.settings)
                for task in batch["task"]
            ]
        return {
            "block": np.array([s["block"] for s in summaries], dtype=np.int64),
            "summary": np.array([orjson.dumps(s).decode() for s in summaries], dtype=object),
        }


def _error_record(exc: DetforgeError, *, model: bool = False) -> dict:
    """A worker's DetforgeError as plain data for the driver (``model``: about the model's own files)."""
    return {
        "type": type(exc).__name__,
        "message": exc.message,
        "path": exc.path,
        "line": exc.line,
        "field": exc.field,
        "hint": exc.hint,
        "model": model,
    }


def _raise(error: dict, *, model_path: str | None = None) -> None:
    from detforge import errors
    from detforge.images import ImageError

    kind = ImageError if error["type"] == "ImageError" else getattr(errors, error["type"], DetforgeError)
    if not (isinstance(kind, type) and issubclass(kind, DetforgeError)):
        kind = DetforgeError
    path = model_path if error.get("model") and model_path else error["path"]  # not the worker's copy
    raise kind(error["message"], path=path, line=error["line"], field=error["field"], hint=error["hint"])


def _job_failed(exc: Exception, *, out: str) -> DetforgeError:
    """A DetforgeError for a Ray job that failed: the workers' own DetforgeError when one is in the chain
    (a model that cannot be loaded ...), else the last line of Ray's report (the exception at its root)."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DetforgeError):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    root = next(
        (line for line in reversed(lines) if "Error" in line.split(":")[0]),
        lines[-1] if lines else type(exc).__name__,
    )
    return DetforgeError(
        f"the Ray job failed: {root}",
        path=out,
        hint="every node needs this detforge with detforge[ray] (and [s3] for s3://); the "
        "workers' logs are in /tmp/ray/session_latest/logs; blocks already written "
        "are kept: rerun to resume",
    )


def _job_record(
    *, model_sha256: str, inputs: Sequence[str], blocks: list[Block], settings: dict, block_size: int
) -> dict:
    plan = hashlib.sha256()
    for block in blocks:
        plan.update(orjson.dumps(asdict(block)) + b"\n")
    return {
        "format": JOB_FORMAT,
        "model_sha256": model_sha256,
        "inputs": [os.fspath(i) for i in inputs],
        "threshold": settings["threshold"],
        "iou_threshold": settings["iou_threshold"],
        "label_attribute": settings["label_attribute"],
        "batch_size": settings["batch_size"],
        "block_size": block_size,
        "blocks": len(blocks),
        "plan_sha256": plan.hexdigest(),
    }


def _resume(out: str, job: dict) -> dict[int, dict]:
    """The summaries of blocks a previous run of the same job wrote; starts the job record when new."""
    job_path = storage.join(out, JOB_FILE)
    if not storage.is_remote(out) and os.path.isfile(out):
        raise ConfigError(
            "with --engine ray, --out is a folder (or s3:// prefix) for the part files; this is a file",
            path=out,
        )
    if storage.exists(job_path):
        previous = orjson.loads(storage.read_bytes(job_path))
        if previous != job:
            changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
            raise ConfigError(
                f"this folder holds the output of another job (it differs in: {', '.join(changed)})",
                path=out,
                hint="write to another --out, or delete this one to start over",
            )
        done: dict[int, dict] = {}
        folder = storage.join(out, BLOCKS_DIR)
        if storage.exists(folder):
            for path in storage.list_files(folder, suffixes=(".json",), recursive=False):
                summary = orjson.loads(storage.read_bytes(path))
                if 0 <= summary["block"] < job["blocks"]:
                    done[int(summary["block"])] = summary
        return done
    if storage.exists(out) and any(
        storage.basename(p).startswith("part-")
        for p in storage.list_files(out, suffixes=(".jsonl",), recursive=False)
    ):
        raise ConfigError(
            "this folder holds part files but no _job.json: not a detforge ray job's output",
            path=out,
            hint="write to another --out",
        )
    storage.write_bytes(job_path, orjson.dumps(job, option=orjson.OPT_INDENT_2))
    return {}


def _remove_leftovers(out: str) -> None:
    """Delete the temporary files of parts whose worker was killed while writing them (local ``out`` only:
    on object stores a part is staged on the worker and sent whole)."""
    if storage.is_remote(out):
        return
    for folder in (out, os.path.join(out, BLOCKS_DIR)):
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith(".detforge-") and name.endswith(".part"):
                os.unlink(os.path.join(folder, name))


def _connect(ray, *, address: str | None) -> bool:
    """Connect to Ray (``address``: "auto", "ray://..." or host:port), or start a local instance for this
    run when none is given. True when this call started it (then the caller shuts it down)."""
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, configure_logging=False)
        except ConnectionError as exc:  # after Ray's own retries
            raise ConfigError(
                f"cannot connect to the Ray cluster at {address}: {exc}",
                field="address",
                hint="check the address (`ray status` on a node prints it) and Ray's token "
                "(RAY_AUTH_TOKEN) where the cluster uses token authentication",
            ) from None
        return False
    start_on_loopback(ray)
    return True


def start_on_loopback(ray, **settings) -> None:
    """Start a new local Ray instance (never a stale cluster's address) whose servers listen on 127.0.0.1.

    ``_node_ip_address="127.0.0.1"`` alone is not enough: Ray (2.60) turns a loopback node address into the
    machine's primary IP (``services.resolve_ip_for_localhost``) unless its ``ENABLE_RAY_CLUSTER``
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``) is off, which this sets for the start only. Without it the GCS,
    raylet and object manager of a one-machine job were reachable from the network. A warning names the
    address should a Ray version still pick another.
    """
    import logging

    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(
            address="local",
            include_dashboard=False,
            configure_logging=False,
            _node_ip_address="127.0.0.1",
            **settings,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    address = ray.util.get_node_ip_address()
    if address != "127.0.0.1":
        logging.getLogger("detforge.predict").warning(
            "the local Ray instance listens on %s, not only on loopback", address
        )


def sample_reports(
    blocks: Sequence[Block],
    out: str,
    *,
    summaries: dict[int, dict],
    settings: dict,
    metadata: dict,
    sample: int,
    report: str | None = None,
    html: str | None = None,
) -> int:
    """The PDF and/or HTML report of the first ``sample`` images of a finished job, in input order.

    Predictions are read back from the parts and matched to the block's images again (an image missing
    from a part was skipped); only the sample's images are read and decoded, here. The report's
    counts, mAP and skipped images are those of the sample. Returns the images in it.
    """
    from detforge.deploy.report import HtmlReport
    from detforge.deploy.report.pdf import PdfReport

    names = list(settings["class_names"])
    threshold = float(settings["threshold"])
    part = PredictResult(
        images=0,
        detections_per_class=[0] * len(names),
        skipped=[],
        seconds=0.0,
        class_names=names,
        threshold=threshold,
    )
    accumulator = DetectionAccumulator(
        len(names), iou_threshold=settings["iou_threshold"], score_threshold=threshold
    )
    with contextlib.ExitStack() as stack:
        targets = []
        title = f"detforge predict --engine ray: {metadata.get('name') or 'model'}, first {sample} images"
        if report is not None:
            targets.append(stack.enter_context(PdfReport(report, class_names=names, title=title)))
        if html is not None:
            page = stack.enter_context(HtmlReport(html, class_names=names))
            targets.append(page)
        cut = False  # the job has more images than the sample: the HTML title says so
        for block in blocks:
            if part.images + len(part.skipped) >= sample:
                cut = True
                break
            reasons = list(summaries[block.index]["skipped"])
            path = storage.join(out, part_name(block.index))
            lines = (orjson.loads(raw) for _, raw in storage.iter_lines(path) if raw.strip())
            line = next(lines, None)
            for source in block_sources(block, label_attribute=settings["label_attribute"]):
                if part.images + len(part.skipped) >= sample:
                    cut = True
                    break
                if line is None or line["source-ref"] != source.source_ref:  # skipped by the worker
                    reason = next((r for n, r in reasons if n == source.source_ref), "skipped")
                    part.skipped.append((source.source_ref, reason))
                    continue
                decoded = _decode(source, True)
                if isinstance(decoded, DetforgeError):
                    raise decoded
                rows = line["prediction"]
                outcome = ImageResult(source, int(line["width"]), int(line["height"]), rows)
                for row in rows:
                    part.detections_per_class[int(row[0])] += 1
                if source.truth is not None:
                    pixels, scores, classes, outcome.is_tp, outcome.missed = match_truth(
                        source.truth, rows, iou_threshold=settings["iou_threshold"]
                    )
                    accumulator.update(
                        gt_boxes=source.truth.boxes,
                        gt_classes=source.truth.class_ids,
                        pred_boxes=pixels,
                        pred_scores=scores,
                        pred_classes=classes,
                        image_id=source.source_ref,
                        gt_difficult=source.truth.difficult,
                    )
                    part.images_with_truth += 1
                item = _report_item(outcome, decoded[1])
                for target in targets:
                    target.add(item)
                part.images += 1
                line = next(lines, None)
        if part.images_with_truth:
            part.metrics = accumulator.compute()
        summary = _summary(part, SimpleNamespace(metadata=metadata))
        if html is not None and cut:
            page.title = title
        for target in targets:
            target.finish(summary)
    return part.images


def predict_ray(
    deploy: str,
    inputs: Sequence[str],
    *,
    out: str,
    threshold: float | None = None,
    batch_size: int = 8,
    block_size: int = DEFAULT_BLOCK_SIZE,
    workers: int | None = None,
    address: str | None = None,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    on_error: str = "skip",
    iou_threshold: float = 0.5,
    label_attribute: str | None = None,
    decode_workers: int = 2,
    report: str | None = None,
    html: str | None = None,
    report_sample: int = 200,
    progress: Callable[[int, int], None] | None = None,
) -> PredictResult:
    """``predict`` over Ray Data: one part file per block under ``out``, then ``_SUCCESS`` naming them.

    ``workers``: actors in the pool (default: as many as the cluster's CPUs hold, each taking ``threads``
    CPUs, default 1). ``address``: an existing Ray cluster ("auto" on one of its nodes); without it a
    local instance is started for this call (or the one this process already runs is used).
    ``progress(done, total)`` is called as blocks finish. ``report``/``html``: a PDF/HTML report of the
    first ``report_sample`` images (``sample_reports``). The result counts every block of the job, those
    written by an earlier run of it included; ``files`` are the parts in order, ``_SUCCESS``, the reports.
    """
    ray = require("ray", "ray")
    require("ray.data", "ray")
    from detforge.runtime import METADATA_FILE, MODEL_FILE, local_deploy, read_metadata

    check_options(on_error=on_error, batch_size=batch_size, threshold=threshold, iou_threshold=iou_threshold)
    if int(block_size) < 1:
        raise ConfigError(f"block size must be at least 1, got {block_size}", field="block-size")
    if workers is not None and int(workers) < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}", field="workers")
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}", field="threads")
    if int(report_sample) < 1:
        raise ConfigError(
            f"the report sample must be at least 1 image, got {report_sample}", field="report-sample"
        )
    deploy = os.fspath(deploy)
    if deploy.endswith(MODEL_FILE):
        deploy = os.path.dirname(deploy) or "."
    metadata = read_metadata(deploy)
    deploy = local_deploy(deploy)
    model_path = os.path.join(deploy, MODEL_FILE)
    if not os.path.exists(model_path):
        from detforge.errors import ModelError

        raise ModelError("missing model.onnx", path=deploy)
    model_files = {
        MODEL_FILE: storage.read_bytes(model_path),
        METADATA_FILE: storage.read_bytes(os.path.join(deploy, METADATA_FILE)),
    }
    names = [str(c) for c in metadata["classes"]]
    threshold = float(metadata.get("default_threshold", 0.3) if threshold is None else threshold)
    out = os.fspath(out)
    specs = resolve_inputs(inputs)
    total = sum(spec.count for spec in specs)
    result = PredictResult(
        images=0,
        detections_per_class=[0] * len(names),
        skipped=[],
        seconds=0.0,
        class_names=names,
        threshold=threshold,
    )
    blocks = plan_blocks(
        specs,
        block_size=int(block_size),
        class_names=names,
        label_attribute=label_attribute,
        warnings=result.warnings,
    )
    cpus = int(threads or 1)
    settings = {
        "class_names": names,
        "threshold": threshold,
        "iou_threshold": float(iou_threshold),
        "label_attribute": label_attribute,
        "batch_size": int(batch_size),
        "on_error": on_error,
        "decode_workers": int(decode_workers),
        "threads": cpus,
        "providers": list(providers) if providers else None,
        "cwd": os.getcwd(),
    }
    job = _job_record(
        model_sha256=hashlib.sha256(model_files[MODEL_FILE]).hexdigest(),
        inputs=inputs,
        blocks=blocks,
        settings=settings,
        block_size=int(block_size),
    )
    started = time.perf_counter()
    done = _resume(out, job)
    todo = [block for block in blocks if block.index not in done]
    finished = sum(blocks[i].size for i in done)
    if progress is not None:
        progress(finished, total)
    if todo:
        started_here = _connect(ray, address=address)
        try:
            cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
            capacity = cluster_cpus // cpus
            if started_here and workers and int(workers) > capacity:  # a cluster may grow; this machine won't
                raise ConfigError(
                    f"{workers} workers of {cpus} CPU each do not fit the {cluster_cpus} CPUs "
                    "of this machine's Ray instance",
                    field="workers",
                    hint="fewer --workers or --threads, or --address of a cluster",
                )
            if workers:
                pool = ray.data.ActorPoolStrategy(size=int(workers))
            else:
                pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, capacity))
            # one Ray Data block per detforge block: a retry redoes exactly one part
            dataset = ray.data.from_items(
                [{"block": b.index, "task": orjson.dumps(asdict(b)).decode()} for b in todo],
                override_num_blocks=len(todo),
            )
            dataset = dataset.map_batches(
                BlockWorker,
                batch_size=1,
                compute=pool,
                num_cpus=cpus,
                batch_format="numpy",
                fn_constructor_kwargs={"model_files": model_files, "settings": settings, "out": out},
            )
            try:
                for row in dataset.iter_rows():
                    summary = orjson.loads(row["summary"])
                    if "error" in summary:
                        _raise(summary["error"], model_path=model_path)
                    if summary["block"] not in done:
                        done[summary["block"]] = summary
                        finished += blocks[summary["block"]].size
                        if progress is not None:
                            progress(finished, total)
            except DetforgeError:
                raise
            except Exception as exc:  # Ray's own errors: say what failed in one line, keep the chain
                if type(exc).__module__.split(".")[0] != "ray":
                    raise
                raise _job_failed(exc, out=out) from exc
        finally:
            if started_here:
                ray.shutdown()
    missing = [b.index for b in blocks if b.index not in done]
    if missing:  # Ray Data returned without them: never expected, never hidden
        raise DetforgeError(
            f"{len(missing)} blocks came back without a result (first: {missing[0]})",
            path=out,
            hint="rerun the same command: finished blocks are kept",
        )
    accumulator = DetectionAccumulator(
        len(names), iou_threshold=float(iou_threshold), score_threshold=threshold
    )
    for block in blocks:  # in input order: totals, skipped images and the mAP as one process gets them
        summary = done[block.index]
        result.images += summary["images"]
        result.detections_per_class = [
            a + b for a, b in zip(result.detections_per_class, summary["detections_per_class"], strict=True)
        ]
        result.skipped.extend((name, reason) for name, reason in summary["skipped"])
        result.images_with_truth += summary["images_with_truth"]
        if summary["accumulator"] is not None:
            accumulator.merge(DetectionAccumulator.from_state_dict(summary["accumulator"]))
    if result.images_with_truth:
        result.metrics = accumulator.compute()
    result.seconds = time.perf_counter() - started
    parts = [part_name(block.index) for block in blocks]
    success = {
        "format": JOB_FORMAT,
        "parts": parts,
        "images": result.images,
        "detections_per_class": dict(zip(names, result.detections_per_class, strict=True)),
        "threshold": threshold,
        "skipped": [list(item) for item in result.skipped],
        "images_with_truth": result.images_with_truth,
        "warnings": result.warnings,
    }
    if result.metrics is not None:
        m = result.metrics
        success["metrics"] = {
            "voc07_map": m.voc07_map,
            "all_point_map": m.all_point_map,
            "iou_threshold": m.iou_threshold,
            "precision": m.precision,
            "recall": m.recall,
            "tp": m.tp,
            "fp": m.fp,
            "fn": m.fn,
        }
    storage.write_bytes(storage.join(out, SUCCESS_FILE), orjson.dumps(success, option=orjson.OPT_INDENT_2))
    _remove_leftovers(out)
    result.files = [storage.join(out, name) for name in parts] + [storage.join(out, SUCCESS_FILE)]
    if report is not None or html is not None:
        sample_reports(
            blocks,
            out,
            summaries=done,
            settings=settings,
            metadata=metadata,
            sample=int(report_sample),
            report=report,
            html=html,
        )
        result.files += [path for path in (report, html) if path is not None]
    return result
