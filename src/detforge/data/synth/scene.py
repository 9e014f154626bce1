"""Drawing the synthetic "storage boxes" scenes: a top-down camera over a carpet with furniture.

A frame is a *display list*: shapes in paint order, each owned by a box (its index) or by nothing
(-1: person, hands). ``paint`` draws it in colour; ``paint_owners`` draws the same list as an id image
(0 = no box, k + 1 = box k) so that tests can check that every label is the tight box of the pixels
its object really covers. Polygon vertices are whole pixels, so the covered pixels are known exactly:
a polygon with vertices spanning columns ``x0..x1`` paints columns ``x0..x1`` inclusive, i.e. the
continuous box ``[x0, x1 + 1]``.

Not here: planning videos, trajectories, labels and files (``synth``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Lid colours: far apart in hue so that a small detector separates the two classes by colour alone.
LID_COLORS = {"blue": (38, 72, 178), "yellow": (236, 206, 38)}
SWEATERS = [(112, 44, 38), (92, 52, 40), (70, 70, 72), (60, 84, 60), (128, 60, 50), (50, 46, 44)]
SKINS = [(224, 180, 150), (196, 150, 112), (150, 104, 76), (98, 66, 48)]


@dataclass(frozen=True)
class Shape:
    """One item of a display list: ``kind`` is polygon, line or ellipse (an ellipse is a polygon here)."""

    kind: str
    points: tuple  # ((x, y), ...) whole pixels
    color: tuple[int, int, int]
    owner: int = -1  # index of the box this shape belongs to, -1 for none
    width: int = 1  # line width


def _ipoints(points: np.ndarray) -> tuple:
    return tuple((int(x), int(y)) for x, y in np.rint(points).astype(np.int64))


def _shade(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * factor)))) for c in color)


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Convex hull of 2-D points, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) <= 2:
        return np.asarray(pts, dtype=np.float64)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)


@dataclass(frozen=True)
class BoxPose:
    """Where a storage box is: lid centre, long/short side, angle (radians), perspective, height."""

    cx: float
    cy: float
    length: float
    breadth: float
    angle: float
    perspective: float = 0.0  # -0.15..0.15: one long edge drawn shorter than the other
    height: float = 0.08  # how far the bottom shrinks toward the image centre (parallax of the walls)


def box_axes(pose: BoxPose) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors along the long and the short side of the lid."""
    u = np.array([np.cos(pose.angle), np.sin(pose.angle)])
    return u, np.array([-u[1], u[0]])


def lid_point(pose: BoxPose, s: float, t: float) -> np.ndarray:
    """A point of the lid in lid coordinates ``s, t`` in [-1, 1] (long, short axis), perspective applied."""
    u, v = box_axes(pose)
    half_l = pose.length / 2 * (1 + pose.perspective * t)
    return np.array([pose.cx, pose.cy]) + u * s * half_l + v * t * pose.breadth / 2


def box_outline(pose: BoxPose, *, image_center: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(lid quad, outline of lid + visible walls) as whole-pixel vertex arrays."""
    lid = np.array([lid_point(pose, s, t) for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))])
    center = np.asarray(image_center, dtype=np.float64)
    bottom = center + (lid - center) * (1.0 - pose.height)
    return np.rint(lid), np.rint(convex_hull(np.vstack([lid, bottom])))


def clip_polygon(points: np.ndarray, *, x_max: float, y_max: float) -> np.ndarray:
    """A convex polygon clipped to ``[0, x_max] x [0, y_max]`` (Sutherland-Hodgman); may be empty."""
    poly = [tuple(p) for p in np.asarray(points, dtype=np.float64)]
    for axis, limit, keep_below in ((0, 0.0, False), (0, x_max, True), (1, 0.0, False), (1, y_max, True)):
        if not poly:
            break

        def inside(p, axis=axis, limit=limit, keep_below=keep_below):
            return p[axis] <= limit if keep_below else p[axis] >= limit

        result = []
        for k, cur in enumerate(poly):
            prev = poly[k - 1]
            if inside(cur) != inside(prev):
                f = (limit - prev[axis]) / (cur[axis] - prev[axis])
                result.append((prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1])))
            if inside(cur):
                result.append(cur)
        poly = result
    return np.asarray(poly, dtype=np.float64).reshape(-1, 2)


def box_label_xyxy(pose: BoxPose, *, width: int, height: int) -> np.ndarray | None:
    """The tight ``xyxy`` box of the pixels the drawn box covers inside the image (None if none).

    Pixel ``(i, j)`` is painted when the point ``(i, j)`` lies in the polygon, so the visible part is
    the polygon clipped to ``[0, width - 1] x [0, height - 1]``; columns ``i0..i1`` give ``[i0, i1 + 1]``.
    """
    _, outline = box_outline(pose, image_center=(width / 2, height / 2))
    visible = clip_polygon(outline, x_max=width - 1, y_max=height - 1)
    if len(visible) < 3:
        return None
    x1, y1 = np.ceil(visible.min(axis=0) - 1e-6) + 0.0  # + 0.0: no negative zero
    x2, y2 = np.floor(visible.max(axis=0) + 1e-6) + 1
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return np.array([x1, y1, x2, y2], dtype=np.float64)


def box_shapes(
    pose: BoxPose, color_name: str, owner: int, *, image_center: tuple[float, float], tint: float = 1.0
) -> list[Shape]:
    """A storage box seen from above: walls, rim, lid, ribbing and the zig-zag seam of the lid halves."""
    base = _shade(LID_COLORS[color_name], tint)
    lid, outline = box_outline(pose, image_center=image_center)
    shapes = [
        Shape("polygon", _ipoints(outline), _shade(base, 0.55), owner),
        Shape("polygon", _ipoints(lid), _shade(base, 0.85), owner),
    ]
    inner = np.array(
        [lid_point(pose, s, t) for s, t in ((-0.93, -0.9), (0.93, -0.9), (0.93, 0.9), (-0.93, 0.9))]
    )
    shapes.append(Shape("polygon", _ipoints(inner), base, owner))
    rib = _shade(base, 0.78)
    line_w = max(1, int(round(pose.length / 110)))
    for s in np.linspace(-0.8, 0.8, 7):
        shapes.append(
            Shape(
                "line",
                _ipoints(np.array([lid_point(pose, s, -0.88), lid_point(pose, s, 0.88)])),
                rib,
                owner,
                line_w,
            )
        )
    for t in (-0.55, 0.55):
        shapes.append(
            Shape(
                "line",
                _ipoints(np.array([lid_point(pose, -0.9, t), lid_point(pose, 0.9, t)])),
                rib,
                owner,
                line_w,
            )
        )
    seam = np.array(
        [lid_point(pose, s, t) for s, t in ((-0.9, 0.1), (-0.1, 0.1), (0.1, -0.15), (0.9, -0.15))]
    )
    shapes.append(Shape("line", _ipoints(seam), _shade(base, 0.6), owner, line_w + 1))
    return shapes


def ellipse_points(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 18) -> np.ndarray:
    """Vertices of a rotated ellipse."""
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(a), ry * np.sin(a)
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


@dataclass(frozen=True)
class Person:
    """A person seen from above: where the shoulders are, facing angle, looks."""

    cx: float
    cy: float
    angle: float  # direction from the person toward what they hold
    scale: float  # shoulder width in pixels
    sweater: tuple[int, int, int]
    skin: tuple[int, int, int]


def person_body_shapes(person: Person) -> list[Shape]:
    """Body and head (drawn under a carried box)."""
    fwd = np.array([np.cos(person.angle), np.sin(person.angle)])
    w = person.scale
    body = ellipse_points(person.cx, person.cy, w * 0.28, w * 0.55, person.angle)
    head_c = np.array([person.cx, person.cy]) + fwd * w * 0.05
    head = ellipse_points(head_c[0], head_c[1], w * 0.17, w * 0.15, person.angle, 14)
    return [Shape("polygon", _ipoints(body), person.sweater), Shape("polygon", _ipoints(head), (34, 28, 24))]


def person_arm_shapes(person: Person, hands: np.ndarray) -> list[Shape]:
    """Arms from the shoulders to the hands (drawn under the box)."""
    side = np.array([-np.sin(person.angle), np.cos(person.angle)])
    center = np.array([person.cx, person.cy])
    shoulders = [center - side * person.scale * 0.45, center + side * person.scale * 0.45]
    width = max(2, int(round(person.scale * 0.16)))
    return [
        Shape("line", _ipoints(np.array([shoulder, hand])), person.sweater, -1, width)
        for shoulder, hand in zip(shoulders, hands, strict=True)
    ]


def hand_shapes(person: Person, hands: np.ndarray) -> list[Shape]:
    """Hands over the box edges: the partial occlusion."""
    r = person.scale * 0.09
    return [
        Shape("polygon", _ipoints(ellipse_points(x, y, r * 1.2, r, person.angle, 12)), person.skin)
        for x, y in hands
    ]


def paint(background: Image.Image, shapes: list[Shape]) -> Image.Image:
    """Draw a display list over a copy of the background (RGB)."""
    image = background.copy()
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw(draw, shape, shape.color)
    return image


def paint_owners(size: tuple[int, int], shapes: list[Shape]) -> np.ndarray:
    """The display list as an owner image: 0 where no box shows, k + 1 where box k is the top shape."""
    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        _draw(draw, shape, shape.owner + 1)
    return np.asarray(image)


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    if shape.kind == "polygon":
        draw.polygon(shape.points, fill=fill)
    elif shape.kind == "line":
        draw.line(shape.points, fill=fill, width=shape.width)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


# --- the room: built once per video -------------------------------------------------------------


def carpet(rng: np.random.Generator, *, width: int, height: int) -> np.ndarray:
    """A grey zig-zag striped carpet like the office floor of the real frames, ``HxWx3`` float32."""
    vertical = rng.random() < 0.3
    h, w = (width, height) if vertical else (height, width)
    scale = max(w, h) / 640
    edges = np.cumsum(rng.integers(max(3, int(6 * scale)), max(6, int(26 * scale)), size=h))
    band = np.searchsorted(edges, np.arange(h), side="right")
    grey = rng.uniform(85, 165, size=band.max() + 1).astype(np.float32)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    period = rng.uniform(5, 9) * scale
    zig = np.abs(((x / period + np.abs((y / (period * 0.6)) % 2 - 1)) % 2) - 1)  # triangle wave
    value = grey[band][:, None] + (zig - 0.5) * rng.uniform(14, 26)
    value = value + rng.normal(0, 5, size=(h, w)).astype(np.float32)
    if vertical:
        value = value.T
    tint = np.array([1.0, 1.0, 1.0 + rng.uniform(-0.02, 0.05)], dtype=np.float32)
    return value[:, :, None] * tint


def room(rng: np.random.Generator, *, width: int, height: int) -> Image.Image:
    """Carpet, a wall strip, a desk with a monitor, a wooden cabinet and cables (one video's background)."""
    pixels = carpet(rng, width=width, height=height)
    # A wooden cabinet panel along one side, with grain.
    panel_w = int(width * rng.uniform(0.18, 0.3))
    x0 = width - panel_w
    cabinet = rng.random() < 0.75
    if cabinet:
        xs = np.arange(panel_w, dtype=np.float32)[None, :]
        ys = np.arange(height, dtype=np.float32)[:, None]
        grain = 8 * np.sin(xs / rng.uniform(3, 7) + 2 * np.sin(ys / 40)) + rng.normal(0, 3, (height, panel_w))
        wood = np.array([196, 152, 104], dtype=np.float32) * rng.uniform(0.85, 1.05)
        pixels[:, x0:, :] = wood + grain[:, :, None].astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    # Wall strip at the top, with the edge of a shelf.
    wall_h = int(height * rng.uniform(0.04, 0.11))
    draw.rectangle((0, 0, width, wall_h), fill=(214, 208, 196))
    draw.rectangle((0, wall_h, width, wall_h + max(2, height // 90)), fill=(120, 118, 112))
    # A desk with a dark monitor in one top corner.
    desk_w, desk_h = int(width * rng.uniform(0.25, 0.4)), int(height * rng.uniform(0.25, 0.45))
    draw.polygon([(0, wall_h), (desk_w, wall_h), (int(desk_w * 0.9), desk_h), (0, desk_h)], fill=(62, 62, 64))
    draw.rectangle((0, int(desk_h * 0.7), int(desk_w * 0.85), desk_h), fill=(34, 34, 36))
    # Cables on the desk.
    for _ in range(int(rng.integers(2, 5))):
        pts = [(float(rng.uniform(0, desk_w)), float(rng.uniform(wall_h, desk_h * 0.7))) for _ in range(4)]
        draw.line(pts, fill=(int(rng.integers(10, 230)),) * 3, width=max(1, width // 400))
    # A metal handle on the cabinet (drawn from the generator either way, so a seed's other draws stay put).
    hy = int(height * rng.uniform(0.55, 0.8))
    if cabinet:
        draw.rectangle((x0 + 4, hy, x0 + 4 + max(3, width // 120), hy + height // 12), fill=(188, 190, 194))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


@dataclass
class Camera:
    """Per-video photometry: a light map (vignette, gradient, white balance), sensor noise, JPEG quality."""

    gain: np.ndarray  # HxWx3 float32
    noise: np.ndarray  # (H + 16) x (W + 16) x 3 float32
    quality: int


def camera(rng: np.random.Generator, *, width: int, height: int) -> Camera:
    """A random camera for one video."""
    y = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    light = (
        rng.uniform(0.85, 1.12)
        * (1 + rng.uniform(-0.25, 0.25) * x + rng.uniform(-0.2, 0.2) * y)
        * (1 - rng.uniform(0.1, 0.35) * (x * x + y * y))
    )
    balance = np.array([1 + rng.uniform(-0.04, 0.04), 1.0, 1 + rng.uniform(-0.05, 0.03)], dtype=np.float32)
    gain = (light[:, :, None] * balance).astype(np.float32)
    sigma = rng.uniform(2.0, 6.0)
    noise = rng.standard_normal((height + 16, width + 16, 3), dtype=np.float32) * np.float32(sigma)
    return Camera(gain=gain, noise=noise, quality=int(rng.integers(80, 93)))


def develop(image: Image.Image, cam: Camera, *, exposure: float, rng: np.random.Generator) -> bytes:
    """Light, noise and JPEG compression for one frame; returns the JPEG bytes."""
    import io

    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * cam.gain
    pixels *= np.float32(exposure)
    dy, dx = (int(v) for v in rng.integers(0, 16, size=2))
    height, width = pixels.shape[:2]
    pixels += cam.noise[dy : dy + height, dx : dx + width]
    np.clip(pixels, 0, 255, out=pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, "JPEG", quality=cam.quality)
    return buffer.getvalue()
