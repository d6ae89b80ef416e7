"""Randomised: exact reversal gives plain autograd's gradients bit for bit (issue 28, item 6).

Drawn: the coupling, the stream dtype (float16, bfloat16, float32, float64), the magnitudes
(ordinary, subnormal, near overflow, with infinities and NaNs planted), the layout (empty,
one element, non-contiguous, channels-last) and branches with state (BatchNorm,
spectral_norm, dropout). Every gradient, NaNs included, must equal plain autograd's exactly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

import torchrev
from torchrev.couplings import COUPLINGS

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
WIDTH = 4


class Branch(nn.Module):
    """A small branch on (batch, WIDTH) or (batch, WIDTH, 2, 2) streams, with drawn state."""

    def __init__(self, out_factor: int, state: frozenset[str], conv: bool) -> None:
        super().__init__()
        make = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        first = make(WIDTH, 2 * WIDTH)
        layers: list[nn.Module] = [
            spectral_norm(first) if "spectral_norm" in state else first,
            nn.Tanh(),
        ]
        if "batchnorm" in state:
            layers.append((nn.BatchNorm2d if conv else nn.BatchNorm1d)(2 * WIDTH))
        if "dropout" in state:
            layers.append(nn.Dropout(0.25))
        layers.append(make(2 * WIDTH, out_factor * WIDTH))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def make_streams(
    batch: int, dtype: torch.dtype, layout: str, magnitude: str, special: bool, seed: int
) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, WIDTH, 2, 2) if layout == "channels_last" else (batch, WIDTH)
    wide = (*shape[:-1], 2 * shape[-1]) if layout == "strided" else shape
    scale = {
        "ordinary": 1.0,
        "subnormal": torch.finfo(dtype).tiny / 4,
        "huge": torch.finfo(dtype).max / 16,
    }[magnitude]
    out = []
    for _ in range(2):
        x = (torch.randn(wide, generator=generator, dtype=torch.float64) * scale).to(dtype)
        if layout == "strided":
            x = x[..., ::2]  # non-contiguous
        elif layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        if special and x.numel() >= 2:
            x[(0,) * x.dim()], x[(-1,) * x.dim()] = float("inf"), float("nan")
        out.append(x.requires_grad_())
    return out


@st.composite
def cases(draw):
    cls = draw(st.sampled_from(COUPLINGS))
    layout = draw(st.sampled_from(["plain", "strided", "channels_last"]))
    state = frozenset(draw(st.sets(st.sampled_from(["batchnorm", "spectral_norm", "dropout"]))))
    batch = draw(st.sampled_from([0, 1, 3]))
    if "batchnorm" in state and batch < 2:
        batch = 3  # batch norm refuses one value per channel, under plain autograd too
    options = {
        torchrev.ScaledCoupling: {"lam": draw(st.sampled_from([0.1, 0.5])), "beta": 0.7},
        torchrev.MomentumCoupling: {"gamma": draw(st.sampled_from([0.3, 0.9]))},
        torchrev.AffineCoupling: {"dim": 1, "bound": 1.0},
    }.get(cls, {})
    return {
        "cls": cls,
        "options": options,
        "dtype": draw(st.sampled_from(DTYPES)),
        "layout": layout,
        "state": state,
        "batch": batch,
        "depth": draw(st.integers(1, 4)),
        "magnitude": draw(st.sampled_from(["ordinary", "subnormal", "huge"])),
        "special": draw(st.booleans()),
        "exact": draw(st.sampled_from([True, "compact"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def gradients(stack, inputs, reversible, seed):
    stack.reversible = reversible
    torch.manual_seed(seed)
    y1, y2 = stack(*inputs)
    loss = (y1.float() * 0.5 + y2.float()).sum()
    params = [p for p in stack.parameters() if p.requires_grad]
    return [y1, y2, *torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)]


@pytest.mark.filterwarnings("ignore::torchrev.ReversibilityWarning")  # tiny or huge streams
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(cases())
def test_exact_reversal_equals_plain_autograd_bit_for_bit(case):
    assert_plain_bit_for_bit(case, case["depth"], budget=None)


@pytest.mark.filterwarnings("ignore::torchrev.ReversibilityWarning")
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cases(), st.sampled_from([0.3, 0.7]))
def test_planned_stacks_equal_plain_autograd_bit_for_bit(case, budget):
    """The same, with a memory budget: kept, checkpointed and reversed blocks in one stack."""
    if case["batch"] == 0:
        case["batch"] = 3  # an empty step has no activations to plan
    assert_plain_bit_for_bit(case, case["depth"] + 1, budget)


def assert_plain_bit_for_bit(case: dict, depth: int, budget: float | None) -> None:
    """Outputs, gradients and buffers of a reversible step equal a plain one's, NaNs included;
    with ``budget``, the plan is made on a first call whose results are not compared."""
    torch.manual_seed(case["seed"])
    conv = case["layout"] == "channels_last"
    couplings = [
        case["cls"].from_factory(lambda k: Branch(k, case["state"], conv), **case["options"])
        for _ in range(depth)
    ]
    stack = torchrev.ReversibleSequential(*couplings, exact=case["exact"]).to(case["dtype"])
    inputs = make_streams(
        case["batch"], case["dtype"], case["layout"], case["magnitude"], case["special"], 1
    )
    start = [b.clone() for b in stack.buffers()]
    plain = gradients(stack, inputs, False, case["seed"])
    after_plain = [b.clone() for b in stack.buffers()]
    if budget is not None:
        stack.memory_budget = budget
        torch.manual_seed(case["seed"])
        stack(*inputs)
    with torch.no_grad():
        for b, saved in zip(stack.buffers(), start):
            b.copy_(saved)
    rev = gradients(stack, inputs, True, case["seed"])
    for i, (a, b) in enumerate(zip(rev, plain)):
        if a is None or b is None:
            assert a is None and b is None, i
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"tensor {i}")
    for a, b in zip(stack.buffers(), after_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
