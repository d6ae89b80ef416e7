"""Error types raised by the engine. Every message names the fix, not just the fault."""

from __future__ import annotations


class ReversibilityError(RuntimeError):
    """A reversible computation was used in a way that would give wrong gradients.

    Raised instead of returning a silently wrong result: ``create_graph=True``, a branch that
    modifies its input in place or recomputes differently from its forward, or a trainable
    tensor a branch closes over.
    """


class ReversibilityWarning(UserWarning):
    """The backward pass rebuilt a stack's input less exactly than the stack's tolerance."""


SECOND_BACKWARD = (
    "a step of a reversible stack ran backward without the stack's outputs having started the "
    "backward, so the stack cannot rebuild its activations. This is a bug in torchrev or in a "
    "custom autograd graph that calls a step node directly; please report it."
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


def recomputed_differently_message(name: str) -> str:
    return (
        f"{name} computed a different output in backward than in forward, so its input cannot "
        f"be rebuilt and its gradients would be wrong. Common causes: nondeterministic kernels "
        f"(call torch.use_deterministic_algorithms(True)); random numbers from a generator other "
        f"than torch's default one (draw from the default generator, which the engine replays); "
        f"state the branch reads but does not own, such as a tensor attribute or a Python value "
        f"it updates (register it as a buffer of the branch: the engine replays buffers) or a "
        f"parameter it modifies in place. Under floating-point reversal it may also be given an "
        f"input that the inverses rebuilt with amplified rounding (small scales, 16-bit streams, "
        f"many blocks): pass exact=True to the stack. A branch that cannot recompute "
        f"identically must run outside the reversible stack, under plain autograd."
    )
