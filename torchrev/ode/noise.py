"""How the diffusion ``g`` multiplies the Brownian increment: torchsde's noise types.

=============  ==========================  ======================  =============================
noise          ``g(t, y)`` returns          increment ``dW``        ``g dW``
=============  ==========================  ======================  =============================
``diagonal``   ``y.shape``                  ``y.shape``             ``g * dW`` (elementwise)
``additive``   either of those shapes,      as for that shape       as for that shape
               not depending on ``y``
``scalar``     ``(*y.shape, 1)``            ``(*y.shape[:-1], 1)``  ``g @ dW``
``general``    ``(*y.shape, m)``            ``(*y.shape[:-1], m)``  ``g @ dW`` (batched)
=============  ==========================  ======================  =============================

The noise type is a promise about ``g`` that sets the method's strong order (reversible Heun:
1 for additive noise, 0.5 in general; diagonal noise commutes and does better in practice), and
its shape fixes the Brownian motion's dimension ``m``, read off ``g``'s first output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NOISE_TYPES = ("diagonal", "additive", "scalar", "general")


@dataclass(frozen=True)
class Noise:
    """A noise type and, once ``g`` has been evaluated, the shape of its output and whether it
    is a matrix per state (``g @ dW``) rather than elementwise (``g * dW``)."""

    kind: str
    g_shape: torch.Size | None = None
    matrix: bool = False

    def __post_init__(self) -> None:
        if self.kind not in NOISE_TYPES:
            raise ValueError(
                f"noise must be one of {', '.join(map(repr, NOISE_TYPES))}, got {self.kind!r}."
            )

    def resolve(self, g: Tensor, y: Tensor) -> Noise:
        """This noise type with ``g``'s shape checked against the state's and recorded."""
        if not isinstance(g, Tensor):
            raise ValueError(f"the diffusion g must return a tensor, got {type(g).__name__}.")
        elementwise = g.shape == y.shape
        matrix = g.ndim == y.ndim + 1 and g.shape[:-1] == y.shape
        ok = {
            "diagonal": elementwise,
            "additive": elementwise or matrix,
            "scalar": matrix and g.shape[-1] == 1,
            "general": matrix,
        }[self.kind]
        if not ok:
            raise ValueError(
                f"with noise={self.kind!r} the diffusion g must return {self._wanted(y)}; "
                f"g(t0, y0) returned shape {tuple(g.shape)} for a state of shape "
                f"{tuple(y.shape)}. Use noise='diagonal' for g shaped like the state, "
                f"noise='general' for g of shape (*state, m) with an m-dimensional Brownian "
                f"motion, noise='scalar' when m = 1."
            )
        return Noise(self.kind, g.shape, matrix=not elementwise)

    def _wanted(self, y: Tensor) -> str:
        state = tuple(y.shape)
        return {
            "diagonal": f"a tensor shaped like the state, {state}",
            "additive": f"a tensor shaped like the state, {state}, or (*state, m)",
            "scalar": f"a tensor of shape {(*state, 1)}",
            "general": f"a tensor of shape {(*state, 'm')}",
        }[self.kind]

    @property
    def increment_shape(self) -> torch.Size:
        """The shape of a Brownian increment ``dW``: the state's for elementwise noise, the
        state's batch dimensions and ``m`` for a matrix ``g``."""
        if self.g_shape is None:
            raise RuntimeError("the noise shape is known only once g has been evaluated")
        return self.g_shape[:-2] + self.g_shape[-1:] if self.matrix else self.g_shape

    def prod(self, g: Tensor, dw: Tensor) -> Tensor:
        """``g dW``: elementwise, or a batched matrix-vector product."""
        return (g @ dw.unsqueeze(-1)).squeeze(-1) if self.matrix else g * dw

    def cotangent(self, a: Tensor, dw: Tensor) -> Tensor:
        """The adjoint of ``g`` in ``g dW`` given the adjoint ``a`` of the product."""
        return a.unsqueeze(-1) * dw.unsqueeze(-2) if self.matrix else a * dw
