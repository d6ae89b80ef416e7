"""One stack call as one custom operator, so that torch.compile keeps the graph around it whole.

NOTE [compile]: the engine reads generator states, mode stacks and version counters and builds
its autograd nodes by hand, none of which Dynamo can trace. Under torch.compile a training
stack call is therefore one operator, ``torchrev::stack_call``, whose implementation runs the
eager engine and whose backward is a second operator, ``torchrev::stack_call_backward``, that
runs the engine's backward. Dynamo and AOTAutograd see two opaque calls with known output
shapes, Inductor compiles everything around them, and there is no graph break (a break inside
a loop, as in ``nn.Sequential.forward``, would leave the whole frame eager). Branches compiled
on their own (``torch.compile(f)``) run compiled inside.

What an operator cannot take as an argument (the stack, the kwargs' structure and their
non-tensor values) is registered once per trace as a :class:`_Site`
(``torch.compiler.assume_constant_result`` runs the registration at trace time and bakes its
number into the graph). The autocast state reaches the operator through the dispatcher: an
autocast kernel, called only while autocast is on where the call was traced, passes its dtype
on as an argument (Python's view of the state while Dynamo traces is not the traced code's).
Each forward run keeps its engine graph, which holds no activations, in ``_RUNS`` under a
number returned as a small CPU tensor, the handle: the compiled graph saves the handle for
backward, and the run is dropped when the handle dies.

The operators' implementations run below autograd and ADInplaceOrView (their dispatch keys
excluded, as for every operator); :func:`_eager` lifts that, so that the engine records its
branches' graphs and reads version counters as in eager code. It and :func:`_autocast_kernel`
are this file's calls into torch's private dispatcher API.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from .grad import EDGE_OUTPUTS
from .state import host_bytes

__all__ = ["AVAILABLE", "opaque_call"]


class _Stack(Protocol):
    def parameters(self) -> Any: ...

    def _engine(
        self, streams: Sequence[Tensor], kwargs: dict[str, Any], inverse: bool
    ) -> tuple[Tensor, ...]: ...


@dataclass(frozen=True)
class _Site:
    """One traced stack call: what its operator's number stands for."""

    stack: Callable[[], _Stack | None]  # a weak reference
    inverse: bool
    spec: TreeSpec  # of the kwargs
    leaves: tuple[Any, ...]  # the kwargs' leaves, 0 where a tensor goes
    slots: tuple[int, ...]  # where the tensors go
    needs: tuple[bool, ...]  # which streams require grad
    trained: tuple[bool, ...]  # which of the kwargs' tensors require grad

    def live_stack(self) -> _Stack:
        stack = self.stack()
        if stack is None:
            raise RuntimeError("torchrev: a compiled graph outlived the reversible stack it calls.")
        return stack

    def kwargs(self, tensors: Sequence[Tensor]) -> dict[str, Any]:
        leaves = list(self.leaves)
        for slot, tensor in zip(self.slots, tensors):
            leaves[slot] = tensor
        return tree_unflatten(leaves, self.spec)


@dataclass
class _Run:
    """One forward run: its engine graph, entered through the gradient edges it keeps."""

    outputs: list[GradientEdge]
    anchor: Tensor  # receives no gradient: it makes _Tap a node of the graph
    grads: list[Tensor | None]  # what _Tap received for the streams and the trained tensors


_SITES: dict[int, _Site] = {}
_RUNS: dict[int, _Run] = {}
_numbers = itertools.count()


def _register(stack: _Stack, inverse: bool, skeleton: Any, *rest: tuple[Any, ...]) -> int:
    """Runs once per trace (Dynamo bakes in the result); ``skeleton``: the kwargs with 0 in
    place of each tensor (a TreeSpec does not survive Dynamo's conversion to a constant)."""
    number = next(_numbers)
    leaves, spec = tree_flatten(skeleton)
    _SITES[number] = _Site(weakref.ref(stack), inverse, spec, tuple(leaves), *rest)
    return number


# What torch.compiler.assume_constant_result(_register) does, without importing Dynamo at
# import time (a second of start-up): mark the function for Dynamo to call at trace time.
_register._dynamo_marked_constant = True  # type: ignore[attr-defined]


def opaque_call(
    stack: _Stack, streams: Sequence[Tensor], kwargs: dict[str, Any], inverse: bool
) -> tuple[Tensor, ...]:
    """``stack._engine(streams, kwargs, inverse)`` as the operator pair (NOTE [compile])."""
    leaves, spec = tree_flatten(kwargs)
    slots = tuple(i for i, v in enumerate(leaves) if isinstance(v, Tensor))
    tensors = [leaves[i] for i in slots]
    skeleton = tree_unflatten([0 if isinstance(v, Tensor) else v for v in leaves], spec)
    needs = tuple(s.requires_grad for s in streams)
    trained = tuple(t.requires_grad for t in tensors)
    site = _register(stack, inverse, skeleton, slots, needs, trained)
    params = _trained(stack)
    *outputs, _ = torch.ops.torchrev.stack_call(site, list(streams), tensors, params, None)
    return tuple(outputs)


def _trained(stack: _Stack) -> list[Tensor]:
    """The parameters the operator returns gradients for. The operator takes them as inputs,
    so that the compiled graph routes those gradients, but differentiates the stack's own:
    what a compiled backward passes in their place may be detached aliases."""
    return [p for p in stack.parameters() if p.requires_grad]


#: Every dispatch key but autocast's, whose exclusion is how autocast is off.
_NOT_AUTOCAST = [
    key
    for name, key in vars(torch._C.DispatchKey).items()
    if isinstance(key, torch._C.DispatchKey) and not name.startswith("Autocast")
]


def _eager() -> Any:
    """Dispatch as eager code does. An operator's implementation runs with the keys above
    the backend excluded: autograd (the engine could not record its branches' graphs in
    backward), ADInplaceOrView (in-place writes would not bump version counters, which the
    engine reads to find the buffers a branch wrote and the inputs it modified), and more.
    This lifts every exclusion but autocast's, which says whether autocast is on."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _NOT_AUTOCAST:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


class _Tap(torch.autograd.Function):
    """The identity on a run's inputs, whose backward hands their gradients to the run:
    leaves in their place would keep the stack's input alive through the whole backward."""

    @staticmethod
    def forward(
        ctx: Any, sink: list[Tensor | None], anchor: Tensor, *tensors: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.sink = sink  # not the run, which holds this node: no reference cycle
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        ctx.sink[:] = grads
        return (None, None, *(None for _ in grads))


def _stack_call(
    site_number: int,
    streams: list[Tensor],
    tensors: list[Tensor],
    params: list[Tensor],
    autocast: torch.dtype | None,
) -> list[Tensor]:
    site = _SITES[site_number]
    stack = site.live_stack()
    run = _Run([], torch.empty(0, requires_grad=True), [])
    taken = [s for s, n in zip(streams, site.needs) if n]
    taken += [t for t, n in zip(tensors, site.trained) if n]
    device = streams[0].device.type
    cast = torch.autocast(device, autocast) if autocast is not None else nullcontext()
    with _eager(), torch.enable_grad(), cast:
        tapped = iter(_Tap.apply(run.grads, run.anchor, *taken))
        streams = [next(tapped) if n else s for s, n in zip(streams, site.needs)]
        tensors = [next(tapped) if n else t for t, n in zip(tensors, site.trained)]
        outputs = stack._engine(streams, site.kwargs(tensors), site.inverse)
    for s, o in zip(streams, outputs):
        if o.shape != s.shape or o.dtype != s.dtype:
            raise RuntimeError(
                f"torchrev under torch.compile: the stack turned a {s.dtype} stream of shape "
                f"{tuple(s.shape)} into {o.dtype} {tuple(o.shape)}; a compiled stack must keep "
                f"its streams' shapes and dtypes (cast them before the stack)."
            )
    run.outputs = [get_gradient_edge(o) for o in outputs]
    number = next(_numbers)
    _RUNS[number] = run
    handle = torch.tensor([number])
    weakref.finalize(handle, _RUNS.pop, number, None)
    return [*(o.detach() for o in outputs), handle]


def _stack_call_fake(
    site_number: int,
    streams: list[Tensor],
    tensors: list[Tensor],
    params: list[Tensor],
    autocast: torch.dtype | None,
) -> list[Tensor]:
    return [*(torch.empty_like(s) for s in streams), torch.empty(1, dtype=torch.long)]


def _stack_call_backward(
    site_number: int,
    handle: Tensor,
    grads: list[Tensor],
    tensors: list[Tensor],
    params: list[Tensor],
) -> list[Tensor]:
    """The gradients of the streams, of the kwargs' tensors that require grad, and of the
    parameters; zeros where none reached them (a custom operator returns tensors only)."""
    site = _SITES[site_number]
    run = _RUNS[int.from_bytes(host_bytes(handle), "little", signed=True)]  # NOTE [host reads]
    run.grads.clear()
    wrt = [run.anchor, *_trained(site.live_stack())]
    with _eager():
        found = torch.autograd.grad(run.outputs, wrt, grads, retain_graph=True, allow_unused=True)
    received = iter(run.grads)
    out = [next(received) if n else None for n in site.needs]
    out += [next(received) for n in site.trained if n]
    out += found[1:]
    shapes = _grad_shapes(site, grads, tensors, params)
    return [_fresh(g, like, grads) for g, like in zip(out, shapes)]


def _grad_shapes(
    site: _Site, grads: Sequence[Tensor], tensors: Sequence[Tensor], params: Sequence[Tensor]
) -> list[Tensor]:
    """What :func:`_stack_call_backward` returns gradients for, in its order."""
    return [*grads, *(t for t, n in zip(tensors, site.trained) if n), *params]


def _fresh(g: Tensor | None, like: Tensor, grads: Sequence[Tensor]) -> Tensor:
    """``g``, or zeros where it is None; a copy where it is one of ``grads`` (an operator's
    outputs may not alias its inputs, and a stream no step read passes its gradient on)."""
    if g is None:
        return torch.zeros_like(like)
    storage = g.untyped_storage().data_ptr()
    return g.clone() if any(h.untyped_storage().data_ptr() == storage for h in grads) else g


def _stack_call_backward_fake(
    site_number: int,
    handle: Tensor,
    grads: list[Tensor],
    tensors: list[Tensor],
    params: list[Tensor],
) -> list[Tensor]:
    shapes = _grad_shapes(_SITES[site_number], grads, tensors, params)
    return [torch.empty_like(t) for t in shapes]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: list[Tensor]) -> None:
    site_number, _, tensors, params, _ = inputs
    ctx.site = site_number
    ctx.n_tensors = len(tensors)
    ctx.save_for_backward(output[-1], *tensors, *params)


def _backward(ctx: Any, grads: list[Tensor]) -> tuple[Any, ...]:
    handle, *rest = ctx.saved_tensors
    tensors, params = rest[: ctx.n_tensors], rest[ctx.n_tensors :]
    site = _SITES[ctx.site]
    out = torch.ops.torchrev.stack_call_backward(ctx.site, handle, grads[:-1], tensors, params)
    n_streams = len(site.needs)
    streams, rest = out[:n_streams], iter(out[n_streams:])
    trained = [next(rest) if n else None for n in site.trained]
    return None, streams, trained, list(rest), None


def _autocast_kernel(
    site_number: int,
    streams: list[Tensor],
    tensors: list[Tensor],
    params: list[Tensor],
    autocast: torch.dtype | None,
) -> list[Tensor]:
    """Where autocast is on: the call again, below autocast, with its dtype as an argument."""
    device = streams[0].device.type
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device))
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
        dtype = torch.get_autocast_dtype(device)
        return torch.ops.torchrev.stack_call(site_number, streams, tensors, params, dtype)


_LIBRARY = torch.library.Library("torchrev", "FRAGMENT")

# NOTE [CUDA graphs]: a CUDA graph replays kernels without the host, so it cannot hold the
# engine, which compares generator states and reads its checks on the host (once per backward,
# NOTE [one read per backward]) and keeps a CPU handle. Tagged cudagraph-unsafe, the operators
# are left out of the graphs: under ``mode="reduce-overhead"`` Inductor partitions the compiled
# step around each stack call and captures everything else (graph partition, on by default
# since torch 2.9). A torch without the tag skips CUDA graphs for such a step instead.
_UNCAPTURED = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


def _define() -> bool:
    """Register the operator pair; False where this torch cannot (before 2.5: no operator
    tags, and autograd.grad takes no gradient edges as outputs)."""
    if not EDGE_OUTPUTS:
        return False
    try:
        forward = torch.library.custom_op(
            "torchrev::stack_call",
            _stack_call,
            mutates_args=(),
            # dropout inside: never merge two calls; NOTE [CUDA graphs]
            tags=(torch.Tag.nondeterministic_seeded, *_UNCAPTURED),
        )
        backward = torch.library.custom_op(
            "torchrev::stack_call_backward",
            _stack_call_backward,
            mutates_args=(),
            tags=_UNCAPTURED,
        )
    except (AttributeError, TypeError):  # pragma: no cover - older torch
        return False
    forward.register_fake(_stack_call_fake)
    backward.register_fake(_stack_call_backward_fake)
    forward.register_autograd(_backward, setup_context=_setup_context)
    for key in dir(torch._C.DispatchKey):
        if key.startswith("Autocast"):
            _LIBRARY.impl("stack_call", _autocast_kernel, key)
    return True


#: Whether torch.compile sees stack calls as the operator pair; where not (older torch), each
#: is one graph break instead (``torch.compiler.disable`` on the engine).
AVAILABLE = _define()
