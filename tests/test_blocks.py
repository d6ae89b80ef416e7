"""Blocks on more than two streams, as RevCol's columns are: the engine's general contract."""

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import F64, compare_with_plain


class Mix(nn.Module):
    """A branch reading several streams."""

    def __init__(self, width, n_inputs):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_inputs * width, 8), nn.Tanh(), nn.Linear(8, width))

    def forward(self, *streams):
        return self.net(torch.cat(streams, dim=-1))


class ThreeStreams(torchrev.AbstractReversibleBlock):
    """a <- a + f0(b, c);  b <- b + f1(a);  c <- scale * c + f2(a, b), scale learnable."""

    steps = ((0, (1, 2)), (1, (0,)), (2, (0, 1)))

    def __init__(self, width=4):
        super().__init__()
        self.f = nn.ModuleList([Mix(width, 2), Mix(width, 1), Mix(width, 2)])
        self.scale = nn.Parameter(torch.full((width,), 0.8))

    def branch(self, step):
        return self.f[step]

    def update(self, x, h, step):
        return (self.scale * x if step == 2 else x) + h

    def revert(self, y, h, step):
        return (y - h) / self.scale if step == 2 else y - h


def three_stream_stack(depth):
    return torchrev.ReversibleSequential(*[ThreeStreams() for _ in range(depth)]).to(F64)


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_three_stream_blocks_match_plain(depth):
    streams = [torch.randn(3, 4, dtype=F64, requires_grad=True) for _ in range(3)]
    compare_with_plain(three_stream_stack(depth), streams, rtol=1e-10)


def test_frozen_steps_between_trainable_ones():
    """Steps with nothing to differentiate still run backward to rebuild their stream."""
    stack = three_stream_stack(3)
    for block in stack:
        block.f[0].requires_grad_(False)
        block.f[2].requires_grad_(False)
        block.scale.requires_grad_(False)
    streams = [torch.randn(3, 4, dtype=F64) for _ in range(3)]
    compare_with_plain(stack, streams, rtol=1e-10)


def test_any_single_output_drives_the_whole_backward():
    stack = three_stream_stack(3)
    streams = [torch.randn(3, 4, dtype=F64, requires_grad=True) for _ in range(3)]
    params = list(stack.parameters())
    for used in range(3):
        stack.reversible = False
        plain = torch.autograd.grad(stack(*streams)[used].sum(), params, allow_unused=True)
        stack.reversible = True
        rev = torch.autograd.grad(stack(*streams)[used].sum(), params, allow_unused=True)
        for a, b in zip(rev, plain):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_inverse_and_report_for_three_streams():
    stack = three_stream_stack(4)
    streams = [torch.randn(3, 4, dtype=F64) for _ in range(3)]
    with torch.no_grad():
        back = stack.inverse(*stack(*streams))
    for a, b in zip(back, streams):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torchrev.check_reversibility(stack, *streams).ok(1e-10)


def test_a_step_may_not_read_its_own_target():
    class Bad(ThreeStreams):
        steps = ((0, (0, 1)), (1, (0,)), (2, (0, 1)))

    with pytest.raises(ValueError, match="updates stream 0 from itself"):
        torchrev.ReversibleSequential(Bad())


def test_wrong_number_of_streams():
    with pytest.raises(TypeError, match="takes 3 tensor streams"):
        three_stream_stack(1)(torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64))
