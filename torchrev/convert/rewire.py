"""Re2TAL (Zhao et al. 2023): rewire a pretrained residual network into a reversible one.

A stage of residual blocks :math:`z_{k+1} = z_k + f_k(z_k)` becomes, keeping every parameter,
:math:`z_{k+1} = z_{k-1} + f_k(z_k)` with :math:`z_{-1} = z_0` the stage input: additive
couplings with F = :math:`f_{2j}`, G = :math:`f_{2j+1}` on streams that start as copies of the
input, and the stage output is :math:`(z_K + z_{K-1})/2`. Blocks that change shape
(downsampling) stay ordinary. The rewired network computes a different function, close enough
to fine-tune from (Re2TAL reports the originals' accuracy after fine-tuning); measure how far
with :func:`torchrev.convert.compare`.

Blocks are recognised by structure, without importing their libraries, from the layer
families of :mod:`torchrev.convert.families` (the ones :func:`torchrev.meft` uses):
torchvision/timm ResNet blocks (the post-add ReLU moves in front of the residual function),
timm-style pre-norm transformer blocks, Hugging Face ResNet, ViT and BERT-family layers, and
GPT-2, OPT and Llama-layout decoders (Mistral, Qwen2, Qwen3), whose stages receive the causal
mask, rotary embeddings and, outside training, the KV cache. Anything else through ``spec``.
Leapfrog ``z_{k+1} = z_{k-1} + f_k(z_k)`` is also how Gal et al. (2025) make pretrained decoders
reversible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._core.exact import Exact
from .._core.fit import set_memory_budget
from .._core.sequence import ReversibleSequential
from .._core.streams import Mean
from ..couplings.additive import AdditiveCoupling
from ._replace import converted, freeze, remember, replace
from .branches import Residual, Zero
from .calls import LayerCall, check_one_call, two_streams
from .families import FAMILIES, SPEC_HINT, LayerFamily, family_of, supported

Residuals = Callable[[nn.Module], list[nn.Module]]
Spec = LayerFamily | Mapping[str, Residuals]


class RewiredStage(nn.Module):
    """Consecutive residual blocks as one reversible stage (two streams, couplings, Mean).

    Called like each block it replaces, with the inputs its family declares (attention mask,
    rotary embeddings, KV cache) passed on to the branches.
    """

    def __init__(
        self, functions: Sequence[nn.Module], exact: Exact = "auto", call: LayerCall | None = None
    ) -> None:
        super().__init__()
        pairs = list(functions) + ([Zero()] if len(functions) % 2 else [])
        self.stack = ReversibleSequential(
            *(AdditiveCoupling(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)),
            exact=exact,
        )
        self.merge = Mean()
        self.call = call

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.call is None:
            hidden, inputs = args[0], {}
        else:
            training = self.training and torch.is_grad_enabled()
            hidden, inputs = self.call.split(args, kwargs, training)
        return self.merge(*self.stack(*two_streams(hidden), **inputs))


def rewire(
    model: nn.Module,
    spec: Spec | None = None,
    *,
    exact: Exact = "auto",
    trainable: tuple[str, ...] | None = None,
    memory_budget: int | float | None = None,
) -> nn.Module:
    """Rewire ``model``'s residual stages into reversible ones, in place; returns ``model``.

    Every ``nn.Sequential`` or ``nn.ModuleList`` holding at least two consecutive blocks of one
    recognised family (see the module docstring) is rewired; other children keep their place.
    For architectures not recognised, ``spec`` is a :class:`LayerFamily` describing their
    layers, or maps the dotted path of a container to a function giving each of its blocks'
    residual functions (``block(x) == x + sum of compositions``, in order). Parameters are
    kept: only module paths change. No match raises. :func:`torchrev.undo` restores the
    original modules. ``exact`` is every rewired stack's setting (see
    :class:`torchrev.ReversibleSequential`; ``"auto"`` reverses 16-bit streams exactly and
    float32 ones in floating point, exact to rounding for additive couplings). Every parameter
    stays trainable (Re2TAL fine-tunes the whole network) unless ``trainable`` names the
    modules that train, freezing the rest (LoRA added afterwards by peft trains too).
    ``memory_budget`` is every rewired stack's (see :class:`torchrev.ReversibleSequential`; a
    fraction, or bytes where there is one stack); :func:`torchrev.fit_memory` shares bytes
    across the stacks of the whole model instead.
    """
    if converted(model):
        raise ValueError("this model is already converted; call torchrev.undo(model) first.")
    rewired = 0
    for parent, name, container, how in _targets(model, spec):
        new = _rewire_container(container, how, exact)
        if new is not None:
            call = next(m.call for m in new if isinstance(m, RewiredStage))
            check_one_call(model, parent, call.inputs if call is not None else ())
            replace(model, parent, name, new)
            rewired += 1
    if not rewired:
        raise ValueError(
            f"rewire found no stage of two or more residual blocks in {type(model).__name__}. "
            f"It recognises: {supported()}. {SPEC_HINT} Or pass "
            f"spec={{'path.to.blocks': lambda block: [residual functions]}}."
        )
    if trainable is not None:
        freeze(model, trainable)
    set_memory_budget(model, memory_budget)
    remember(
        model,
        {
            "method": "rewire",
            "exact": exact,
            "trainable": None if trainable is None else list(trainable),
            "spec": None if spec is None else getattr(spec, "name", "paths"),
        },
    )
    return model


def _targets(
    model: nn.Module, spec: Spec | None
) -> list[tuple[nn.Module, str, nn.Module, Residuals | Sequence[LayerFamily]]]:
    """The containers to look at (parent, name, container) and how to find their blocks."""
    if isinstance(spec, Mapping):
        targets = []
        for path, residuals in spec.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            targets.append((parent, name, model.get_submodule(path), residuals))
        return targets
    families = (spec,) if spec is not None else FAMILIES
    return [
        (parent, name, child, families)
        for parent in list(model.modules())
        for name, child in parent.named_children()
        if isinstance(child, nn.Sequential | nn.ModuleList)
    ]


def _rewire_container(
    container: nn.Module, how: Residuals | Sequence[LayerFamily], exact: Exact
) -> nn.Module | None:
    children = list(container)
    found = [_functions(child, how) for child in children]
    out: list[nn.Module] = []
    run: list[int] = []
    changed = False

    def close() -> None:
        nonlocal changed
        if len(run) >= 2:
            flat = [f for i in run for f in found[i][1]]
            stage = RewiredStage(flat, exact, LayerCall(children[run[0]], found[run[0]][0]))
            out.append(stage.train(container.training))  # new modules in the model's mode
            changed = True
        else:
            out.extend(children[i] for i in run)
        run.clear()

    for index, child in enumerate(children):
        if found[index] is not None and (not run or found[run[0]][0] == found[index][0]):
            run.append(index)
            continue
        close()
        if found[index] is not None:
            run.append(index)
        else:
            out.append(child)
    close()
    if not changed:
        return None
    return nn.Sequential(*out) if isinstance(container, nn.Sequential) else nn.ModuleList(out)


def _functions(
    block: nn.Module, how: Residuals | Sequence[LayerFamily]
) -> tuple[tuple[str, ...], list[nn.Module]] | None:
    """The inputs a block's call passes its branches, and its residual functions."""
    if callable(how):
        return ("attention_mask",), list(how(block))
    family = family_of(block, how)
    if family is None:
        return None
    return family.inputs, [Residual(s) for s in family.sublayers(block)]
