"""Offline augmentation: flipped and rotated copies of a manifest's images with exactly moved boxes.

``augment(manifest, ops=("xflip", "yflip", "cw", "ccw"), out_dir=DIR)`` writes, for every image and op,
``DIR/images/<stem><suffix><ext>`` (suffixes as in the blog: ``-x-flip``, ``-y-flip``, ``-cw-rotate``,
``-ccw-rotate``, and ``-rot180``) and the manifests ``DIR/augmented.manifest`` (each original line followed
by its copies) and ``DIR/<op>.manifest`` (the copies of one op). A copy's line keeps every field of the
original, gets its own ``source-ref`` and ``image_size`` (width and height swap for 90° turns), boxes moved
with ``detforge.boxes``, and ``"detforge-augment": {"op": ..., "from": <original source-ref>}``.

- Images are read from each line's ``source-ref`` (local path or any fsspec URL such as ``s3://``); a
  relative ``source-ref`` is resolved against the manifest's folder. Originals with a relative reference
  are written to the output manifest with the resolved one, so that it works from its new folder.
- JPEGs are turned without re-encoding (libjpeg-turbo's lossless transform, through ``ctypes`` on
  ``libturbojpeg``) when the image's size is a whole number of MCUs for that op (8 or 16 px, depending
  on the chroma subsampling); otherwise JPEGs are re-encoded at quality 95 from their decoded Y/Cb/Cr
  planes (no colour conversion, subsampling kept), or through Pillow (odd sizes, ICC profiles, other
  formats). An image is decoded once for all its ops; its ops are encoded and written in threads.
- The output is written whole (``data.output``): into ``.DIR.partial`` beside ``DIR``, renamed to ``DIR``
  when every image and manifest is there. An interrupted run leaves its complete images in
  ``.DIR.partial`` and the next run resumes from them (skipping those with the expected size, read by
  ``images.probe``); each file is written atomically, so none is ever half there. An existing non-empty
  ``DIR`` is refused unless ``overwrite``, which starts afresh and replaces it whole. On S3 the files are
  staged locally and uploaded once complete (an interrupted S3 run starts again from nothing).
- A manifest named like ``*validation*`` or with lines marked ``"split": "validation"`` is refused unless
  ``force=True``.

Not here: online (training-time) augmentation, see ``detforge.training.transforms``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import io
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from detforge import boxes as box_ops
from detforge import images, storage
from detforge.data.groundtruth import Record, dumps_line, read_manifest, record_to_json, resolve_source_ref
from detforge.data.output import check_free, whole_output
from detforge.errors import ConfigError, ManifestError, StorageError

PROVENANCE_KEY = "detforge-augment"
JPEG_QUALITY = 95
_JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Op:
    """One offline augmentation: its name, file-name suffix, box function and image transposition."""

    name: str
    suffix: str
    swaps_size: bool
    pil_transpose: int  # PIL.Image.Transpose value
    tjxop: int  # libjpeg-turbo TJXOP_* code
    boxes: Callable[[np.ndarray, int, int], np.ndarray]  # (xyxy, width, height) -> xyxy


# PIL.Image.Transpose values (ROTATE_90 turns counter-clockwise), kept as ints to import PIL lazily.
_FLIP_LEFT_RIGHT, _FLIP_TOP_BOTTOM, _ROTATE_90, _ROTATE_180, _ROTATE_270 = 0, 1, 2, 3, 4
# libjpeg-turbo TJXOP_* codes (TJXOP_ROT90 turns clockwise).
_TJXOP_HFLIP, _TJXOP_VFLIP, _TJXOP_ROT90, _TJXOP_ROT180, _TJXOP_ROT270 = 1, 2, 5, 6, 7

OPS: dict[str, Op] = {
    "xflip": Op(
        "xflip",
        "-x-flip",
        False,
        _FLIP_LEFT_RIGHT,
        _TJXOP_HFLIP,
        lambda b, w, h: box_ops.flip_x_xyxy(b, width=w),
    ),
    "yflip": Op(
        "yflip",
        "-y-flip",
        False,
        _FLIP_TOP_BOTTOM,
        _TJXOP_VFLIP,
        lambda b, w, h: box_ops.flip_y_xyxy(b, height=h),
    ),
    "cw": Op(
        "cw",
        "-cw-rotate",
        True,
        _ROTATE_270,
        _TJXOP_ROT90,
        lambda b, w, h: box_ops.rotate_cw_xyxy(b, height=h),
    ),
    "ccw": Op(
        "ccw",
        "-ccw-rotate",
        True,
        _ROTATE_90,
        _TJXOP_ROT270,
        lambda b, w, h: box_ops.rotate_ccw_xyxy(b, width=w),
    ),
    "rot180": Op(
        "rot180",
        "-rot180",
        False,
        _ROTATE_180,
        _TJXOP_ROT180,
        lambda b, w, h: box_ops.rotate_180_xyxy(b, width=w, height=h),
    ),
}
DEFAULT_OPS = ("xflip", "yflip", "cw", "ccw")


def parse_ops(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"xflip,cw"`` (or a list) to a tuple of known op names, duplicates removed; ConfigError otherwise."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise ConfigError("no ops given", field="--ops", hint=f"choose from {', '.join(OPS)}")
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ConfigError(
            f"unknown op(s) {', '.join(unknown)}", field="--ops", hint=f"choose from {', '.join(OPS)}"
        )
    return tuple(dict.fromkeys(names))


def augment_record(record: Record, op: str, *, source_ref: str) -> Record:
    """The record of the op's copy of an image stored at ``source_ref`` (boxes, size, provenance)."""
    spec = OPS[op]
    width, height = (record.height, record.width) if spec.swaps_size else (record.width, record.height)
    fields = dict(record.fields)
    fields[PROVENANCE_KEY] = {"op": op, "from": record.source_ref}
    fields["source-ref"] = source_ref
    return record.replace(
        source_ref=source_ref,
        width=width,
        height=height,
        boxes=spec.boxes(record.boxes, record.width, record.height),
        fields=fields,
    )


# ---------------------------------------------------------------- JPEG, lossless (libturbojpeg via ctypes)

# MCU size in pixels per TJSAMP_* value (444, 422, 420, GRAY, 440, 411, 441).
_MCU = {0: (8, 8), 1: (16, 8), 2: (16, 16), 3: (8, 8), 4: (8, 16), 5: (32, 8), 6: (8, 32)}
_TJXOPT_PERFECT = 1


class _TJRegion(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _TJTransform(ctypes.Structure):
    _fields_ = [
        ("r", _TJRegion),
        ("op", ctypes.c_int),
        ("options", ctypes.c_int),
        ("data", ctypes.c_void_p),
        ("customFilter", ctypes.c_void_p),
    ]


_LIB: list = []  # [library or None], loaded once per process


def _turbojpeg():
    """libturbojpeg (the TurboJPEG 2.x API, also kept by 3.x), or None when it is not installed."""
    if not _LIB:
        lib = None
        for name in (
            ctypes.util.find_library("turbojpeg"),
            "libturbojpeg.so.0",
            "/usr/lib/x86_64-linux-gnu/libturbojpeg.so.0",
            "libturbojpeg.dylib",
        ):
            if not name:
                continue
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is not None:
            lib.tjInitTransform.restype = ctypes.c_void_p
            lib.tjDestroy.argtypes = [ctypes.c_void_p]
            lib.tjFree.argtypes = [ctypes.c_void_p]
            lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong] + [
                ctypes.POINTER(ctypes.c_int)
            ] * 4
            lib.tjInitDecompress.restype = ctypes.c_void_p
            lib.tjInitCompress.restype = ctypes.c_void_p
            lib.tjPlaneWidth.argtypes = lib.tjPlaneHeight.argtypes = [ctypes.c_int] * 3
            lib.tjDecompressToYUVPlanes.argtypes = [
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_ulong,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_int,
            ]
            lib.tjCompressFromYUVPlanes.argtypes = [
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_ulong),
                ctypes.c_int,
                ctypes.c_int,
            ]
            lib.tjTransform.argtypes = [
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_ulong,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_ulong),
                ctypes.POINTER(_TJTransform),
                ctypes.c_int,
            ]
            lib.tjDestroy.restype = ctypes.c_int
        _LIB.append(lib)
    return _LIB[0]


def _header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, TJSAMP_*) of a JPEG, or None (not a JPEG, or no libturbojpeg)."""
    lib = _turbojpeg()
    if lib is None:
        return None
    handle = lib.tjInitTransform()
    try:
        w, h, samp, cs = (ctypes.c_int() for _ in range(4))
        if (
            lib.tjDecompressHeader3(
                handle,
                data,
                len(data),
                ctypes.byref(w),
                ctypes.byref(h),
                ctypes.byref(samp),
                ctypes.byref(cs),
            )
            != 0
        ):
            return None
    finally:
        lib.tjDestroy(handle)
    return w.value, h.value, samp.value


def lossless_possible(data: bytes, op: str) -> bool:
    """Whether the JPEG ``data`` can be turned by ``op`` without re-encoding and without trimming edges."""
    header = _header(data)
    if header is None or header[2] not in _MCU:
        return False
    width, height, samp = header
    mcu_w, mcu_h = _MCU[samp]
    # A flip moves the partial MCUs of one edge to the other side; 90° and 180° turns do it on both axes.
    need_x = op in ("xflip", "cw", "ccw", "rot180")
    need_y = op in ("yflip", "cw", "ccw", "rot180")
    return not (need_x and width % mcu_w) and not (need_y and height % mcu_h)


def jpeg_transform_lossless_many(data: bytes, ops) -> dict[str, bytes]:
    """The JPEG turned by each op that allows it, in the DCT domain (no generation loss), in one pass."""
    ops = [op for op in ops if lossless_possible(data, op)]
    if not ops:
        return {}
    lib = _turbojpeg()
    handle = lib.tjInitTransform()
    n = len(ops)
    bufs = (ctypes.c_void_p * n)()
    sizes = (ctypes.c_ulong * n)()
    xforms = (_TJTransform * n)(
        *[_TJTransform(_TJRegion(0, 0, 0, 0), OPS[op].tjxop, _TJXOPT_PERFECT, None, None) for op in ops]
    )
    try:
        if lib.tjTransform(handle, data, len(data), n, bufs, sizes, xforms, 0) != 0:
            return {}
        return {op: ctypes.string_at(bufs[i], sizes[i]) for i, op in enumerate(ops)}
    finally:
        for buf in bufs:
            if buf:
                lib.tjFree(buf)
        lib.tjDestroy(handle)


def jpeg_transform_lossless(data: bytes, op: str) -> bytes | None:
    """The JPEG turned by ``op`` in the DCT domain (no generation loss), or None where that is impossible."""
    return jpeg_transform_lossless_many(data, [op]).get(op)


# ---------------------------------------------------------------- JPEG, re-encoded in YUV (libturbojpeg)

# Chroma subsampling factors per TJSAMP_* this path handles, and what a 90° turn makes of it.
_SUBSAMPLING = {0: (1, 1), 1: (2, 1), 2: (2, 2), 3: (1, 1), 4: (1, 2)}
_TURNED = {0: 0, 1: 4, 2: 2, 3: 3, 4: 1}


def _decode_yuv(data: bytes) -> tuple[list[np.ndarray], int] | None:
    """The JPEG's Y, Cb, Cr planes (Y only for gray) as decoded samples, before colour conversion.

    None when the chroma planes would not mirror exactly (odd sizes), or the file carries an ICC profile.
    """
    header = _header(data)
    if header is None or header[2] not in _SUBSAMPLING or b"ICC_PROFILE" in data[:65536]:
        return None
    width, height, samp = header
    sx, sy = _SUBSAMPLING[samp]
    if width % sx or height % sy:
        return None
    lib = _turbojpeg()
    count = 1 if samp == 3 else 3
    planes = [
        np.empty((lib.tjPlaneHeight(i, height, samp), lib.tjPlaneWidth(i, width, samp)), np.uint8)
        for i in range(count)
    ]
    pointers = (ctypes.c_void_p * 3)(*[p.ctypes.data for p in planes], *([None] * (3 - count)))
    handle = lib.tjInitDecompress()
    try:
        if lib.tjDecompressToYUVPlanes(handle, data, len(data), pointers, width, None, height, 0) != 0:
            return None
    finally:
        lib.tjDestroy(handle)
    return planes, samp


_PLANE_OP = {
    "xflip": lambda a: a[:, ::-1],
    "yflip": lambda a: a[::-1],
    "cw": lambda a: np.rot90(a, -1),
    "ccw": lambda a: np.rot90(a, 1),
    "rot180": lambda a: a[::-1, ::-1],
}


def _encode_yuv(planes: list[np.ndarray], samp: int, op: str) -> bytes | None:
    """Turn decoded planes by ``op`` and compress them at JPEG_QUALITY, keeping the subsampling."""
    lib = _turbojpeg()
    turned = [np.ascontiguousarray(_PLANE_OP[op](p)) for p in planes]
    if OPS[op].swaps_size:
        samp = _TURNED[samp]
    height, width = turned[0].shape
    pointers = (ctypes.c_void_p * 3)(*[p.ctypes.data for p in turned], *([None] * (3 - len(turned))))
    out_buf = ctypes.c_void_p()
    out_size = ctypes.c_ulong(0)
    handle = lib.tjInitCompress()
    try:
        if (
            lib.tjCompressFromYUVPlanes(
                handle,
                pointers,
                width,
                None,
                height,
                samp,
                ctypes.byref(out_buf),
                ctypes.byref(out_size),
                JPEG_QUALITY,
                0,
            )
            != 0
        ):
            return None
        return ctypes.string_at(out_buf.value, out_size.value)
    finally:
        if out_buf.value:
            lib.tjFree(out_buf)
        lib.tjDestroy(handle)


# ---------------------------------------------------------------- images


def transform_image_bytes(
    data: bytes, op: str, *, suffix: str, cache: dict | None = None
) -> tuple[bytes, bool]:
    """The image file ``data`` turned by ``op``, encoded like ``suffix``; and whether it was lossless.

    JPEG: lossless where the MCUs allow, else re-encoded from the decoded YUV planes (no colour
    conversion, the chroma subsampling kept), else through Pillow. ``cache`` (an empty dict shared by
    the calls for one image) keeps the decoded image between ops.
    """
    jpeg = suffix.lower() in _JPEG_SUFFIXES
    cache = {} if cache is None else cache
    if jpeg:
        lossless = jpeg_transform_lossless(data, op)
        if lossless is not None:
            return lossless, True
        if "yuv" not in cache:
            cache["yuv"] = _decode_yuv(data)
        if cache["yuv"] is not None:
            out = _encode_yuv(*cache["yuv"], op)
            if out is not None:
                return out, False
    from PIL import Image, JpegImagePlugin

    if "image" not in cache:
        image = Image.open(io.BytesIO(data))  # in memory: nothing to close
        image.load()
        cache["format"] = image.format
        cache["sampling"] = JpegImagePlugin.get_sampling(image) if image.format == "JPEG" else -1
        cache["icc_profile"] = image.info.get("icc_profile")
        cache["image"] = image
    image = cache["image"]
    kwargs: dict = {}
    fmt = "JPEG" if jpeg else (cache["format"] or "PNG")
    if jpeg:
        sampling = cache["sampling"]
        # 4:2:2 halves the horizontal chroma only; after a 90° turn that would be the wrong axis.
        if sampling == 1 and OPS[op].swaps_size:
            sampling = 0
        kwargs = {"quality": JPEG_QUALITY, "subsampling": sampling if sampling in (0, 1, 2) else 2}
    if cache["icc_profile"]:
        kwargs["icc_profile"] = cache["icc_profile"]
    turned = image.transpose(Image.Transpose(OPS[op].pil_transpose))
    if fmt == "JPEG" and turned.mode not in ("RGB", "L", "CMYK"):
        turned = turned.convert("RGB")
    buffer = io.BytesIO()
    turned.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue(), False


def image_size(uri: str) -> tuple[int, int] | None:
    """Upright (width, height) from an image file's header (``images.probe``, the one size reader), or
    None when it is missing or unreadable."""
    if not storage.is_remote(uri) and not os.path.exists(uri):
        return None
    try:
        return images.probe(uri)
    except (images.ImageError, StorageError):
        return None


# ---------------------------------------------------------------- the run


@dataclass
class _Task:
    source: str  # resolved source reference
    origin: str
    width: int
    height: int
    outputs: list[tuple[str, str, int, int]]  # (op, uri, width, height)


@dataclass
class AugmentResult:
    """What ``augment`` did: counts and the files it wrote."""

    images: int = 0
    written: int = 0
    skipped: int = 0
    lossless: int = 0
    reencoded: int = 0
    manifest: str = ""
    op_manifests: dict[str, str] = field(default_factory=dict)


def _resolve(ref: str, manifest: str) -> str:
    """The image of a line by the one rule (``groundtruth.resolve_source_ref``), local paths made absolute."""
    found = resolve_source_ref(ref, manifest)
    return found if storage.is_remote(found) else os.path.abspath(found)


def _check_manifest(path: str, label_attribute: str | None, *, force: bool) -> int:
    """One streaming pass before any work: validation marks, clashing image names; returns the line count."""
    if not force and "validation" in storage.basename(path).lower():
        raise ConfigError(
            "refusing to augment validation data: the manifest's name says validation",
            path=path,
            hint="augment only training data; pass --force if this really is training data",
        )
    seen: dict[str, str] = {}
    count = 0
    for record in read_manifest(path, label_attribute=label_attribute):
        count += 1
        line = int(record.origin.rsplit(":", 1)[1])
        for key in ("split", "detforge-split"):
            if not force and str(record.fields.get(key, "")).lower() in ("validation", "val"):
                raise ConfigError(
                    f"refusing to augment validation data: the line is marked "
                    f'"{key}": "{record.fields[key]}"',
                    path=path,
                    line=line,
                    hint="augment only training data; pass --force to do it anyway",
                )
        name = storage.basename(record.source_ref)
        if name in seen:
            raise ManifestError(
                f"two lines refer to images named {name} (the other is {seen[name]}); their "
                "copies would overwrite each other",
                path=path,
                line=line,
                field="source-ref",
            )
        seen[name] = record.origin
    return count


def _run_task(task: _Task, overwrite: bool) -> tuple[str, list[str]]:
    """Write the missing outputs of one image; returns (origin, one status per output)."""
    needed = [
        (op, uri)
        for op, uri, width, height in task.outputs
        if overwrite or image_size(uri) != (width, height)
    ]
    statuses = dict.fromkeys((op for op, *_ in task.outputs), "skipped")
    if needed:
        data = images.read_bytes(task.source)
        if images.orientation(data) != 1:
            # a phone photo stored sideways: its boxes are upright, so its pixels must be too (re-encoded)
            data = images.encode(images.decode_pil(data, name=task.source), task.source)
        size = _decoded_size(data)
        if size != (task.width, task.height):
            path, line = task.origin.rsplit(":", 1)
            raise ManifestError(
                f"the image {task.source} is {size[0]}x{size[1]} but the line says "
                f"{task.width}x{task.height}",
                path=path,
                line=int(line),
                field="image_size",
            )
        suffix = os.path.splitext(storage.basename(task.source))[1] or ".jpg"
        # All lossless turns of one JPEG in one pass over its coefficients.
        lossless = (
            jpeg_transform_lossless_many(data, [op for op, _ in needed])
            if suffix.lower() in _JPEG_SUFFIXES
            else {}
        )
        # A re-encoded op goes first, here: it decodes the image into the cache the others share. The
        # rest run in threads (libjpeg-turbo and file writes release the GIL), overlapping fsync waits.
        needed.sort(key=lambda item: item[0] in lossless)
        cache: dict = {}
        (op, uri), rest = needed[0], needed[1:]
        futures = {}
        try:
            statuses[op] = _encode_and_write(data, op, uri, suffix=suffix, cache=cache, lossless=lossless)
            futures = {
                op: _executor().submit(
                    _encode_and_write, data, op, uri, suffix=suffix, cache=cache, lossless=lossless
                )
                for op, uri in rest
            }
        finally:
            concurrent.futures.wait(futures.values())  # nothing keeps writing after an error
        for op, future in futures.items():
            statuses[op] = future.result()
    return task.origin, [statuses[op] for op, *_ in task.outputs]


def _encode_and_write(
    data: bytes, op: str, uri: str, *, suffix: str, cache: dict, lossless: dict[str, bytes]
) -> str:
    if op in lossless:
        storage.write_bytes(uri, lossless[op])
        return "lossless"
    out, _ = transform_image_bytes(data, op, suffix=suffix, cache=cache)
    storage.write_bytes(uri, out)
    return "reencoded"


_EXECUTOR: list = []  # one thread pool per process, made on first use


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    if not _EXECUTOR:
        _EXECUTOR.append(
            concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="detforge-augment")
        )
    return _EXECUTOR[0]


def _decoded_size(data: bytes) -> tuple[int, int]:
    try:
        return images.probe_bytes(data)
    except images.ImageError:
        return (-1, -1)


def _run_task_star(args: tuple[_Task, bool]) -> tuple[str, list[str]]:
    return _run_task(*args)


def _remove_stale_parts(folder: str) -> None:
    """Temporary files a killed run left behind (complete files are only ever renamed into place)."""
    if storage.is_remote(folder) or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(".detforge-") and name.endswith(".part"):
            os.unlink(os.path.join(folder, name))


def augment(
    manifest: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    ops=DEFAULT_OPS,
    workers: int = 1,
    force: bool = False,
    overwrite: bool = False,
    label_attribute: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AugmentResult:
    """Write flipped/rotated copies of a manifest's images and the manifests that list them.

    ``progress(done, total)`` is called after every image. See the module docstring for the outputs.
    """
    manifest = os.fspath(manifest)
    out_dir = os.fspath(out_dir)
    if not storage.is_remote(out_dir):
        out_dir = os.path.abspath(out_dir)
    ops = parse_ops(ops)
    if workers < 1:
        raise ConfigError(f"must be at least 1, got {workers}", field="--workers")
    check_free(out_dir, overwrite=overwrite)
    total = _check_manifest(manifest, label_attribute, force=force)
    with whole_output(out_dir, overwrite=overwrite, resumable=True, last=("augmented.manifest",)) as staging:
        if overwrite:  # afresh: nothing of an interrupted earlier run is reused
            for name in os.listdir(staging):
                path = os.path.join(staging, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        return _augment(
            manifest,
            out_dir,
            staging,
            ops=ops,
            workers=workers,
            total=total,
            label_attribute=label_attribute,
            progress=progress,
        )


def _augment(
    manifest: str,
    out_dir: str,
    staging: str,
    *,
    ops,
    workers: int,
    total: int,
    label_attribute: str | None,
    progress,
) -> AugmentResult:
    """The run: images and manifests written into ``staging``; the lines name the images in ``out_dir``."""
    images_dir = storage.join(out_dir, "images")  # where the manifests say the copies are
    staged_images = os.path.join(staging, "images")  # where they are written
    os.makedirs(staged_images, exist_ok=True)
    _remove_stale_parts(staged_images)
    _remove_stale_parts(staging)
    result = AugmentResult(
        manifest=storage.join(out_dir, "augmented.manifest"),
        op_manifests={op: storage.join(out_dir, f"{op}.manifest") for op in ops},
    )

    def tasks() -> Iterator[tuple[_Task, bool]]:
        for record in read_manifest(manifest, label_attribute=label_attribute):
            yield (
                _Task(
                    _resolve(record.source_ref, manifest),
                    record.origin,
                    record.width,
                    record.height,
                    [(op, *_output(record, op, staged_images)) for op in ops],
                ),
                False,
            )

    pool = None
    if workers == 1:
        results: Iterator[tuple[str, list[str]]] = (_run_task(*args) for args in tasks())
    else:
        import multiprocessing

        # spawn, not fork: the parent may run threads (progress bar, s3fs's event loop).
        pool = multiprocessing.get_context("spawn").Pool(workers)
        results = pool.imap(_run_task_star, tasks(), chunksize=1)
    try:
        with contextlib.ExitStack() as stack:
            combined = stack.enter_context(
                storage.atomic_writer(os.path.join(staging, "augmented.manifest"), "wb")
            )
            per_op = {
                op: stack.enter_context(storage.atomic_writer(os.path.join(staging, f"{op}.manifest"), "wb"))
                for op in ops
            }
            records = read_manifest(manifest, label_attribute=label_attribute)
            for record, (_origin, statuses) in zip(records, results, strict=True):
                _count(result, statuses)
                original = record_to_json(record)
                original["source-ref"] = _resolve(record.source_ref, manifest)
                combined.write(dumps_line(original))
                for op in ops:
                    uri, _, _ = _output(record, op, images_dir)
                    line = dumps_line(record_to_json(augment_record(record, op, source_ref=uri)))
                    combined.write(line)
                    per_op[op].write(line)
                if progress is not None:
                    progress(result.images, total)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return result


def _count(result: AugmentResult, statuses: list[str]) -> None:
    result.images += 1
    for status in statuses:
        if status == "skipped":
            result.skipped += 1
        else:
            result.written += 1
            result.lossless += status == "lossless"
            result.reencoded += status == "reencoded"


def _output(record: Record, op: str, images_dir: str) -> tuple[str, int, int]:
    name = storage.basename(record.source_ref)
    stem, ext = os.path.splitext(name)
    spec = OPS[op]
    width, height = (record.height, record.width) if spec.swaps_size else (record.width, record.height)
    return storage.join(images_dir, f"{stem}{spec.suffix}{ext or '.jpg'}"), width, height


__all__ = [
    "OPS",
    "DEFAULT_OPS",
    "Op",
    "AugmentResult",
    "augment",
    "augment_record",
    "parse_ops",
    "jpeg_transform_lossless",
    "lossless_possible",
    "transform_image_bytes",
    "image_size",
]
