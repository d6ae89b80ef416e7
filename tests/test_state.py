"""Invariants 3, 4, 6 (REFERENCE.md): RNG, autocast and buffers seen by the recomputation."""

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import F64, compare_with_plain, mlp, relative_error, stack_of, streams

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def dropout_stack(depth, device="cpu", dtype=F64):
    couplings = [
        torchrev.AdditiveCoupling(mlp(6, dropout=0.3), mlp(6, dropout=0.3)) for _ in range(depth)
    ]
    return torchrev.ReversibleSequential(*couplings).to(device, dtype)


@pytest.mark.parametrize("depth", [3, 4])
def test_dropout_masks_replayed_and_caller_rng_unchanged(depth):
    stack = dropout_stack(depth)
    x1, x2 = streams(8, 6)
    # compare_with_plain starts both runs from one RNG state and asserts the state after the
    # reversible step (forward and backward) equals the state after the plain step.
    compare_with_plain(stack, (x1, x2), rtol=1e-10)


def test_dropout_masks_differ_between_steps():
    stack = dropout_stack(2)
    x1, x2 = streams(8, 6)
    first = stack(x1, x2)[0]
    sum(first).sum().backward()
    second = stack(x1, x2)[0]
    assert not torch.equal(first, second)


def test_backward_does_not_touch_the_global_generator():
    stack = dropout_stack(3)
    x1, x2 = streams(8, 6)
    y1, y2 = stack(x1, x2)
    before = torch.get_rng_state()
    (y1.sum() + y2.sum()).backward()
    assert torch.equal(torch.get_rng_state(), before)


@CUDA
def test_dropout_on_cuda_generator():
    stack = dropout_stack(3, device="cuda")
    x1, x2 = torch.randn(2, 8, 6, dtype=F64, device="cuda", requires_grad=True)
    state = torch.cuda.get_rng_state()
    compare_with_plain(stack, (x1, x2), rtol=1e-10)
    assert not torch.equal(torch.cuda.get_rng_state(), state)


class AutocastProbe(nn.Module):
    """Records whether autocast was on each time it ran."""

    def __init__(self, width):
        super().__init__()
        self.net = mlp(width)
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return self.net(x)


def test_recomputation_runs_under_the_forward_autocast_state():
    f, g = AutocastProbe(8), AutocastProbe(8)
    stack = torchrev.ReversibleSequential(torchrev.AdditiveCoupling(f, g))
    x1, x2 = streams(4, 8, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = stack(x1, x2)
    (y1.sum() + y2.sum()).backward()  # outside autocast, as training loops do
    assert f.seen == [True, True] and g.seen == [True, True]


def test_bf16_autocast_gradients_match_plain_autocast():
    stack = stack_of(torchrev.AdditiveCoupling, 6, width=16, dtype=torch.float32)
    x1, x2 = streams(32, 16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compare_with_plain(stack, (x1, x2), rtol=1e-3)


def test_bf16_without_replay_would_be_wrong():
    """The bound above is meaningful: recomputing in float32 is off by far more than 1e-3."""
    stack = stack_of(torchrev.AdditiveCoupling, 6, width=16, dtype=torch.float32)
    x1, x2 = streams(32, 16, dtype=torch.float32, grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        mixed = stack(x1, x2)[0]
    with torch.no_grad():
        full = stack(x1, x2)[0]
    assert relative_error(mixed, full) > 1e-3


def bn_stack(depth):
    def branch(_):
        return nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.GELU(), nn.Linear(6, 6))

    couplings = [torchrev.AdditiveCoupling.from_factory(branch) for _ in range(depth)]
    return torchrev.ReversibleSequential(*couplings).to(F64)


@pytest.mark.parametrize("depth", [2, 3])
def test_batchnorm_gradients_match_plain(depth):
    stack = bn_stack(depth)
    x1, x2 = streams(8, 6)
    compare_with_plain(stack, (x1, x2), rtol=1e-10)


def test_batchnorm_statistics_updated_exactly_once_per_step():
    reversible = bn_stack(3)
    plain = bn_stack(3)
    plain.load_state_dict(reversible.state_dict())
    plain.reversible = False
    for _ in range(2):
        x1, x2 = streams(8, 6)
        for stack in (reversible, plain):
            y1, y2 = stack(x1, x2)
            (y1.sum() + y2.sum()).backward()
    for (name, a), b in zip(reversible.named_buffers(), plain.buffers()):
        assert torch.equal(a, b), name
    counts = {b.item() for n, b in reversible.named_buffers() if n.endswith("num_batches_tracked")}
    assert counts == {2}
