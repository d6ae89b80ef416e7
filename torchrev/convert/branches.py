"""Branch modules built from pretrained parts: adapters, sublayers, residual functions.

Each wraps modules of the original model (the same parameter objects, so the pretrained
weights are kept and only module paths change) and accepts the keyword arguments a stack
passes to every branch (the attention mask, rotary embeddings, ...), ignoring those it does
not use.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .calls import EXTRA


class Adapter(nn.Module):
    """``Linear(d -> r)``, ReLU, ``Linear(r -> d)``; weights N(0, std^2), biases zero (MEFT)."""

    def __init__(self, dim: int, rank: int, std: float = 0.02) -> None:
        super().__init__()
        if not 1 <= rank <= dim:
            raise ValueError(f"adapter rank must lie in 1..{dim} (the hidden size), got {rank}.")
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, **_: Any) -> Tensor:
        return self.up(torch.relu(self.down(x)))


class Call(nn.Module):
    """``after(module(x, **the named inputs))``: a pretrained module called the way its layer
    calls it, keeping the first item when it returns a tuple (attention modules return their
    weights too), then the modules ``after`` it (output projection, dropout, layer scale).

    Only the keyword inputs named in ``inputs`` reach ``module``, so one branch signature
    serves modules that take different arguments; with ``extra``, so do the keywords the layer
    took as ``**kwargs`` (see :class:`torchrev.convert.calls.LayerCall`), for a module its
    layer handed them to (Hugging Face attention modules).
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Iterable[str] = (),
        after: Iterable[nn.Module] = (),
        *,
        extra: bool = False,
    ) -> None:
        super().__init__()
        self.module, self.inputs, self.extra = module, tuple(inputs), extra
        self.after = nn.Sequential(*after)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        chosen = {name: kwargs[name] for name in self.inputs if name in kwargs}
        if self.extra:
            chosen.update(kwargs.get(EXTRA, {}))
        y = self.module(x, **chosen)
        if isinstance(y, tuple):
            y = y[0]
        return self.after(y)


class Sublayer(nn.Module):
    """One residual sublayer of a pretrained layer: pre-norm ``x + body(norm(x))`` or post-norm
    ``norm(x + body(x))``, with an optional adapter parallel to the body (same input, output
    added: MEFT's parallel adapter).

    The addition keeps the original's order of operations, so without an adapter the sublayer
    computes its part of the layer bit for bit. :meth:`residual` is its residual function,
    what Re2TAL rewires: ``body(norm(x))`` itself for pre-norm, ``self(x) - x`` for post-norm.
    """

    def __init__(
        self,
        body: nn.Module,
        norm: nn.Module | None = None,
        *,
        pre_norm: bool,
        adapter: Adapter | None = None,
    ) -> None:
        super().__init__()
        self.body, self.pre_norm = body, pre_norm
        self.norm = norm if norm is not None else nn.Identity()
        self.adapter = adapter

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        if self.pre_norm:
            return x + self.residual(x, **kwargs)
        h = self.body(x, **kwargs) + x
        if self.adapter is not None:
            h = h + self.adapter(x)
        return self.norm(h)

    def residual(self, x: Tensor, **kwargs: Any) -> Tensor:
        if not self.pre_norm:
            return self(x, **kwargs) - x
        if self.adapter is None:
            return self.body(self.norm(x), **kwargs)
        # NOTE [adapter beside a pre-norm body]: the adapter's weight gradient needs its input,
        # the normalised hidden state, which the frozen body does not keep: stored, it would
        # stay alive through the body's backward, the peak of a recomputed layer. So the
        # adapter normalises ``x`` itself inside a checkpoint, which keeps only ``x`` (kept
        # anyway), and runs first, so that autograd, which differentiates the latest nodes
        # first, reaches it after the body. One hidden state less at the peak for a second
        # normalisation; the values and their sum are the same.
        side = (
            self._adapted(x)
            if not torch.is_grad_enabled()
            else checkpoint(self._adapted, x, use_reentrant=False)
        )
        return self.body(self.norm(x), **kwargs) + side

    def _adapted(self, x: Tensor) -> Tensor:
        assert self.adapter is not None
        return self.adapter(self.norm(x))

    def extra_repr(self) -> str:
        return f"pre_norm={self.pre_norm}"


class Residual(nn.Module):
    """A sublayer's residual function (:meth:`Sublayer.residual`), so it can be rewired
    additively."""

    def __init__(self, sublayer: Sublayer) -> None:
        super().__init__()
        self.sublayer = sublayer

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.sublayer.residual(x, **kwargs)


class Recomputed(nn.Module):
    """A part of a branch that keeps only its input while the rest of the branch differentiates:
    under grad it runs inside non-reentrant :func:`torch.utils.checkpoint.checkpoint` and is
    recomputed once more when its own backward comes.

    The trade-off, measured on a Llama-shaped layer (width 768, sequence 1024, float32): the
    attention sublayer of a MEFT branch keeps four hidden states (``q``, ``k``, ``v`` after the
    rotary embedding, and the attention output) through the backward of the feed-forward
    sublayer, the peak of the recomputed layer; recomputing it drops that peak by 12 MiB of
    about 80 and costs one more attention forward: 1.14x the flops of LoRA with gradient
    checkpointing instead of 1.06x at 24 layers, 1.19x its time instead of 1.08x. Its input is the
    branch's input, which the step keeps anyway. The recomputation replays the forward's RNG
    and autocast state, so the gradients do not change.
    """

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        if not torch.is_grad_enabled():
            return self.part(x, **kwargs)
        return checkpoint(self.part, x, use_reentrant=False, **kwargs)


class Chain(nn.Module):
    """Branches applied one after the other, each receiving the keyword arguments."""

    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        for part in self.parts:
            x = part(x, **kwargs)
        return x


class Zero(nn.Module):
    """A branch that adds nothing: pairs the last residual function of an odd-length stage."""

    def forward(self, x: Tensor, **_: Any) -> Tensor:
        return torch.zeros_like(x)
