"""A torch Dataset over Ground Truth manifest records, for training and validation.

- ``load_split(manifest, *, classes=None)``: records of a manifest as compact ``Sample``s with 0-based
  class ids in the order of ``classes.json`` (beside the manifest when present, or given), else the
  manifest's own class map; class names not in the list are a ``ManifestError`` naming the line.
- ``ManifestDataset(samples, *, image_size, preset, train, cache_dir)``: item ``i`` is
  ``(image float CHW [0, 1] at image_size x image_size, {"boxes": xyxy pixels, "labels": class id + 1}, i)``.
  Images come from local paths or any fsspec URL (``s3://``); a remote image is copied once into
  ``cache_dir`` and read from disk afterwards, so a remote dataset streams on the first epoch (as
  SageMaker's Pipe mode) instead of being copied up front. Relative ``source-ref``s resolve against
  the manifest's folder.
- ``mosaic`` (a probability, training only): an item is a ``mosaic`` of itself and three other
  images drawn from the same seeded generator, then randomly flipped; ``cache_images`` keeps every image
  decoded in memory, scaled to a long side of at most ``CACHE_SCALE x image_size`` (``fill_cache`` decodes
  them all up front, so forked loader workers share one copy).
- ``tiles`` (a ``training.tiles.TileCrops``, training only): each item (and each mosaic quarter) is a crop of
  its photo at the photo's resolution (the cache then keeps 1.5 x ``image_size`` per tile side instead).
- Augmentation comes from ``detforge.training.transforms.build_transform(preset, image_size=, train=)``; each
  item's randomness is seeded from ``(seed, epoch, index)`` (``set_epoch``), so an epoch's data is the
  same whatever the worker count, and a resumed run sees exactly what an uninterrupted one saw.

Not here: the training loop (``train``), augmentation recipes (``transforms``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from detforge import boxes as box_ops
from detforge import images, storage
from detforge.data.groundtruth import ClassMaps, classes_beside, read_manifest, resolve_source_ref
from detforge.errors import ManifestError


@dataclass
class Sample:
    """One training image: where it is, its size, ``xyxy`` pixel boxes and 0-based class ids."""

    image: str  # resolved local path or URL
    width: int
    height: int
    boxes: np.ndarray
    class_ids: np.ndarray
    image_id: str
    difficult: np.ndarray | None = None  # (N,) bool; validation counts them as the VOC devkit does


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/detforge/images`` (``~/.cache/detforge/images``): remote images land here."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "detforge", "images")


def load_split(
    manifest: str | os.PathLike, *, classes: list[str] | None = None, label_attribute: str | None = None
) -> tuple[list[Sample], list[str]]:
    """Samples of a manifest and the class names they index (see the module docstring)."""
    manifest = os.fspath(manifest)
    names = classes if classes is not None else classes_beside(manifest)
    by_name = {n: i for i, n in enumerate(names)} if names is not None else None
    samples: list[Sample] = []
    merged = ClassMaps()  # the one class-map merge (convert, evaluate): an id meaning two names is an error
    seen = merged.names
    for record in read_manifest(manifest, label_attribute=label_attribute):
        if by_name is not None:
            try:
                ids = np.array([by_name[record.class_map[int(c)]] for c in record.class_ids], dtype=np.int64)
            except KeyError as exc:
                path, _, line = (record.origin or manifest).rpartition(":")
                raise ManifestError(
                    f"class {exc.args[0]!r} is not in the class list {names}",
                    path=path,
                    line=int(line) if line.isdigit() else None,
                    hint="add it to classes.json or relabel the image",
                ) from None
        else:
            ids = record.class_ids.astype(np.int64)
            merged.add(record, manifest)
        samples.append(
            Sample(
                resolve_source_ref(record.source_ref, manifest),
                record.width,
                record.height,
                record.boxes.astype(np.float64),
                ids,
                record.image_id,
                record.difficult,
            )
        )
    if names is None:
        if not seen:
            raise ManifestError("no class map in the manifest and no classes.json beside it", path=manifest)
        if sorted(seen) != list(range(len(seen))):
            raise ManifestError(
                f"class ids {sorted(seen)} are not 0..N-1",
                path=manifest,
                hint="run `detforge prepare`, which writes classes.json",
            )
        names = [seen[i] for i in range(len(seen))]
    return samples, names


def build_transform(preset: str, *, image_size: int, train: bool):
    """``transforms.build_transform`` (resize with antialiasing, the preset's augmentation)."""
    from detforge.training.transforms import build_transform as build

    return build(preset, image_size=image_size, train=train)


CACHE_SCALE = 1.5


class ManifestDataset:
    """Map-style dataset (see the module docstring); ``set_epoch`` before each epoch."""

    def __init__(
        self,
        samples: list[Sample],
        *,
        image_size: int,
        preset: str = "none",
        train: bool = False,
        cache_dir: str | None = None,
        seed: int = 0,
        mosaic: float = 0.0,
        scale_jitter: float = 0.5,
        cache_images: bool = False,
        tiles=None,
    ) -> None:
        self.samples = samples
        self.image_size = int(image_size)
        self.train = train
        self.preset = preset
        self.cache_dir = cache_dir or default_cache_dir()
        self.seed = int(seed)
        self.epoch = 0
        self.transform = build_transform(preset if train else "none", image_size=self.image_size, train=train)
        self.mosaic = float(mosaic) if train else 0.0
        self.scale_jitter = float(scale_jitter)
        # a mosaic is already cropped and zoomed: it gets the preset's flip and, with it, its colour change
        self.mosaic_transform = build_transform(
            "flip+hsv" if preset == "flip+hsv" else "flip", image_size=self.image_size, train=True
        )
        self.cache_images = bool(cache_images)
        self._decoded: dict[int, tuple] = {}
        self.tiles = tiles if train else None  # training.tiles.TileCrops: items are crops of the photos

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation draws ``__getitem__`` makes."""
        self.epoch = int(epoch)

    def read_image(self, index: int):
        """The RGB PIL image of sample ``index`` (remote images through the local cache)."""
        sample = self.samples[index]
        path = sample.image
        if storage.is_remote(path):
            path = storage.local_copy(path, self.cache_dir)
        return images.decode_pil(images.read_bytes(path), name=sample.image)

    def _checked_image(self, index: int):
        sample = self.samples[index]
        image = self.read_image(index)
        if image.size != (sample.width, sample.height):
            raise ManifestError(
                f"the image is {image.size[0]}x{image.size[1]} but the manifest says "
                f"{sample.width}x{sample.height}",
                path=sample.image,
            )
        return image

    def decoded(self, index: int) -> tuple:
        """``(uint8 H x W x 3, xyxy boxes in its pixels, class ids)``, from memory with ``cache_images``."""
        if index in self._decoded:
            return self._decoded[index]
        from PIL import Image

        sample = self.samples[index]
        image = self._checked_image(index)
        boxes = sample.boxes.astype(np.float64)
        if self.cache_images:
            # tiles: kept at the resolution a tile is resized from, not the whole photo's
            r = min(
                1.0,
                CACHE_SCALE
                * self.image_size
                / min(max(sample.width, sample.height), self.tiles.tile if self.tiles else 1 << 30),
            )
            if r < 1.0:
                size = (max(1, round(sample.width * r)), max(1, round(sample.height * r)))
                image = image.resize(size, Image.BILINEAR)
                boxes = boxes * np.array([size[0] / sample.width, size[1] / sample.height] * 2)
        item = (np.array(image, dtype=np.uint8), boxes, sample.class_ids)
        if self.cache_images:
            self._decoded[index] = item
        return item

    def piece(self, index: int, rng: np.random.Generator) -> tuple:
        """``decoded(index)``, or with ``tiles`` a crop of it (``training.tiles``)."""
        item = self.decoded(index)
        if self.tiles is None:
            return item
        return self.tiles.sample(*item, scale=item[0].shape[1] / self.samples[index].width, rng=rng)

    def fill_cache(self) -> None:
        """Decode every image now (``cache_images``): workers forked afterwards share the copies."""
        if self.cache_images:
            for index in range(len(self.samples)):
                self.decoded(index)

    def __getitem__(self, index: int):
        import torch

        sample = self.samples[index]
        with torch.random.fork_rng(devices=[]):
            seed = (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**63)
            torch.manual_seed(seed)
            rng = np.random.default_rng(seed)
            if self.mosaic > 0 and rng.random() < self.mosaic:
                from detforge.training.mosaic import mosaic

                others = rng.integers(0, len(self.samples), 3)
                pieces = [self.piece(i, rng) for i in [index, *others.tolist()]]
                image, boxes, ids = mosaic(
                    pieces, size=self.image_size, rng=rng, scale_jitter=self.scale_jitter
                )
                pixels, boxes, labels = self.mosaic_transform(image, boxes.astype(np.float32), ids)
            elif self.cache_images or self.tiles is not None:
                image, boxes, ids = self.piece(index, rng)
                pixels, boxes, labels = self.transform(image, boxes.astype(np.float32), ids)
            else:
                pixels, boxes, labels = self.transform(
                    self._checked_image(index), sample.boxes.astype(np.float32), sample.class_ids
                )
        boxes_np = box_ops.clip_xyxy(
            np.asarray(boxes, dtype=np.float64).reshape(-1, 4), width=self.image_size, height=self.image_size
        )
        keep = box_ops.positive_size_xyxy(boxes_np, min_size=1e-3)
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)[torch.from_numpy(keep)]
        target = {"boxes": torch.from_numpy(boxes_np[keep]).float(), "labels": labels_t + 1}
        if not self.train and sample.difficult is not None and len(sample.difficult) == len(keep):
            # without augmentation the boxes keep their order, so the flags still line up
            target["difficult"] = torch.from_numpy(np.asarray(sample.difficult, dtype=bool)[keep])
        return pixels.float().contiguous(), target, index


def collate(batch):
    """Lists of images, targets and indices (detectors take lists)."""
    images, targets, indices = zip(*batch, strict=True)
    return list(images), list(targets), list(indices)
