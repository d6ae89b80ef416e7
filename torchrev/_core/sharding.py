"""FSDP2 inside a reversible stack: one sharded branch or block gathered at a time, reduced once.

The trade-off: the engine drives FSDP2's parameter groups itself (through FSDP2's private
group API) instead of leaving it to FSDP2's module hooks, which a reversible backward cannot
honour. In return, a stack whose branches (or blocks) are sharded with
``torch.distributed.fsdp.fully_shard`` holds one group's gathered parameters at a time in
forward and in backward, and its gradients are those of one process.

FSDP2 gathers a module's parameters in its forward pre-hook, registers its reduction
(reduce-scatter) on the module's inputs, and reads ``unsharded_param.grad`` when that fires.
The engine computes the forward under no grad, calls branches rather than blocks, and
differentiates each recomputed branch in a nested ``autograd.grad``, so left alone the hooks
gather nothing for a sharded block, fire the reduction inside the nested call before any
gradient exists, and reduce the gradient one step late.

NOTE [sharded units]: a *unit* is the FSDP2 state of a module inside one block (a branch, a
block, or a layer of a branch). Its parameters are not inputs of the step nodes; instead

1. forward: the unit is gathered before the first step that reads it and resharded (as its
   ``reshard_after_forward`` says) after the last;
2. backward: it is gathered before the last step that reads it runs backward, with its state
   set to PRE_BACKWARD, in which FSDP2's hooks only cast (as for activation checkpointing);
   each step differentiates the gathered parameters along with everything else and adds the
   total, in plain autograd's order, to ``unsharded_param.grad`` once its earliest reader has
   run (NOTE [gradient order]); right after that reader, the engine runs the unit's
   post-backward, which reduce-scatters and reshards.

A reduction therefore runs only after every contribution to the unit's gradients has been
added, and always runs: the root's end-of-backward callback, queued when a unit is gathered
for backward, reduces any unit a partial backward did not reach. Units that span several
blocks, units with no sharded root above them, and block units whose mixed-precision policy
would cast the block's streams raise an error that names the layout that works.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .errors import ReversibilityError

_LAYOUT = (
    "Shard each coupling's f and g (or each block) on its own, then the module that contains "
    "the stack: torchrev.fully_shard_stack(stack, ...) does the first, fully_shard(model) the "
    "second."
)


class Unit:
    """One FSDP2 state inside one block and the steps of that block that read its parameters."""

    def __init__(self, state: Any, block: nn.Module) -> None:
        self.state = state
        self.groups = list(state._fsdp_param_groups)
        self.params = [p for g in self.groups for p in g.fsdp_params]
        self.is_block = any(m is block for m in state._modules)
        self.first = self.last = -1  # the steps of the block that read it, set by Sharding

    def gather(self, backward: bool) -> None:
        """All-gather the unit's parameters; for backward, also put its state in PRE_BACKWARD
        (NOTE [sharded units]) and queue the root's end-of-backward callback."""
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        if backward:
            self.state._training_state = TrainingState.PRE_BACKWARD
            self.state._register_root_post_backward_final_callback()
            for group in self.groups:
                group.pre_backward(False)  # False: no prefetch of the next unit
            return
        for group in self.groups:
            with group.use_training_state(TrainingState.FORWARD):
                group.unshard()
                group.wait_for_unshard()

    def release(self) -> None:
        """Reshard after the forward, as the unit's ``reshard_after_forward`` says."""
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        for group in self.groups:
            with group.use_training_state(TrainingState.FORWARD):
                group.reshard()

    def reduce(self) -> None:
        """Reduce-scatter the gradients added to the gathered parameters, and reshard."""
        for group in self.groups:
            group.post_backward()


class Sharding:
    """The sharded units of one stack call, by block."""

    def __init__(self, units: list[list[Unit]]) -> None:
        self.units = units

    @staticmethod
    def find(blocks: Sequence[nn.Module]) -> Sharding | None:
        """The units inside ``blocks``, or None where nothing inside them is sharded (always,
        unless FSDP2 has been imported)."""
        if "torch.distributed.fsdp" not in sys.modules:
            return None
        from torch.distributed.fsdp import FSDPModule

        units, found = [], False
        for block in blocks:
            states = {}
            for module in block.modules():
                if isinstance(module, FSDPModule):
                    state = module._get_fsdp_state()
                    states[id(state)] = state
            units.append([_checked(Unit(s, block), block) for s in states.values()])
            found = found or bool(states)
        return Sharding(units) if found else None

    def managed(self, block_index: int) -> dict[int, Any]:
        """``id(tensor) -> FSDPParam`` for the parameters of the block's units, by the tensor
        each module holds now (sharded or gathered)."""
        out = {}
        for unit in self.units[block_index]:
            for param in unit.params:
                info = param._module_info
                out[id(info.module._parameters[info.param_name])] = param
        return out

    def set_readers(self, block_index: int, readers: Sequence[Sequence[Any]]) -> None:
        """Record which steps read each unit; ``readers[k]``: the FSDPParams step ``k`` reads."""
        for unit in self.units[block_index]:
            ids = {id(p) for p in unit.params}
            steps = [k for k, params in enumerate(readers) if any(id(p) in ids for p in params)]
            if steps:
                unit.first, unit.last = steps[0], steps[-1]

    def before_forward(self, block_index: int, step: int) -> None:
        for unit in self.units[block_index]:
            if unit.first == step:
                unit.gather(backward=False)

    def after_forward(self, block_index: int, step: int) -> None:
        for unit in self.units[block_index]:
            if unit.last == step:
                unit.release()

    def before_backward(self, block_index: int, step: int) -> None:
        for unit in self.units[block_index]:
            if unit.last == step:
                unit.gather(backward=True)

    def after_backward(self, block_index: int, step: int) -> None:
        for unit in self.units[block_index]:
            if unit.first == step:
                unit.reduce()


def gathered(params: Sequence[Any]) -> list[Tensor]:
    """The gathered parameter of each FSDPParam (valid between gather and reshard)."""
    return [p.unsharded_param for p in params]


def accumulate(param: Any, grad: Tensor | None) -> None:
    """Add ``grad`` to the gathered parameter's ``.grad``, as autograd's AccumulateGrad would,
    where FSDP2's post-backward reads it."""
    if grad is None:
        return
    target = param.unsharded_param
    if target.grad is None:
        target.grad = grad.detach()
    else:
        target.grad += grad


def _checked(unit: Unit, block: nn.Module) -> Unit:
    """``unit`` if the engine can run it (NOTE [sharded units]); a clear error otherwise."""
    inside = {id(m) for m in block.modules()}
    name = type(block).__name__
    if any(id(m) not in inside for m in unit.state._modules):
        raise ReversibilityError(
            f"a fully_shard group inside a reversible stack spans modules of several blocks "
            f"(or of a block and modules outside the stack); the engine gathers and reduces one "
            f"block's parameters at a time. {_LAYOUT}"
        )
    if unit.state._is_root is not False:
        raise ReversibilityError(
            f"a module inside {name} is sharded with fully_shard, but no sharded module above "
            f"it ran forward first (FSDP2's root): each sharded branch would act as its own "
            f"root and stay gathered. {_LAYOUT}"
        )
    policy = unit.state._mp_policy
    casts = (policy.param_dtype is not None and policy.cast_forward_inputs) or (
        policy.output_dtype is not None
    )
    if unit.is_block and casts:
        raise ReversibilityError(
            f"fully_shard on the block {name} with a MixedPrecisionPolicy that casts its inputs "
            f"or outputs would cast the stack's streams, which the reversible backward cannot "
            f"undo. Shard each coupling's f and g instead (torchrev.fully_shard_stack(stack, "
            f"mp_policy=...)): their inputs are cast, the streams stay as they are."
        )
    return unit


def fully_shard_stack(stack: nn.Module, *, per: str = "branch", **kwargs: Any) -> nn.Module:
    """Shard a reversible stack with FSDP2 so that its training holds one branch's (or one
    block's) gathered parameters at a time, and return it.

    The trade-off: ``per="branch"`` gathers the least (one ``f`` or ``g``) and communicates
    most often (two all-gathers and two reduce-scatters per coupling and step); ``"block"``
    halves the collectives and gathers a whole block. Either way the gradients are those of
    one process on the global batch (NOTE [sharded units]).

    Calls ``torch.distributed.fsdp.fully_shard(module, **kwargs)`` on every branch (or block),
    then on the stack itself with the same arguments but ``mp_policy``, so that the stack's
    streams are never cast (a branch's inputs are; its output updates the stream in the
    stream's dtype). Shard the model that contains the stack afterwards, as FSDP2 expects of
    its root: ``fully_shard(model)``.
    """
    from torch.distributed.fsdp import fully_shard

    if per not in ("branch", "block"):
        raise ValueError(f"per must be 'branch' or 'block', got {per!r}.")
    for block in stack:
        if per == "block":
            fully_shard(block, **kwargs)
            continue
        branches = {id(b): b for b in (block.branch(k) for k in range(len(block.steps)))}
        for branch in branches.values():
            fully_shard(branch, **kwargs)
    outer = {k: v for k, v in kwargs.items() if k != "mp_policy"}
    fully_shard(stack, **outer)
    return stack
