"""What a trained model expects: the data set's examples as it gives them, normalised inside.

`torchrev train` feeds its models normalised tensors (digits: ``x / 8 - 1``, a channel axis
added). A checkpoint records that transform in its metadata, and :func:`load_checkpoint`
returns the model wrapped in :class:`TrainedModel`, which applies it: so the model takes the
data as the data set gives it (scikit-learn's ``load_digits().images``, a float64 array of
shape ``(N, 8, 8)`` with values 0 to 16). The trade-off: the wrapper costs one multiply-add
per input element, and its ``state_dict`` keys are those of the trained model under
``model.``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class InputSpec:
    """``x * scale + shift`` on the data set's examples, with a channel axis inserted at
    dimension 1 when ``add_channel`` (the data set's examples have none)."""

    source: str
    scale: float
    shift: float
    add_channel: bool


class TrainedModel(nn.Module):
    """A trained model that takes its data set's examples as the data set gives them.

    ``forward(x)`` computes ``model(x * scale + shift)`` (with a channel axis added where the
    data set has none), after converting ``x`` (a tensor or a NumPy array) to the model's
    dtype and device. ``model`` is the registered model itself, for normalised inputs.

    Example:
        ```py
        from sklearn.datasets import load_digits
        import torchrev

        model = torchrev.load_checkpoint("runs/revnet38/best.safetensors")
        predicted = model(load_digits().images).argmax(1)
        ```
    """

    def __init__(self, model: nn.Module, inputs: InputSpec) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, x: Any) -> Tensor:
        reference = next(self.model.parameters(), None)
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        device = reference.device if reference is not None else None
        x = torch.as_tensor(x).to(device=device, dtype=dtype)
        if self.inputs.add_channel:
            x = x.unsqueeze(1)
        return self.model(x * self.inputs.scale + self.inputs.shift)

    def extra_repr(self) -> str:
        spec = self.inputs
        channel = ", a channel axis added" if spec.add_channel else ""
        return f"inputs: {spec.source} -> x * {spec.scale} + {spec.shift}{channel}"
