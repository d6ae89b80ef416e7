"""The model registry: names to factories, plus what tests and tools need to run each model."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from .._core.fit import set_memory_budget

Task = Literal["classification", "segmentation", "detection"]


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its factory and what generic tools need to vary it.

    ``small`` turns the full-size model into one that runs a float64 step in well under a
    second. ``medium`` is the size ``torchrev bench`` measures by default: the model's own
    widths (or near them) on an input large enough that activations dominate its memory and
    compute its step time (a step of a fraction of a second to a few seconds at batch 16 on
    two CPU cores), where ``small`` would measure Python's overhead; ``None`` means ``small``.
    ``depth(n)`` gives the keyword arguments for a model ``n`` units deep (blocks per
    stage, transformer blocks, or RevCol's columns), so tests and ``torchrev bench`` can check
    that activation memory does not grow with depth.
    """

    name: str
    factory: Callable[..., nn.Module]
    task: Task
    depth: Callable[[int], dict[str, Any]]
    small: dict[str, Any] = field(default_factory=dict)
    medium: dict[str, Any] | None = None


_MODELS: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    task: Task,
    depth: Callable[[int], dict[str, Any]],
    small: dict[str, Any] | None = None,
    medium: dict[str, Any] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory(**kwargs) -> nn.Module`` under ``name``.

    Classification models accept ``in_chans``, ``num_classes`` and ``image_size``;
    segmentation models ``in_chans``, ``num_classes`` and ``volume``: the command line builds
    any registered model for its data through these.
    """

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = ModelInfo(name, factory, task, depth, small or {}, medium)
        return factory

    return add


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; unknown names raise with the closest matches."""
    try:
        return _MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}."
        ) from None


def create_model(
    name: str, *, exact: Any = "auto", memory_budget: int | float | None = None, **kwargs: Any
) -> nn.Module:
    """Build the registered model ``name``; keyword arguments override its defaults.

    Every model takes ``reversible: bool = True``: ``reversible=False`` computes the same
    function with the same parameters through plain autograd. ``exact`` sets every reversible
    stack's exact-reversal mode (``True``, ``False`` or ``"auto"``, see
    :class:`torchrev.ReversibleSequential`). ``memory_budget`` is every stack's (a fraction
    of the way from all blocks reversed to all kept, or bytes for a one-stack model);
    :func:`torchrev.fit_memory` shares bytes across a model's stacks instead.
    """
    model = model_info(name).factory(**kwargs)
    if exact != "auto":
        model.exact = exact  # type: ignore[attr-defined]
    if memory_budget is not None:
        set_memory_budget(model, memory_budget)
    return model
