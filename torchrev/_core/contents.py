"""What a step's branch may touch: gathered from the module tree on every call.

Parameters' ``requires_grad`` and hooks, and the modules themselves, may change between calls, so
nothing here is cached across calls (but the scan in :mod:`purity`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from .block import AbstractReversibleBlock
from .errors import ReversibilityError
from .purity import pure_layers


class StepContents(NamedTuple):
    """What a step's branch may touch."""

    params: list[Tensor]  # trainable: the branch's and the block's own (used by ``update``)
    frozen: list[Tensor]  # the same, not requiring grad
    owners: tuple[nn.Module, ...]  # submodules holding buffers
    pure: bool  # see NOTE [pure branches]
    sharded: list[Any]  # FSDP2 parameters it reads, not in params (NOTE [sharded units])


def step_contents(
    block: AbstractReversibleBlock, managed: dict[int, Any] | None = None
) -> list[StepContents]:
    """Per step: the parameters it may use (never those only other branches have), the
    submodules whose buffers it may write, and whether its branch is pure. Parameters whose
    id is in ``managed`` (FSDP2's, mapped to their FSDPParam) are listed apart."""
    branches = [block.branch(i) for i in range(len(block.steps))]
    walks = [_submodules(b) for b in branches]
    own = _own_parameters(block, branches, walks)
    plain_call = block.calls_branches_plainly
    contents = []
    for walk in walks:
        params = {id(p): p for m in walk for p in m._parameters.values() if p is not None}
        params.update((id(p), p) for p in own)
        sharded = []
        if managed:
            sharded = [managed[k] for k in params if k in managed]
            params = {k: p for k, p in params.items() if k not in managed}
        trainable = [p for p in params.values() if p.requires_grad]
        frozen = [p for p in params.values() if not p.requires_grad]
        owners = tuple(m for m in walk if m._buffers)
        pure = plain_call and pure_layers(walk)
        contents.append(StepContents(trainable, frozen, owners, pure, sharded))
    return contents


def _own_parameters(
    block: AbstractReversibleBlock, branches: list[nn.Module], walks: list[list[nn.Module]]
) -> list[Tensor]:
    """Parameters of ``block`` in none of its branches (those ``update`` may use)."""
    outside = _submodules(block, skip={id(b) for b in branches})
    candidates = [p for m in outside for p in m._parameters.values() if p is not None]
    if not candidates:
        return candidates  # the usual case: a block is its branches
    inside = {id(p) for walk in walks for m in walk for p in m._parameters.values()}
    own = [p for p in candidates if id(p) not in inside]
    if any(p.requires_grad and p._backward_hooks for p in own):
        raise ReversibilityError(
            f"a parameter of {type(block).__name__} outside its branches has a tensor hook "
            f"(register_hook); the reversible backward would run it twice. Register the hook "
            f"with register_post_accumulate_grad_hook, or on a parameter of a branch."
        )
    return own


def _submodules(root: nn.Module, skip: set[int] | None = None) -> list[nn.Module]:
    """``root`` and every module below it, each once, not entering those whose id is in
    ``skip``: ``nn.Module.modules`` without the name bookkeeping, which costs more than the
    step's other Python work together."""
    found, seen = [root], {id(root)}
    skip = skip or set()
    for module in found:  # grows while it is walked
        for child in module._modules.values():
            if child is not None and id(child) not in seen and id(child) not in skip:
                seen.add(id(child))
                found.append(child)
    return found
