"""What a training run records each epoch: metrics.csv, curves.png and, optionally,
TensorBoard events.

The trade-off: the CSV and the plot are rewritten whole from the run's history every epoch
(a few kilobytes), so a resumed run's files are those of an uninterrupted one without any
appending logic.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

METRICS, CURVES, TENSORBOARD = "metrics.csv", "curves.png", "tensorboard/"


def require_tensorboard() -> Any:
    """TensorBoard's ``SummaryWriter``, or an error saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


class RunLog:
    """Writes a run's per-epoch history to ``out`` (and to TensorBoard if asked)."""

    def __init__(self, out: Path, title: str, metric: str, tensorboard: bool = False) -> None:
        self.out, self.title, self.metric = out, title, metric
        self.writer: Any = None
        if tensorboard:
            self.writer = require_tensorboard()(str(out / TENSORBOARD))

    def epoch(self, history: list[dict[str, Any]]) -> None:
        """Record the history up to its last row (the epoch just finished)."""
        fields = list(dict.fromkeys(k for row in history for k in row))
        with open(self.out / METRICS, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)
        plot_curves(history, self.metric, self.title, self.out / CURVES)
        if self.writer is not None:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: list[dict[str, Any]], metric: str, title: str, path: Path) -> None:
    """Loss on a log axis (left) and the metric (right), on training and validation data, per
    epoch; a dashed line marks the best epoch by validation score (the best checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        if all(key in row for row in history):
            left.plot(epochs, [row[key] for row in history], marker="o", label=label)
    left.set(xlabel="epoch", ylabel="loss (log scale)", title="loss", yscale="log")
    for prefix, label in (("train", "training"), ("val", "validation")):
        values = [100 * row[f"{prefix}_{metric}"] for row in history]
        right.plot(epochs, values, marker="o", label=f"{label} {metric}")
    right.set(xlabel="epoch", ylabel=f"{metric} (%)", title=metric)
    best = max(history, key=lambda row: row[f"val_{metric}"])["epoch"]  # the first best
    for ax in (left, right):
        ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best (epoch {best})")
    finish(fig, title, path)


def finish(fig: Any, title: str, path: Path, legend: bool = True, bottom: float = 0.0) -> None:
    """Legends (unless the figure has its own, in the ``bottom`` fraction kept free), a light
    grid and whole-number x ticks on every panel; the title; saved."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        if legend:
            ax.legend()
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
