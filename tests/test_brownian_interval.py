"""The Brownian interval: consistent under any query order, additive, reproducible, bounded in
memory, Brownian in law (against theory and against torchsde's BrownianInterval), and the
path sdeint's reversible Runge-Kutta methods integrate on any grid.

Every statistical test draws from a fixed seed, so it is deterministic; its tolerance is five
standard errors (or a Kolmogorov-Smirnov level of 1e-4) of the quantity it checks.
"""

import itertools
import math
import random

import pytest
import torch

from torchrev.ode import BrownianInterval, ReversibleRK, sdeint

F64 = torch.float64
N = 20_000
QUERIES = [(0.0, 1.0), (0.1, 0.35), (0.35, 0.7), (0.123, 0.456), (0.5, 0.5 + 1e-7), (0.9, 1.0)]


def test_any_query_order_gives_the_same_values():
    first, second = BrownianInterval(0.0, 1.0, (5,), seed=7), BrownianInterval(0.0, 1.0, (5,), 7)
    values = {q: first(*q) for q in QUERIES}
    shuffled = QUERIES[::-1] + random.Random(0).sample(QUERIES, len(QUERIES))
    for q in shuffled:
        assert torch.equal(second(*q), values[q])
    assert not torch.equal(BrownianInterval(0.0, 1.0, (5,), seed=8)(0.0, 1.0), values[(0.0, 1.0)])


def test_increments_add_over_adjacent_intervals():
    w = BrownianInterval(-1.0, 2.0, (64,), seed=1)
    cuts = [-1.0, -0.3, 0.1, 0.1 + 1e-9, 0.77, 1.5, 2.0]
    parts = sum(w(a, b) for a, b in itertools.pairwise(cuts))
    torch.testing.assert_close(parts, w(-1.0, 2.0), rtol=0, atol=1e-12)
    assert torch.equal(w(0.77, 0.1), -w(0.1, 0.77))


def sample(intervals, seed=0):
    w = BrownianInterval(0.0, 1.0, (N,), seed=seed)
    return [w(s, t) for s, t in intervals]


def test_mean_variance_and_independence():
    a, b, c = sample([(0.1, 0.35), (0.35, 0.7), (0.2, 0.6)])
    for x, var in ((a, 0.25), (b, 0.35), (c, 0.4)):
        assert abs(x.mean().item()) < 5 * math.sqrt(var / N)
        assert abs(x.var().item() / var - 1) < 5 * math.sqrt(2 / N)
    # disjoint increments are uncorrelated; overlapping ones share the overlap's variance
    assert abs(torch.corrcoef(torch.stack((a, b)))[0, 1].item()) < 5 / math.sqrt(N)
    overlap = (a * c).mean().item()  # E[W(.1,.35) W(.2,.6)] = 0.15
    assert abs(overlap - 0.15) < 5 * math.sqrt((0.25 * 0.4 + 0.15**2) / N)


def ks_statistic(x, y):
    x, y = torch.sort(x).values, torch.sort(y).values
    grid = torch.cat((x, y))
    cdf_x = torch.searchsorted(x, grid, right=True) / len(x)
    cdf_y = torch.searchsorted(y, grid, right=True) / len(y)
    return (cdf_x - cdf_y).abs().max().item()


def test_agrees_in_law_with_torchsde():
    torchsde = pytest.importorskip("torchsde")
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(N,), dtype=F64, entropy=11)
    ours = sample(QUERIES[1:4], seed=11)
    theirs = [bm(s, t) for s, t in QUERIES[1:4]]
    critical = math.sqrt(-math.log(1e-4 / 2) / 2) * math.sqrt(2 / N)  # KS at level 1e-4
    for x, y in zip(ours, theirs):
        assert ks_statistic(x, y) < critical
    # the joint law too: the correlation of overlapping queries
    for pair in ((0, 2), (1, 2)):
        mine = torch.corrcoef(torch.stack([ours[i] for i in pair]))[0, 1].item()
        other = torch.corrcoef(torch.stack([theirs[i] for i in pair]))[0, 1].item()
        assert abs(mine - other) < 10 / math.sqrt(N)


def test_memory_is_bounded_by_the_cache():
    w = BrownianInterval(0.0, 1.0, (3,), seed=0, cache_size=16)
    first = w(0.3, 0.6)
    for k in range(200):
        w(k / 200, (k + 1) / 200)
    assert len(w._cache) <= 16 and len(w._points) <= 16
    assert torch.equal(w(0.3, 0.6), first)  # evicted nodes are redrawn identically


def test_sdeint_paths_converge_strongly_on_irregular_grids():
    # dy = -y dt + 0.5 dW: each grid samples the same path, so finer grids converge to it.
    y0 = torch.ones(256, dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.31, 1.0], dtype=F64)  # irregular requested times

    def solve(dt):
        method = ReversibleRK("midpoint", adjoint=False)
        return sdeint(
            lambda t, y: -y, lambda t, y: 0.5 * torch.ones_like(y), y0, t, dt=dt, method=method
        )[-1]

    reference = solve(1 / 400)
    coarse, fine = ((solve(dt) - reference).abs().mean().item() for dt in (1 / 10, 1 / 40))
    assert fine < coarse / 3


def test_bad_intervals_say_what_to_pass():
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianInterval(1.0, 0.0, (2,))
    with pytest.raises(ValueError, match="outside"):
        BrownianInterval(0.0, 1.0, (2,))(0.5, 1.5)
