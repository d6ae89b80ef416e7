"""Find tensors a recomputation reaches but cannot return gradients for.

A custom backward can only hand autograd gradients for its node's inputs. A branch (or an ODE
vector field) that closes over some other tensor requiring grad, say one kept as a plain
attribute instead of an ``nn.Parameter``, would have that gradient dropped without a word.
The recomputation's graph shows every leaf it reaches, so such tensors are caught there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from .errors import ReversibilityError


def graph_leaves(outputs: Sequence[Tensor]) -> list[Tensor]:
    """The tensors requiring grad that ``outputs``' autograd graph would accumulate into."""
    seen: set[object] = set()
    pending = [t.grad_fn for t in outputs if t.grad_fn is not None]
    leaves = []
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        # Leaves end in AccumulateGrad nodes, which have no children; a type test is several
        # times cheaper than probing every node for ``variable``.
        if type(node).__name__ == "AccumulateGrad":
            leaves.append(node.variable)
            continue
        for child, _ in node.next_functions:
            if child is not None:
                pending.append(child)
    return leaves


def check_tracked(outputs: Sequence[Tensor], known: Iterable[Tensor], what: str, fix: str) -> None:
    """Raise if ``outputs`` depend on a tensor requiring grad that is not among ``known``.

    ``fix`` tells the user what to do; ``{what}`` in it is replaced by ``what``.
    """
    ids = {id(t) for t in known}
    stray = [leaf for leaf in graph_leaves(outputs) if id(leaf) not in ids]
    if stray:
        shapes = ", ".join(str(tuple(t.shape)) for t in stray)
        raise ReversibilityError(
            f"{what} uses {len(stray)} tensor(s) requiring grad (shapes {shapes}) that the "
            f"reversible backward cannot return gradients for, so they would silently get "
            f"none. {fix.format(what=what)}"
        )
