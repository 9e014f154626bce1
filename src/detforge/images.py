"""The one image decoder of every step: train, evaluate, predict, export, augment, review, label, serve, edge.

- Formats: only what cameras and labeling tools produce (``FORMATS``: JPEG, PNG, WebP, BMP). Pillow is
  told to try only these, so an EPS, PSD or TGA file never reaches its (riskier) plugins.
- EXIF orientation is applied: a phone photo stored sideways with ``Orientation=6`` comes out upright,
  the way browsers (and so labeling tools) show it; sizes from ``probe`` are the upright ones too.
- One pixel cap (``MAX_PIXELS``, per call ``max_pixels``), checked from the header before any pixel is
  decoded. Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` is never changed.
- One error type, ``ImageError`` (a DetforgeError naming the image), with ``too_large`` set for the cap.

Arrays are ``H x W x 3`` uint8 RGB. Needs numpy and Pillow only (the torch-free runtime uses it).
``resize_rgb``: the square resize every model input gets (training's ``Resize``, export, the runtime,
evaluate). Not here: where a manifest line's image is (``groundtruth.resolve_source_ref``), lossless
JPEG turns (``augment``).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

from detforge import storage
from detforge.errors import DetforgeError

FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# 100 megapixels: a 48 MP phone photo fits twice; a decompression bomb does not.
MAX_PIXELS = 100_000_000
THUMB_SIZE = 320
# EXIF orientations that turn the image by 90 degrees (its stored width is the upright height)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


class ImageError(DetforgeError):
    """An image that cannot be used: missing, not one of ``FORMATS``, corrupt, truncated or too large."""

    def __init__(self, message: str, *, too_large: bool = False, **where) -> None:
        self.too_large = too_large
        super().__init__(message, **where)


def _open(data: bytes, name: str, max_pixels: int):
    """The opened (header-only) PIL image, checked against the formats and the pixel cap."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty file: no image data", path=name)
    try:
        with warnings.catch_warnings():
            # our own cap below replaces Pillow's bomb warning; its hard limit still raises
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as too large: {exc}", path=name, too_large=True) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"not a {'/'.join(FORMATS)} image (unknown format or corrupt data)", path=name
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"cannot read the image header: {exc}", path=name) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image has an empty size {width}x{height}", path=name)
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
            path=name,
            too_large=True,
        )
    return image


def _orientation(image) -> int:
    try:
        value = image.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):  # a broken EXIF block is ignored
        return 1


def decode_pil(data: bytes, *, name: str = "<bytes>", max_pixels: int = MAX_PIXELS, draft: int | None = None):
    """An upright RGB ``PIL.Image`` of encoded image bytes (ImageError saying why not).

    ``draft``: a JPEG may be decoded at a reduced scale whose long side stays at least this many pixels
    (fast thumbnails); the result is then smaller than the image.
    """
    from PIL import ImageOps

    image = _open(data, name, max_pixels)
    try:
        if draft is not None and image.format == "JPEG":
            image.draft("RGB", (draft, draft))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            upright = ImageOps.exif_transpose(image) if _orientation(image) != 1 else image
            rgb = upright.convert("RGB")  # decodes now: truncated data fails here
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"image data is truncated or corrupt: {exc}", path=name) from None
    return rgb


def decode(data: bytes, *, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An upright ``H x W x 3`` uint8 RGB array of encoded image bytes (ImageError saying why not)."""
    return np.asarray(decode_pil(data, name=name, max_pixels=max_pixels), dtype=np.uint8)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The bytes of an image file or object (ImageError when it is missing or unreadable)."""
    name = os.fspath(uri)
    try:
        return storage.read_bytes(name)
    except DetforgeError as exc:
        raise ImageError(exc.message, path=name, hint=exc.hint) from None
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}", path=name) from None


def read(uri: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An upright ``H x W x 3`` uint8 RGB array of an image file (local path or any fsspec URL)."""
    return decode(read_bytes(uri), name=os.fspath(uri), max_pixels=max_pixels)


def read_pil(uri: str | os.PathLike, *, max_pixels: int = MAX_PIXELS):
    """An upright RGB ``PIL.Image`` of an image file (local path or any fsspec URL)."""
    return decode_pil(read_bytes(uri), name=os.fspath(uri), max_pixels=max_pixels)


def probe_bytes(data: bytes, *, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Upright ``(width, height)`` from the header only (no pixel decoding)."""
    image = _open(data, name, max_pixels)
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPPING_ORIENTATIONS else (width, height)


def probe(uri: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Upright ``(width, height)`` of an image file from its header (reads only the first bytes locally)."""
    name = os.fspath(uri)
    try:
        with storage.open_file(name, "rb") as handle:
            head = handle.read(1 << 16)
            try:
                return probe_bytes(head, name=name, max_pixels=max_pixels)
            except ImageError:
                # the EXIF block or header may be larger than the first 64 KiB
                return probe_bytes(head + handle.read(), name=name, max_pixels=max_pixels)
    except ImageError:
        raise
    except DetforgeError as exc:
        raise ImageError(exc.message, path=name, hint=exc.hint) from None
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}", path=name) from None


def from_any(source, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An ``H x W x 3`` uint8 RGB array from a path/URI, encoded bytes, a PIL image or an array."""
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
            raise ImageError(f"an image array must be HxWx3 uint8, got shape {array.shape} {array.dtype}")
        return array[:, :, :3]
    if isinstance(source, bytes | bytearray | memoryview):
        return decode(bytes(source), max_pixels=max_pixels)
    if isinstance(source, str | os.PathLike):
        return read(source, max_pixels=max_pixels)
    if hasattr(source, "convert"):  # a PIL image
        return np.asarray(source.convert("RGB"), dtype=np.uint8)
    raise ImageError(f"cannot read an image from a {type(source).__name__}")


def thumbnail(source, *, size: int = THUMB_SIZE, quality: int = 80) -> tuple[bytes, int, int]:
    """(JPEG, width, height) no larger than ``size`` on its long side (aspect kept), of encoded bytes,
    a path or an RGB array: the one thumbnail maker (review, label, reports)."""
    from PIL import Image

    if isinstance(source, bytes | bytearray | memoryview):
        image = decode_pil(bytes(source), draft=size)
    else:
        image = Image.fromarray(np.ascontiguousarray(from_any(source)))
    image.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), image.width, image.height


def thumbnail_jpeg(source, *, size: int = THUMB_SIZE, quality: int = 80) -> bytes:
    """The JPEG of ``thumbnail``."""
    return thumbnail(source, size=size, quality=quality)[0]


def resize_rgb(image: np.ndarray, size: int) -> np.ndarray:
    """``size x size x 3`` uint8: PIL bilinear with antialiasing (what training's ``Resize`` does)."""
    if image.shape[0] == size and image.shape[1] == size:
        return np.ascontiguousarray(image)
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.BILINEAR))


def is_image_name(name: str) -> bool:
    """True for a file name with one of the ``SUFFIXES`` (case-insensitive)."""
    return name.lower().endswith(SUFFIXES)


def orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of encoded image bytes; 1 when there is none or it cannot be read."""
    try:
        return _orientation(_open(data, "<bytes>", MAX_PIXELS))
    except ImageError:
        return 1


def encode(image, name: str, *, quality: int = 95) -> bytes:
    """A PIL image encoded in the format its file name says (JPEG when unknown), without EXIF."""
    suffix = os.path.splitext(name)[1].lower()
    fmt = {".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}.get(suffix, "JPEG")
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()
