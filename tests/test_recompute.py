"""A recomputation sees what its forward saw, or the backward raises (issue 28, items 1-2).

Every case compares with plain autograd or expects :class:`torchrev.ReversibilityError`, in
float and in exact reversal alike: no fault may give a silently wrong gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

import torchrev
from tests.helpers import F64, compare_with_plain, coupling_params, mlp, stack_of, streams


class Ema(nn.Module):
    """Scales its input by a buffer, then moves the buffer towards the input's mean: the
    output reads the value the forward overwrites."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.register_buffer("scale", torch.ones(width, dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x) * self.scale.clone()  # as spectral_norm clones its vectors
        if self.training:
            with torch.no_grad():
                self.scale.mul_(0.9).add_(0.1 * x.mean(0).abs())
        return out


def sn_branch(k: int) -> nn.Module:
    return nn.Sequential(spectral_norm(nn.Linear(6, 6 * k)), nn.Tanh())


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize(("cls", "options"), coupling_params())
def test_spectral_norm_branches_give_plain_gradients(cls, options, exact):
    stack = stack_of(cls, 3, make=sn_branch, **options)
    stack.exact = exact
    compare_with_plain(stack, streams(4, 6), rtol=1e-10)


def test_spectral_norm_vectors_updated_once_per_step_as_in_plain():
    torch.manual_seed(0)
    reversible = stack_of(torchrev.AdditiveCoupling, 2, make=sn_branch)
    plain = stack_of(torchrev.AdditiveCoupling, 2, make=sn_branch)
    plain.load_state_dict(reversible.state_dict())
    plain.reversible = False
    for _ in range(2):
        x1, x2 = streams(4, 6)
        for stack in (reversible, plain):
            y1, y2 = stack(x1, x2)
            (y1.sum() + y2.sum()).backward()
    for (name, a), b in zip(reversible.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("depth", [2, 3])
def test_buffer_read_then_updated_through_grad_and_a_kept_graph(depth):
    stack = stack_of(torchrev.AdditiveCoupling, depth, make=lambda k: Ema(6) if k == 1 else mlp(6))
    compare_with_plain(stack, streams(5, 6), rtol=1e-10)
    x1, x2 = streams(5, 6)
    before = [b.clone() for b in stack.buffers()]
    y1, y2 = stack(x1, x2)
    after = [b.clone() for b in stack.buffers()]
    loss = (y1 * y2).sum()
    first = torch.autograd.grad(loss, [x1, x2], retain_graph=True)
    second = torch.autograd.grad(loss, [x1, x2])  # replays the same buffer values again
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(stack.buffers(), after))
    with torch.no_grad():
        for b, saved in zip(stack.buffers(), before):
            b.copy_(saved)
    stack.reversible = False
    plain = torch.autograd.grad((lambda y: (y[0] * y[1]).sum())(stack(x1, x2)), [x1, x2])
    assert all(torch.allclose(a, b, rtol=1e-10, atol=0) for a, b in zip(first, plain))


class Counter(nn.Module):
    """State a branch does not own: a Python number it updates on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.calls = nn.Linear(6, 6), 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.linear(x) * self.calls


class PlainTensorEma(nn.Module):
    """State a branch does not own: a tensor attribute (not a buffer) it reads and updates."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.scale = torch.ones(6, dtype=F64)

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x) * self.scale
        self.scale = 0.5 * self.scale + 0.5 * x.detach().mean(0).abs()
        return out


class PrivateGenerator(nn.Module):
    """Noise from a generator the engine cannot replay."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.generator = nn.Linear(6, 6), torch.Generator().manual_seed(0)

    def forward(self, x: Tensor) -> Tensor:
        noise = torch.rand(x.shape, generator=self.generator, dtype=x.dtype)
        return self.linear(x) + noise


class InPlaceParameter(nn.Module):
    """A branch that modifies its own parameter in place during its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        with torch.no_grad():
            self.linear.bias.mul_(1.5)
        return out


@pytest.mark.parametrize("exact", [False, True, "compact"])
@pytest.mark.parametrize("branch", [Counter, PlainTensorEma, PrivateGenerator, InPlaceParameter])
def test_a_branch_that_recomputes_differently_raises_in_every_mode(branch, exact):
    stack = stack_of(torchrev.AdditiveCoupling, 2, make=lambda k: branch() if k == 1 else mlp(6))
    stack.exact = exact
    y1, y2 = stack(*streams(4, 6))
    with pytest.raises(torchrev.ReversibilityError, match="different output") as error:
        (y1.sum() + y2.sum()).backward()
    assert "exact=False" not in str(error.value)  # never advice that gives wrong gradients


def test_the_float_check_can_be_switched_off_and_then_trusts_the_branch():
    stack = stack_of(torchrev.AdditiveCoupling, 2, make=lambda k: Counter() if k == 1 else mlp(6))
    stack.exact, stack.check_recompute = False, False
    y1, y2 = stack(*streams(4, 6))
    (y1.sum() + y2.sum()).backward()  # the user's word: no check, no error
    stack.exact = True  # exact reversal checks whatever the switch says
    y1, y2 = stack(*streams(4, 6))
    with pytest.raises(torchrev.ReversibilityError, match="different output"):
        (y1.sum() + y2.sum()).backward()


def test_float_rounding_passes_the_check_but_amplified_rounding_does_not():
    torch.manual_seed(0)
    deep = stack_of(torchrev.AdditiveCoupling, 32, width=16, dtype=torch.float32)
    deep.exact = False
    y1, y2 = deep(*streams(64, 16, dtype=torch.float32))
    (y1.sum() + (y2 * y2).sum()).backward()  # rounding only: no error
    scaled = stack_of(torchrev.ScaledCoupling, 32, width=16, dtype=torch.float32, lam=0.3, beta=0.3)
    scaled.exact = False
    y1, y2 = scaled(*streams(64, 16, dtype=torch.float32))
    with pytest.raises(torchrev.ReversibilityError, match="exact=True"):
        (y1.sum() + (y2 * y2).sum()).backward()


def test_overlapped_rebuilds_check_too():
    stack = stack_of(torchrev.AdditiveCoupling, 3, make=lambda k: Counter() if k == 1 else mlp(6))
    stack.exact, stack.overlap = False, True
    y1, y2 = stack(*streams(4, 6))
    with pytest.raises(torchrev.ReversibilityError, match="different output"):
        (y1.sum() + y2.sum()).backward()


@pytest.mark.parametrize("exact", [True, "compact"])
def test_a_channels_last_batch_of_one_recomputes_as_its_forward(exact):
    """The recomputation sees its sources with the forward's strides, size-1 dimensions
    included: a 1x1 convolution on a channels-last batch of one rounds differently otherwise
    (found by the randomised test)."""
    torch.manual_seed(0)
    make = lambda k: nn.Sequential(nn.Conv2d(4, 8, 1), nn.Tanh(), nn.Conv2d(8, 4 * k, 1))  # noqa: E731
    stack = torchrev.ReversibleSequential(
        *[torchrev.AdditiveCoupling.from_factory(make) for _ in range(2)], exact=exact
    )
    x1, x2 = (
        torch.randn(1, 4, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
        for _ in range(2)
    )
    grads = []
    for reversible in (False, True):
        stack.reversible = reversible
        y1, y2 = stack(x1, x2)
        grads.append(torch.autograd.grad((y1 * 0.5 + y2).sum(), [x1, x2, *stack.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
