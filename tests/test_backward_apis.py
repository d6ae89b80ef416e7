"""Every backward API behaves as under plain autograd: several passes, partial passes, gradcheck,
version checks, buffers, the inverse direction, and no graph left alive."""

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import (
    F64,
    assert_close_tensors,
    assert_inverse_training_matches_plain,
    mlp,
    stack_of,
    streams,
)
from torchrev.bench import LiveTensorBytes, peak_live_bytes


def grads(stack, loss_of, inputs, reversible, **backward):
    """Gradients of ``inputs`` and of the stack's parameters after ``loss_of(outputs)``."""
    stack.reversible = reversible
    torch.manual_seed(0)
    outputs = stack(*inputs)
    wanted = [*inputs, *stack.parameters()]
    return torch.autograd.grad(loss_of(outputs), wanted, allow_unused=True, **backward)


@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("cls", [torchrev.AdditiveCoupling, torchrev.ScaledCoupling])
def test_several_backward_passes_through_one_forward(depth, cls):
    """retain_graph=True: each pass gives plain autograd's gradients, whole or partial."""
    stack = stack_of(cls, depth, **({"lam": 0.5} if cls is torchrev.ScaledCoupling else {}))
    inputs = streams(4, 6)
    top = list(stack[depth - 1].parameters())
    results = []
    for reversible in (False, True):
        stack.reversible = reversible
        y1, y2 = stack(*inputs)
        loss = (y1 * y2).sum()
        first = torch.autograd.grad(loss, top, retain_graph=True)  # the top block only
        second = torch.autograd.grad(loss, [*inputs, *stack.parameters()], retain_graph=True)
        third = torch.autograd.grad(loss, inputs)
        results.append([*first, *second, *third])
    assert_close_tensors(results[1], results[0], 1e-12)


@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("fast_mode", [True, False])
def test_gradcheck(depth, fast_mode):
    torch.manual_seed(0)
    stack = stack_of(torchrev.ScaledCoupling, depth, width=3, lam=0.7)
    scale = torch.randn(3, dtype=F64, requires_grad=True)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(3)

        def forward(self, x, scale):
            return self.net(x * scale)

    conditioned = torchrev.ReversibleSequential(
        *[torchrev.AdditiveCoupling(Scaled(), Scaled()) for _ in range(depth)]
    ).to(F64)
    x1, x2 = streams(2, 3)
    assert torch.autograd.gradcheck(stack, (x1, x2), fast_mode=fast_mode)
    assert torch.autograd.gradcheck(
        lambda a, b, s: conditioned(a, b, scale=s), (x1, x2, scale), fast_mode=fast_mode
    )


def test_double_backward_is_refused_clearly():
    stack = stack_of(torchrev.AdditiveCoupling, 2)
    y1, y2 = stack(*streams(3, 6))
    with pytest.raises(torchrev.ReversibilityError, match="create_graph"):
        torch.autograd.grad((y1 * y2).sum(), list(stack.parameters()), create_graph=True)


class ReadsBuffer(nn.Module):
    """A branch whose output depends on a buffer it does not write (a fixed positional table)."""

    def __init__(self, width):
        super().__init__()
        self.net = mlp(width)
        self.register_buffer("table", torch.randn(width))

    def forward(self, x):
        return self.net(x + self.table)


@pytest.mark.parametrize("what", ["frozen parameter", "buffer read", "trainable parameter"])
def test_in_place_changes_between_forward_and_backward_raise(what):
    """Plain autograd raises where its backward needs the changed value (a weight); the
    reversible backward recomputes from every one of them, so it raises for each."""
    torch.manual_seed(0)
    stack = torchrev.ReversibleSequential(
        *[torchrev.ScaledCoupling(ReadsBuffer(6), mlp(6), lam=0.5) for _ in range(3)]
    ).to(F64)
    stack[0].f.net[0].requires_grad_(what != "frozen parameter")
    target = {
        "frozen parameter": stack[0].f.net[0].weight,
        "buffer read": stack[1].f.table,
        "trainable parameter": stack[2].g[0].bias,
    }[what]
    for reversible in (False, True) if what == "frozen parameter" else (True,):
        stack.reversible = reversible
        y1, y2 = stack(*streams(4, 6))
        with torch.no_grad():
            target.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            (y1 * y2).sum().backward()


class Counter(nn.Module):
    """Counts its calls in a buffer it reassigns, and normalises with batch norm."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.BatchNorm1d(width)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        self.calls = self.calls + 1
        return self.norm(x)


def test_buffers_are_written_once_and_their_versions_left_alone():
    torch.manual_seed(0)
    stack = torchrev.ReversibleSequential(
        *[torchrev.ScaledCoupling(Counter(6), mlp(6), lam=0.5) for _ in range(2)]
    ).to(F64)
    norm = stack[0].f.norm
    x1, x2 = streams(8, 6)
    outside = norm(x1)  # the same batch norm used outside the stack, saving its statistics
    y1, y2 = stack(x1, x2)
    (outside.sum() + (y1 * y2).sum()).backward()  # plain autograd runs both: so must torchrev
    assert [int(block.f.calls) for block in stack] == [1, 1]
    assert int(norm.num_batches_tracked) == 2  # outside and inside: once each


def test_forward_and_inverse_in_one_loss_match_plain():
    """memcnn-style training: the same stack forward on one input and inverse on another."""
    torch.manual_seed(0)
    stack = torchrev.ReversibleSequential(
        *[torchrev.ScaledCoupling(Counter(6), mlp(6), lam=0.5) for _ in range(3)]
    ).to(F64)
    x, y = streams(8, 6), streams(8, 6)
    buffers = [b.clone() for b in stack.buffers()]

    def loss_of(reversible):
        stack.reversible = reversible
        with torch.no_grad():
            for b, saved in zip(stack.buffers(), buffers):
                b.copy_(saved)
        a1, a2 = stack(*x)
        b1, b2 = stack.inverse(*y)
        loss = (a1 * a2).sum() + (b1.square() + b2).sum()
        return torch.autograd.grad(loss, [*x, *y, *stack.parameters()])

    assert_close_tensors(loss_of(True), loss_of(False), 1e-10)


@pytest.mark.parametrize("depth", [3, 4])
@pytest.mark.parametrize("cls", [torchrev.AdditiveCoupling, torchrev.AffineCoupling])
def test_training_through_the_inverse_matches_plain_and_stores_nothing(depth, cls):
    torch.manual_seed(0)
    stack = stack_of(cls, depth, make=lambda k: nn.Sequential(mlp(6, k), nn.Dropout(0.2)))
    assert_inverse_training_matches_plain(stack)


def inverse_step_peak(depth, direction):
    torch.manual_seed(0)
    stack = stack_of(torchrev.AdditiveCoupling, depth, width=16, dtype=torch.float32)
    stack.check_recompute = False  # its fingerprints grow with depth (test_memory.py)
    x = torch.randn(32, 32)

    def step():
        streams = torchrev.Split(1)(x.clone())
        y1, y2 = stack(*streams) if direction == "forward" else stack.inverse(*streams)
        (y1.square().sum() + y2.square().sum()).backward()

    step()
    stack.zero_grad(set_to_none=False)
    return peak_live_bytes(step)


def test_memory_through_the_inverse_is_flat_in_depth_and_that_of_the_forward():
    """Within one stream of the forward direction's peak: the inverse subtracts each branch
    output, so its gradient is a negated copy where the forward's is the same tensor."""
    inverse = inverse_step_peak(12, "inverse")
    assert inverse == inverse_step_peak(3, "inverse")
    assert 0 <= inverse - inverse_step_peak(12, "forward") <= 32 * 16 * 4


def test_reversible_stage_inverts():
    torch.manual_seed(0)
    stack = stack_of(torchrev.ScaledCoupling, 3, width=4, lam=0.5)
    stage = torchrev.ReversibleStage(stack, torchrev.Split(1), torchrev.Concat(1))
    x = torch.randn(2, 8, dtype=F64, requires_grad=True)
    back = stage.inverse(stage(x))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    back.sum().backward()
    assert x.grad is not None
    duplicated = torchrev.ReversibleStage(stack, torchrev.Duplicate(), torchrev.Mean())
    with pytest.raises(TypeError, match="Mean loses information"):
        duplicated.inverse(x)


def live_bytes_after(calls, reversible, backward_every=None, fail=False):
    torch.manual_seed(0)
    stack = stack_of(torchrev.ScaledCoupling, 6, width=16, dtype=torch.float32, lam=0.5)
    stack.reversible = reversible
    upstream = nn.Linear(32, 32)
    x = torch.randn(8, 32)
    with LiveTensorBytes() as tracker:
        for i in range(calls):
            y1, y2 = stack(*torchrev.Split(1)(upstream(x)))
            if backward_every and i % backward_every == 0:
                loss = (y1 * y2).sum()
                if fail:
                    hook = y2.register_hook(lambda g: 1 / 0)
                    with pytest.raises(ZeroDivisionError):
                        loss.backward()
                    hook.remove()
                else:
                    loss.backward()
            del y1, y2
            loss = None
        stack.zero_grad(set_to_none=True)
        upstream.zero_grad(set_to_none=True)
    return tracker.current


@pytest.mark.parametrize(
    ("backward_every", "fail"), [(None, False), (2, False), (3, True)], ids=["none", "half", "fail"]
)
def test_no_graph_stays_alive_after_the_outputs_are_dropped(backward_every, fail):
    """Forward-only calls, skipped backwards, and backwards that fail midway free everything,
    as plain autograd's do (the per-call tape holds no tensor with a grad_fn)."""
    assert live_bytes_after(60, True, backward_every, fail) == 0
    assert live_bytes_after(60, False, backward_every, fail) == 0


class Masked(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = mlp(width)

    def forward(self, x, mask):
        return self.net(x) * mask


def test_momentum_coupling_takes_keyword_arguments():
    stack = torchrev.ReversibleSequential(
        *[torchrev.MomentumCoupling(Masked(6), gamma=0.5) for _ in range(3)]
    ).to(F64)
    v, x = torch.zeros(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64, requires_grad=True)
    mask = (torch.rand(4, 6) > 0.5).to(F64)
    results = []
    for reversible in (False, True):
        stack.reversible = reversible
        _, out = stack(v, x, mask=mask)
        results.append(torch.autograd.grad(out.square().sum(), [x, *stack.parameters()]))
    assert_close_tensors(results[1], results[0], 1e-12)


def test_shape_inference_on_the_meta_device():
    stack = stack_of(torchrev.ScaledCoupling, 4, width=8, lam=0.1).to("meta")
    x1 = torch.empty(3, 8, device="meta", requires_grad=True)
    y1, y2 = stack(x1, torch.empty(3, 8, device="meta"))
    assert y1.shape == (3, 8) and y1.is_meta
    (y1.sum() + y2.sum()).backward()
    assert x1.grad.shape == (3, 8)


@pytest.mark.parametrize("module", [torchrev.Split(5), torchrev.Concat(-3)], ids=str)
def test_out_of_range_dims_are_explained(module):
    with pytest.raises(ValueError, match="has no dimension"):
        module(torch.randn(2, 4)) if isinstance(module, torchrev.Split) else module(
            torch.randn(2, 4), torch.randn(2, 4)
        )


class Rotary(nn.Module):
    """Reads tensors nested in keyword arguments, as Llama's layers read
    ``position_embeddings=(cos, sin)``; ``masks`` passes one tensor under two keys."""

    def __init__(self, width):
        super().__init__()
        self.net = mlp(width)

    def forward(self, x, position_embeddings, masks):
        cos, sin = position_embeddings
        return self.net(x * cos + sin) * masks["scale"] + masks["shift"]


def test_tensors_nested_in_keyword_arguments_receive_gradients():
    torch.manual_seed(0)
    stack = torchrev.ReversibleSequential(
        *[torchrev.ScaledCoupling(Rotary(6), Rotary(6), lam=0.5) for _ in range(3)]
    ).to(F64)
    x1, x2 = streams(4, 6)
    cos, sin = torch.randn(2, 6, dtype=F64, requires_grad=True)
    mask = torch.rand(4, 6, dtype=F64)
    kwargs = {"position_embeddings": (cos, sin), "masks": {"scale": mask, "shift": mask}}
    results = []
    for reversible in (False, True):
        stack.reversible = reversible
        y1, y2 = stack(x1, x2, **kwargs)
        wanted = [x1, x2, cos, sin, *stack.parameters()]
        results.append(torch.autograd.grad((y1 * y2).sum(), wanted))
    assert all(torch.equal(a, b) for a, b in zip(*results))
