"""How far a conversion moved a model: outputs, parameters, activation memory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..bench.memory import MiB, training_step_peak


@dataclass(frozen=True)
class ConversionReport:
    """Original against converted on the same inputs (eval mode for outputs)."""

    max_abs_deviation: float
    relative_deviation: float
    cosine_similarity: float
    same_parameters: bool
    original_mib: float
    converted_mib: float

    def __str__(self) -> str:
        return (
            f"output deviation: max {self.max_abs_deviation:.3e}, relative "
            f"{self.relative_deviation:.3e}, cosine similarity {self.cosine_similarity:.6f}\n"
            f"pretrained parameters kept: {self.same_parameters}\n"
            f"activation memory of a training step: original {self.original_mib:.1f} MiB, "
            f"converted {self.converted_mib:.1f} MiB "
            f"({self.original_mib / max(self.converted_mib, 1e-9):.1f}x)"
        )


def main_output(output: Any) -> Tensor:
    """The tensor a model's output stands for: itself, ``last_hidden_state``, ``logits``, or
    the first tensor of a tuple."""
    if isinstance(output, Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


def _same_tensors(theirs: Any, mine: Any) -> bool:
    """Whether every tensor of ``theirs`` appears, exactly, among ``mine``."""
    index: dict[tuple, list[Tensor]] = {}
    for t in mine:
        index.setdefault((t.shape, t.dtype, t.double().sum().item()), []).append(t)
    return all(
        any(torch.equal(t, v) for v in index.get((t.shape, t.dtype, t.double().sum().item()), []))
        for t in theirs
    )


def compare(
    original: nn.Module, converted: nn.Module, inputs: Mapping[str, Any] | tuple
) -> ConversionReport:
    """Compare ``converted`` with ``original`` (a copy made before converting) on ``inputs``
    (keyword arguments, or a tuple of positional ones): output deviation in eval mode, whether
    every pretrained tensor survives unchanged, and each one's training-step activation peak.
    """

    def run(model: nn.Module) -> Tensor:
        args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), dict(inputs))
        return main_output(model(*args, **kwargs))

    def peak(model: nn.Module) -> float:
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        step = lambda: run(model).float().square().mean().backward()  # noqa: E731
        step()
        value = training_step_peak(step, trainable) / MiB
        model.zero_grad(set_to_none=True)
        return value

    modes = original.training, converted.training
    original.eval()
    converted.eval()
    with torch.no_grad():
        a, b = run(original).float(), run(converted).float()
    deviation = (a - b).abs().max().item()
    cosine = nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    same = _same_tensors(original.state_dict().values(), converted.state_dict().values())
    report = ConversionReport(
        deviation,
        deviation / max(a.abs().max().item(), 1e-30),
        cosine,
        same,
        peak(original),
        peak(converted),
    )
    original.train(modes[0])
    converted.train(modes[1])
    return report
