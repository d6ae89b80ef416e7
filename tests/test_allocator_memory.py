"""The allocator's peak (torch.profiler's memory events): on eager steps it agrees with the
dispatch-mode count, and it sees compiled graphs, which run eagerly under a dispatch mode."""

import pytest
import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

import torchrev
from tests.helpers import stack_of
from torchrev.bench import AllocatorBytes, allocator_step_peak, training_step_peak


def steps():
    """Eager training steps (their parameters): an MLP, a reversible stack, and the same stack
    under plain autograd."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(128, 64)
    yield "mlp", lambda: mlp(x.clone()).square().mean().backward(), mlp
    for reversible in (True, False):
        stack = stack_of(torchrev.AdditiveCoupling, 4, width=32, dtype=torch.float32)
        stack.reversible = reversible

        def step(stack=stack) -> None:
            y1, y2 = stack(*torchrev.Split(1)(x.clone()))
            (y1.square().sum() + y2.square().sum()).backward()

        yield f"stack, reversible={reversible}", step, stack


@pytest.mark.parametrize("case", list(steps()), ids=lambda c: c[0])
def test_on_eager_steps_it_agrees_with_the_dispatch_mode(case):
    """The allocator sees every storage the dispatch mode does, plus memory allocated outside
    the dispatcher (the engine's copies of the CPU generator's state, 5056 bytes each) and
    memory operators use internally and free before returning (small reduction buffers here):
    at least the same peak, and at most 1% + 16 KiB more."""
    _, step, model = case
    step()
    live = training_step_peak(step, model.parameters())
    allocated = allocator_step_peak(step, model.parameters())
    assert live > 0
    assert live <= allocated <= 1.01 * live + 16 * 1024


def test_it_sees_a_compiled_steps_saved_activations():
    """``(w * x).exp().sum()``, compiled through AOTAutograd: the forward holds ``w * x`` and
    its exponential (2N floats) and keeps the exponential for the backward, which computes
    the gradient from it (N floats, then the gradient itself, left out): a peak of 2N floats,
    seen while the compiled forward and backward run (a dispatch mode would run them eagerly)."""
    n = 2**16
    w, x = torch.randn(n, requires_grad=True), torch.randn(n)
    calls = []

    def counted(gm: torch.fx.GraphModule, _: list) -> object:
        def run(*args: torch.Tensor) -> object:
            calls.append(gm)
            return gm(*args)

        return make_boxed_func(run)

    backend = aot_autograd(fw_compiler=counted, bw_compiler=counted)
    f = torch.compile(lambda x: (w * x).exp().sum(), backend=backend)
    step = lambda: f(x).backward()  # noqa: E731
    step()
    before = len(calls)
    peak = allocator_step_peak(step, [w])
    assert len(calls) == before + 2  # the compiled forward and backward ran
    assert 2 * 4 * n <= peak <= 2 * 4 * n + 64  # and a few scalars
    assert w.grad is not None and torch.allclose(w.grad, (w * x).exp().detach() * x)
    training_step_peak(step, [w])
    assert len(calls) == before + 2  # under the dispatch mode it ran eagerly


def test_it_counts_allocations_and_frees_from_the_start_and_leaves_out_what_is_asked():
    with AllocatorBytes() as tracker:
        a = torch.empty(1000, dtype=torch.uint8)
        b = torch.empty(3000, dtype=torch.uint8)
        del a
        c = torch.empty(500, dtype=torch.uint8)
    assert tracker.peak == 4000
    assert tracker.peak_excluding([b]) == 1000
    assert tracker.peak_excluding([c]) == 4000
