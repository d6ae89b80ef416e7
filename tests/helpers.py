"""Shared builders and comparisons: every test compares against plain autograd."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import torchrev
from torchrev.couplings import COUPLINGS

F64 = torch.float64


def streams(*shape: int, dtype: torch.dtype = F64, grad: bool = True) -> tuple[Tensor, Tensor]:
    """Two independent leaf tensors of ``shape``."""
    return tuple(torch.randn(*shape, dtype=dtype, requires_grad=grad) for _ in range(2))


def mlp(width: int, out_factor: int = 1, hidden: int | None = None, dropout: float = 0.0):
    hidden = hidden or 2 * width
    layers: list[nn.Module] = [nn.Linear(width, hidden), nn.GELU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_factor * width))
    return nn.Sequential(*layers)


def stack_of(
    cls: type[torchrev.AbstractCoupling],
    depth: int,
    width: int = 6,
    dtype: torch.dtype = F64,
    make: Callable[[int], nn.Module] | None = None,
    **options,
) -> torchrev.ReversibleSequential:
    """``depth`` couplings of class ``cls`` on streams of ``width`` features (last dim)."""
    make = make or (lambda k: mlp(width, k))
    if cls is torchrev.AffineCoupling:
        options.setdefault("dim", -1)
    couplings = [cls.from_factory(make, **options) for _ in range(depth)]
    return torchrev.ReversibleSequential(*couplings).to(dtype)


def coupling_params():
    """Every registered coupling, with options that make it differ from the additive one."""
    options = {torchrev.ScaledCoupling: {"lam": 0.7, "beta": 1.3}}
    return [(cls, options.get(cls, {})) for cls in COUPLINGS]


def run_step(
    stack: nn.Module,
    inputs: Sequence[Tensor],
    weights: Sequence[Tensor],
    reversible: bool,
    **kwargs,
) -> tuple[Tensor, ...]:
    """Outputs of one forward of ``stack`` and a fixed linear loss, reversible or plain.

    Every reversible stack inside ``stack`` (nested ones too) switches mode together.
    """
    stacks = [m for m in stack.modules() if isinstance(m, torchrev.ReversibleSequential)]
    for s in stacks:
        s.reversible = reversible
    try:
        outputs = stack(*inputs, **kwargs)
    finally:
        for s in stacks:
            s.reversible = True
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return outputs, loss


def relative_error(a: Tensor, b: Tensor) -> float:
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close_tensors(
    got: Sequence[Tensor | None], want: Sequence[Tensor | None], rtol: float, what: str = ""
) -> None:
    """Every tensor agrees elementwise within ``rtol`` of its own largest entry.

    Tensors whose entries are all tiny next to the largest tensor of the set (a bias followed
    by batch norm has a gradient that is zero up to rounding) are compared against a floor of
    1e-3 of that largest entry instead, so rounding noise is not compared with itself.
    """
    assert len(got) == len(want)
    floor = 1e-3 * max((b.abs().max().item() for b in want if b is not None), default=0.0)
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None, f"{what}[{i}]: one gradient is None"
            continue
        assert a.shape == b.shape, f"{what}[{i}]: shape {a.shape} vs {b.shape}"
        scale = max(b.abs().max().item(), floor)
        err = (a.detach() - b.detach()).abs().max().item() / scale if scale else 0.0
        assert err <= rtol, f"{what}[{i}]: relative error {err:.3e} > {rtol:.1e}"


def grads_of(loss: Tensor, tensors: Sequence[Tensor]) -> list[Tensor | None]:
    return list(torch.autograd.grad(loss, list(tensors), allow_unused=True))


def compare_with_plain(
    stack: torchrev.ReversibleSequential,
    inputs: Sequence[Tensor],
    rtol: float,
    extra: Sequence[Tensor] = (),
    **kwargs,
) -> None:
    """Reversible and plain steps from the same RNG state give the same outputs and grads."""
    params = [p for p in stack.parameters() if p.requires_grad]
    wanted = [t for t in (*inputs, *extra) if t.requires_grad] + params
    weights = [torch.randn_like(t) for t in inputs]
    state = torch.get_rng_state()
    buffers = [b.clone() for b in stack.buffers()]
    out_plain, loss = run_step(stack, inputs, weights, reversible=False, **kwargs)
    plain = grads_of(loss, wanted)
    after_plain = torch.get_rng_state()
    with torch.no_grad():
        for b, saved in zip(stack.buffers(), buffers):
            b.copy_(saved)
    torch.set_rng_state(state)
    out_rev, loss = run_step(stack, inputs, weights, reversible=True, **kwargs)
    rev = grads_of(loss, wanted)
    assert torch.equal(torch.get_rng_state(), after_plain), "RNG advanced differently"
    assert_close_tensors(out_rev, out_plain, rtol, "outputs")
    assert_close_tensors(rev, plain, rtol, "grads")


def assert_inverse_training_matches_plain(stack: torchrev.ReversibleSequential) -> None:
    """Gradients of a loss on ``stack.inverse``'s outputs, reversible against plain, from the
    same RNG state (the branches may hold dropout)."""
    y = streams(5, 6)
    results = []
    for reversible in (False, True):
        stack.reversible = reversible
        torch.manual_seed(1)
        x1, x2 = stack.inverse(*y)
        loss = (x1 * 0.5 + x2.tanh()).sum()
        results.append(torch.autograd.grad(loss, [*y, *stack.parameters()]))
    assert_close_tensors(results[1], results[0], 1e-10)


def run_ranks(
    worker: str, tmp: Path, world: int = 2, timeout: float = 240, args: Sequence[str] = ()
) -> Path:
    """Run ``python -m worker RANK WORLD INIT OUT *args`` once per rank from the repository
    root and return OUT, which the worker writes; fail with every rank's log if one fails."""
    out, init = tmp / "results.pt", f"file://{tmp / 'init'}"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", worker, str(rank), str(world), init, str(out), *args],
            cwd=Path(__file__).parent.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = [rank.communicate(timeout=timeout)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(logs)
    return out
