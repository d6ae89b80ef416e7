"""MEFT (Liao et al. 2023): reversible parameter-efficient fine-tuning of BERT-family encoders.

Each pretrained layer becomes a scaled coupling on two streams that start as copies of the
embeddings and end averaged:

.. math:: h^1_n = \\lambda h^1_{n-1} + F_n(h^2_{n-1}), \\qquad h^2_n = \\beta h^2_{n-1} + G_n(h^1_n)

MEFT1: F = the pretrained layer with an adapter parallel to its feed-forward sublayer, G = an
adapter, lam = 0.1, beta = 1, streams swapped after every layer. MEFT2: F = an adapter, G = the
layer with its parallel adapter, lam = 1, beta = 0.1, swapped. MEFT3: F = the attention sublayer,
G = the feed-forward sublayer, each with a parallel adapter, lam = beta = 0.1. Only adapters and
the task head train.

The trade-off is precision: the inverse divides by lam and beta every layer, so the error of
rebuilding a layer's input grows about tenfold per reversible layer. Measure it with
:func:`reconstruction_errors` on your data and dtype; :func:`meft` warns when it passes
``tolerance``, and ``reversible_layers`` keeps only the top layers reversible (the others store
their activations), :func:`choose_reversible_layers` picking the count from the measurement.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from .._core.checks import check_reversibility
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
    model's own forward, signature and output type stay as they were. The bottom layers up to
    ``len(couplings) - reversible_layers`` store their activations; the rest are reversible.
    With ``reversible_layers=None`` the first training batch decides: the stage measures how
    exactly it can rebuild its input from k top layers under that batch's dtype and autocast,
    and makes reversible the most layers within a tenth of ``tolerance``. Every training step
    then checks the rebuilt input against the real one (``verify``) and warns if it drifts past
    tolerance.
    """

    def __init__(
        self, couplings: list[ScaledCoupling], reversible_layers: int | None, tolerance: float
    ) -> None:
        super().__init__()
        self.couplings = nn.ModuleList(couplings)
        self.tolerance = tolerance
        self.reversible_layers: int | None = None
        self.stacks: tuple[ReversibleSequential, ReversibleSequential] | None = None
        if reversible_layers is not None:
            self.set_reversible_layers(reversible_layers)

    def set_reversible_layers(self, count: int) -> None:
        n = len(self.couplings)
        if not 0 <= count <= n:
            raise ValueError(f"reversible_layers must lie in 0..{n}, got {count}.")
        self.reversible_layers = count
        blocks = list(self.couplings)
        # Kept out of the module tree: the couplings are registered once, in self.couplings.
        self.__dict__["stacks"] = (
            ReversibleSequential(*blocks[: n - count], reversible=False),
            ReversibleSequential(*blocks[n - count :], verify=self.tolerance),
        )

    def forward(self, hidden_states: Tensor, attention_mask: Any = None, *_: Any, **__: Any):
        if self.reversible_layers is None and self.training and torch.is_grad_enabled():
            self._choose(hidden_states, attention_mask)
        streams: tuple[Tensor, ...] = (hidden_states, hidden_states)
        if self.stacks is None:  # not trained yet: evaluation needs no choice
            stacks = (ReversibleSequential(*self.couplings, reversible=False),)
        else:
            stacks = self.stacks
        for stack in stacks:
            stack.train(self.training)
            if len(stack):
                streams = stack(*streams, attention_mask=attention_mask)
        return (streams[0] + streams[1]) / 2

    def _choose(self, hidden: Tensor, mask: Any) -> None:
        errors = stage_errors(self, hidden, mask)
        # A tenth of the tolerance: the error moves from batch to batch with the dropout masks
        # (by 3x between steps of MiniLM), and the per-step check should stay quiet.
        count = max(k for k, e in enumerate(errors) if e <= self.tolerance / 10)
        self.set_reversible_layers(count)
        if count < len(self.couplings):
            warnings.warn(
                f"MEFT: {count} of {len(self.couplings)} layers made reversible; rebuilding the "
                f"input of {count + 1} would lose precision (relative error "
                f"{errors[count + 1]:.1e}, more than a tenth of the tolerance "
                f"{self.tolerance:.0e}). The others store their activations. Pass "
                f"reversible_layers= to choose yourself.",
                stacklevel=3,
            )


def meft(
    model: nn.Module,
    variant: int = 1,
    rank: int = 8,
    *,
    reversible_layers: int | None = None,
    adapter_std: float = 0.02,
    trainable: tuple[str, ...] = HEADS,
    check_inputs: Mapping[str, Tensor] | None = None,
    tolerance: float = 1e-3,
) -> nn.Module:
    """Make a Hugging Face BERT-family model reversible for MEFT fine-tuning, in place.

    The encoder's layers become MEFT couplings (``variant`` 1, 2 or 3) with adapters of
    ``rank``; every parameter but the adapters and modules named in ``trainable`` (the task
    heads) is frozen. Forward signature and outputs stay those of the model, so it trains in an
    ordinary loop or the transformers Trainer; :func:`torchrev.undo` restores the original.
    ``reversible_layers`` keeps that many top layers reversible; by default the first training
    batch chooses the most that rebuild their input within ``tolerance`` (see
    :class:`MeftStage`), and every step warns if the rebuild drifts past it. With
    ``check_inputs`` (a batch for the model) the error is measured now, in float32, and a
    warning names a ``reversible_layers`` within ``tolerance`` if the requested count is not.
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
    stage = MeftStage(couplings, reversible_layers, tolerance)
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
    if check_inputs is not None:
        errors = reconstruction_errors(model, check_inputs)
        count = len(layers) if reversible_layers is None else reversible_layers
        if errors[count] > tolerance:
            best = max(k for k, e in enumerate(errors) if e <= tolerance)
            warnings.warn(
                f"MEFT: rebuilding the input of {count} reversible layers loses precision "
                f"(relative error {errors[count]:.1e} > tolerance {tolerance:.0e}); gradients "
                f"would be off by as much. Use reversible_layers={best} "
                f"(see torchrev.convert.choose_reversible_layers).",
                stacklevel=2,
            )
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


def reconstruction_errors(
    model: nn.Module, inputs: Mapping[str, Tensor], dtype: torch.dtype = torch.float32
) -> list[float]:
    """Relative error of rebuilding the stage input from ``k`` top layers, for k = 0..L.

    Runs ``model(**inputs)`` in eval mode to capture what the MEFT layers receive, then the
    layers forward and their inverses backward, as the reversible backward pass does, in
    ``dtype`` (``torch.bfloat16`` runs the layers under CPU/CUDA autocast, streams in float32).
    """
    stage = meft_stage(model)
    captured: dict[str, Any] = {}

    def grab(_: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"], captured["mask"] = args[0], (args[1] if len(args) > 1 else None)

    handle = stage.register_forward_pre_hook(grab, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        model.train(was_training)
    hidden, mask = captured["hidden"].float(), captured["mask"]
    autocast = (
        torch.autocast(hidden.device.type, dtype=dtype)
        if dtype in (torch.bfloat16, torch.float16)
        else nullcontext()
    )
    with autocast:
        return stage_errors(stage, hidden, mask)


def stage_errors(stage: MeftStage, hidden: Tensor, mask: Any) -> list[float]:
    """Errors of rebuilding ``hidden`` from k = 0..L top layers, as the reversible backward
    does it in the stage's current mode (dropout replayed) and under the current autocast."""
    stack = ReversibleSequential(*stage.couplings)
    stack.train(stage.training)
    report = check_reversibility(stack, hidden, hidden, attention_mask=mask)
    return [0.0, *(b.reconstruction_error for b in reversed(report.blocks))]


def choose_reversible_layers(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    tolerance: float = 1e-3,
    dtype: torch.dtype = torch.float32,
) -> int:
    """The most top layers that can be reversible with reconstruction error within
    ``tolerance``; apply it with ``meft_stage(model).set_reversible_layers(n)``."""
    errors = reconstruction_errors(model, inputs, dtype)
    return max(k for k, e in enumerate(errors) if e <= tolerance)


def _relative(got: tuple[Tensor, ...], want: tuple[Tensor, ...]) -> float:
    return max(
        ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        for a, b in zip(got, want)
    )


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
