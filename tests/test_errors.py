"""Bad input gets an error that says what to do, never a silently wrong gradient."""

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import F64, mlp, stack_of, streams


def test_split_needs_an_even_size():
    with pytest.raises(ValueError, match="even size along dim 1"):
        torchrev.Split(1)(torch.randn(2, 5))


def test_streams_must_match():
    stack = stack_of(torchrev.AdditiveCoupling, 2)
    with pytest.raises(ValueError, match="streams must match"):
        stack(torch.randn(3, 6, dtype=F64), torch.randn(4, 6, dtype=F64))
    with pytest.raises(TypeError, match="takes 2 tensor streams"):
        stack(torch.randn(3, 6, dtype=F64), None)
    with pytest.raises(ValueError, match="streams must match"):
        stack.inverse(torch.randn(3, 6, dtype=F64), torch.randn(3, 5, dtype=F64))


class Returns(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


@pytest.mark.parametrize("reversible", [True, False])
def test_branch_output_is_checked(reversible):
    x1, x2 = streams(3, 6)
    wrong_shape = torchrev.AdditiveCoupling(Returns(lambda x: x[:, :2]), mlp(6).to(F64))
    stack = torchrev.ReversibleSequential(wrong_shape, reversible=reversible)
    with pytest.raises(ValueError, match=r"must return \(3, 6\)"):
        stack(x1, x2)
    not_tensor = torchrev.AdditiveCoupling(mlp(6).to(F64), Returns(lambda x: (x, None)))
    stack = torchrev.ReversibleSequential(not_tensor, reversible=reversible)
    with pytest.raises(TypeError, match="must return one Tensor"):
        stack(x1, x2)


def test_broadcasting_branch_output_is_rejected():
    coupling = torchrev.AdditiveCoupling(Returns(lambda x: x.mean(0, keepdim=True)), nn.Identity())
    with pytest.raises(ValueError, match="broadcasting is not applied"):
        coupling(*streams(3, 6))


@pytest.mark.parametrize("reversible", [True, False])
def test_in_place_modification_of_a_branch_input_is_detected(reversible):
    inplace = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 6)).to(F64)
    stack = torchrev.ReversibleSequential(
        torchrev.AdditiveCoupling(inplace, mlp(6).to(F64)), reversible=reversible
    )
    x1, x2 = streams(3, 6, grad=False)
    with pytest.raises(torchrev.ReversibilityError, match="inplace=False"):
        stack(x1, x2)


def test_a_second_backward_without_retain_graph_fails_as_in_plain_autograd():
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    y1, y2 = stack(*streams(3, 6))
    loss = (y1 * y2).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


def test_double_backward_is_refused():
    stack = stack_of(torchrev.AdditiveCoupling, 2)
    x1, x2 = streams(3, 6)
    y1, y2 = stack(x1, x2)
    with pytest.raises(torchrev.ReversibilityError, match="create_graph"):
        torch.autograd.grad((y1 * y2).sum(), x1, create_graph=True)


def test_parameter_changed_between_forward_and_backward():
    stack = stack_of(torchrev.AdditiveCoupling, 2)
    y1, y2 = stack(*streams(3, 6))
    with torch.no_grad():
        next(stack.parameters()).add_(1.0)  # e.g. an optimizer step before backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y1 * y2).sum().backward()


def test_stack_items_must_be_couplings():
    with pytest.raises(TypeError, match="not a reversible block"):
        torchrev.ReversibleSequential(nn.Linear(3, 3))
    stack = stack_of(torchrev.AdditiveCoupling, 1)
    stack.append(nn.Linear(6, 6))
    with pytest.raises(TypeError, match="item 1"):
        stack(*streams(3, 6))


def test_branches_must_be_modules():
    with pytest.raises(TypeError, match="must be an nn"):
        torchrev.AdditiveCoupling(torch.tanh, nn.Identity())


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: torchrev.ScaledCoupling(nn.Identity(), nn.Identity(), lam=0.0), "lam=0.0"),
        (lambda: torchrev.ScaledCoupling(nn.Identity(), nn.Identity(), beta=float("inf")), "beta"),
        (lambda: torchrev.MomentumCoupling(nn.Identity(), gamma=0.0), "gamma=0.0"),
        (lambda: torchrev.MomentumCoupling(nn.Identity(), gamma=1.0), "gamma=1.0"),
        (lambda: torchrev.AffineCoupling(nn.Identity(), nn.Identity(), bound=0), "bound=0"),
    ],
)
def test_non_invertible_settings_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


class LearnedScale(torchrev.AbstractCoupling):
    """A coupling with a parameter of its own, in the update (RevCol's alpha)."""

    def __init__(self, f, g, width):
        super().__init__(f, g)
        self.alpha = nn.Parameter(torch.full((width,), 0.5))

    def update(self, x, h, half):
        return self.alpha * x + h

    def revert(self, y, h, half):
        return (y - h) / self.alpha


def test_hook_on_a_coupling_parameter_outside_the_branches_is_refused():
    coupling = LearnedScale(mlp(6), mlp(6), 6).to(F64)
    coupling.alpha.register_hook(lambda g: 2 * g)
    stack = torchrev.ReversibleSequential(coupling)
    with pytest.raises(torchrev.ReversibilityError, match="register_post_accumulate_grad_hook"):
        stack(*streams(3, 6))
