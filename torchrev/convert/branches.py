"""Branch modules built from pretrained parts: adapters, sublayers, residual functions.

Each wraps modules of the original model (the same parameter objects, so the pretrained
weights are kept and only module paths change) and accepts the keyword arguments a stack
passes to every branch (``attention_mask``), ignoring those it does not use.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


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


class BertAttention(nn.Module):
    """A BERT-family attention sublayer, ``LN(x + Attn(x) [+ adapter(x)])``."""

    def __init__(self, layer: nn.Module, adapter: Adapter | None = None) -> None:
        super().__init__()
        self.attention, self.adapter = layer.attention, adapter

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        out = self.attention.output
        h = out.dropout(out.dense(self.attention.self(x, attention_mask=attention_mask)[0])) + x
        if self.adapter is not None:
            h = h + self.adapter(x)
        return out.LayerNorm(h)


class BertFeedForward(nn.Module):
    """A BERT-family feed-forward sublayer, ``LN(h + FFN(h) [+ adapter(h)])``."""

    def __init__(self, layer: nn.Module, adapter: Adapter | None = None) -> None:
        super().__init__()
        self.intermediate, self.output, self.adapter = layer.intermediate, layer.output, adapter

    def forward(self, h: Tensor, **_: Any) -> Tensor:
        out = self.output
        y = out.dropout(out.dense(self.intermediate(h))) + h
        if self.adapter is not None:
            y = y + self.adapter(h)
        return out.LayerNorm(y)


class Chain(nn.Module):
    """Branches applied one after the other, each receiving the keyword arguments."""

    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        for part in self.parts:
            x = part(x, **kwargs)
        return x


class Residual(nn.Module):
    """``f(x) = block(x) - x``: the residual function of a block that computes ``x + f(x)``
    behind a normalisation (post-norm BERT), so it can be rewired additively."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.block(x, **kwargs) - x


class PreReLU(nn.Module):
    """``f(x) = body(relu(x))``: a ResNet block's residual function with the post-add ReLU
    moved in front of it, as Re2TAL rewires ResNets."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor, **_: Any) -> Tensor:
        return self.body(torch.relu(x))


class PreNorm(nn.Module):
    """``f(x) = drop(scale(fn(norm(x))))``: a pre-norm transformer's residual branch (timm's
    attention and MLP, Hugging Face ViT's MLP). ``fn`` returning a tuple gives its first item
    (attention modules), and it receives the attention mask when ``masked``."""

    def __init__(
        self,
        norm: nn.Module,
        fn: nn.Module,
        scale: nn.Module | None = None,
        drop: nn.Module | None = None,
        masked: bool = False,
    ) -> None:
        super().__init__()
        self.norm, self.fn, self.masked = norm, fn, masked
        self.scale = scale or nn.Identity()
        self.drop = drop or nn.Identity()

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, **_: Any) -> Tensor:
        y = self.fn(self.norm(x), attention_mask) if self.masked else self.fn(self.norm(x))
        if isinstance(y, tuple):
            y = y[0]
        return self.drop(self.scale(y))


class Zero(nn.Module):
    """A branch that adds nothing: pairs the last residual function of an odd-length stage."""

    def forward(self, x: Tensor, **_: Any) -> Tensor:
        return torch.zeros_like(x)
