"""Which labeled images are one image, the same bytes, near copies or frames of one video: one rule.

``prepare`` and ``stats`` count duplicates with the same ``DuplicateRule``:

- an image's **identity is its resolved path** (a local file's absolute path with ``..`` resolved, else
  the URI; a symbolic link to another file is found as the same bytes below): two photos both
  named ``IMG_2385.JPG`` in ``phoneA/`` and ``phoneB/`` are two images; the same path listed twice (two
  jobs labeling one image, a manifest given twice) is one image labeled twice;
- **exact duplicates** are local files with the same bytes under different paths (BLAKE2b of the file).

What belongs together in a split (``prepare``):

- ``video_frame``: a frame *by its name*, ``<video>_<NNNNN...>`` with five or more digits (the ``frames``
  command writes six, as do the Ground Truth jobs made from videos), unless the part before is a date
  (``IMG_20230101_123456``: a phone's photo named by the time it was taken);
- ``numbered``: any other stem ending in a number (``IMG_2385``, ``DSC_0001``, ``frame_0012``; Roboflow's
  ``_jpg.rf.<hash>`` suffix removed first). Numbered photos are still photos unless their **content** says
  otherwise: neighbours in number order whose ``dhash`` (64-bit difference hash of a small grey
  thumbnail, from a reduced-scale JPEG decode) differ in at most ``NEAR_DUPLICATE_BITS`` bits are near
  copies, and a run of them is one sequence.

On Roboflow's Aquarium photos (638, ``../shared/data/aquarium``) the distance of 2,000 random pairs of
different photos was at least 9 bits (1st percentile 18); burst shots of one tank were 0 to 8 bits apart.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

import numpy as np

from detforge import images, storage

NEAR_DUPLICATE_BITS = 8
HASH_SIDE = 8
# the decode needs only a thumbnail: a JPEG is decoded at a reduced scale of at least this long side
_DRAFT = 64
VIDEO_FRAME = re.compile(r"^(?P<video>.+)_(?P<frame>\d{5,})$")
_DATE_END = re.compile(r"(?:^|[_-])(?:19|20)\d{6}$")
_ROBOFLOW_SUFFIX = re.compile(r"(?:_[A-Za-z]{3,4})+\.rf\.[0-9A-Fa-f]{16,}$")
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<number>\d+)$")


def identity(source_ref: str) -> str:
    """The identity of an image whose reference is resolved: a local file's absolute path, else the URI.

    No file system call (``abspath``, not ``realpath``): it runs once per manifest line.
    """
    if storage.is_remote(source_ref):
        return source_ref
    path = source_ref[len("file://") :] if source_ref.startswith("file://") else source_ref
    return os.path.abspath(path)


def original_stem(stem: str) -> str:
    """The stem a Roboflow export started from (``IMG_2301_jpeg_jpg.rf.3f2a...`` -> ``IMG_2301``)."""
    return _ROBOFLOW_SUFFIX.sub("", stem) or stem


def video_frame(stem: str) -> tuple[str, int] | None:
    """(video, frame number) when the stem names a video frame, else None."""
    m = VIDEO_FRAME.match(stem)
    if not m or _DATE_END.search(m.group("video")):
        return None
    return m.group("video"), int(m.group("frame"))


def numbered(stem: str) -> tuple[str, int] | None:
    """(prefix, number) of a stem ending in a number (Roboflow suffix removed), else None."""
    stem = original_stem(stem)
    for suffix in ("_jpeg", "_jpg", "_png", "_JPG", "_JPEG", "_PNG"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    m = _NUMBERED.match(stem)
    return (m.group("prefix").lower(), int(m.group("number"))) if m else None


def file_digest(path: str) -> str | None:
    """BLAKE2b of a local file's bytes (None when it cannot be read: its absence is reported elsewhere)."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "blake2b").hexdigest()
    except OSError:
        return None


def dhash_bytes(data: bytes, name: str = "<bytes>") -> int | None:
    """The 64-bit difference hash of encoded image bytes (None when they cannot be decoded)."""
    from PIL import Image

    try:
        image = images.decode_pil(data, name=name, draft=_DRAFT)
    except images.ImageError:
        return None
    grey = np.asarray(image.convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def dhash(path: str) -> int | None:
    """The 64-bit difference hash of a local image (None when it cannot be read or decoded)."""
    try:
        return dhash_bytes(images.read_bytes(path), path)
    except images.ImageError:
        return None


def hash_distance(a: int, b: int) -> int:
    """Bits in which two ``dhash`` values differ."""
    return (a ^ b).bit_count()


@dataclass
class DuplicateRule:
    """Finds, over a stream of images, the same image listed again and the same bytes under another path.

    ``check(reference, origin)`` returns None for a new image, else ``(kind, first origin)`` with kind
    ``"same image"`` or ``"same content"``; ``content=False`` compares identities only. ``origin`` is
    whatever the caller names a listing by (``"file:line"``, or its own record of the image);
    ``listings`` (identity -> origin of the first listing) may be the caller's own table of images.
    """

    content: bool = True
    listings: dict[str, object] = field(default_factory=dict)  # identity -> origin of its first listing
    _digests: dict[str, tuple[str, object]] = field(default_factory=dict)  # digest -> (identity, origin)

    def same_image(self, reference: str, origin: object) -> object | None:
        """The origin of the first listing of this image, or None (and it is remembered)."""
        key = identity(reference)
        first = self.listings.get(key)
        if first is None:
            self.listings[key] = origin
        return first

    def same_content(self, reference: str, origin: object, data: bytes | None = None) -> object | None:
        """The origin of an earlier image (another path) with these bytes, or None (remembered).

        ``data``: the file's bytes when the caller has read them already.
        """
        if not self.content or storage.is_remote(reference):
            return None
        key = identity(reference)
        digest = hashlib.blake2b(data).hexdigest() if data is not None else file_digest(key)
        if digest is None:
            return None
        first = self._digests.setdefault(digest, (key, origin))
        return first[1] if first[0] != key else None

    def check(self, reference: str, origin: object) -> tuple[str, object] | None:
        """None for a new image, else ("same image" | "same content", the origin of the first one)."""
        first = self.same_image(reference, origin)
        if first is not None:
            return "same image", first
        first = self.same_content(reference, origin)
        return ("same content", first) if first is not None else None
