"""Error types raised by the engine. Every message names the fix, not just the fault."""

from __future__ import annotations


class ReversibilityError(RuntimeError):
    """A reversible computation was used in a way that would give wrong gradients.

    Raised instead of returning a silently wrong result: a second backward through a stack
    whose activations were already consumed, ``create_graph=True``, a branch that modifies its
    input in place, or an input that a branch's recomputation cannot reproduce.
    """


class ReversibilityWarning(UserWarning):
    """The backward pass rebuilt a stack's input less exactly than the stack's tolerance."""


SECOND_BACKWARD = (
    "backward ran twice through the same forward of a reversible stack. The stack rebuilds its "
    "activations from its outputs and releases them as it goes, so the graph cannot be reused "
    "(retain_graph=True does not keep them). Run the forward again before the second backward, "
    "or set `stack.reversible = False` to store activations like plain autograd."
)

DOUBLE_BACKWARD = (
    "double backward (create_graph=True, e.g. for gradient penalties or Hessian-vector "
    "products) is not supported through a reversible stack: its backward runs outside "
    "autograd. Set `stack.reversible = False` for that computation."
)


def inplace_branch_message(name: str) -> str:
    return (
        f"{name} modified its input in place (for example nn.ReLU(inplace=True) or x.add_() as "
        f"its first operation). A coupling needs that input unchanged to compute its update and "
        f"to invert it. Make the first operation of {name} out of place (inplace=False)."
    )
