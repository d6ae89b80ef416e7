"""PaReprop (overlap=True): each step's input rebuilt one step ahead. Without CUDA it runs in
sequence; the gradients equal plain autograd's at odd and even depths, exactly with exact
reversal, and every branch runs once more in backward (the rebuild ahead)."""

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import (
    F64,
    assert_inverse_training_matches_plain,
    compare_with_plain,
    coupling_params,
    mlp,
    stack_of,
    streams,
)
from tests.test_blocks import ThreeStreams


def overlapped(stack: torchrev.ReversibleSequential) -> torchrev.ReversibleSequential:
    stack.overlap = True
    return stack


@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize(("cls", "options"), coupling_params())
def test_couplings_match_plain_at_odd_and_even_depth(cls, options, depth, exact):
    stack = overlapped(stack_of(cls, depth, make=lambda k: mlp(6, k, dropout=0.2), **options))
    stack.exact = exact
    compare_with_plain(stack, streams(5, 6), rtol=0.0 if exact else 1e-10)


@pytest.mark.parametrize("depth", [1, 2])  # three steps per block: 3 and 6 steps
def test_blocks_with_an_odd_number_of_steps_match_plain(depth):
    stack = torchrev.ReversibleSequential(*[ThreeStreams() for _ in range(depth)]).to(F64)
    inputs = [torch.randn(3, 4, dtype=F64, requires_grad=True) for _ in range(3)]
    compare_with_plain(overlapped(stack), inputs, rtol=1e-10)


def test_each_branch_runs_once_more_in_backward():
    calls = []
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    for block in stack:
        for branch in (block.f, block.g):
            branch.register_forward_hook(lambda *_: calls.append(1))

    def branch_calls(overlap: bool) -> int:
        calls.clear()
        stack.overlap = overlap
        sum(y.sum() for y in stack(*streams(4, 6))).backward()
        return len(calls)

    assert branch_calls(False) == 2 * 6  # forward, recomputation
    assert branch_calls(True) == 3 * 6  # forward, rebuild ahead, recomputation


def test_a_branch_that_recomputes_differently_raises_with_exact_reversal():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + 1e-3 * torch.randn(x.shape, generator=self.generator, dtype=x.dtype)

    noisy = Noisy()
    noisy.generator = torch.Generator().manual_seed(0)  # not torch's: never replayed
    stack = overlapped(stack_of(torchrev.AdditiveCoupling, 2))
    stack.exact = True
    stack[0].f = noisy
    y1, y2 = stack(*streams(4, 6))
    with pytest.raises(torchrev.ReversibilityError, match=r"AdditiveCoupling\.f computed"):
        (y1.sum() + y2.sum()).backward()


def test_retain_graph_and_a_second_backward():
    stack = overlapped(stack_of(torchrev.ScaledCoupling, 3, lam=0.5))
    x1, x2 = streams(4, 6)
    y1, y2 = stack(x1, x2)
    loss = (y1 * y2).sum()
    first = torch.autograd.grad(loss, [x1, x2], retain_graph=True)
    second = torch.autograd.grad(loss, [x1, x2])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("depth", [3, 4])
def test_training_through_the_inverse_matches_plain(depth):
    def make(k):
        return mlp(6, k, dropout=0.2)

    stack = overlapped(stack_of(torchrev.AffineCoupling, depth, make=make))
    assert_inverse_training_matches_plain(stack)
