"""Branches whose recomputation provably needs neither the RNG replay nor the closure check.

For an arbitrary branch the engine pays two checks on every step: it captures the generator
state after the branch to learn whether it drew random numbers (NOTE [RNG replay]), and it
walks the recomputed graph for trainable tensors it cannot return gradients for (NOTE
[closed-over tensors]). At width 64 and batch 512 on the engine benchmark, where per-step
Python shows, they cost about 4% of a step.

NOTE [pure branches]: a branch made only of the torch.nn layers below, each running torch's
own ``forward`` (no forward hooks, none set on the instance, no global ones), reads nothing but
its input, its parameters and its buffers and draws no random numbers. If none of its
parameters is a tensor subclass, no tensor sits in a layer's ``__dict__`` where ``forward``
might read it instead of a parameter, no buffer requires grad and no torch function or
dispatch mode is active, neither check can find anything, and the engine skips both. Anything
else, from a custom module to a hook that adds noise, takes the general path.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.overrides import has_torch_function


class PassThrough(nn.Identity):
    """``nn.Identity`` that accepts and ignores the keyword arguments a stack passes to every
    branch: the branch of a step that adds another stream as it is (MomentumCoupling's)."""

    def forward(self, x: Tensor, **_: Any) -> Tensor:
        return x


# Exact types: a subclass may override forward. None of these draws random numbers.
PURE_LAYERS: frozenset[type[nn.Module]] = frozenset(
    {
        PassThrough,
        nn.Sequential,
        nn.Identity,
        nn.Flatten,
        nn.Unflatten,
        nn.Linear,
        nn.Bilinear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.RMSNorm,
        nn.ReLU,
        nn.ReLU6,
        nn.LeakyReLU,
        nn.PReLU,
        nn.ELU,
        nn.CELU,
        nn.SELU,
        nn.GELU,
        nn.SiLU,
        nn.Mish,
        nn.Tanh,
        nn.Sigmoid,
        nn.Hardtanh,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.Softplus,
        nn.Softsign,
        nn.GLU,
        nn.Softmax,
        nn.LogSoftmax,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.Upsample,
        nn.PixelShuffle,
        nn.PixelUnshuffle,
    }
)


def pure_layers(modules: Sequence[nn.Module]) -> bool:
    """Whether ``modules`` (a branch and all below it) are pure layers as NOTE [pure branches]
    defines them. Modes and tensor subclasses are checked per call by :func:`unobserved`."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    for m in modules:
        if type(m) not in PURE_LAYERS or m._forward_hooks or m._forward_pre_hooks:
            return False
        if m._buffers and any(b is not None and b.requires_grad for b in m._buffers.values()):
            return False
        if _SCANNED.get(m) != tuple(m.__dict__) and not _own_forward_on_own_tensors(m):
            return False
    return True


_SCANNED: weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]] = weakref.WeakKeyDictionary()


def _own_forward_on_own_tensors(m: nn.Module) -> bool:
    """No ``forward`` set on the instance and no tensor in its ``__dict__``, where it would
    shadow a parameter of the same name (``del m.weight; m.weight = t``).

    Either needs a new attribute name, so :func:`pure_layers` scans a module again only when
    its attribute names change. (A tensor put in an existing attribute, such as
    ``negative_slope``, these layers read as a plain number, as plain autograd does.)
    """
    names = tuple(m.__dict__)
    if "forward" in names or any(isinstance(v, Tensor) for v in m.__dict__.values()):
        return False
    _SCANNED[m] = names
    return True


def unobserved(tensors: Sequence[Tensor]) -> bool:
    """No torch function or dispatch mode is active, and no tensor overrides torch functions:
    nothing but the layers themselves decides what a pure branch computes."""
    return (
        not torch._C._len_torch_function_stack()
        and not torch._C._len_torch_dispatch_stack()
        and not has_torch_function(tensors)
    )
