"""Randomised: any stack, any branch contents, any backward API gives plain autograd's results."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchrev
from tests.helpers import F64, assert_close_tensors
from torchrev.couplings import COUPLINGS

LAYERS = ["dropout", "batchnorm", "layernorm", "conv"]


class Branch(nn.Module):
    """A branch assembled from the drawn layers; reads an optional ``mask`` keyword."""

    def __init__(self, width, out_factor, layers, conv):
        super().__init__()
        if conv:  # (batch, channels, length) streams
            body = [nn.Conv1d(width, 2 * width, 3, padding=1), nn.GELU()]
            if "batchnorm" in layers:
                body.append(nn.BatchNorm1d(2 * width))
            body.append(nn.Conv1d(2 * width, out_factor * width, 3, padding=1))
        else:  # (batch, features) streams
            body = [nn.Linear(width, 2 * width), nn.GELU()]
            if "batchnorm" in layers:
                body.append(nn.BatchNorm1d(2 * width))
            if "layernorm" in layers:
                body.append(nn.LayerNorm(2 * width))
            body.append(nn.Linear(2 * width, out_factor * width))
        if "dropout" in layers:
            body.append(nn.Dropout(0.3))
        self.body = nn.Sequential(*body)

    def forward(self, x, mask=None):
        return self.body(x if mask is None else x * mask)


@st.composite
def cases(draw):
    cls = draw(st.sampled_from(COUPLINGS))
    conv = draw(st.booleans())
    layers = draw(st.sets(st.sampled_from(LAYERS)))
    options = {
        torchrev.ScaledCoupling: {"lam": draw(st.sampled_from([0.1, 0.5, 1.0])), "beta": 0.7},
        torchrev.MomentumCoupling: {"gamma": draw(st.sampled_from([0.3, 0.9]))},
        torchrev.AffineCoupling: {"dim": 1 if conv else -1, "bound": 1.0},
    }.get(cls, {})
    return {
        "cls": cls,
        "options": options,
        "conv": conv,
        "layers": layers,
        "depth": draw(st.integers(1, 5)),
        "frozen": draw(st.lists(st.booleans(), min_size=10, max_size=10)),
        "mask": draw(st.sampled_from([None, "plain", "trainable"])),
        "used": draw(st.sampled_from(["both", "first", "second"])),
        "api": draw(st.sampled_from(["backward", "grad", "retain twice", "hooks"])),
        "exact": draw(st.sampled_from(["auto", True, False])),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(case):
    torch.manual_seed(case["seed"])
    width = 4
    cls = case["cls"]

    def make(k):
        return Branch(width, k, case["layers"], case["conv"])

    blocks = [cls.from_factory(make, **case["options"]) for _ in range(case["depth"])]
    stack = torchrev.ReversibleSequential(*blocks, exact=case["exact"]).to(F64)
    for frozen, block in zip(case["frozen"], stack):
        block.branch(0).requires_grad_(not frozen)
    shape = (6, width, 5) if case["conv"] else (6, width)
    inputs = [torch.randn(shape, dtype=F64, requires_grad=True) for _ in range(2)]
    if cls is torchrev.MomentumCoupling:
        inputs[0] = torch.zeros(shape, dtype=F64)  # the velocity starts at rest
    kwargs = {}
    if case["mask"] is not None:
        kwargs["mask"] = torch.rand(shape, dtype=F64) + 0.5
        kwargs["mask"].requires_grad_(case["mask"] == "trainable")
    return stack, inputs, kwargs


def run(case, stack, inputs, kwargs, reversible):
    """Outputs, gradients and hook calls of one step in the drawn backward API."""
    stack.reversible = reversible
    torch.manual_seed(1)
    outputs = stack(*inputs, **kwargs)
    weights = [torch.linspace(-1, 2, o.numel(), dtype=F64).view_as(o) for o in outputs]
    terms = [(o * w).sum() for o, w in zip(outputs, weights)]
    loss = {"both": terms[0] + terms[1], "first": terms[0], "second": terms[1]}[case["used"]]
    wanted = [t for t in (*inputs, *kwargs.values()) if t.requires_grad]
    wanted += [p for p in stack.parameters() if p.requires_grad]
    calls = []
    if case["api"] == "grad":
        grads = list(torch.autograd.grad(loss, wanted, allow_unused=True))
    elif case["api"] == "retain twice":
        first = torch.autograd.grad(loss, wanted, allow_unused=True, retain_graph=True)
        second = torch.autograd.grad(loss, wanted, allow_unused=True)
        grads = [*first, *second]
    else:
        handles = []
        if case["api"] == "hooks":
            # A branch whose output the loss ignores returns None for its parameters, and
            # autograd calls their hooks with None (as for any custom Function): not counted.
            def hook(g, i):
                if g is not None:
                    calls.append(i)

            handles = [p.register_hook(lambda g, i=i: hook(g, i)) for i, p in enumerate(wanted)]
        for t in wanted:
            t.grad = None
        loss.backward()
        grads = [t.grad for t in wanted]
        for handle in handles:
            handle.remove()
    return [*outputs, *grads], sorted(calls)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(cases())
def test_everything_matches_plain_autograd(case):
    stack, inputs, kwargs = build(case)
    buffers = [b.clone() for b in stack.buffers()]
    got, got_calls = run(case, stack, inputs, kwargs, reversible=True)
    after = [b.clone() for b in stack.buffers()]
    with torch.no_grad():
        for b, saved in zip(stack.buffers(), buffers):
            b.copy_(saved)
    want, want_calls = run(case, stack, inputs, kwargs, reversible=False)
    assert got_calls == want_calls  # every hook once, as in plain autograd
    assert all(torch.equal(a, b) for a, b in zip(after, stack.buffers()))  # written once
    assert [g is None for g in got] == [g is None for g in want]
    present = [(a, b) for a, b in zip(got, want) if a is not None]
    rtol = 0.0 if torchrev._core.exact.resolve(stack.exact, list(stack), inputs) else 1e-9
    if rtol == 0.0:  # exact reversal: plain autograd's results bit for bit
        assert all(torch.equal(a, b) for a, b in present)
    else:
        assert_close_tensors([a for a, _ in present], [b for _, b in present], rtol)
