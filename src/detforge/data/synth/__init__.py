"""The embedded synthetic "storage boxes" dataset (``detforge synth``, the demo's data).

- ``synth.dataset``: the dataset: videos planned and rendered frame by frame, Ground Truth job manifests,
  the reviewer's ``rejected.txt``, ``synthesize(out, images=..., seed=...)``.
- ``synth.scene``: drawing one top-down office scene (carpet, furniture, a person carrying a box).

The dataset's public names are re-exported here (``from detforge.data.synth import synthesize``).
"""

from detforge.data.synth.dataset import (
    BAD_LABEL_RATE,
    CLASS_MAP,
    COLORS,
    DEFAULT_IMAGES,
    DEFAULT_SIZE,
    FRAMES_PER_VIDEO,
    SLIVER_FRACTION,
    SynthFrame,
    SynthSummary,
    VideoPlan,
    parse_size,
    plan_videos,
    preview,
    render_video,
    synthesize,
)

__all__ = [
    "BAD_LABEL_RATE",
    "CLASS_MAP",
    "COLORS",
    "DEFAULT_IMAGES",
    "DEFAULT_SIZE",
    "FRAMES_PER_VIDEO",
    "SLIVER_FRACTION",
    "SynthFrame",
    "SynthSummary",
    "VideoPlan",
    "parse_size",
    "plan_videos",
    "preview",
    "render_video",
    "synthesize",
]
