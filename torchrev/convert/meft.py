"""MEFT (Liao et al. 2023): reversible parameter-efficient fine-tuning of pretrained transformers.

Each pretrained layer becomes a scaled coupling on two streams that start as copies of the
embeddings and end averaged:

.. math:: h^1_n = \\lambda h^1_{n-1} + F_n(h^2_{n-1}), \\qquad h^2_n = \\beta h^2_{n-1} + G_n(h^1_n)

MEFT1: F = the pretrained layer with an adapter parallel to its feed-forward sublayer, G = an
adapter, lam = 0.1, beta = 1, streams swapped after every layer. MEFT2: F = an adapter, G = the
layer with its parallel adapter, lam = 1, beta = 0.1, swapped. MEFT3: F = the attention sublayer,
G = the feed-forward sublayer, each with a parallel adapter, lam = beta = 0.1. Only adapters and
the task head train.

Any layer family of :mod:`torchrev.convert.families` with an attention and a feed-forward
sublayer converts: BERT-family encoders, GPT-2, OPT, and Llama-layout decoders (Mistral, Qwen2,
Qwen3). The parallel adapter takes the feed-forward sublayer's input: the hidden state in a
post-norm layer (BERT), the normalised one in a pre-norm layer (GPT-2, Llama). In eval mode or
under ``torch.no_grad`` the couplings run as ordinary modules, KV cache included, so
``model.generate`` works on the converted model.

The trade-off was precision: the float inverse divides by lam and beta every layer, so the
error of rebuilding a layer's input grows about tenfold per layer (on MiniLM, 7-100% off in the
adapter gradients with all six layers reversible). The stacks here reverse exactly by default
(``exact="compact"``, see :class:`torchrev.ReversibleSequential`): every layer is reversible, the
gradients are plain autograd's, and each layer stores a few bits per hidden-state element
instead of its activations. No step measures anything, so the first step needs no more memory
than the others.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._core.exact import Exact
from .._core.sequence import ReversibleSequential
from ..couplings.scaled import ScaledCoupling
from ._replace import converted, freeze, remember, replace
from .branches import Adapter, Chain, Recomputed
from .calls import LayerCall, check_one_call, two_streams
from .families import FAMILIES, SPEC_HINT, LayerFamily, family_of, supported

VARIANTS = {1: (0.1, 1.0, True), 2: (1.0, 0.1, True), 3: (0.1, 0.1, False)}
SWAPPED = ((1, (0,)), (0, (1,)))
HEADS = ("classifier", "score", "qa_outputs")


class MeftStage(nn.Module):
    """Stands in for a model's list of layers: one call runs them all as MEFT couplings.

    Called the way the model calls each layer (hidden states, attention mask, rotary
    embeddings, KV cache, ...: :class:`LayerCall` sorts them out), so the model's own forward,
    signature and output type stay as they were. The top ``reversible_layers`` layers form one
    reversible stack (all of them by default); any below store their activations like plain
    autograd.
    """

    def __init__(
        self,
        couplings: list[ScaledCoupling],
        reversible_layers: int | None,
        exact: Exact,
        call: LayerCall,
        memory_budget: int | float | None = None,
    ) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(couplings)
        self.call = call
        self._exact = exact
        self._memory_budget = memory_budget
        self.set_reversible_layers(
            len(couplings) if reversible_layers is None else reversible_layers
        )

    @property
    def stack(self) -> ReversibleSequential:
        """The reversible stack of the top layers (for :func:`torchrev.check_reversibility`)."""
        return self.stacks[1]

    def reversible_stacks(self) -> dict[str, ReversibleSequential]:
        """The stacks kept out of the module tree, for :func:`torchrev.fit_memory`."""
        return {"stack": self.stack}

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
            ReversibleSequential(
                *blocks[n - count :], exact=self._exact, memory_budget=self._memory_budget
            ),
        )

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        hidden, inputs = self.call.split(args, kwargs, self.training and torch.is_grad_enabled())
        streams: tuple[Tensor, ...] = two_streams(hidden)
        for stack in self.stacks:
            stack.train(self.training)
            if len(stack):
                streams = stack(*streams, **inputs)
        return (streams[0] + streams[1]) / 2


def meft(
    model: nn.Module,
    variant: int = 1,
    rank: int = 8,
    *,
    reversible_layers: int | None = None,
    exact: Exact = "compact",
    recompute_attention: bool = True,
    adapter_std: float = 0.02,
    trainable: tuple[str, ...] = HEADS,
    spec: LayerFamily | None = None,
    memory_budget: int | float | None = None,
) -> nn.Module:
    """Make a pretrained transformer reversible for MEFT fine-tuning, in place.

    The model's list of layers (a BERT-family encoder's, a GPT-2, OPT or Llama-layout
    decoder's: any family in :mod:`torchrev.convert.families`, or ``spec`` for others) becomes
    MEFT couplings (``variant`` 1, 2 or 3) with adapters of ``rank``; every parameter but the
    adapters and modules named in ``trainable`` (the task heads) is frozen. Forward signature
    and outputs stay those of the model (``loss``, ``logits``, generation), so it trains in an
    ordinary loop or the transformers Trainer; :func:`torchrev.undo` restores the original.
    Every layer is reversible unless ``reversible_layers`` keeps fewer (the top ones);
    ``exact`` is the reversible stack's setting (``"compact"`` by default: exact, so the
    gradients are plain autograd's at any depth and dtype, with the smallest corrections, about
    8 bits per hidden-state element per layer, whose extra passes a transformer layer hardly
    notices; ``True`` stores about 60% more for less time; ``False`` trusts the float
    inverse, which loses about a digit per layer). ``recompute_attention`` (variants 1 and 2,
    whose branch is the whole layer) recomputes the attention sublayer during the layer's
    backward instead of keeping its activations through the feed-forward sublayer's
    (:class:`~torchrev.convert.branches.Recomputed`: about four hidden states less at the
    peak for one more attention forward per layer, about 10% more time). On a Llama-shaped
    decoder of 24 layers (sequence 1024) the layers need 1.74x less activation memory than
    LoRA with gradient checkpointing for 1.19x its step time with it, 1.52x less for 1.08x
    without it (``benchmarks/convert.py``). ``memory_budget`` is the layer stack's (see
    :class:`torchrev.ReversibleSequential`): bytes or a fraction of the way from all layers
    reversed to all kept; :func:`torchrev.fit_memory` budgets the whole step instead.
    """
    if variant not in VARIANTS:
        raise ValueError(f"MEFT variant must be 1, 2 or 3, got {variant!r}.")
    if converted(model):
        raise ValueError("this model is already converted; call torchrev.undo(model) first.")
    family, parent, name, layers = find_layers(model, spec)
    check_one_call(model, parent, family.inputs)
    lam, beta, swapped = VARIANTS[variant]
    couplings = []
    for index, layer in enumerate(layers):
        f, g = _branches(variant, family, layer, rank, adapter_std, recompute_attention)
        coupling = ScaledCoupling(f, g, lam=lam, beta=beta)
        if swapped and index % 2:
            coupling.steps = SWAPPED  # this layer's F updates the stream the last one's G did
        couplings.append(coupling)
    call = LayerCall(layers[0], family.inputs)
    stage = MeftStage(couplings, reversible_layers, exact, call, memory_budget)
    reference = next(layers[0].parameters())
    stage.to(device=reference.device, dtype=reference.dtype)  # the new adapters, like the rest
    stage.train(layers[0].training)  # new modules (adapters, dropout) in the model's mode
    container = getattr(parent, name)
    one = nn.ModuleList([stage]) if isinstance(container, nn.ModuleList) else nn.Sequential(stage)
    replace(model, parent, name, one)
    adapters = [p for m in stage.modules() if isinstance(m, Adapter) for p in m.parameters()]
    freeze(model, trainable, keep=adapters)
    remember(
        model,
        {
            "method": "meft",
            "variant": variant,
            "rank": rank,
            "reversible_layers": reversible_layers,
            "exact": exact,
            "recompute_attention": recompute_attention,
            "trainable": list(trainable),
            "family": family.name,
            "spec": None if spec is None else spec.name,
        },
    )
    return model


def _branches(
    variant: int, family: LayerFamily, layer: nn.Module, rank: int, std: float, recompute: bool
) -> tuple[nn.Module, nn.Module]:
    assert family.width is not None  # find_layers only returns families MEFT converts
    width = family.width(layer)

    def adapter() -> Adapter:
        return Adapter(width, rank, std)

    parts = family.sublayers(layer)
    if len(parts) != 2:
        raise ValueError(
            f"meft needs two sublayers per layer, attention then feed-forward; family "
            f"{family.name!r} describes {len(parts)}."
        )
    attention, feed_forward = parts
    feed_forward.adapter = adapter()
    if variant == 3:
        attention.adapter = adapter()
        return attention, feed_forward
    whole = Chain(Recomputed(attention) if recompute else attention, feed_forward)
    return (whole, adapter()) if variant == 1 else (adapter(), whole)


def find_layers(
    model: nn.Module, spec: LayerFamily | None = None
) -> tuple[LayerFamily, nn.Module, str, list[nn.Module]]:
    """The first list of layers (``nn.ModuleList`` or ``nn.Sequential``) of one family that
    MEFT converts: the family, the list's parent, its name there, and its layers."""
    families = (spec,) if spec is not None else FAMILIES
    for parent in model.modules():
        for name, child in parent.named_children():
            if not isinstance(child, nn.ModuleList | nn.Sequential) or not len(child):
                continue
            family = family_of(child[0], families)
            if family is not None and family.width is not None and all(map(family.match, child)):
                return family, parent, name, list(child)
    if spec is not None:
        raise ValueError(
            f"meft found no list of layers matching spec {spec.name!r} in {type(model).__name__}"
            f" (a ModuleList or Sequential whose every layer spec.match accepts, with a width "
            f"and two sublayers, attention then feed-forward)."
        )
    raise ValueError(
        f"meft found no list of layers it recognises in {type(model).__name__}. It converts: "
        f"{supported(meft=True)}. {SPEC_HINT}"
    )


def meft_stage(model: nn.Module) -> MeftStage:
    stages = [m for m in model.modules() if isinstance(m, MeftStage)]
    if not stages:
        raise ValueError("this model has no MEFT layers: convert it with torchrev.meft first.")
    return stages[0]
