"""Re2TAL (Zhao et al. 2023): rewire a pretrained residual network into a reversible one.

A stage of residual blocks :math:`z_{k+1} = z_k + f_k(z_k)` becomes, keeping every parameter,
:math:`z_{k+1} = z_{k-1} + f_k(z_k)` with :math:`z_{-1} = z_0` the stage input: additive
couplings with F = :math:`f_{2j}`, G = :math:`f_{2j+1}` on streams that start as copies of the
input, and the stage output is :math:`(z_K + z_{K-1})/2`. Blocks that change shape
(downsampling) stay ordinary. The rewired network computes a different function, close enough
to fine-tune from (Re2TAL reports the originals' accuracy after fine-tuning); measure how far
with :func:`torchrev.convert.compare`.

Recognised by structure, without importing their libraries: torchvision/timm ResNet blocks
(BasicBlock, Bottleneck: the post-add ReLU moves in front of the residual function), timm-style
pre-norm transformer blocks (norm1, attn, norm2, mlp), Hugging Face ResNet, ViT and BERT-family
layers. Anything else through ``spec``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from .._core.exact import Exact
from .._core.sequence import ReversibleSequential
from .._core.streams import Duplicate, Mean
from ..couplings.additive import AdditiveCoupling
from ._replace import converted, replace
from .branches import BertAttention, BertFeedForward, PreNorm, PreReLU, Residual, Zero

Matcher = Callable[[nn.Module], "list[nn.Module] | None"]


class RewiredStage(nn.Module):
    """Consecutive residual blocks as one reversible stage (Duplicate, couplings, Mean).

    Callable like each block it replaces: one tensor in and out, with the attention mask
    forwarded to the branches when a loop passes one (Hugging Face encoders).
    """

    def __init__(self, functions: Sequence[nn.Module], exact: Exact = "auto") -> None:
        super().__init__()
        pairs = list(functions) + ([Zero()] if len(functions) % 2 else [])
        self.stack = ReversibleSequential(
            *(AdditiveCoupling(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)),
            exact=exact,
        )
        self.split, self.merge = Duplicate(), Mean()

    def forward(self, x: Tensor, attention_mask: Any = None, *_: Any, **__: Any) -> Tensor:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self.merge(*self.stack(*self.split(x), **kwargs))


def _torchvision_resnet(block: nn.Module) -> list[nn.Module] | None:
    names = ("conv1", "bn1", "conv2", "bn2")
    if not all(hasattr(block, n) for n in names) or getattr(block, "downsample", 0) is not None:
        return None  # no attribute, or a downsample module: not an identity-shortcut block
    if not isinstance(block.conv1, nn.Conv2d):
        return None
    parts = [block.conv1, block.bn1, nn.ReLU(), block.conv2, block.bn2]
    if hasattr(block, "conv3"):
        parts += [nn.ReLU(), block.conv3, block.bn3]
    return [PreReLU(nn.Sequential(*parts))]


def _timm_block(block: nn.Module) -> list[nn.Module] | None:
    if not all(hasattr(block, n) for n in ("norm1", "attn", "norm2", "mlp")):
        return None
    get = lambda name: getattr(block, name, None)  # noqa: E731
    return [
        PreNorm(block.norm1, block.attn, get("ls1"), get("drop_path1")),
        PreNorm(block.norm2, block.mlp, get("ls2"), get("drop_path2")),
    ]


def _hf_resnet(block: nn.Module) -> list[nn.Module] | None:
    if not all(hasattr(block, n) for n in ("shortcut", "layer", "activation")):
        return None
    if not isinstance(block.shortcut, nn.Identity):
        return None
    return [PreReLU(block.layer)]


def _hf_vit(block: nn.Module) -> list[nn.Module] | None:
    names = ("layernorm_before", "attention", "layernorm_after", "mlp")
    if not all(hasattr(block, n) for n in names):
        return None
    drop = getattr(block, "dropout", None)
    return [
        PreNorm(block.layernorm_before, block.attention, drop=drop, masked=True),
        PreNorm(block.layernorm_after, block.mlp, drop=drop),
    ]


def _hf_bert(block: nn.Module) -> list[nn.Module] | None:
    from .meft import _is_bert_layer

    if not _is_bert_layer(block):
        return None
    return [Residual(BertAttention(block)), Residual(BertFeedForward(block))]


MATCHERS: tuple[Matcher, ...] = (_torchvision_resnet, _timm_block, _hf_resnet, _hf_vit, _hf_bert)


def rewire(
    model: nn.Module,
    spec: Mapping[str, Callable[[nn.Module], list[nn.Module]]] | None = None,
    *,
    exact: Exact = "auto",
) -> nn.Module:
    """Rewire ``model``'s residual stages into reversible ones, in place; returns ``model``.

    Every ``nn.Sequential`` or ``nn.ModuleList`` holding at least two consecutive recognised
    residual blocks (see the module docstring) is rewired; other children keep their place.
    ``spec`` maps the dotted path of such a container to a function giving each of its blocks'
    residual functions (``block(x) == x + sum of compositions``, in order) for architectures
    not recognised. Parameters are kept: only module paths change. No match raises.
    :func:`torchrev.undo` restores the original modules. ``exact`` is every rewired stack's
    setting (see :class:`torchrev.ReversibleSequential`; ``"auto"`` reverses 16-bit streams
    exactly and float32 ones in floating point, exact to rounding for additive couplings).
    """
    if converted(model):
        raise ValueError("this model is already converted; call torchrev.undo(model) first.")
    targets = []
    if spec:
        for path, residuals in spec.items():
            container = model.get_submodule(path)
            parent_path, _, name = path.rpartition(".")
            targets.append((model.get_submodule(parent_path), name, container, residuals))
    else:
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.Sequential | nn.ModuleList):
                    targets.append((parent, name, child, None))
    rewired = 0
    for parent, name, container, residuals in targets:
        new = _rewire_container(container, residuals, exact)
        if new is not None:
            replace(model, parent, name, new)
            rewired += 1
    if not rewired:
        raise ValueError(
            f"rewire found no stage of two or more residual blocks in {type(model).__name__}. "
            f"It recognises torchvision/timm ResNet blocks, timm-style pre-norm transformer "
            f"blocks and Hugging Face ResNet, ViT and BERT-family layers; for other models pass "
            f"spec={{'path.to.blocks': lambda block: [residual functions]}}."
        )
    return model


def _rewire_container(
    container: nn.Module, residuals: Callable[[nn.Module], list[nn.Module]] | None, exact: Exact
) -> nn.Module | None:
    children = list(container)
    found = [residuals(c) if residuals else _match(c) for c in children]
    out: list[nn.Module] = []
    run: list[nn.Module] = []
    changed = False
    for child, functions in [*zip(children, found), (None, None)]:
        if functions is not None:
            run.append(child)
            continue
        if len(run) >= 2:
            flat = [f for block in run for f in found[children.index(block)]]
            out.append(RewiredStage(flat, exact))
            changed = True
        else:
            out.extend(run)
        run = []
        if child is not None:
            out.append(child)
    if not changed:
        return None
    return nn.Sequential(*out) if isinstance(container, nn.Sequential) else nn.ModuleList(out)


def _match(block: nn.Module) -> list[nn.Module] | None:
    for matcher in MATCHERS:
        functions = matcher(block)
        if functions is not None:
            return functions
    return None
