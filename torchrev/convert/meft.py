"""MEFT (Liao et al. 2023): reversible parameter-efficient fine-tuning of BERT-family encoders.

Each pretrained layer becomes a scaled coupling on two streams that start as copies of the
embeddings and end averaged:

.. math:: h^1_n = \\lambda h^1_{n-1} + F_n(h^2_{n-1}), \\qquad h^2_n = \\beta h^2_{n-1} + G_n(h^1_n)

MEFT1: F = the pretrained layer with an adapter parallel to its feed-forward sublayer, G = an
adapter, lam = 0.1, beta = 1, streams swapped after every layer. MEFT2: F = an adapter, G = the
layer with its parallel adapter, lam = 1, beta = 0.1, swapped. MEFT3: F = the attention sublayer,
G = the feed-forward sublayer, each with a parallel adapter, lam = beta = 0.1. Only adapters and
the task head train.

The trade-off was precision: the float inverse divides by lam and beta every layer, so the
error of rebuilding a layer's input grows about tenfold per layer (on MiniLM, 7-100% off in the
adapter gradients with all six layers reversible). The stacks here reverse exactly by default
(``exact="auto"``, see :class:`torchrev.ReversibleSequential`): every layer is reversible, the
gradients are plain autograd's, and each layer stores a few bits per hidden-state element
instead of its activations. No step measures anything, so the first step needs no more memory
than the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._core.exact import Exact
from .._core.sequence import ReversibleSequential
from ..couplings.scaled import ScaledCoupling
from ._replace import converted, freeze, replace
from .branches import Adapter, BertAttention, BertFeedForward, Chain

VARIANTS = {1: (0.1, 1.0, True), 2: (1.0, 0.1, True), 3: (0.1, 0.1, False)}
SWAPPED = ((1, (0,)), (0, (1,)))
HEADS = ("classifier", "score", "qa_outputs")


class MeftStage(nn.Module):
    """Stands in for an encoder's list of layers: one call runs them all as MEFT couplings.

    Called the way the encoder calls each layer (hidden states, attention mask, ...), so the
    model's own forward, signature and output type stay as they were. The top
    ``reversible_layers`` layers form one reversible stack (all of them by default); any below
    store their activations like plain autograd.
    """

    def __init__(
        self, couplings: list[ScaledCoupling], reversible_layers: int | None, exact: Exact
    ) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(couplings)
        self._exact = exact
        self.set_reversible_layers(
            len(couplings) if reversible_layers is None else reversible_layers
        )

    @property
    def stack(self) -> ReversibleSequential:
        """The reversible stack of the top layers (for :func:`torchrev.check_reversibility`)."""
        return self.stacks[1]

    @property
    def exact(self) -> Exact:
        return self._exact

    @exact.setter
    def exact(self, value: Exact) -> None:
        self.stack.exact = value  # validates
        self._exact = value

    def set_reversible_layers(self, count: int) -> None:
        n = len(self.couplings)
        if not 0 <= count <= n:
            raise ValueError(f"reversible_layers must lie in 0..{n}, got {count}.")
        self.reversible_layers = count
        blocks = list(self.couplings)
        # Kept out of the module tree: the couplings are registered once, in self.couplings.
        self.__dict__["stacks"] = (
            ReversibleSequential(*blocks[: n - count], reversible=False),
            ReversibleSequential(*blocks[n - count :], exact=self._exact),
        )

    def forward(self, hidden_states: Tensor, attention_mask: Any = None, *_: Any, **__: Any):
        streams: tuple[Tensor, ...] = (hidden_states, hidden_states)
        for stack in self.stacks:
            stack.train(self.training)
            if len(stack):
                streams = stack(*streams, attention_mask=attention_mask)
        return (streams[0] + streams[1]) / 2


def meft(
    model: nn.Module,
    variant: int = 1,
    rank: int = 8,
    *,
    reversible_layers: int | None = None,
    exact: Exact = "auto",
    adapter_std: float = 0.02,
    trainable: tuple[str, ...] = HEADS,
) -> nn.Module:
    """Make a Hugging Face BERT-family model reversible for MEFT fine-tuning, in place.

    The encoder's layers become MEFT couplings (``variant`` 1, 2 or 3) with adapters of
    ``rank``; every parameter but the adapters and modules named in ``trainable`` (the task
    heads) is frozen. Forward signature and outputs stay those of the model, so it trains in an
    ordinary loop or the transformers Trainer; :func:`torchrev.undo` restores the original.
    Every layer is reversible unless ``reversible_layers`` keeps fewer (the top ones);
    ``exact`` is the reversible stack's setting (exact by default, so the gradients are plain
    autograd's at any depth and dtype; ``False`` trusts the float inverse, which loses about
    a digit per layer).
    """
    if variant not in VARIANTS:
        raise ValueError(f"MEFT variant must be 1, 2 or 3, got {variant!r}.")
    if converted(model):
        raise ValueError("this model is already converted; call torchrev.undo(model) first.")
    parent, name, layers = _find_bert_layers(model)
    lam, beta, swapped = VARIANTS[variant]
    dim = layers[0].attention.output.dense.out_features
    couplings = []
    for index, layer in enumerate(layers):
        f, g = _branches(variant, layer, dim, rank, adapter_std)
        coupling = ScaledCoupling(f, g, lam=lam, beta=beta)
        if swapped and index % 2:
            coupling.steps = SWAPPED  # this layer's F updates the stream the last one's G did
        couplings.append(coupling)
    stage = MeftStage(couplings, reversible_layers, exact)
    reference = next(layers[0].parameters())
    stage.to(device=reference.device, dtype=reference.dtype)  # the new adapters, like the rest
    adapters = {id(p) for m in stage.modules() if isinstance(m, Adapter) for p in m.parameters()}
    replace(model, parent, name, nn.ModuleList([stage]))
    heads = {
        id(p)
        for n, m in model.named_modules()
        if n.split(".")[-1] in trainable
        for p in m.parameters()
    }
    freeze(model, adapters | heads)
    return model


def _branches(
    variant: int, layer: nn.Module, dim: int, rank: int, std: float
) -> tuple[nn.Module, nn.Module]:
    def adapter() -> Adapter:
        return Adapter(dim, rank, std)

    whole = Chain(BertAttention(layer), BertFeedForward(layer, adapter()))
    if variant == 1:
        return whole, adapter()
    if variant == 2:
        return adapter(), whole
    return BertAttention(layer, adapter()), BertFeedForward(layer, adapter())


def _find_bert_layers(model: nn.Module) -> tuple[nn.Module, str, list[nn.Module]]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and all(map(_is_bert_layer, child)):
                return parent, name, list(child)
    raise ValueError(
        f"meft supports Hugging Face BERT-family encoders (BERT, RoBERTa, ELECTRA, MiniLM, ...: "
        f"a ModuleList of layers with attention.self, attention.output, intermediate and "
        f"output); found none in {type(model).__name__}."
    )


def _is_bert_layer(layer: nn.Module) -> bool:
    attention = getattr(layer, "attention", None)
    output = getattr(layer, "output", None)
    return (
        hasattr(attention, "self")
        and all(hasattr(getattr(attention, "output", None), a) for a in ("dense", "LayerNorm"))
        and hasattr(layer, "intermediate")
        and all(hasattr(output, a) for a in ("dense", "dropout", "LayerNorm"))
    )


def meft_stage(model: nn.Module) -> MeftStage:
    stages = [m for m in model.modules() if isinstance(m, MeftStage)]
    if not stages:
        raise ValueError("this model has no MEFT layers: convert it with torchrev.meft first.")
    return stages[0]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only what MEFT trains (adapters and heads): save this instead of the whole model."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_adapters(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load :func:`adapter_state_dict` output into a model converted the same way."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(
            f"load_adapters: {len(unknown)} entries match no parameter of this model (first: "
            f"{unknown[0]}); convert the model with the same meft settings before loading."
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
