"""The one image decoder: EXIF orientation everywhere, only camera formats, one pixel cap, one error type."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from detforge import images
from detforge.data import groundtruth
from detforge.images import ImageError

# An upright 60x40 photo with a red box at x 40..56, y 4..20 (left, top, width 16, height 16).
UPRIGHT = (60, 40)
BOX = (40, 4, 56, 20)


def _upright() -> Image.Image:
    image = Image.new("RGB", UPRIGHT, (40, 120, 40))
    image.paste((230, 20, 20), BOX)
    return image


def phone_jpeg(path=None) -> bytes:
    """A phone-style JPEG: pixels stored turned 90 degrees, EXIF Orientation=6 to show them upright."""
    stored = _upright().transpose(Image.Transpose.ROTATE_90)  # 40x60 as stored on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    stored.save(out, "JPEG", quality=95, exif=exif.tobytes())
    if path is not None:
        path.write_bytes(out.getvalue())
    return out.getvalue()


def _red_box(array: np.ndarray) -> tuple[int, int, int, int]:
    red = (array[:, :, 0] > 150) & (array[:, :, 1] < 90)
    ys, xs = np.nonzero(red)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_exif_orientation_applied_to_pixels_and_header_size():
    data = phone_jpeg()
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (40, 60)  # what a decoder that ignores EXIF sees
    assert images.probe_bytes(data) == UPRIGHT
    assert images.orientation(data) == 6
    array = images.decode(data)
    assert array.shape == (40, 60, 3)
    assert np.abs(np.array(_red_box(array)) - BOX).max() <= 1
    thumb = Image.open(io.BytesIO(images.thumbnail_jpeg(data, size=30)))
    assert thumb.size == (30, 20)


def test_phone_photo_box_lands_right_through_prepare_dataset_augment_and_predict(tmp_path):
    from detforge.data.augment import augment
    from detforge.data.prepare import prepare
    from detforge.deploy.predict import Source, _decode
    from detforge.training.dataset import ManifestDataset, load_split

    (tmp_path / "photos").mkdir()
    phone_jpeg(tmp_path / "photos" / "IMG_0001.jpg")
    record = groundtruth.make_record(
        "photos/IMG_0001.jpg",
        width=UPRIGHT[0],
        height=UPRIGHT[1],
        boxes_xyxy=[BOX],
        class_ids=[0],
        class_map={0: "red"},
    )
    groundtruth.write_manifest(tmp_path / "job.manifest", [record])
    prepare([str(tmp_path / "job.manifest")], str(tmp_path / "prepared"), validation_fraction=0)
    manifest = tmp_path / "prepared" / "train.manifest"
    line = json.loads(manifest.read_text())
    assert line["source-ref"] == "../photos/IMG_0001.jpg"  # rewritten to work from its new folder

    samples, names = load_split(str(manifest))
    dataset = ManifestDataset(samples, image_size=60, train=False)
    pixels, target, _ = dataset[0]  # resized to 60x60: y scaled by 60/40
    assert names == ["red"] and target["boxes"].tolist() == [[40.0, 6.0, 56.0, 30.0]]
    found = _red_box(
        (pixels.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        if pixels.max() <= 1
        else pixels.permute(1, 2, 0).numpy().astype(np.uint8)
    )
    assert np.abs(np.array(found) - [40, 6, 56, 30]).max() <= 2

    result = augment(str(manifest), out_dir=str(tmp_path / "aug"), ops="xflip")
    assert result.images == 1
    flipped = next(groundtruth.read_manifest(tmp_path / "aug" / "xflip.manifest"))
    assert flipped.boxes.tolist() == [[4.0, 4.0, 20.0, 20.0]]
    array = images.read(
        groundtruth.resolve_source_ref(flipped.source_ref, tmp_path / "aug" / "xflip.manifest")
    )
    assert array.shape == (40, 60, 3) and np.abs(np.array(_red_box(array)) - [4, 4, 20, 20]).max() <= 1

    decoded, _ = _decode(
        Source(ref=str(tmp_path / "photos" / "IMG_0001.jpg"), source_ref="x", truth=None), False
    )
    assert decoded.shape == (40, 60, 3) and np.abs(np.array(_red_box(decoded)) - BOX).max() <= 1


def _encoded(fmt: str, size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_camera_formats_decode(fmt):
    assert images.decode(_encoded(fmt)).shape == (8, 8, 3)


@pytest.mark.parametrize("fmt", ["TGA", "GIF", "TIFF", "ICO", "PPM"])
def test_other_formats_are_refused(fmt):
    with pytest.raises(ImageError, match=r"x\.bin: not a JPEG/PNG/WEBP/BMP image"):
        images.decode(_encoded(fmt), name="x.bin")


def test_pixel_cap_truncation_and_no_global_state(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    big = _encoded("PNG", size=(3000, 2000))
    with pytest.raises(
        ImageError, match="3000x2000 = 6000000 pixels, more than the limit of 1000000"
    ) as info:
        images.decode(big, max_pixels=1_000_000)
    assert info.value.too_large
    assert images.decode(big).shape == (2000, 3000, 3)
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        noise = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(noise).save(out, "JPEG")
        images.decode(out.getvalue()[:1500])
    assert not info.value.too_large
    with pytest.raises(ImageError, match="empty file"):
        images.decode(b"")
    with pytest.raises(ImageError, match="missing.jpg"):
        images.read(tmp_path / "missing.jpg")
    from detforge import runtime  # noqa: F401  (importing the runtime once changed Pillow's global)

    assert Image.MAX_IMAGE_PIXELS == before
