"""Invariant 2: reversible backprop equals plain autograd, at every depth, for every coupling."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchrev
from tests.helpers import (
    F64,
    assert_close_tensors,
    compare_with_plain,
    coupling_params,
    grads_of,
    mlp,
    stack_of,
    streams,
)


def _name(value):
    return getattr(value, "__name__", "")


@pytest.mark.parametrize(("cls", "options"), coupling_params(), ids=_name)
@pytest.mark.parametrize("depth", [1, 2, 5, 8])
def test_gradients_match_plain_autograd_float64(cls, options, depth):
    stack = stack_of(cls, depth, **options)
    x1, x2 = streams(5, 6)
    compare_with_plain(stack, (x1, x2), rtol=1e-10)


@pytest.mark.parametrize("depth", [32, 33])
def test_long_stacks_odd_and_even(depth):
    stack = stack_of(torchrev.AdditiveCoupling, depth, width=4)
    x1, x2 = streams(3, 4)
    compare_with_plain(stack, (x1, x2), rtol=1e-10)


@settings(max_examples=15, deadline=None)
@given(
    depth=st.integers(1, 6),
    batch=st.integers(1, 4),
    width=st.integers(1, 5),
    lam=st.floats(0.5, 2.0),
    beta=st.floats(0.5, 2.0),
    seed=st.integers(0, 2**16),
)
def test_random_scaled_stacks_match_plain(depth, batch, width, lam, beta, seed):
    torch.manual_seed(seed)
    stack = stack_of(torchrev.ScaledCoupling, depth, width=width, lam=lam, beta=beta)
    x1, x2 = streams(batch, width)
    compare_with_plain(stack, (x1, x2), rtol=1e-9)


class Conditioned(nn.Module):
    """A branch that reads keyword arguments: an additive mask and a scale vector."""

    def __init__(self, width):
        super().__init__()
        self.net = mlp(width)

    def forward(self, x, mask, scale, shift=0.0):
        return self.net(x * scale + mask) + shift


def conditioned_stack(depth, width=6):
    couplings = [
        torchrev.AdditiveCoupling(Conditioned(width), Conditioned(width)) for _ in range(depth)
    ]
    return torchrev.ReversibleSequential(*couplings).to(F64)


@pytest.mark.parametrize("depth", [3, 4])
def test_tensor_kwargs_receive_gradients(depth):
    stack = conditioned_stack(depth)
    x1, x2 = streams(5, 6)
    mask = torch.randn(5, 6, dtype=F64)  # no grad: passed through
    scale = torch.randn(6, dtype=F64, requires_grad=True)
    compare_with_plain(stack, (x1, x2), 1e-10, extra=(scale,), mask=mask, scale=scale, shift=0.5)


def test_inputs_without_grad_still_train_parameters():
    stack = stack_of(torchrev.AdditiveCoupling, 4)
    x1, x2 = streams(5, 6, grad=False)
    compare_with_plain(stack, (x1, x2), rtol=1e-10)


def test_duplicated_input_gets_the_sum_of_both_streams_gradients():
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    x = torch.randn(5, 6, dtype=F64, requires_grad=True)
    stage = torchrev.ReversibleStage(stack, torchrev.Duplicate(), torchrev.Mean())
    stack.reversible = False
    (plain,) = grads_of(stage(x).pow(2).sum(), [x])
    stack.reversible = True
    (rev,) = grads_of(stage(x).pow(2).sum(), [x])
    assert_close_tensors([rev], [plain], 1e-10)


def test_shared_parameters_across_blocks_and_branches():
    shared = mlp(6).to(F64)
    couplings = [torchrev.AdditiveCoupling(shared, shared) for _ in range(3)]
    stack = torchrev.ReversibleSequential(*couplings)
    x1, x2 = streams(5, 6)
    compare_with_plain(stack, (x1, x2), rtol=1e-10)


def test_float32_agrees_to_single_precision():
    stack = stack_of(torchrev.AdditiveCoupling, 8, width=16, dtype=torch.float32)
    x1, x2 = streams(32, 16, dtype=torch.float32)
    compare_with_plain(stack, (x1, x2), rtol=1e-5)


def test_convolutional_branches_on_channel_split():
    def conv(k):
        return nn.Sequential(nn.Conv2d(3, 3 * k, 3, padding=1), nn.GELU())

    stack = torchrev.ReversibleSequential(
        *[torchrev.AffineCoupling.from_factory(conv) for _ in range(3)]
    ).to(F64)
    x = torch.randn(2, 6, 5, 5, dtype=F64, requires_grad=True)
    x1, x2 = torchrev.Split(1)(x)
    compare_with_plain(stack, (x1, x2), rtol=1e-10)


def test_custom_coupling_with_its_own_parameters():
    from tests.test_errors import LearnedScale

    couplings = [LearnedScale(mlp(6), mlp(6), 6) for _ in range(3)]
    stack = torchrev.ReversibleSequential(*couplings).to(F64)
    compare_with_plain(stack, streams(4, 6), rtol=1e-10)


def test_slices_are_stacks():
    stack = stack_of(torchrev.AdditiveCoupling, 5)
    head = stack[1:3]
    assert isinstance(head, torchrev.ReversibleSequential) and len(head) == 2
    compare_with_plain(head, streams(4, 6), rtol=1e-10)


class Nested(nn.Module):
    """A branch that is itself a reversible stack on a split of its input."""

    def __init__(self):
        super().__init__()
        self.inner = torchrev.ReversibleStage(stack_of(torchrev.AdditiveCoupling, 2, width=3))

    def forward(self, x):
        return self.inner(x)


def test_nested_reversible_stacks():
    couplings = [torchrev.AdditiveCoupling(Nested(), Nested()) for _ in range(3)]
    stack = torchrev.ReversibleSequential(*couplings).to(F64)
    compare_with_plain(stack, streams(4, 6), rtol=1e-10)


def test_public_autograd_grad_path_gives_the_same_gradients(monkeypatch):
    # NOTE [engine call]: without torch's inner call the engine uses torch.autograd.grad.
    monkeypatch.setattr(torchrev._core.grad, "_engine_run_backward", None)
    calls = []
    public = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or public(*a, **k))
    stack = conditioned_stack(3)
    x1, x2 = streams(5, 6)
    mask = torch.randn(5, 6, dtype=F64)
    scale = torch.randn(6, dtype=F64, requires_grad=True)
    compare_with_plain(stack, (x1, x2), 1e-10, extra=(scale,), mask=mask, scale=scale)
    assert len(calls) == 2 + 6  # the plain and reversible grads_of, then one per step
