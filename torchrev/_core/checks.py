"""Check a stack against its own contract: per-block reconstruction and gradient agreement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from .exact import resolve
from .function import Trace, reversible_forward
from .sequence import ReversibleSequential
from .state import RngState, Written, buffers_preserved


@dataclass(frozen=True)
class BlockReport:
    """One block: how far its rebuilt input and its parameters' gradients are from plain, how
    many bits per stream element its steps store for exact reversal (0 without it), and how
    far its own float inverse misses its input given the forward's values (rounding for a
    right inverse, whatever exact reversal corrects afterwards)."""

    index: int
    reconstruction_error: float
    gradient_error: float
    stored_bits: float = 0.0
    inverse_error: float = 0.0


@dataclass(frozen=True)
class ReversibilityReport:
    """What :func:`check_reversibility` measured.

    Errors are max-abs differences relative to the reference tensor's largest entry. For
    gradients the scale is at least 1e-3 of the largest gradient in the stack, so a gradient
    that is zero up to rounding (a bias followed by batch norm) is not a disagreement.
    """

    blocks: tuple[BlockReport, ...]
    input_gradient_error: float
    exact_mode: bool = False

    @property
    def worst_reconstruction(self) -> float:
        return max((b.reconstruction_error for b in self.blocks), default=0.0)

    @property
    def exact(self) -> bool:
        """Whether every block's input was rebuilt bit for bit."""
        return self.worst_reconstruction == 0.0

    @property
    def stored_bits(self) -> float:
        """Bits stored per stream element per step, averaged over the blocks."""
        return sum(b.stored_bits for b in self.blocks) / max(1, len(self.blocks))

    @property
    def worst_inverse(self) -> float:
        """The largest miss of any block's own float inverse (see :class:`BlockReport`)."""
        return max((b.inverse_error for b in self.blocks), default=0.0)

    @property
    def worst_gradient(self) -> float:
        block = max((b.gradient_error for b in self.blocks), default=0.0)
        return max(block, self.input_gradient_error)

    def ok(self, rtol: float) -> bool:
        """Whether every reconstruction and gradient is within ``rtol`` of plain autograd, and
        every block's own inverse within ``rtol`` of its input: exact reversal would hide an
        inverse that is wrong (by storing its whole miss), this does not."""
        worst = max(self.worst_reconstruction, self.worst_gradient, self.worst_inverse)
        return worst <= rtol

    def __str__(self) -> str:
        lines = ["block  reconstruction  float inverse  gradient  bits/element/step"]
        lines += [
            f"{b.index:>5}  {b.reconstruction_error:>14.2e}  {b.inverse_error:>13.2e}"
            f"  {b.gradient_error:>8.2e}  {b.stored_bits:>17.2f}"
            for b in self.blocks
        ]
        lines.append(f"input gradients: {self.input_gradient_error:.2e}")
        mode = "exact" if self.exact_mode else "floating-point"
        lines.append(f"{mode} reversal; every input rebuilt bit for bit: {self.exact}")
        return "\n".join(lines)


def check_reversibility(
    stack: ReversibleSequential, *streams: Tensor, **kwargs: Any
) -> ReversibilityReport:
    """Run one training step of ``stack`` both reversibly and under plain autograd, and compare.

    For each block it reports how far the inputs the backward rebuilt are from those the
    forward computed, and how far the gradients of its parameters are from plain autograd's
    (and, overall, those of the input streams and differentiable kwargs). Both runs start from
    the same RNG state and the same buffers; the stack's buffers and the caller's RNG are left
    as they were. A block whose branches are not deterministic, read state they do not own, or
    are badly conditioned (a small scale in a scaled coupling) shows up as a large
    reconstruction error at that block; a branch that closes over a tensor requiring grad
    (which the reversible backward cannot return a gradient for) raises
    :class:`ReversibilityError`, as a training step would. Run it in
    float64 to separate bugs from rounding, and in your training dtype to see what rounding
    costs. The stack's ``exact`` setting applies: with exact reversal every reconstruction
    error is 0.0 (:attr:`ReversibilityReport.exact`) and each block reports the bits per
    stream element its steps store; each block also reports how far its own float inverse
    misses, so that a wrong ``revert``, which exact reversal would silently correct at full
    width, fails :meth:`ReversibilityReport.ok`.
    """
    blocks = list(stack)
    if blocks:
        blocks[0].check_streams(streams, "check_reversibility")
    exact = resolve(stack.exact, blocks, streams)
    inputs = [s.detach().requires_grad_() for s in streams]
    extras = [v for v in tree_leaves(kwargs) if isinstance(v, Tensor) and v.requires_grad]
    params = [p for p in stack.parameters() if p.requires_grad]
    start = RngState.capture(inputs[0].device)
    buffers = tuple(  # each run works on copies: the stack's own are left as they were
        Written(m, name, b)
        for m in stack.modules()
        for name, b in m._buffers.items()
        if b is not None
    )
    weights = _loss_weights(inputs)

    def step(reversible: bool) -> tuple[list[Tensor | None], Trace]:
        trace = Trace()
        with start.replayed(), buffers_preserved(buffers), torch.enable_grad():
            if reversible:
                outputs = reversible_forward(
                    blocks, inputs, kwargs, trace=trace, exact=exact, check=False
                )
            else:
                outputs = tuple(inputs)
                for block in blocks:
                    outputs = block(*outputs, **kwargs)
            loss = sum((y * w).sum() for y, w in zip(outputs, weights))
            grads = torch.autograd.grad(loss, [*inputs, *extras, *params], allow_unused=True)
        return list(grads), trace

    plain_grads, _ = step(reversible=False)
    rev_grads, trace = step(reversible=True)
    floor = 1e-3 * max((g.abs().max().item() for g in plain_grads if g is not None), default=0)
    n_inputs = len(inputs) + len(extras)

    def grad_error(i: int) -> float:
        return _relative_error(rev_grads[i], plain_grads[i], floor)

    by_block = _params_by_block(blocks, params)
    reports = []
    for index in range(len(blocks)):
        pairs = zip(trace.rebuilt[index], trace.forward[index])
        recon = max(_relative_error(rebuilt, computed) for rebuilt, computed in pairs)
        grad = max((grad_error(n_inputs + i) for i in by_block[index]), default=0.0)
        bits = trace.stored_bits.get(index, [])
        inverse = max(trace.inverse_error.get(index, [0.0]))
        reports.append(BlockReport(index, recon, grad, sum(bits) / max(1, len(bits)), inverse))
    inputs_error = max(grad_error(i) for i in range(n_inputs))
    return ReversibilityReport(tuple(reports), inputs_error, exact)


def _loss_weights(streams: list[Tensor]) -> list[Tensor]:
    """Fixed random weights, one per stream: the loss is a random linear function."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(s.shape, generator=generator, dtype=torch.float64).to(s) for s in streams]


def _params_by_block(couplings: list, params: list[Tensor]) -> list[list[int]]:
    position = {id(p): i for i, p in enumerate(params)}
    return [[position[id(p)] for p in c.parameters() if id(p) in position] for c in couplings]


def _relative_error(a: Tensor | None, b: Tensor | None, floor: float = 0.0) -> float:
    """Max-abs difference over the larger of ``b``'s largest entry and ``floor``."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    scale = max(b.detach().abs().max().item(), floor)
    diff = (a.detach() - b.detach()).abs().max().item()
    return diff / scale if scale > 0 else diff
