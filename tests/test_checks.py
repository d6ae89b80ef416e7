"""The diagnostic users run on their own f and g."""

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import F64, mlp, stack_of, streams


def test_a_sound_stack_passes_and_state_is_left_alone():
    couplings = [
        torchrev.AdditiveCoupling(
            nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Dropout(0.2)), mlp(6)
        )
        for _ in range(4)
    ]
    stack = torchrev.ReversibleSequential(*couplings).to(F64)
    buffers = [b.clone() for b in stack.buffers()]
    x1, x2 = streams(8, 6)
    rng = torch.get_rng_state()
    report = torchrev.check_reversibility(stack, x1, x2)
    assert report.ok(1e-10), str(report)
    assert len(report.blocks) == 4 and "reconstruction" in str(report)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(stack.buffers(), buffers))


class Drifting(nn.Module):
    """Not a function of its input: returns something new on every call."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * 0.1 * self.calls


def test_a_stateful_branch_is_caught_at_its_block():
    couplings = [torchrev.AdditiveCoupling(mlp(6), mlp(6)) for _ in range(3)]
    couplings[1] = torchrev.AdditiveCoupling(Drifting(), mlp(6))
    stack = torchrev.ReversibleSequential(*couplings).to(F64)
    report = torchrev.check_reversibility(stack, *streams(5, 6))
    assert not report.ok(1e-6)
    assert report.blocks[2].reconstruction_error < 1e-12  # above the culprit: fine
    assert report.blocks[1].reconstruction_error > 1e-3


class ClosesOver(nn.Module):
    def __init__(self, tensor):
        super().__init__()
        self.tensor = tensor  # a plain attribute, not a parameter: invisible to the engine

    def forward(self, x):
        return x * self.tensor


def test_a_branch_that_closes_over_a_trainable_tensor_is_refused():
    """Plain autograd would give ``hidden`` a gradient; the reversible backward cannot."""
    hidden = torch.randn(6, dtype=F64, requires_grad=True)
    stack = torchrev.ReversibleSequential(
        torchrev.AdditiveCoupling(mlp(6).to(F64), ClosesOver(hidden))
    )
    with pytest.raises(torchrev.ReversibilityError, match=r"AdditiveCoupling\.g uses 1 tensor"):
        torchrev.check_reversibility(stack, *streams(5, 6))
    with pytest.raises(torchrev.ReversibilityError, match="keyword argument"):
        sum(y.sum() for y in stack(*streams(5, 6))).backward()
    hidden.requires_grad_(False)  # the fix the message offers for a tensor that should not train
    assert torchrev.check_reversibility(stack, *streams(5, 6)).ok(1e-10)


def test_small_scales_lose_precision_with_depth_unless_exact():
    stack = stack_of(torchrev.ScaledCoupling, 12, width=16, dtype=torch.float32, lam=0.1)
    inputs = streams(8, 16, dtype=torch.float32)
    stack.exact = False
    report = torchrev.check_reversibility(stack, *inputs)
    errors = [b.reconstruction_error for b in report.blocks]
    assert errors[0] > 100 * errors[-1] and not report.exact
    assert "floating-point reversal" in str(report)
    stack.exact = "auto"  # exact for a scale below one
    report = torchrev.check_reversibility(stack, *inputs)
    assert report.exact and report.worst_gradient == 0.0
    assert all(0 < b.stored_bits <= 9 for b in report.blocks), str(report)
    assert "every input rebuilt bit for bit: True" in str(report)


class FakeInverse(torchrev.AbstractCoupling):
    """memcnn's wrong inverse: update ``x + h``, revert ``y - 2h``."""

    def update(self, x, h, step):
        return x + h

    def revert(self, y, h, step):
        return y - 2 * h


@pytest.mark.filterwarnings("ignore::torchrev.ReversibilityWarning")  # tested below
@pytest.mark.parametrize("exact", [False, True, "compact"])
def test_a_wrong_inverse_fails_the_check_in_every_mode(exact):
    stack = torchrev.ReversibleSequential(
        FakeInverse(mlp(6), mlp(6)), FakeInverse(mlp(6), mlp(6)), exact=exact
    ).to(F64)
    report = torchrev.check_reversibility(stack, *streams(5, 6))
    assert not report.ok(1e-6), str(report)
    assert report.worst_inverse > 0.01
    if exact:
        assert report.exact  # exact reversal corrected the miss, at full width
        assert report.stored_bits > 60
    good = torchrev.ReversibleSequential(
        torchrev.AdditiveCoupling(mlp(6), mlp(6)), exact=exact
    ).to(F64)
    assert torchrev.check_reversibility(good, *streams(5, 6)).worst_inverse < 1e-15


def test_exact_reversal_warns_once_per_block_that_stores_full_width_corrections():
    stack = torchrev.ReversibleSequential(
        FakeInverse(mlp(6), mlp(6)), FakeInverse(mlp(6), mlp(6)), exact=True
    ).to(F64)
    with pytest.warns(torchrev.ReversibilityWarning, match="bits per element") as record:
        for _ in range(2):
            y1, y2 = stack(*streams(5, 6))
            (y1.sum() + y2.sum()).backward()
    messages = [str(w.message) for w in record if "bits per element" in str(w.message)]
    assert len(messages) == 2  # one per block, not per call
    assert "block 0" in messages[0] and "block 1" in messages[1]
