"""Invariant 7: the activation peak of a training step does not grow with depth."""

import weakref
from typing import ClassVar

import pytest
import torch

import torchrev
from tests.helpers import mlp, stack_of
from torchrev.bench import LiveTensorBytes, peak_live_bytes


def training_step_peak(
    depth: int,
    reversible: bool,
    cls=torchrev.AdditiveCoupling,
    exact=False,
    dtype=torch.float32,
    check: bool = True,
) -> int:
    """Peak live bytes of one step beyond parameters and gradients (both allocated before)."""
    torch.manual_seed(0)
    stack = stack_of(cls, depth, width=16, dtype=dtype)
    stack.reversible, stack.exact, stack.check_recompute = reversible, exact, check
    x = torch.randn(32, 32, dtype=dtype)

    def loss():
        y1, y2 = stack(*torchrev.Split(1)(x.clone()))
        return y1.square().sum() + y2.square().sum()

    loss().backward()
    stack.zero_grad(set_to_none=False)
    return peak_live_bytes(lambda: loss().backward())


@pytest.mark.parametrize("cls", torchrev.couplings.COUPLINGS, ids=lambda c: c.__name__)
def test_reversible_peak_is_flat_in_depth(cls):
    assert training_step_peak(3, True, cls, check=False) == training_step_peak(
        12, True, cls, check=False
    )


def test_the_recomputation_check_keeps_two_numbers_per_step():
    """NOTE [recomputation checksum]: float reversal's fingerprint is two float32 per step."""
    growth = training_step_peak(12, True) - training_step_peak(3, True)
    assert growth == 2 * (12 - 3) * 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", torchrev.couplings.COUPLINGS, ids=lambda c: c.__name__)
def test_exact_reversal_stores_a_few_bits_per_element_per_step(cls, dtype):
    """Exact reversal keeps a correction per step: the peak grows with depth, by at most 9
    bits per stream element per step (a checksum aside), where storing each step's input
    would cost 16 or 32."""
    growth = training_step_peak(12, True, cls, True, dtype) - training_step_peak(
        3, True, cls, True, dtype
    )
    elements, steps = 32 * 16, 2 * (12 - 3)
    assert 0 < growth <= steps * (elements * 9 / 8 + 8)
    assert growth < steps * elements * torch.finfo(dtype).bits / 8 / 2


@pytest.mark.parametrize("cls", [torchrev.AdditiveCoupling, torchrev.ScaledCoupling])
def test_compact_exact_reversal_stores_fewer_bits(cls):
    """``exact="compact"`` finds its escapes again instead of storing their positions: at most
    5 bits per stream element per step here, below what ``exact=True`` stores."""

    def growth(exact):
        return training_step_peak(12, True, cls, exact) - training_step_peak(3, True, cls, exact)

    elements, steps = 32 * 16, 2 * (12 - 3)
    compact = growth("compact")
    assert 0 < compact <= steps * (elements * 5 / 8 + 8) and compact < growth(True)


def test_exact_reversal_adds_only_its_corrections_to_the_peak():
    """The backward frees each step's output once it has rebuilt the input out of place, so
    at the peak (a branch's backward) exact reversal holds its corrections and nothing more;
    the output used to stay alive through the branch's backward, one stream more."""
    torch.manual_seed(0)
    stack = stack_of(torchrev.ScaledCoupling, 8, width=64, dtype=torch.float32, lam=0.1)
    stack.check_recompute = False  # float reversal of lam=0.1 is noise; only memory counts here
    streams = [torch.randn(256, 64), torch.randn(256, 64)]

    def peak(exact):
        stack.exact = exact

        def step():
            y1, y2 = stack(streams[0].requires_grad_(), streams[1])
            (y1.square().sum() + y2.square().sum()).backward()

        step()
        return peak_live_bytes(step)

    bits = torchrev.check_reversibility(stack, *streams).stored_bits
    stream = streams[0].nbytes
    corrections = bits / 32 * stream * 2 * 8  # two steps per block, eight blocks
    extra = peak(True) - peak(False)
    assert corrections <= extra <= corrections + 0.5 * stream


class _Probe(torch.autograd.Function):
    """The identity, ending a branch: records, when its backward starts, whether the branch
    output it returned is still alive."""

    outputs: ClassVar[list] = []
    alive: ClassVar[list] = []

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        _Probe.outputs.append(weakref.ref(out))
        return out

    @staticmethod
    def backward(ctx, grad):
        _Probe.alive.append(_Probe.outputs[-1]() is not None)
        return grad


@pytest.mark.parametrize("edges", [True, False], ids=["edges", "torch<2.5"])
@pytest.mark.parametrize("reversible", [False, True])
def test_a_branch_output_is_freed_before_its_backward_as_in_plain_autograd(
    reversible, edges, monkeypatch
):
    """The engine differentiates a branch from its output's gradient edge, not the output;
    where autograd.grad takes no edges (torch before 2.5) it keeps the output instead."""
    monkeypatch.setattr(torchrev._core.recompute, "EDGE_OUTPUTS", edges)
    torch.manual_seed(0)
    f, g = mlp(8), mlp(8)
    block = torchrev.ScaledCoupling(
        torch.nn.Sequential(f, _ProbeModule()), torch.nn.Sequential(g, _ProbeModule()), lam=0.5
    )
    stack = torchrev.ReversibleSequential(block, reversible=reversible).double()
    x1, x2 = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True).unbind(0)
    _Probe.outputs.clear()
    _Probe.alive.clear()
    y1, y2 = stack(x1, x2)
    grads = torch.autograd.grad(y1.sum() + y2.sum(), list(stack.parameters()))
    assert _Probe.alive == [reversible and not edges] * 2
    stack.reversible = False
    y1, y2 = stack(x1, x2)
    plain = torch.autograd.grad(y1.sum() + y2.sum(), list(stack.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, plain, strict=True))


class _ProbeModule(torch.nn.Module):
    def forward(self, x):
        return _Probe.apply(x)


def test_a_scaled_step_peaks_where_an_additive_one_does():
    """A scaled step's input gradient (``lam * dL/dy``) is computed after its branch's backward
    (update_vjp defers it), so it is not alive at the step's peak."""

    def peak(cls, **options):
        torch.manual_seed(0)
        stack = stack_of(cls, 4, width=16, dtype=torch.float32, **options)
        stack.exact = False
        x = torch.randn(64, 32)

        def step():
            y1, y2 = stack(*torchrev.Split(1)(x.clone().requires_grad_()))
            (y1.square().sum() + y2.square().sum()).backward()

        step()
        return peak_live_bytes(step)

    scaled = peak(torchrev.ScaledCoupling, lam=0.5, beta=0.25)
    assert scaled == peak(torchrev.AdditiveCoupling)


def test_plain_peak_grows_with_depth_so_the_measurement_can_fail():
    shallow, deep = training_step_peak(3, False), training_step_peak(12, False)
    assert deep > 3 * shallow
    assert training_step_peak(12, True) < deep / 4


def test_tracker_counts_allocations_frees_and_storage_resizes():
    with LiveTensorBytes() as tracker:
        a = torch.empty(1000, dtype=torch.float32)
        view = a[:10]
        assert tracker.current == 4000
        del a
        assert tracker.current == 4000  # the view keeps the storage alive
        del view
        assert tracker.current == 0
        b = torch.empty(250)
        b.untyped_storage().resize_(0)  # as memcnn frees activations
        assert tracker.current == 0
    assert tracker.peak == 4000


def test_training_step_peak_leaves_gradients_out():
    from torchrev.bench import training_step_peak

    lin = torch.nn.Linear(1000, 1000)  # 4 MB of weight gradient
    x = torch.randn(2, 1000)
    peak = training_step_peak(lambda: lin(x).square().sum().backward(), lin.parameters())
    assert 0 < peak < 100_000 and lin.weight.grad is not None


@pytest.mark.parametrize("cls", torchrev.couplings.COUPLINGS, ids=lambda c: c.__name__)
def test_flat_in_depth_with_gradients_set_to_none(cls):
    from torchrev.bench import training_step_peak

    peaks = []
    for depth in (3, 12):
        torch.manual_seed(0)
        stack = stack_of(cls, depth, width=16, dtype=torch.float32)
        stack.exact, stack.check_recompute = False, False
        x = torch.randn(32, 32)

        def step(stack=stack, x=x):
            y1, y2 = stack(*torchrev.Split(1)(x.clone()))
            (y1.square().sum() + y2.square().sum()).backward()

        peaks.append(training_step_peak(step, stack.parameters()))
    assert peaks[0] == peaks[1]
