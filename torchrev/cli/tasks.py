"""The data the command line trains on, per task: real digits, generated 3D shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data import load_digits, make_shapes3d


@dataclass(frozen=True)
class TaskData:
    """Train and test tensors, the keyword arguments that fit a model to them, the metric."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    model_kwargs: dict[str, Any]
    metric: str

    def score(self, logits: Tensor, labels: Tensor) -> float:
        """Accuracy for classification; mean Dice over the foreground classes for segmentation."""
        predicted = logits.argmax(dim=1)
        if self.metric == "accuracy":
            return (predicted == labels).float().mean().item()
        classes = range(1, logits.shape[1])
        dice = []
        for c in classes:
            p, t = predicted == c, labels == c
            denominator = (p.sum() + t.sum()).item()
            dice.append(1.0 if denominator == 0 else 2 * (p & t).sum().item() / denominator)
        return sum(dice) / len(dice)


def load_task(task: str) -> TaskData:
    if task == "classification":
        x_train, y_train, x_test, y_test = load_digits()
        kwargs = {"in_chans": 1, "num_classes": 10, "image_size": 8}
        return TaskData(
            "digits (scikit-learn)", x_train, y_train, x_test, y_test, kwargs, "accuracy"
        )
    side = 16
    x_train, y_train = make_shapes3d(96, side, seed=0)
    x_test, y_test = make_shapes3d(32, side, seed=1)
    kwargs = {"in_chans": 1, "num_classes": 3, "volume": side}
    return TaskData("shapes3d (generated)", x_train, y_train, x_test, y_test, kwargs, "dice")


def evaluate(
    model: torch.nn.Module, data: TaskData, batch_size: int, device: torch.device
) -> float:
    """The metric on the test set, in eval mode, batch by batch."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [
                model(data.x_test[i : i + batch_size].to(device)).cpu()
                for i in range(0, len(data.x_test), batch_size)
            ]
        )
    model.train()
    return data.score(logits, data.y_test)
