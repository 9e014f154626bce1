"""Online presets: exact boxes for resize, flips and 90° turns; pixels under boxes; preset properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import tv_tensors

from detforge import boxes as box_ops
from detforge.errors import ConfigError
from detforge.training.transforms import PRESETS, RandomHSV, RandomRot90, build_transform, check_preset

torch.set_num_threads(1)

RED = (220, 30, 30)


def _scene(width: int = 80, height: int = 60, box=(20, 10, 50, 30)) -> np.ndarray:
    image = np.full((height, width, 3), 40, dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = RED
    return image


def test_eval_and_none_resize_boxes_exactly():
    boxes = np.array([[20, 10, 50, 30], [0, 0, 80, 60]], dtype=float)
    expected = torch.tensor([[8, 10 * 32 / 60, 20, 16], [0, 0, 32, 32]], dtype=torch.float32)
    for preset in PRESETS:
        image, out_boxes, labels = build_transform(preset, image_size=32, train=False)(
            _scene(), boxes, np.array([3, 4])
        )
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert torch.equal(out_boxes, expected) and torch.equal(labels, torch.tensor([3, 4]))
    image, out_boxes, labels = build_transform("none", image_size=32, train=True)(
        Image.fromarray(_scene()), boxes, [3, 4]
    )
    assert torch.equal(out_boxes, expected) and labels.dtype == torch.int64
    # The red rectangle is where the box says: every pixel well inside it is red.
    assert torch.allclose(image[:, 7:15, 10:18].mean(dim=(1, 2)), torch.tensor(RED) / 255, atol=1e-3)


def test_flip_preset_gives_the_flipped_or_the_original_box_and_pixels_follow():
    transform = build_transform("flip", image_size=40, train=True)
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        image, boxes, labels = transform(_scene(80, 40, (10, 5, 30, 25)), [[10, 5, 30, 25]], [1])
        box = tuple(round(v, 4) for v in boxes[0].tolist())
        assert box in {(5.0, 5.0, 15.0, 25.0), (25.0, 5.0, 35.0, 25.0)}
        seen.add(box)
        x1, y1, x2, y2 = (int(v) for v in box)
        inside = image[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].mean(dim=(1, 2))
        assert torch.allclose(inside, torch.tensor(RED) / 255, atol=1e-3)
        assert torch.equal(labels, torch.tensor([1]))
    assert len(seen) == 2


def test_hsv_colour_map_is_exact_on_known_colours():
    hsv = RandomHSV(gains=(0.5, 1.0, 0.5))
    assert np.allclose(hsv.matrix([0, 0, 0]), np.eye(3))
    grey, red = np.array([100.0, 100.0, 100.0]), np.array([200.0, 50.0, 50.0])
    assert np.allclose(hsv.matrix([0, 0, 1]) @ grey, [150, 150, 150])  # value x 1.5
    assert np.allclose(hsv.matrix([0, 0, -1]) @ red, [100, 25, 25])  # value x 0.5
    gray_red = hsv.matrix([0, -1, 0]) @ red  # saturation x 0: the luma left on every channel
    luma = 0.299 * 200 + 0.587 * 50 + 0.114 * 50
    assert np.allclose(gray_red, [luma] * 3)
    # a hue turn keeps the luma and the chroma's length, and half a circle (u0 = 1, gain 0.5) negates chroma
    yiq = RandomHSV._YIQ
    turned = yiq @ (hsv.matrix([1, 0, 0]) @ red)
    assert np.isclose(turned[0], (yiq @ red)[0]) and np.allclose(turned[1:], -(yiq @ red)[1:])


def test_flip_hsv_preset_moves_boxes_as_flip_and_changes_only_colours():
    image = _scene(80, 40, (10, 5, 30, 25))
    for seed in range(6):
        torch.manual_seed(seed)
        flip = build_transform("flip", image_size=40, train=True)
        flipped, boxes, labels = flip(image, [[10, 5, 30, 25]], [1])
        torch.manual_seed(seed)
        coloured, boxes2, labels2 = build_transform("flip+hsv", image_size=40, train=True)(
            image, [[10, 5, 30, 25]], [1]
        )
        assert torch.equal(boxes, boxes2) and torch.equal(labels, labels2)
        # one colour map for the whole image: the background (grey 40) stays uniform, the red box uniform
        x1, y1, x2, y2 = (int(v) for v in boxes2[0].tolist())
        inside = coloured[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].reshape(3, -1)
        assert float((inside - inside[:, :1]).abs().max()) <= 1 / 255
        assert not torch.allclose(coloured, flipped)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_rot90_moves_boxes_and_pixels_together(k):
    image = tv_tensors.Image(torch.from_numpy(_scene(50, 30, (7, 5, 28, 18))).permute(2, 0, 1))
    boxes = tv_tensors.BoundingBoxes([[7, 5, 28, 18]], format="XYXY", canvas_size=(30, 50))
    rot = RandomRot90()
    new_image = rot.transform(image, {"k": k})
    new_boxes = rot.transform(boxes, {"k": k})
    expected = {0: [7, 5, 28, 18], 1: [5, 22, 18, 43], 2: [22, 12, 43, 25], 3: [12, 7, 25, 28]}[k]
    assert new_boxes.tolist() == [expected]
    assert new_boxes.canvas_size == ((30, 50) if k % 2 == 0 else (50, 30))
    assert tuple(new_image.shape[-2:]) == new_boxes.canvas_size
    x1, y1, x2, y2 = expected
    assert (new_image[:, y1:y2, x1:x2] == torch.tensor(RED)[:, None, None]).all()
    assert (new_image == torch.tensor(RED)[:, None, None]).all(dim=0).sum() == 21 * 13
    # A full turn in four steps returns the box.
    again = boxes
    for _ in range(4):
        again = rot.transform(again, {"k": 1})
    assert again.tolist() == boxes.tolist()


def test_training_drops_degenerate_boxes_with_their_labels_eval_keeps_them():
    boxes = np.array([[0, 0, 1, 1], [10, 10, 70, 50], [79, 59, 80, 60]], dtype=float)
    _, out, labels = build_transform("none", image_size=20, train=True)(_scene(), boxes, [5, 6, 7])
    assert torch.equal(labels, torch.tensor([6]))
    assert torch.allclose(out, torch.tensor([[2.5, 10 / 3, 17.5, 50 / 3]]), rtol=0, atol=1e-5)
    _, out, labels = build_transform("none", image_size=20, train=False)(_scene(), boxes, [5, 6, 7])
    assert torch.equal(labels, torch.tensor([5, 6, 7])) and out.shape == (3, 4)


def test_images_without_boxes_and_other_inputs():
    for preset in PRESETS:
        image, boxes, labels = build_transform(preset, image_size=16, train=True)(
            _scene()[:, :, 0], np.zeros((0, 4)), np.zeros(0, dtype=int)
        )
        assert image.shape == (3, 16, 16) and boxes.shape == (0, 4) and labels.shape == (0,)
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64


def test_bad_inputs():
    with pytest.raises(
        ConfigError,
        match="field 'augmentation': unknown augmentation preset 'ssd-rot' "
        r"\(choose one of none, flip, ssd, ssd\+rot, flip\+hsv\)",
    ):
        build_transform("ssd-rot", image_size=32, train=True)
    assert check_preset("ssd+rot") == "ssd+rot"
    with pytest.raises(ConfigError, match="image_shape"):
        build_transform("none", image_size=0, train=True)
    transform = build_transform("none", image_size=8, train=True)
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        transform(_scene(), [[0, 0, 5, 5], [1, 1, 4, 4]], [0])
    with pytest.raises(ValueError, match="uint8"):
        transform(_scene().astype(np.float32), [], [])


@st.composite
def _case(draw):
    width, height = draw(st.integers(8, 48)), draw(st.integers(8, 48))
    n = draw(st.integers(0, 5))
    boxes = []
    for _ in range(n):
        w, h = draw(st.integers(1, width)), draw(st.integers(1, height))
        x, y = draw(st.integers(0, width - w)), draw(st.integers(0, height - h))
        boxes.append((x, y, x + w, y + h))
    return width, height, np.array(boxes, dtype=float).reshape(-1, 4), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=200, deadline=None)
@given(case=_case(), preset=st.sampled_from(PRESETS), size=st.sampled_from([16, 24]))
def test_property_every_preset_keeps_boxes_inside_and_labels_aligned(case, preset, size):
    width, height, boxes, seed = case
    torch.manual_seed(seed)
    labels = np.arange(10, 10 + len(boxes))
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    transform = build_transform(preset, image_size=size, train=True)
    out_image, out_boxes, out_labels = transform(image, boxes, labels)
    assert out_image.shape == (3, size, size) and out_image.dtype == torch.float32
    assert 0 <= float(out_image.min()) and float(out_image.max()) <= 1
    assert out_boxes.dtype == torch.float32 and out_labels.dtype == torch.int64
    assert out_boxes.shape == (len(out_labels), 4)
    b = out_boxes.double().numpy()
    assert box_ops.inside_image_xyxy(b, width=size, height=size, tolerance=1e-4).all()
    assert box_ops.positive_size_xyxy(b, min_size=1.0 - 1e-4).all()
    # Labels are unique per input box: what is left is the kept boxes' labels, in input order.
    kept = out_labels.tolist()
    assert kept == sorted(set(kept)) and set(kept) <= set(labels.tolist())
    if preset in ("none", "flip"):
        scaled = box_ops.xyxy_norm_to_xyxy(
            box_ops.xyxy_to_xyxy_norm(boxes, width=width, height=height), width=size, height=size
        )
        flipped = box_ops.flip_x_xyxy(scaled, width=size)
        for box, label in zip(b, kept, strict=True):
            i = label - 10
            assert np.allclose(box, scaled[i], atol=1e-3) or (
                preset == "flip" and np.allclose(box, flipped[i], atol=1e-3)
            )
