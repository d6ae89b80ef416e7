"""One memory budget shared by every reversible stack of a model.

The trade-off is the same knapsack as a single stack's (:mod:`torchrev._core.plan`), over the
blocks of all stacks at once: a block of the decoder and a block of the encoder compete for the
same bytes, and the ones that save the most time per byte are kept first. The peak measured is
the whole model's training step (embeddings, heads and loss included), so the budget is the
step's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from .budget import agreed, default_loss, detached, fit, measure_blocks, step_peak, untouched
from .plan import Choice, Plan
from .sequence import ReversibleSequential, shape_key

Inputs = Sequence[Any] | Mapping[str, Any]


def fit_memory(
    model: nn.Module,
    example_inputs: Inputs,
    budget: int | float,
    loss_fn: Callable[[Any], Tensor] | None = None,
) -> Plan:
    """Plan every :class:`ReversibleSequential` in ``model`` under one shared ``budget``.

    ``budget``: bytes of activations and temporaries the training step may keep beyond
    parameters and gradients (an int), or a fraction of the way from the all-reversed floor to
    the estimated plain peak (a float in [0, 1]). ``example_inputs``: the model's positional
    arguments (a tuple) or keyword arguments (a dict) for one training step, at the shapes
    training will use; ``loss_fn`` turns the output into the loss (default: its ``.loss`` if
    any, else the sum of its floating-point tensors). The model must be in training mode.

    Returns the plan (``print(plan)`` shows the table) and installs each stack's part of it
    for these input shapes, beside the plans of other shapes (call it once per shape
    training uses, a smaller last batch included): a stack called with shapes never planned
    runs fully reversed, with a warning. A budget below the floor raises a ``ValueError``
    stating the floor. Stacks' own ``memory_budget`` is cleared: shared plans replace it.
    """
    if not model.training:
        raise ValueError("fit_memory plans a training step: call model.train() first.")
    stacks = reversible_stacks(model)
    if not stacks:
        raise ValueError(
            "fit_memory found no ReversibleSequential in the model; convert it first "
            "(torchrev.meft, torchrev.rewire) or build it from reversible stacks."
        )
    loss_fn = loss_fn or default_loss
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    calls = _captured(model, example_inputs, [m for _, m in stacks], device)
    stacks = [(name, m) for name, m in stacks if id(m) in calls]
    for _, m in stacks:
        if m.memory_budget is not None:
            m.memory_budget = None  # and its own plans
    costs = [measure_blocks(m, *calls[id(m)]) for _, m in stacks]

    def measure(choices: Sequence[tuple[Choice, ...]]) -> int:
        with untouched([model], device), _forced([m for _, m in stacks], choices):
            return step_peak(lambda: _call(model, detached(example_inputs)), params, loss_fn)

    plan = fit([name for name, _ in stacks], costs, agreed(measure, params), budget)
    for name, m in stacks:
        m._set_plan(plan.for_stack(name), shape_key(*calls[id(m)]))
    return plan


def set_memory_budget(model: nn.Module, budget: int | float | None) -> nn.Module:
    """Give every reversible stack of ``model`` its own ``memory_budget``; returns ``model``.

    A fraction (or None) means the same for every stack; bytes are one stack's only, so a
    model with several stacks takes a byte budget through :func:`fit_memory`, which shares it.
    """
    stacks = reversible_stacks(model)
    if isinstance(budget, int) and not isinstance(budget, bool) and len(stacks) > 1:
        raise ValueError(
            f"memory_budget={budget} bytes: this model has {len(stacks)} reversible stacks, and "
            f"bytes cannot be split among them without measuring. Give a fraction (0.0 = all "
            f"reversed, 1.0 = all kept), applied to each stack, or share the bytes with "
            f"torchrev.fit_memory(model, example_inputs, {budget})."
        )
    for _, stack in stacks:
        stack.memory_budget = budget
    return model


def reversible_stacks(model: nn.Module) -> list[tuple[str, ReversibleSequential]]:
    """Every reversible stack of ``model`` by name: its submodules, and stacks a module keeps
    out of the module tree and lists in a ``reversible_stacks()`` method (MEFT's)."""
    found: list[tuple[str, ReversibleSequential]] = []
    for name, m in model.named_modules():
        if isinstance(m, ReversibleSequential):
            found.append((name, m))
        listed = getattr(m, "reversible_stacks", None)
        if callable(listed):
            found.extend((f"{name}.{key}".lstrip("."), s) for key, s in listed().items())
    return list({id(s): (n, s) for n, s in found}.values())


def _call(model: nn.Module, inputs: Inputs) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


@contextmanager
def _forced(
    stacks: Sequence[ReversibleSequential], choices: Sequence[tuple[Choice, ...] | None]
) -> Iterator[None]:
    with ExitStack() as stack:
        for m, c in zip(stacks, choices):
            stack.enter_context(m._forced_choices(c))
        yield


def _captured(
    model: nn.Module, inputs: Inputs, stacks: list[ReversibleSequential], device: torch.device
) -> dict[int, tuple[tuple[Tensor, ...], dict[str, Any]]]:
    """Each stack's first call's streams and kwargs, detached, from one forward (fully
    reversed, so that it needs the floor's memory at most)."""
    calls: dict[int, tuple[tuple[Tensor, ...], dict[str, Any]]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if id(module) not in calls:
            calls[id(module)] = (detached(tuple(args)), detached(dict(kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in stacks]
    try:
        with untouched([model], device), _forced(stacks, [None] * len(stacks)):
            out = _call(model, detached(inputs))
            del out
    finally:
        for h in handles:
            h.remove()
    for args, _ in calls.values():
        if not all(isinstance(t, Tensor) for t in tree_leaves(args)):
            raise TypeError("fit_memory: a stack was called with non-tensor streams")
    return calls
