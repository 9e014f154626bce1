"""``metrics.png``: the training trend of a run (loss, learning rate, validation mAP per epoch), no torch.

Drawn with matplotlib's Agg backend (no display needed) from the rows of ``metrics.jsonl``, like the
CloudWatch graph of a SageMaker training job. Not here: computing metrics (``metrics``), PR curves
(``evaluate``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

from detforge import storage


def plot_metrics(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "training") -> None:
    """Draw train loss (and its parts), learning rate and the validation mAPs against epoch into ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if row.get(key) is None else float(row[key]) for row in rows]

    figure = Figure(figsize=(10, 3.6), dpi=100)
    loss_ax, lr_ax, map_ax = figure.subplots(1, 3)
    for key, label in (
        ("train_loss", "total"),
        ("train_loss_bbox_regression", "box regression"),
        ("train_loss_classification", "classification"),
    ):
        if any(key in row for row in rows):
            loss_ax.plot(epochs, series(key), marker="o", label=label)
    loss_ax.set_title("train loss")
    loss_ax.legend(fontsize=8)
    lr_ax.plot(epochs, series("lr"), marker="o", color="tab:gray")
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for key, label in (
        ("validation:mAP", "validation:mAP (VOC07)"),
        ("all_point_map", "all-point AP"),
        ("coco_AP", "COCO AP[.5:.95]"),
    ):
        if any(row.get(key) is not None for row in rows):
            map_ax.plot(epochs, series(key), marker="o", label=label)
    map_ax.set_ylim(0, 1)
    map_ax.set_title("validation")
    if map_ax.lines:
        map_ax.legend(fontsize=8)
    for ax in (loss_ax, lr_ax, map_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    storage.write_bytes(path, buffer.getvalue())
