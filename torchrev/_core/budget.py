"""Fitting stacks to a memory budget: measure each block's costs once, choose, verify.

The trade-off: a plan costs a few measured training steps when it is made (the floor, then the
chosen plan, rarely one or two more), made on the first training call of a shape or on example
inputs, and none after. Measurements are deterministic (:class:`LiveTensorBytes` counts live
storages through the dispatcher, :class:`CountFlops` counts matrix-product flops), so the same
model and shapes always give the same plan. Every measurement runs on detached copies of the
inputs, with the RNG state forked, buffers swapped for copies and ``.grad`` stashed, so that
planning changes neither the training step nor its gradients.

NOTE [verified peak]: the additive estimate (floor plus each kept block's bytes) ignores what
blocks share (a kept block's input is often the tensor a run of reversed blocks keeps anyway)
and the backward's transients. The chosen plan's peak is therefore measured, and while it is
above the budget the least time-saving increments are dropped (as many bytes as the excess) and
the plan measured again. Every plan in use was measured under its budget on the shapes it was
made for. Peaks are reported with :data:`HEADROOM` added: exact reversal stores a correction
whose wider codes depend on the values (a few bytes to a few hundred per step from batch to
batch), so a plan measured on one batch keeps that much room for the next. Under FSDP2 every
rank plans at once, on the largest of the ranks' measured peaks (:func:`agreed`), so that all
choose the same plan and run the same collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.checkpoint import checkpoint

from .measure import CountFlops, LiveTensorBytes, local_shard
from .plan import (
    CHOICES,
    BlockCost,
    Choice,
    Increment,
    Plan,
    PlanRow,
    choices_of,
    fallbacks,
    greedy,
    increments,
    resolve_budget,
)
from .planned import _buffer_copies

if TYPE_CHECKING:
    from .sequence import ReversibleSequential

#: Flop-equivalents of one elementwise pass over one byte of a stream: an estimate of machine
#: balance kept low (CPUs and GPUs do 10 to 100 flops per byte moved), so that it errs towards
#: reversal, which needs less memory.
FLOPS_PER_BYTE = 8
#: Elementwise passes over the target stream per step that reversal adds: the inverse update
#: (read two, write one), and with exact reversal the corrections' encode and decode.
INVERSE_PASSES: dict[object, int] = {False: 3, True: 9, "compact": 12}

#: Added to every measured peak (floor and plain included): see NOTE [verified peak].
HEADROOM = 0.01
#: Plans measured at most while the estimate is calibrated against measured peaks, and
#: upgrades tried on measured peaks after it.
CALIBRATIONS = 4
GROWTH = 8

Measure = Callable[[Sequence[tuple[Choice, ...]]], int]


@contextmanager
def untouched(modules: Sequence[nn.Module], device: torch.device) -> Iterator[None]:
    """Run the body without side effects on ``modules``: RNG state forked, buffers swapped for
    copies, parameters' ``.grad`` stashed and put back."""
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    grads = [p.grad for p in params]
    devices = [device.index or 0] if device.type == "cuda" else []
    with ExitStack() as stack:
        for m in modules:
            stack.enter_context(_buffer_copies(m))
        stack.enter_context(torch.random.fork_rng(devices=devices))
        for p in params:
            p.grad = None
        try:
            yield
        finally:
            for p, g in zip(params, grads):
                p.grad = g


def detached(tree: Any) -> Any:
    """``tree`` with every tensor detached, requiring grad as the original did."""
    return tree_map(
        lambda v: v.detach().requires_grad_(v.requires_grad) if isinstance(v, Tensor) else v,
        tree,
    )


def default_loss(out: Any) -> Tensor:
    """A model output's ``.loss`` if it has one, else the sum of its floating-point tensors."""
    loss = getattr(out, "loss", None)
    if isinstance(loss, Tensor):
        return loss
    if isinstance(out, Mapping):
        out = list(out.values())
    leaves = [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()]
    if not leaves:
        raise ValueError("the model's output holds no floating-point tensor; pass loss_fn=")
    return sum(t.sum() for t in leaves)  # type: ignore[return-value]


def step_peak(
    run: Callable[[], Any], params: Sequence[Tensor], loss_fn: Callable[[Any], Tensor]
) -> int:
    """Peak live bytes of ``loss_fn(out := run()).backward()`` beyond parameters and gradients:
    the storages that end up as a ``.grad`` are left out (``LiveTensorBytes.peak_excluding``).
    The output stays alive through the backward, as a training loop that logs it keeps it."""
    with LiveTensorBytes() as tracker:
        out = run()
        loss_fn(out).backward()
        del out
    return tracker.peak_excluding(p.grad for p in params if p.grad is not None)


def agreed(measure: Measure, params: Iterable[Tensor]) -> Measure:
    """``measure``, its peaks the largest over the ranks where ``params`` are sharded (FSDP2).

    Exact reversal's corrections make peaks differ by a few bytes from rank to rank (each has
    its own data); plans chosen from different peaks would differ, and so would the ranks'
    sequences of collectives (a measured step gathers and reduces): every rank plans on the
    same numbers instead, the largest, so that the plan fits every rank.
    """
    mesh = next((_local_mesh(p) for p in params if local_shard(p) is not p), None)
    if mesh is None:
        return measure
    import torch.distributed as dist

    group, device = mesh

    def largest(choices: Sequence[tuple[Choice, ...]]) -> int:
        peak = torch.tensor([measure(choices)], dtype=torch.int64, device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        return int(peak.item())

    return largest


def _local_mesh(t: Any) -> tuple[Any, torch.device]:
    """A DTensor's process group (its mesh's) and the device of its local shard."""
    return t.device_mesh.get_group(), t.to_local().device


def _pointers(tensors: Iterable[Tensor]) -> set[int]:
    """The storage addresses of ``tensors`` (of a DTensor's local shard)."""
    return {local_shard(t).untyped_storage().data_ptr() for t in tensors}


def measure_blocks(
    stack: ReversibleSequential, streams: Sequence[Tensor], kwargs: dict[str, Any]
) -> list[BlockCost]:
    """Each block's :class:`BlockCost` on the stack's real input, block by block: one
    training step of the block alone under each choice, its flops counted."""
    device = streams[0].device
    passes = INVERSE_PASSES[stack._resolved_exact(streams)]
    costs: list[BlockCost] = []
    with untouched([stack], device):
        kw = detached(kwargs)
        outside = _pointers(t for t in tree_leaves(kw) if isinstance(t, Tensor))
        outside |= _pointers((*stack.parameters(), *stack.buffers()))
        values = tuple(s.detach() for s in streams)
        for index, block in enumerate(stack):
            saved: dict[int, int] = {}

            def pack(t: Tensor, saved: dict[int, int] = saved, block: nn.Module = block) -> Tensor:
                storage = t.untyped_storage()
                # FSDP2 swaps in gathered parameters for the forward: not activations either.
                if storage.data_ptr() not in outside | _pointers(block.parameters()):
                    saved[storage.data_ptr()] = storage.nbytes()
                return t

            with saved_tensors_hooks(pack, _same):
                keep, out = _block_step(lambda x, b=block: b(*x, **kw), values)
            checkpointed = _block_step(
                lambda x, b=block: checkpoint(b, *x, use_reentrant=False, **kw), values
            )[0]
            run = stack._run(index, index + 1, values)
            reverse = _block_step(lambda x, r=run: r._reversible(x, kw, inverse=False), values)[0]
            inverse = sum(
                FLOPS_PER_BYTE * passes * values[target].untyped_storage().nbytes()
                for target, _ in block.steps
            )
            costs.append(
                BlockCost(
                    keep_bytes=sum(saved.values()),
                    input_bytes=sum(v.untyped_storage().nbytes() for v in values),
                    keep_flops=keep,
                    checkpoint_flops=checkpointed,
                    reverse_flops=reverse,
                    inverse_flops=inverse,
                )
            )
            values = tuple(o.detach() for o in out)
    return costs


def _block_step(
    run: Callable[[tuple[Tensor, ...]], Sequence[Tensor]], values: tuple[Tensor, ...]
) -> tuple[int, tuple[Tensor, ...]]:
    """Flops of ``run``'s forward and backward on fresh leaves holding ``values``, and its
    outputs."""
    inputs = tuple(v.detach().requires_grad_(v.is_floating_point()) for v in values)
    with torch.enable_grad(), CountFlops() as flops:
        out = tuple(run(inputs))
        sum(o.sum() for o in out if o.requires_grad).backward()  # type: ignore[union-attr]
    return flops.total, out


def _same(t: Tensor) -> Tensor:
    return t


def fit(
    names: Sequence[str],
    costs: Sequence[Sequence[BlockCost]],
    measure: Measure,
    budget: int | float,
) -> Plan:
    """The plan for ``costs`` under ``budget`` (NOTE [verified peak]).

    A fraction measures plain autograd's peak (that step must fit the device: give bytes where
    it would not); bytes need only plans estimated to fit the budget.
    """
    sizes = [len(c) for c in costs]
    raw = measure

    def measure(choices: Sequence[tuple[Choice, ...]]) -> int:
        return math.ceil(raw(choices) * (1 + HEADROOM))

    # A warm-up: the first call of an exact stack sizes its corrections to the data, later
    # calls to the room planned from it (NOTE [planned capacities]), and those are measured.
    raw(choices_of(sizes, []))
    floor = measure(choices_of(sizes, []))
    everything = [("keep",) * n for n in sizes]
    plain = measure(everything) if isinstance(budget, float) else None
    target = resolve_budget(budget, floor, floor if plain is None else plain)
    order, spare = increments(costs), fallbacks(costs)
    best: tuple[int, list[Increment], int] | None = None  # time saved, taken, peak
    room = target - floor
    if plain is not None and target >= plain:
        room = sum(inc.bytes for inc in order)  # plain autograd fits: keep everything
    for _ in range(CALIBRATIONS):
        taken = greedy(order, room, spare)
        peak = measure(choices_of(sizes, taken)) if taken else floor
        estimate = sum(inc.bytes for inc in taken)
        if peak <= target:
            saved = sum(inc.saved for inc in taken)
            if best is None or saved > best[0]:
                best = (saved, taken, peak)
            if len(taken) >= len(order) or estimate == 0 or peak - floor >= estimate:
                break  # nothing left to take, or the estimate was not pessimistic
            room = int((target - floor) * estimate / max(peak - floor, 1))  # calibrated
        else:
            best = best or _backed_off(taken, peak, target, sizes, measure, floor)
            break
    assert best is not None  # the floor fits: resolve_budget checked it
    _, taken, peak = best
    taken, peak = _grown(taken, peak, target, [*order, *spare], sizes, measure)
    choices = choices_of(sizes, taken)
    if plain is None and all(ch == "keep" for stack in choices for ch in stack):
        plain = peak  # the plan is plain autograd: its peak is measured
    rows = tuple(
        PlanRow(names[s], i, choice, *costs[s][i].option(choice))
        for s, stack in enumerate(choices)
        for i, choice in enumerate(stack)
    )
    estimated = floor + sum(c.keep_bytes for stack in costs for c in stack)
    return Plan(rows, target, floor, estimated if plain is None else plain, peak)


def _grown(
    taken: list[Increment],
    peak: int,
    target: int,
    candidates: Sequence[Increment],
    sizes: Sequence[int],
    measure: Measure,
) -> tuple[list[Increment], int]:
    """Try the next upgrades one at a time on measured peaks (at most :data:`GROWTH` more
    measurements), keeping each that fits: the estimate errs per choice (kept blocks share
    their input with their neighbours, checkpointed ones do not), which calibration by one
    factor cannot fix. Peaks do not add up either (keeping a stack's last block costs nothing,
    and one kept block may lower the peak another set), so an upgrade that did not fit is
    tried again after one that did."""
    tries, pending = 0, list(candidates)
    while pending and tries < GROWTH:
        rejected, grew = [], False
        for inc in pending:
            if tries == GROWTH:
                break
            current = choices_of(sizes, taken)[inc.stack][inc.index]
            if CHOICES.index(inc.choice) >= CHOICES.index(current):
                continue  # not an upgrade of this block's current choice
            tries += 1
            attempt = [*taken, inc]
            measured = measure(choices_of(sizes, attempt))
            if measured <= target:
                taken, peak, grew = attempt, measured, True
            else:
                rejected.append(inc)
        if not grew:
            break
        pending = rejected
    return taken, peak


def _backed_off(
    taken: list[Increment],
    peak: int,
    target: int,
    sizes: Sequence[int],
    measure: Measure,
    floor: int,
) -> tuple[int, list[Increment], int]:
    """Drop the least time-saving increments, as many bytes as the excess, until it fits."""
    taken = list(taken)
    while peak > target:
        removed = 0
        while taken and removed < peak - target:
            removed += taken.pop().bytes
        peak = measure(choices_of(sizes, taken)) if taken else floor
    return sum(inc.saved for inc in taken), taken, peak


def plan_stack(
    stack: ReversibleSequential,
    streams: tuple[Tensor, ...],
    kwargs: dict[str, Any],
    budget: int | float,
) -> Plan:
    """The plan of one stack under its own budget, measured on this call's input."""
    costs = measure_blocks(stack, streams, kwargs)
    device = streams[0].device

    def measure(choices: Sequence[tuple[Choice, ...]]) -> int:
        with untouched([stack], device), stack._forced_choices(choices[0]):
            inputs = detached(streams)
            kw = detached(kwargs)
            leaves = [t for t in (*inputs, *tree_leaves(kw)) if isinstance(t, Tensor)]
            trained = [*stack.parameters(), *(t for t in leaves if t.requires_grad)]
            return step_peak(lambda: stack(*inputs, **kw), trained, default_loss)

    return fit([""], [costs], agreed(measure, stack.parameters()), budget)
