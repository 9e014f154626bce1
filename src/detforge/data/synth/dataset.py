"""The embedded synthetic "storage boxes" dataset: videos of blue and yellow boxes, Ground Truth job labels.

``synthesize(out, images=..., seed=...)`` writes what a user of the original blog had after labeling:

- ``images/<video>_<NNNNNN>.jpg``: frames of several short "videos" (``blue_box_1``, ``yellow_box_2`` ...);
  a person carries a box through a top-down office view, frames in a video move smoothly;
- ``manifests/<job>.output.manifest``: one Ground Truth bounding-box *output* manifest per labeling job
  (a small and a large job per colour; all frames of a video belong to one job), every box ``class_id 0``
  "storage box" with ``color``/``object`` fields on the line, empty frames with ``"annotations": []``;
- ``rejected.txt``: ids a reviewer would discard: deliberately bad labels (box shifted or too large),
  slivers of a box at the frame edge, frames showing both colours (a line has one ``color``);
- ``synth.json`` (what was generated, reasons for each rejected id) and ``README.txt``.

A label is the tight box of the pixels the drawn box covers (lid and walls), clipped to the frame:
labelers outline the whole box, so hands over its edges do not shrink it (they never reach its corners).
Same seed and size, same bytes. Drawing lives in ``data.synth.scene``; nothing here imports torch.
The package ``detforge.data.synth`` re-exports the names below.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from detforge import storage
from detforge.data import groundtruth
from detforge.data.synth import scene
from detforge.errors import ConfigError

COLORS = ("blue", "yellow")
CLASS_MAP = {0: "storage box"}
DEFAULT_IMAGES = 600
DEFAULT_SIZE = (640, 360)
FRAMES_PER_VIDEO = 80  # a large job's video; a small job's video is half as long
BAD_LABEL_RATE = 0.02
SLIVER_FRACTION = 0.12  # a box showing less than this share of itself at the frame edge is rejected


@dataclass(frozen=True)
class VideoPlan:
    """One synthetic video: its name, colour, labeling job, first frame number and length."""

    index: int
    name: str
    color: str
    job: str
    first_frame: int
    frames: int


@dataclass
class SynthFrame:
    """One rendered frame with its truth and its label (which differs for deliberately bad labels)."""

    image_id: str
    video: VideoPlan
    jpeg: bytes
    true_boxes: np.ndarray  # (N, 4) xyxy: the drawn boxes, clipped to the frame
    colors: list[str]  # colour of each box
    label_boxes: np.ndarray  # (N, 4) xyxy as written to the manifest
    reject_reason: str | None
    shapes: list = field(repr=False, default_factory=list)  # the display list (scene.Shape)


@dataclass
class SynthSummary:
    """What ``synthesize`` wrote."""

    out: str
    seed: int
    width: int
    height: int
    images: int
    boxes: int
    empty_images: int
    boxes_by_color: dict[str, int]
    videos: list[str]
    job_images: dict[str, int]
    manifests: list[str]
    rejected: dict[str, str]  # image id -> reason
    rejected_file: str
    seconds: float = 0.0

    def to_json(self) -> dict:
        """The summary as written to ``synth.json`` (without the timing, so that a seed gives fixed bytes)."""
        data = asdict(self)
        data.pop("seconds")
        return data


def parse_size(text: str) -> tuple[int, int]:
    """``"640x360"`` -> ``(640, 360)`` (ConfigError otherwise)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"size must look like 640x360, got {text!r}", field="size") from None
    return width, height


def _split(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` by weights (largest remainder), each part at least 1 when total allows."""
    raw = [total * w / sum(weights) for w in weights]
    parts = [max(1, int(math.floor(r))) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    i = 0
    while sum(parts) < total:
        parts[order[i % len(order)]] += 1
        i += 1
    while sum(parts) > total:
        j = max(range(len(parts)), key=lambda k: parts[k])
        parts[j] -= 1
    return parts


def plan_videos(images: int, *, seed: int, frames_per_video: int = FRAMES_PER_VIDEO) -> list[VideoPlan]:
    """The videos and jobs for ``images`` frames: per colour a short video for a small job, the rest large.

    ``frames_per_video`` is a large job's video length; fewer frames per video give more videos (more
    scenes) for the same number of images.
    """
    if images < 1:
        raise ConfigError(f"images must be at least 1, got {images}", field="images")
    if frames_per_video < 2:
        raise ConfigError(
            f"frames per video must be at least 2, got {frames_per_video}", field="frames_per_video"
        )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1_000_003]))
    per_color = {"blue": images - images // 2, "yellow": images // 2}
    plans: list[VideoPlan] = []
    for color in COLORS:
        count = per_color[color]
        if count == 0:
            continue
        n_videos = 1 if count < 8 else max(2, round(count / (frames_per_video * 0.875)))
        lengths = _split(count, [0.5] + [1.0] * (n_videos - 1))
        for k, length in enumerate(lengths):
            job = f"{color}-box-{'small' if k == 0 else 'large'}-job"
            plans.append(
                VideoPlan(
                    index=len(plans),
                    name=f"{color}_box_{k + 1}",
                    color=color,
                    job=job,
                    first_frame=int(rng.integers(0, 40)),
                    frames=length,
                )
            )
    return plans


# --- motion ------------------------------------------------------------------------------------


def _smooth(rng: np.random.Generator, n: int, *, amplitude: float, period: tuple[float, float]) -> np.ndarray:
    """A smooth random curve over ``n`` frames: two sinusoids."""
    t = np.arange(n, dtype=np.float64)
    out = np.zeros(n)
    for share in (0.7, 0.3):
        w = 2 * np.pi / rng.uniform(*period)
        out += share * amplitude * np.sin(w * t + rng.uniform(0, 2 * np.pi))
    return out


@dataclass
class _Track:
    """Per-frame poses of the carried box (None where it is out of the picture) and the carrier."""

    poses: list[scene.BoxPose | None]
    person: list[scene.Person | None]
    hands_t: tuple[float, float]


def _track(rng: np.random.Generator, n: int, *, width: int, height: int) -> _Track:
    base = math.sqrt(width * height) * 4 / 3
    length0 = rng.uniform(0.24, 0.40) * base
    breadth_ratio = rng.uniform(0.62, 0.74)
    t_in = int(rng.integers(0, max(1, n // 10) + 1)) if n > 6 else 0
    t_out = n - (int(rng.integers(0, max(1, n // 10) + 1)) if n > 6 else 0)
    cx = width * rng.uniform(0.38, 0.62) + _smooth(
        rng, n, amplitude=width * rng.uniform(0.1, 0.2), period=(40, 90)
    )
    cy = height * rng.uniform(0.42, 0.58) + _smooth(
        rng, n, amplitude=height * rng.uniform(0.06, 0.14), period=(40, 90)
    )
    angle = rng.uniform(-0.5, 0.5) + _smooth(rng, n, amplitude=0.35, period=(30, 80))
    scale = 1 + _smooth(rng, n, amplitude=0.12, period=(30, 70))
    persp = _smooth(rng, n, amplitude=0.1, period=(25, 60))
    # Entering and leaving: a few frames sliding in from / out to an edge.
    ramp = int(rng.integers(3, 6))
    for start, toward_inside in ((t_in, True), (t_out - 1, False)):
        if n <= 2 * ramp + 2:
            break
        side = int(rng.integers(0, 4))
        outside = {
            0: (-0.35 * length0, cy[start]),
            1: (width + 0.35 * length0, cy[start]),
            2: (cx[start], -0.35 * length0),
            3: (cx[start], height + 0.35 * length0),
        }[side]
        anchor = start + ramp if toward_inside else start - ramp
        for k in range(ramp):
            i = start + k if toward_inside else start - k
            done = (k + 1) / (ramp + 1)  # share of the way from the edge point to the path
            cx[i] = outside[0] * (1 - done) + cx[anchor] * done
            cy[i] = outside[1] * (1 - done) + cy[anchor] * done
    carrier_side = 1.0 if rng.random() < 0.5 else -1.0
    sweater = scene.SWEATERS[int(rng.integers(len(scene.SWEATERS)))]
    skin = scene.SKINS[int(rng.integers(len(scene.SKINS)))]
    walks_empty = rng.random() < 0.5
    poses: list[scene.BoxPose | None] = []
    people: list[scene.Person | None] = []
    for i in range(n):
        carried = t_in <= i < t_out
        pose = scene.BoxPose(
            cx=float(cx[i]),
            cy=float(cy[i]),
            length=float(length0 * scale[i]),
            breadth=float(length0 * scale[i] * breadth_ratio),
            angle=float(angle[i]),
            perspective=float(persp[i]),
            height=0.07,
        )
        _, v = scene.box_axes(pose)
        body = np.array([pose.cx, pose.cy]) - carrier_side * v * (pose.breadth * 0.5 + 0.06 * pose.length)
        facing = math.atan2(carrier_side * v[1], carrier_side * v[0])
        person = scene.Person(
            cx=float(body[0]),
            cy=float(body[1]),
            angle=facing,
            scale=0.8 * length0,
            sweater=sweater,
            skin=skin,
        )
        poses.append(pose if carried else None)
        people.append(person if carried or walks_empty else None)
    hands_t = (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.3, 0.3)))
    return _Track(poses=poses, person=people, hands_t=hands_t)


def _bbox_of_shapes(shapes: list[scene.Shape]) -> np.ndarray | None:
    if not shapes:
        return None
    pts = np.array([p for s in shapes for p in s.points], dtype=np.float64)
    pad = max(s.width for s in shapes)
    return np.array([*(pts.min(axis=0) - pad), *(pts.max(axis=0) + pad + 1)])


def _overlaps(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is not None and b is not None and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _bad_label(
    rng: np.random.Generator, box: np.ndarray, *, width: int, height: int
) -> tuple[np.ndarray, str]:
    """A box a careless labeler might draw: shifted by a third of its size, or far too large."""
    w, h = box[2] - box[0], box[3] - box[1]
    if rng.random() < 0.5:
        dx, dy = rng.choice([-1, 1], size=2) * rng.uniform(0.3, 0.45, size=2) * np.array([w, h])
        bad, reason = box + np.array([dx, dy, dx, dy]), "bad label: box shifted"
    else:
        grow = rng.uniform(1.5, 1.9)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        bad = np.array([cx - w * grow / 2, cy - h * grow / 2, cx + w * grow / 2, cy + h * grow / 2])
        reason = "bad label: box too large"
    bad = np.rint(np.clip(bad, [0, 0, 0, 0], [width, height, width, height]))
    if bad[2] - bad[0] < 2 or bad[3] - bad[1] < 2:
        bad = np.rint(np.clip(box * np.array([1, 1, 1.5, 1.5]), 0, [width, height, width, height]))
        reason = "bad label: box too large"
    return bad, reason


def render_video(plan: VideoPlan, *, seed: int, width: int, height: int) -> Iterator[SynthFrame]:
    """Render the frames of one video, in order (deterministic for ``seed`` and ``plan``)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, plan.index]))
    background = scene.room(rng, width=width, height=height)
    cam = scene.camera(rng, width=width, height=height)
    n = plan.frames
    track = _track(rng, n, width=width, height=height)
    center = (width / 2, height / 2)
    # Sometimes a second box stands on the floor for a while (rarely of the other colour).
    floor = None
    if rng.random() < 0.35 and n >= 4:
        span = max(2, int(n * rng.uniform(0.2, 0.5)))
        start = int(rng.integers(0, n - span + 1))
        other = rng.random() < 0.25
        length = track.poses[0].length if track.poses[0] else math.sqrt(width * height) * 0.4
        for pose in track.poses:
            if pose is not None:
                length = pose.length
                break
        floor_pose = scene.BoxPose(
            cx=float(width * rng.uniform(0.15, 0.85)),
            cy=float(height * rng.uniform(0.25, 0.8)),
            length=float(length * rng.uniform(0.7, 0.9)),
            breadth=float(length * rng.uniform(0.45, 0.6)),
            angle=float(rng.uniform(-np.pi, np.pi)),
            perspective=0.0,
            height=0.07,
        )
        floor = (
            range(start, start + span),
            floor_pose,
            COLORS[1 - COLORS.index(plan.color)] if other else plan.color,
        )
    exposure = 1 + _smooth(rng, n, amplitude=0.06, period=(20, 60))
    if rng.random() < 0.4:  # a light switched on or off during the video
        step = int(rng.integers(0, n))
        exposure[step:] *= rng.uniform(0.8, 1.2)
    tint = rng.uniform(0.9, 1.08)

    for i in range(n):
        pose, person = track.poses[i], track.person[i]
        top: list[scene.Shape] = []  # what is drawn over the floor box
        boxes, colors = [], []
        if person is not None:
            top += scene.person_body_shapes(person)
        if pose is not None:
            hands = np.array(
                [scene.lid_point(pose, -1.0, track.hands_t[0]), scene.lid_point(pose, 1.0, track.hands_t[1])]
            )
            top += scene.person_arm_shapes(person, hands)
            owner = 1 if floor is not None else 0
            # Hands over the edges never reach a corner of a whole box, but they could hide the extreme
            # pixels of a box cut by the frame edge: there they go under the box.
            _, outline = scene.box_outline(pose, image_center=center)
            whole = bool(
                (outline.min(axis=0) >= 0).all()
                and (outline[:, 0] < width).all()
                and (outline[:, 1] < height).all()
            )
            if not whole:
                top += scene.hand_shapes(person, hands)
            top += scene.box_shapes(pose, plan.color, owner, image_center=center, tint=tint)
            if whole:
                top += scene.hand_shapes(person, hands)
        shapes: list[scene.Shape] = []
        floor_color = None
        if floor is not None and i in floor[0]:
            label = scene.box_label_xyxy(floor[1], width=width, height=height)
            if label is not None and not _overlaps(label, _bbox_of_shapes(top)):
                shapes += scene.box_shapes(floor[1], floor[2], 0, image_center=center, tint=tint)
                boxes.append(label)
                colors.append(floor[2])
                floor_color = floor[2]
        shapes += top
        reason = None
        if pose is not None:
            label = scene.box_label_xyxy(pose, width=width, height=height)
            if label is not None:
                if floor_color is None and floor is not None:
                    # keep owner numbering dense: the carried box is box 0 when no floor box shows
                    shapes = [
                        s if s.owner < 0 else scene.Shape(s.kind, s.points, s.color, 0, s.width)
                        for s in shapes
                    ]
                boxes.append(label)
                colors.append(plan.color)
                _, outline = scene.box_outline(pose, image_center=center)
                full = np.array([*outline.min(axis=0), *(outline.max(axis=0) + 1)], dtype=np.float64)
                shown = (label[2] - label[0]) * (label[3] - label[1])
                if shown < SLIVER_FRACTION * (full[2] - full[0]) * (full[3] - full[1]):
                    reason = "sliver of a box at the frame edge"
        if floor_color is not None and floor_color != plan.color:
            reason = reason or "two colours in one frame (the line's colour names one)"
        true_boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
        label_boxes = true_boxes.copy()
        if reason is None and len(boxes) and rng.random() < BAD_LABEL_RATE:
            label_boxes[0], reason = _bad_label(rng, true_boxes[0], width=width, height=height)
        image = scene.paint(background, shapes)
        jpeg = scene.develop(image, cam, exposure=float(exposure[i]), rng=rng)
        yield SynthFrame(
            image_id=f"{plan.name}_{plan.first_frame + i:06d}",
            video=plan,
            jpeg=jpeg,
            true_boxes=true_boxes,
            colors=colors,
            label_boxes=label_boxes,
            reject_reason=reason,
            shapes=shapes,
        )


def _creation_dates(rng: np.random.Generator, job_index: int) -> Iterator[str]:
    moment = _dt.datetime(2019, 5, 21, 19, 0, 0)
    moment += _dt.timedelta(hours=job_index, seconds=int(rng.integers(3600)))
    while True:
        moment += _dt.timedelta(seconds=float(rng.uniform(2, 40)))
        yield moment.strftime("%Y-%m-%dT%H:%M:%S.%f")


def synthesize(
    out: str | os.PathLike,
    *,
    images: int = DEFAULT_IMAGES,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    progress: Callable[[int], None] | None = None,
    frames_per_video: int = FRAMES_PER_VIDEO,
) -> SynthSummary:
    """Write the synthetic storage-box dataset to ``out`` (local folder or ``s3://`` prefix).

    ``progress`` is called with the number of images written so far after each one.
    """
    width, height = (int(v) for v in size)
    if width < 32 or height < 32:
        raise ConfigError(f"size must be at least 32x32, got {width}x{height}", field="size")
    out = os.fspath(out)
    if not storage.is_remote(out):
        out = os.path.abspath(out)
    storage.makedirs(out)
    started = time.perf_counter()
    plans = plan_videos(images, seed=seed, frames_per_video=frames_per_video)
    jobs: dict[str, list[VideoPlan]] = {}
    for plan in plans:
        jobs.setdefault(plan.job, []).append(plan)
    meta_rng = np.random.default_rng(np.random.SeedSequence([seed, 2_000_003]))
    summary = SynthSummary(
        out=out,
        seed=seed,
        width=width,
        height=height,
        images=0,
        boxes=0,
        empty_images=0,
        boxes_by_color={c: 0 for c in COLORS},
        videos=[p.name for p in plans],
        job_images={},
        manifests=[],
        rejected={},
        rejected_file=storage.join(out, "rejected.txt"),
    )

    def job_records(job_index: int, job: str) -> Iterator[groundtruth.Record]:
        dates = _creation_dates(meta_rng, job_index)
        for plan in jobs[job]:
            for frame in render_video(plan, seed=seed, width=width, height=height):
                name = f"{frame.image_id}.jpg"
                ref = storage.join(out, "images", name)
                storage.write_bytes(ref, frame.jpeg)
                n = len(frame.label_boxes)
                confidences = np.where(meta_rng.random(n) < 0.02, 0.29, 0.09)
                summary.images += 1
                summary.boxes += n
                summary.empty_images += n == 0
                for color in frame.colors:
                    summary.boxes_by_color[color] += 1
                summary.job_images[job] = summary.job_images.get(job, 0) + 1
                if frame.reject_reason:
                    summary.rejected[frame.image_id] = frame.reject_reason
                if progress is not None:
                    progress(summary.images)
                yield groundtruth.make_record(
                    ref,
                    width=width,
                    height=height,
                    boxes_xyxy=frame.label_boxes,
                    class_ids=np.zeros(n),
                    class_map=CLASS_MAP if n else {},
                    job_name=f"labeling-job/{job}",
                    confidences=confidences,
                    metadata={"color": plan.color, "object": "box"},
                    creation_date=next(dates),
                )

    for job_index, job in enumerate(jobs):
        path = storage.join(out, "manifests", f"{job}.output.manifest")
        groundtruth.write_manifest(path, job_records(job_index, job))
        summary.manifests.append(path)

    header = (
        "# Images a reviewer rejected in the synthetic storage-box dataset (detforge synth):\n"
        "# deliberately bad labels, slivers at the frame edge, frames with both colours.\n"
        "# One image id per line; use with: detforge prepare ... --discard rejected.txt\n"
    )
    storage.write_text(summary.rejected_file, header + "".join(f"{i}\n" for i in sorted(summary.rejected)))
    storage.write_text(storage.join(out, "synth.json"), json.dumps(summary.to_json(), indent=2) + "\n")
    storage.write_text(storage.join(out, "README.txt"), _readme(summary))
    summary.seconds = time.perf_counter() - started
    return summary


def _readme(summary: SynthSummary) -> str:
    jobs = "\n".join(
        f"  manifests/{job}.output.manifest: {count} images" for job, count in summary.job_images.items()
    )
    return (
        "Synthetic storage-box dataset written by `detforge synth`\n"
        f"seed {summary.seed}, {summary.width}x{summary.height}, {summary.images} images in "
        f"{len(summary.videos)} videos, {summary.boxes} labeled boxes "
        f"({', '.join(f'{c} {n}' for c, n in summary.boxes_by_color.items())}), "
        f"{summary.empty_images} images without a box.\n"
        "Ground Truth output manifests, one per labeling job (class_id 0 'storage box', colour in the "
        "'color' field):\n" + jobs + "\n"
        f"rejected.txt: {len(summary.rejected)} image ids a reviewer would discard (reasons in synth.json).\n"
        "Next: detforge prepare manifests/*.output.manifest --discard rejected.txt "
        '--class-from "{color} {object}" --out prepared/\n'
    )


def preview(frame: SynthFrame) -> Image.Image:
    """The frame's image (decoded JPEG), for notebooks and debugging."""
    import io

    return Image.open(io.BytesIO(frame.jpeg)).convert("RGB")
