"""One call into autograd's engine per step backward: gradients of a recomputed branch."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.overrides import has_torch_function

try:  # torch's own inner call of autograd.grad; see NOTE [engine call]
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - older or newer torch: the public call instead
    _engine_run_backward = None

Grads = list[Tensor | None]
#: Whether autograd.grad takes gradient edges as outputs (torch 2.5 on).
EDGE_OUTPUTS = torch.__version__ >= (2, 5)


def engine_grad(
    roots: list[tuple[Tensor | GradientEdge, Tensor]],
    consumed: list[Tensor],
    seeds: list[Tensor | None],
    inputs: list[Tensor],
) -> Grads:
    """Gradients of ``inputs`` from ``(output, grad_output)`` pairs, each tensor in
    ``consumed`` starting from its seed (NOTE [gradient order]); ``allow_unused``.

    A seed enters through an alias of its tensor made after everything else, so autograd, which
    runs the latest node first, adds it before any other contribution, as plain autograd would.

    NOTE [engine call]: for plain tensors ``torch.autograd.grad`` validates and converts its
    arguments in Python (shape checks, ``__torch_function__`` dispatch) and then calls
    ``_engine_run_backward``. Every step's backward calls it once with arguments that are
    right by construction, and at small sizes that wrapper costs as much as the rest of the
    step's Python, so the engine calls the inner function itself when torch has it and no
    argument overrides torch functions.
    """
    with torch.enable_grad():
        roots = [(t, g) for t, g in roots if isinstance(t, GradientEdge) or t.requires_grad]
        roots += [(t.view_as(t), g) for t, g in zip(consumed, seeds) if g is not None]
    if not inputs or not roots:
        return [None] * len(inputs)
    outputs, grad_outputs = tuple(t for t, _ in roots), tuple(g for _, g in roots)
    if _engine_run_backward is None or has_torch_function((*outputs, *grad_outputs, *inputs)):
        return list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))
    return list(
        _engine_run_backward(
            outputs, grad_outputs, False, False, tuple(inputs), True, accumulate_grad=False
        )
    )
