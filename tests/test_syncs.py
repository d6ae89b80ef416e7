"""No step waits for the device: no host read in a stack's forward, one per backward.

On a GPU every read of a device value on the host (``.item()``, ``.tolist()``, ``nonzero``,
``torch.equal``, ...) drains the queue. :class:`~torchrev.bench.SyncCounter` sees them through
the dispatcher, so the budget holds on the CPU too, where these tests plan exact corrections
ahead as stacks on accelerators do (NOTE [planned capacities]). The first call of an exact
stack sizes its corrections from the data; the budget applies from the next call: one read
when the backward ends (NOTE [one read per backward]), and for exact stacks, when it starts, a
wait for the planned corrections' statistics that the forward copied to the host as it ended
(NOTE [staged reads]), which leaves the kernels queued after the forward running.
"""

import pytest
import torch
from torch import nn

import torchrev
import torchrev._core.widths
from tests.helpers import mlp
from torchrev._core import recover
from torchrev._core.exact import resolve
from torchrev._core.staged import Staged
from torchrev.bench.syncs import SyncCounter


@pytest.fixture(autouse=True)
def plan_ahead(monkeypatch):
    monkeypatch.setattr(torchrev._core.widths, "PLAN_AHEAD", True)


WIDTH, BATCH, DEPTH = 16, 64, 4


def coupling(kind: str, dropout: float) -> torchrev.AbstractCoupling:
    f, g = mlp(WIDTH, dropout=dropout), mlp(WIDTH, dropout=dropout)
    if kind == "scaled":
        return torchrev.ScaledCoupling(f, g, lam=0.1)
    if kind == "affine":
        return torchrev.AffineCoupling.from_factory(lambda k: mlp(WIDTH, k), dim=-1)
    return torchrev.AdditiveCoupling(f, g)


MODES = {
    "float": {},
    "float, dropout": {"dropout": 0.1},
    "exact": {"exact": True},
    "exact, dropout": {"exact": True, "dropout": 0.1},
    "compact": {"exact": "compact"},
    "auto, bf16": {"exact": "auto", "dtype": torch.bfloat16},
    "auto, scaled": {"exact": "auto", "kind": "scaled"},
    "exact, affine": {"exact": True, "kind": "affine"},
    "overlap": {"overlap": True},
    "overlap, compact": {"overlap": True, "exact": "compact"},
    "budget, exact": {"exact": True, "memory_budget": 0.5},
}


def build(kind="additive", dropout=0.0, dtype=torch.float32, **options):
    torch.manual_seed(0)
    blocks = [coupling(kind, dropout) for _ in range(DEPTH)]
    return torchrev.ReversibleSequential(*blocks, **options).to(dtype), dtype


def counted_step(model, inputs):
    forward, backward = SyncCounter(), SyncCounter()
    with forward:
        y1, y2 = model(*inputs)
        loss = (y1.float() ** 2).sum() + y2.float().sum()
    with backward:
        loss.backward()
    return forward, backward


@pytest.mark.parametrize("mode", MODES)
def test_a_training_step_reads_the_device_once_in_backward(mode):
    stack, dtype = build(**MODES[mode])
    x = [torch.randn(BATCH, WIDTH, dtype=dtype, requires_grad=True) for _ in range(2)]
    for _ in range(2):  # warm-up: the first call plans exact corrections from the data
        counted_step(stack, x)
    forward, backward = counted_step(stack, x)
    assert forward.total == forward.staged == 0, dict(forward.counts)
    assert backward.total <= 1, dict(backward.counts)
    exact = resolve(stack.exact, list(stack), x)
    if "memory_budget" in MODES[mode]:  # only where the plan reverses a block
        assert backward.staged <= 1
    else:
        assert backward.staged == (1 if exact else 0)


def test_a_compiled_step_reads_the_device_once_in_backward():
    """Under torch.compile the stack is one operator that runs the eager engine (NOTE
    [compile]); Dynamo refuses to run under a dispatch mode, so only the compiled graph's
    backward, which runs the engine's through a second operator, is counted here."""
    stack, _ = build(exact=True)
    compiled = torch.compile(stack, backend="aot_eager", fullgraph=True)
    x = [torch.randn(BATCH, WIDTH, requires_grad=True) for _ in range(2)]
    for _ in range(3):
        y1, y2 = compiled(*x)
        with SyncCounter() as backward:
            ((y1**2).sum() + y2.sum()).backward()
    assert backward.total <= 1, dict(backward.counts)
    assert backward.staged == 1


def test_the_counter_sees_host_reads():
    """The counter itself: each kind of read counts, device-side work does not."""
    x = torch.arange(8.0)
    with SyncCounter() as reads:
        y = (x * 2).cumsum(0)
        torch.nonzero_static(y > 3, size=4)
    assert reads.total == 0
    with SyncCounter() as reads:
        y.sum().item()
        y.tolist()
        (y > 3).nonzero()
        y[y > 3]
        torch.equal(x, y)
        if (y > 0).any():
            pass
    assert dict(reads.counts) == {
        "aten._local_scalar_dense": 2,  # .item() and the if
        "Tensor.tolist": 1,
        "aten.nonzero": 1,
        "aten.index": 1,
        "aten.equal": 1,
    }
    with SyncCounter() as reads:  # a copy between host and device ("meta" stands in for one)
        x.to("meta")
        x.to("meta", non_blocking=True)
    assert dict(reads.counts) == {"aten._to_copy": 1}


@pytest.mark.filterwarnings("ignore:block 0")  # tiny streams: most differences are wide
def test_a_planned_correction_that_overflows_is_recorded_again_before_the_backward(monkeypatch):
    """Corrections sized from earlier calls (NOTE [planned capacities]): when the data jumps
    past their room, the backward replays the forward from the stack's input to record them
    again, and the gradients are plain autograd's bit for bit."""
    replays = []
    record_again = recover._record_again
    monkeypatch.setattr(recover, "_record_again", lambda *a: replays.append(record_again(*a)))
    torch.manual_seed(0)
    blocks = [torchrev.AdditiveCoupling(mlp(WIDTH, dropout=0.2), mlp(WIDTH)) for _ in range(3)]
    stack = torchrev.ReversibleSequential(*blocks, exact=True)
    calm = [torch.randn(BATCH, WIDTH) for _ in range(2)]
    for _ in range(2):  # plans from data where few differences escape
        sum(y.sum() for y in stack(*calm)).backward()
    # Streams far smaller than the branch outputs: x - ((x + h) - h) misses by many ulps.
    tiny = [1e-6 * torch.randn(BATCH, WIDTH) for _ in range(2)]
    grads = []
    for reversible in (True, False):
        stack.reversible = reversible
        x = [t.clone().requires_grad_() for t in tiny]
        stack.zero_grad()
        torch.manual_seed(1)
        with SyncCounter() as reads:
            ys = stack(*x)
        sum((y**2).sum() for y in ys).backward()
        grads.append([t.grad for t in x] + [p.grad for p in stack.parameters()])
        assert reads.total == 0
    assert len(replays) == 1
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_planned_room_stays_close_to_what_the_data_needs():
    """Bits per element of planned corrections (second call on) against the warm-up's, which
    are sized exactly: the margin costs a fraction of a bit (16k elements per stream)."""
    torch.manual_seed(0)
    blocks = [torchrev.AdditiveCoupling(mlp(64), mlp(64)) for _ in range(2)]
    stack = torchrev.ReversibleSequential(*blocks, exact=True)
    x = [torch.randn(256, 64, requires_grad=True) for _ in range(2)]
    bits = []
    for _ in range(2):
        bits.append(torchrev.check_reversibility(stack, *x).stored_bits)
        counted_step(stack, x)
    assert bits[0] < bits[1] <= bits[0] + 0.5, bits


@pytest.mark.filterwarnings("ignore:block 0")
def test_a_replayed_step_reads_a_stateful_branchs_buffers_as_its_forward_did(monkeypatch):
    """The replay behind an overflow (recover.py) runs spectral normalisation, which reads its
    power-iteration vector and then updates it, on the value the forward read: gradients and
    buffers are plain autograd's bit for bit."""
    replays = []
    record_again = recover._record_again
    monkeypatch.setattr(recover, "_record_again", lambda *a: replays.append(record_again(*a)))
    torch.manual_seed(0)

    def branch():
        return nn.Sequential(nn.utils.spectral_norm(nn.Linear(WIDTH, WIDTH)), nn.Dropout(0.1))

    def build():
        blocks = [torchrev.AdditiveCoupling(branch(), branch()) for _ in range(2)]
        return torchrev.ReversibleSequential(*blocks, exact=True)

    stack, plain = build(), build()
    for _ in range(2):  # plans from data where few differences escape
        sum(y.sum() for y in stack(*[torch.randn(BATCH, WIDTH) for _ in range(2)])).backward()
    plain.load_state_dict(stack.state_dict())  # the parameters and vectors as they are now
    plain.reversible = False
    tiny = [1e-6 * torch.randn(BATCH, WIDTH) for _ in range(2)]
    results = []
    for model in (stack, plain):
        model.zero_grad()
        x = [t.clone().requires_grad_() for t in tiny]
        torch.manual_seed(1)
        sum((y**2).sum() for y in model(*x)).backward()
        grads = [t.grad for t in x] + [p.grad for p in model.parameters()]
        results.append((grads, [b.clone() for b in model.buffers()]))
    assert len(replays) == 1
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
        ),
    ],
)
def test_staged_values_read_back_exactly_without_a_device_read(device):
    """NOTE [staged reads]: the copy is queued behind the kernels that compute the values;
    reading it waits on an event, not on the device's queue."""
    values = torch.tensor([0, -1, 2**31 - 1, -(2**31), 7], dtype=torch.int32, device=device)
    staged = Staged(values * 1)
    values.zero_()  # the staged copy is the values' when staged
    with SyncCounter() as reads:
        assert staged.read() == [0, -1, 2**31 - 1, -(2**31), 7]
    assert reads.total == 0 and reads.staged == 1
    with pytest.raises(TypeError, match="int32"):
        Staged(torch.zeros(2))
