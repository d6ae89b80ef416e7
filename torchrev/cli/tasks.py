"""The data `torchrev train` learns from, per task, with its loss, augmentation and scores.

Classification: scikit-learn's digits (real, bundled). Segmentation: generated 3D volumes of
spheres and cubes. Each task comes with a validation set carved from its training data: the
best checkpoint is chosen on it, so the test set only ever reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..data import digits, load_digits, make_shapes3d
from .inputs import InputSpec

#: Keyword arguments that fit a registered model to each task's data.
MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "classification": {"in_chans": 1, "num_classes": 10, "image_size": 8},
    "segmentation": {"in_chans": 1, "num_classes": 3, "volume": 16},
    "detection": {"in_chans": 3, "num_classes": 4, "image_size": 64},
}

#: How each task's data set gives its examples, and what the models are trained on.
INPUTS: dict[str, InputSpec] = {
    "classification": InputSpec(
        "sklearn.datasets.load_digits().images: (N, 8, 8), values 0..16",
        digits.SCALE,
        digits.SHIFT,
        add_channel=True,
    ),
    "segmentation": InputSpec(
        "torchrev.data.make_shapes3d(...)[0]: (N, 1, D, H, W)", 1.0, 0.0, add_channel=False
    ),
    "detection": InputSpec(
        "torchrev.data.make_shapes_detect(...)[0]: (N, 3, H, W)", 1.0, 0.0, add_channel=False
    ),
}


@dataclass(frozen=True)
class TaskData:
    """Train, validation and test tensors, the class names and the headline metric."""

    name: str
    task: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[str, ...]

    @property
    def metric(self) -> str:
        """``accuracy`` for classification; ``dice``, the mean over foreground classes."""
        return "accuracy" if self.task == "classification" else "dice"

    def scorer(self) -> Scorer:
        return Scorer(self.task, self.classes)


def load_task(task: str) -> TaskData:
    """The data set of ``task`` (``classification`` or ``segmentation``), split three ways."""
    if task == "classification":
        x, y, x_test, y_test = load_digits()
        n_val = len(y) // 10  # 143 of the 1,438 training images
        names = tuple(str(d) for d in range(10))
        return TaskData(
            "digits (scikit-learn)", task, x[n_val:], y[n_val:], x[:n_val], y[:n_val],
            x_test, y_test, names,
        )  # fmt: skip
    if task == "segmentation":
        side = MODEL_KWARGS[task]["volume"]
        x, y = make_shapes3d(192, side, seed=0)
        x_val, y_val = make_shapes3d(32, side, seed=1)
        x_test, y_test = make_shapes3d(64, side, seed=2)
        names = ("background", "sphere", "cube")
        return TaskData("shapes3d (generated)", task, x, y, x_val, y_val, x_test, y_test, names)
    raise ValueError(f"unknown task {task!r}; torchrev train knows classification, segmentation")


def augment(x: Tensor, y: Tensor, shift: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random translations of up to ``shift`` pixels (images, filled with the background
    value), or random flips along each axis (volumes: the shapes are symmetric)."""
    if x.dim() == 5:
        for axis in (2, 3, 4):
            flip = torch.rand(len(x), generator=generator) < 0.5
            x[flip] = x[flip].flip(axis)
            y[flip] = y[flip].flip(axis - 1)
        return x, y
    if shift == 0:
        return x, y
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (shift,) * 4, value=float(x.min()))
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator).tolist()
    out = torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx))])
    return out, y


def loss_function(task: str, label_smoothing: float):
    """Cross-entropy for classification; cross-entropy plus soft Dice for segmentation (the
    nnU-Net loss: Dice keeps small foreground classes from drowning in background)."""
    if task == "classification":
        return lambda logits, y: nn.functional.cross_entropy(
            logits, y, label_smoothing=label_smoothing
        )

    def ce_dice(logits: Tensor, y: Tensor) -> Tensor:
        ce = nn.functional.cross_entropy(logits, y)
        probs = logits.softmax(1)[:, 1:]
        onehot = nn.functional.one_hot(y, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs)
        dims = (0, *range(2, logits.dim()))
        overlap = (probs * onehot).sum(dims)
        dice = (2 * overlap + 1) / (probs.sum(dims) + onehot.sum(dims) + 1)
        return ce + (1 - dice).mean()

    return ce_dice


class Scorer:
    """Accumulates predictions batch by batch: accuracy, or Dice per foreground class over
    the whole set (twice the overlap over the sum of sizes; 1 if a class is absent from both)."""

    def __init__(self, task: str, classes: tuple[str, ...]) -> None:
        self.task, self.classes = task, classes
        self.correct = self.seen = 0
        k = len(classes)
        self.overlap, self.predicted, self.actual = [0] * k, [0] * k, [0] * k

    def update(self, logits: Tensor, labels: Tensor) -> None:
        predicted = logits.argmax(dim=1)
        self.correct += (predicted == labels).sum().item()
        self.seen += labels.numel()
        if self.task == "segmentation":
            for c in range(1, len(self.classes)):
                p, t = predicted == c, labels == c
                self.overlap[c] += (p & t).sum().item()
                self.predicted[c] += p.sum().item()
                self.actual[c] += t.sum().item()

    def merged(self, total: Callable[[list[float]], list[float]]) -> Scorer:
        """This scorer with its counts replaced by ``total(counts)`` (their sum over the
        processes of a multi-process run)."""
        counts = total([self.correct, self.seen, *self.overlap, *self.predicted, *self.actual])
        k = len(self.classes)
        ints = [round(c) for c in counts]
        self.correct, self.seen = ints[0], ints[1]
        self.overlap, self.predicted, self.actual = (
            ints[2 : 2 + k],
            ints[2 + k : 2 + 2 * k],
            ints[2 + 2 * k :],
        )
        return self

    def result(self) -> dict[str, float]:
        if self.task == "classification":
            return {"accuracy": self.correct / max(self.seen, 1)}
        per_class = {}
        for c in range(1, len(self.classes)):
            total = self.predicted[c] + self.actual[c]
            dice = 1.0 if total == 0 else 2 * self.overlap[c] / total
            per_class[f"dice_{self.classes[c]}"] = dice
        return {"dice": sum(per_class.values()) / len(per_class), **per_class}


def evaluate(
    model: nn.Module,
    data: TaskData,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    device: torch.device,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Scores of ``model`` on ``(x, y)`` in eval mode, batch by batch (and the mean loss
    under ``loss_fn``, weighted by batch size, if given)."""
    model.eval()
    scorer, total = data.scorer(), 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size].to(device)).cpu()
            scorer.update(logits, y[i : i + batch_size])
            if loss_fn is not None:
                total += loss_fn(logits, y[i : i + batch_size]).item() * len(logits)
    model.train()
    scores = scorer.result()
    return scores if loss_fn is None else {"loss": total / len(x), **scores}
