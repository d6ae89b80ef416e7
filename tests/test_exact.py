"""Exact reversal: bit-identical inverses, and with them plain autograd's gradients bit for bit."""

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchrev
from tests.helpers import mlp, stack_of
from torchrev._core.exact import BITS, Correction, resolve

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def same_bits(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


@pytest.mark.parametrize("compact", [False, True], ids=["fast", "compact"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("spread", [0.0, 1e-7, 1e-3, 1.0, 1e4])
def test_a_correction_turns_any_tensor_into_any_other(dtype, spread, compact):
    """Whatever the rebuilt tensor is (a few ulps off, far off, of another sign, inf or NaN),
    the correction restores the recorded one bit for bit, and never costs more than storing
    it outright (plus an index per escape it does not need)."""
    torch.manual_seed(0)
    x = torch.randn(513, 7, dtype=torch.float64)
    rebuilt = x + spread * x.abs() * torch.randn_like(x)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3.0])
    x[0], rebuilt[0] = specials, specials.flip(0)
    x, rebuilt = x.to(dtype), rebuilt.to(dtype)
    correction = Correction.between(x, rebuilt.clone(), compact)
    assert same_bits(correction.apply_(rebuilt.clone()), x)
    assert same_bits(correction.apply_(rebuilt.clone()), x)  # applying leaves it intact
    assert correction.nbytes <= x.nbytes + 4 * 7
    if spread == 0.0:  # the specials' row only: the rest fits the narrowest code
        assert correction.nbytes * 8 / x.numel() < (3 if compact else 5)


def test_a_correction_follows_the_logical_order_of_strided_tensors():
    x = torch.randn(6, 8).t()  # not contiguous
    rebuilt = x.contiguous().mul_(1 + 1e-6)  # the same values, laid out otherwise
    target = torch.empty(6, 8).t()  # laid out like x, filled later
    target.copy_(rebuilt)
    for compact in (False, True):
        target.copy_(rebuilt)
        Correction.between(x, rebuilt.clone(), compact).apply_(target)
        assert same_bits(target, x)


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS),
    n=st.integers(1, 3000),
    ulps=st.integers(0, 2**20),
    escapes=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    compact=st.booleans(),
)
def test_random_differences_round_trip(dtype, n, ulps, escapes, seed, compact):
    generator = torch.Generator().manual_seed(seed)
    int_type = BITS[dtype]
    bits = torch.randint(-(2**15), 2**15, (n,), generator=generator).to(int_type)
    x = bits.view(dtype)
    noise = torch.randint(-ulps, ulps + 1, (n,), generator=generator).to(int_type)
    far = torch.rand(n, generator=generator) < escapes
    noise[far] = torch.randint(-(2**14), 2**14, (int(far.sum()),), generator=generator).to(int_type)
    rebuilt = (bits - noise).view(dtype)
    correction = Correction.between(x, rebuilt.clone(), compact)
    assert same_bits(correction.apply_(rebuilt.clone()), x)


def scaled(depth, **options):
    return lambda: stack_of(torchrev.ScaledCoupling, depth, width=16, **options)


CASES = {  # the list: each fails by orders of magnitude under float reversal
    "scaled lam=0.1, 64": (scaled(64, lam=0.1), torch.float32),
    "scaled lam=beta=0.1, 64": (scaled(64, lam=0.1, beta=0.1), torch.float32),
    "scaled lam=0.1, 63": (scaled(63, lam=0.1), torch.float32),
    "momentum 0.5, 64": (
        lambda: stack_of(torchrev.MomentumCoupling, 64, width=16, gamma=0.5),
        torch.float32,
    ),
    "additive bf16, 64": (
        lambda: stack_of(torchrev.AdditiveCoupling, 64, width=16),
        torch.bfloat16,
    ),
    "affine, 64": (
        lambda: stack_of(torchrev.AffineCoupling, 64, width=16, bound=0.5),
        torch.float32,
    ),
    "scaled lam=0.5 float16, 33": (scaled(33, lam=0.5), torch.float16),
    "scaled lam=0.1 float64, 32": (scaled(32, lam=0.1), torch.float64),
}


def plain_and_reversible(stack, inputs, kwargs=None, autocast=None):
    """Gradients of inputs and trainable parameters for one step of each kind, from the same
    RNG state and buffers."""
    kwargs = kwargs or {}
    wanted = [t for t in (*inputs, *kwargs.values()) if t.requires_grad]
    wanted += [p for p in stack.parameters() if p.requires_grad]
    buffers = [b.clone() for b in stack.buffers()]
    weights = [torch.randn(s.shape, generator=torch.Generator().manual_seed(9)) for s in inputs]
    results = []
    for reversible in (False, True):
        stack.reversible = reversible
        with torch.no_grad():
            for b, saved in zip(stack.buffers(), buffers):
                b.copy_(saved)
        torch.manual_seed(3)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None):
            outputs = stack(*inputs, **kwargs)
            loss = sum((y.float() * w).sum() for y, w in zip(outputs, weights))
        results.append((outputs, torch.autograd.grad(loss, wanted, allow_unused=True)))
    stack.reversible = True
    return results


def assert_bitwise(results):
    (plain_out, plain), (rev_out, rev) = results
    assert all(same_bits(a, b) for a, b in zip(rev_out, plain_out))
    for a, b in zip(rev, plain):
        assert (a is None and b is None) or same_bits(a, b)


@pytest.mark.parametrize("exact", ["auto", "compact"])
@pytest.mark.parametrize("case", list(CASES))
def test_deep_ill_conditioned_stacks_train_on_plain_autograd_gradients_bitwise(case, exact):
    build, dtype = CASES[case]
    torch.manual_seed(0)
    stack = build().to(dtype)
    stack.exact = exact
    inputs = [torch.randn(64, 16, dtype=dtype, requires_grad=True) for _ in range(2)]
    report = torchrev.check_reversibility(stack, *inputs)
    assert report.exact and report.worst_gradient == 0.0, str(report)
    # Bits per stream element per step: 1 to 9 on average (lam = beta = 0.1 is the worst),
    # against 16 to 64 for storing the input.
    assert 1 < report.stored_bits <= 9 and max(b.stored_bits for b in report.blocks) < 11
    assert_bitwise(plain_and_reversible(stack, inputs))
    stack.exact = False  # the float inverse these cases need exactness for
    lossy = torchrev.check_reversibility(stack, *inputs).worst_reconstruction
    assert not lossy <= 1e-3  # NaN for the worst: every digit lost, then overflow


class Conditioned(nn.Module):
    """Dropout, batch norm and keyword arguments (a mask, and a scale that trains)."""

    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.Dropout(0.2), nn.GELU()
        )

    def forward(self, x, mask, scale):
        return self.net(x * scale + mask)


@pytest.mark.parametrize("depth", [7, 8])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "bf16 autocast"])
def test_dropout_batchnorm_frozen_branches_and_kwargs_bitwise(depth, autocast):
    torch.manual_seed(0)
    blocks = [
        torchrev.ScaledCoupling(Conditioned(16), Conditioned(16), lam=0.1) for _ in range(depth)
    ]
    for block in blocks[::3]:
        block.f.requires_grad_(False)  # a frozen backbone part
    stack = torchrev.ReversibleSequential(*blocks)
    inputs = [torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)]
    kwargs = {"mask": torch.randn(8, 16), "scale": torch.randn(16, requires_grad=True)}
    results = plain_and_reversible(stack, inputs, kwargs, autocast)
    assert_bitwise(results)
    assert results[1][1][1] is not None  # the trainable kwarg's gradient


class Unreplayable(nn.Module):
    """Draws from its own generator, which the engine does not replay."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        return self.linear(x) + 1e-3 * torch.randn(x.shape, generator=self.generator)


def test_a_branch_that_recomputes_differently_is_caught_and_named():
    stack = torchrev.ReversibleSequential(
        torchrev.ScaledCoupling(mlp(6), mlp(6), lam=0.1),
        torchrev.ScaledCoupling(mlp(6), Unreplayable(6), lam=0.1),
    )
    outputs = stack(torch.randn(4, 6, requires_grad=True), torch.randn(4, 6))
    with pytest.raises(torchrev.ReversibilityError, match=r"ScaledCoupling\.g computed a diff"):
        sum(y.sum() for y in outputs).backward()


def test_auto_is_exact_where_float_reversal_amplifies_rounding():
    def stack(cls, dtype=torch.float32, **options):
        return stack_of(cls, 2, width=4, **options).to(dtype)

    x = torch.zeros(1, 4)
    assert not resolve("auto", list(stack(torchrev.AdditiveCoupling)), [x, x])
    assert not resolve("auto", list(stack(torchrev.ScaledCoupling, lam=1.0, beta=2.0)), [x, x])
    for cls, options in [
        (torchrev.ScaledCoupling, {"lam": 0.1}),
        (torchrev.MomentumCoupling, {}),
        (torchrev.AffineCoupling, {}),
    ]:
        assert resolve("auto", list(stack(cls, **options)), [x, x])
    half = x.bfloat16()
    assert resolve("auto", list(stack(torchrev.AdditiveCoupling, torch.bfloat16)), [half, half])
    assert resolve(True, list(stack(torchrev.AdditiveCoupling)), [x, x])
    assert resolve("compact", list(stack(torchrev.AdditiveCoupling)), [x, x]) == "compact"
    assert not resolve(False, list(stack(torchrev.ScaledCoupling, lam=0.1)), [x, x])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="exact must be True, False, 'auto' or 'compact'"):
        torchrev.ReversibleSequential(torchrev.AdditiveCoupling(mlp(4), mlp(4)), exact="yes")
    with pytest.raises(ValueError, match="exact must be True"):
        torchrev.create_model("revnet38", exact=1.0)
    stack = torchrev.ReversibleSequential(
        torchrev.AdditiveCoupling(nn.Identity(), nn.Identity()), exact=True
    )
    ints = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="exact=True needs float16, bfloat16, float32 or float64"):
        torchrev.check_reversibility(stack, ints, ints)


def test_fused_passes_give_the_eager_passes_bits(monkeypatch):
    """The fused encode and decode (torch.compile'd, :mod:`torchrev._core.fused`) store and
    rebuild the same bits as the eager reference, planned ahead or sized from the data."""
    import torchrev._core.fused as fused
    import torchrev._core.native as native
    from torchrev._core.widths import Levels

    monkeypatch.setattr(native, "NATIVE", False)  # the eager reference, not the C loops
    torch.manual_seed(0)
    x = torch.randn(4099)
    h = 8 * torch.randn(4099)
    rebuilt = (x + h) - h
    results = []
    for fuse in (False, True):
        monkeypatch.setattr(fused, "FUSE", fuse)
        for layout in (None, Levels((4, 8), (1500, 300))):  # room to spare
            c = Correction.between(x, rebuilt.clone(), layout=layout)
            results.append((c, c.apply_(rebuilt.clone())))
    for (eager, back), (fast, fast_back) in zip(results[:2], results[2:]):
        assert (eager.widths, eager.sizes) == (fast.widths, fast.sizes)
        assert all(torch.equal(a, b) for a, b in zip(eager.levels, fast.levels))
        assert torch.equal(eager.index, fast.index) and torch.equal(eager.stats, fast.stats)
        assert same_bits(back, x) and same_bits(fast_back, x)


def test_fused_passes_fall_back_to_eager_where_nothing_compiles(monkeypatch):
    """A machine without Triton or a C++ compiler: one warning, then the same bits eagerly."""
    import torchrev._core.fused as fused
    import torchrev._core.native as native

    monkeypatch.setattr(native, "NATIVE", False)

    def cannot_compile(fn, **options):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(fused, "FUSE", True)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", cannot_compile)
    torch.manual_seed(0)
    x = torch.randn(4099)
    h = 8 * torch.randn(4099)
    rebuilt = (x + h) - h
    with pytest.warns(UserWarning, match="could not compile"):
        correction = Correction.between(x, rebuilt.clone())
    assert same_bits(correction.apply_(rebuilt.clone()), x)
    monkeypatch.setattr(fused, "FUSE", False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(correction.levels, Correction.between(x, rebuilt.clone()).levels)
    )


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(FLOATS),
    n=st.integers(1, 5000),
    ulps=st.sampled_from([0, 1, 3, 8, 200, 2**20]),
    escapes=st.sampled_from([0.0, 0.01, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
    compact=st.booleans(),
)
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the loops")
def test_the_cpu_loops_store_and_rebuild_the_eager_passes_bits(
    dtype, n, ulps, escapes, seed, compact
):
    """:mod:`torchrev._core.native` against its reference, the eager passes: the same widths,
    codes, escapes and positions, and the same rebuilt bits, for every code width the data
    picks (wrapping differences and the type's extremes included)."""
    import torchrev._core.native as native

    generator = torch.Generator().manual_seed(seed)
    int_type = BITS[dtype]
    info = torch.iinfo(int_type)
    bits = torch.randint(-(2**15), 2**15, (n,), generator=generator).to(int_type)
    noise = torch.randint(-ulps, ulps + 1, (n,), generator=generator).to(int_type)
    far = torch.rand(n, generator=generator) < escapes
    noise[far] = torch.randint(info.min, info.max, (int(far.sum()),), generator=generator).to(
        int_type
    )
    bits[: min(n, 2)] = torch.tensor([info.min, info.max])[: min(n, 2)].to(int_type)
    x, rebuilt = bits.view(dtype), (bits - noise).view(dtype)
    assert native.usable(x)
    results = []
    for use in (False, None):
        native.NATIVE = use
        try:
            c = Correction.between(x, rebuilt.clone(), compact)
            results.append((c, c.apply_(rebuilt.clone())))
        finally:
            native.NATIVE = None
    (eager, eager_back), (loops, loops_back) = results
    assert (eager.widths, eager.sizes) == (loops.widths, loops.sizes)
    assert all(torch.equal(a, b) for a, b in zip(eager.levels, loops.levels))
    assert (eager.index is None and loops.index is None) or torch.equal(eager.index, loops.index)
    assert same_bits(eager_back, x) and same_bits(loops_back, x)


def test_the_cpu_loops_fall_back_to_eager_without_a_compiler(monkeypatch, tmp_path):
    import torchrev._core.native as native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCHREV_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_LIBRARY", [])
    x = torch.randn(4099)
    rebuilt = (x + 8) - 8
    with pytest.warns(UserWarning, match="could not build"):
        correction = Correction.between(x, rebuilt.clone())
    assert same_bits(correction.apply_(rebuilt.clone()), x)
    assert not native.usable(x)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the loops")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("in_place", [True, False])
def test_a_step_that_reverts_by_subtraction_codes_while_it_subtracts(dtype, in_place):
    """The CPU loops compute ``x' = y - h`` while coding (the rebuilt input is never written
    out) and the backward subtracts the same way, so the bits come back through NaNs (NaN -
    NaN takes another sign from torch's kernels than from C), infinities and signed zeros,
    whether a few ulps or every bit differ."""
    from torchrev._core.exact import ExactStep

    torch.manual_seed(0)
    nan, inf = float("nan"), float("inf")
    specials = torch.tensor([1.0, nan, -nan, inf, -inf, 0.0, -0.0], dtype=dtype)
    coupling = torchrev.AdditiveCoupling(nn.Identity(), nn.Identity())
    for spread in (0.0, 1.0):  # y = x + h (a few ulps), or y unrelated to x (every bit)
        x = torch.randn(4900, dtype=dtype)
        h = specials.repeat(700)
        y = coupling.update(x, h, 0) if spread == 0.0 else specials.repeat_interleave(700)
        record = ExactStep.record(coupling, 0, x, h, y)
        assert record.subtracted
        rebuilt = record.rebuild(coupling, 0, y.clone(), h, in_place)
        assert same_bits(rebuilt, x)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the loops")
@pytest.mark.parametrize("exact", [True, "compact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_an_additive_stack_coded_while_subtracting_trains_on_plain_gradients(
    monkeypatch, exact, dtype
):
    """The engine's route through the CPU loops' subtraction (forward) and in-place rebuild
    (backward), with dropout, a frozen branch and odd depth: plain autograd bit for bit."""
    from torchrev._core.exact import ExactStep

    recorded = []
    record = ExactStep.record  # bound to the class

    def spy(*args, **kwargs):
        recorded.append(record(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(ExactStep, "record", spy)
    torch.manual_seed(0)
    blocks = [torchrev.AdditiveCoupling(mlp(16, dropout=0.1), mlp(16)) for _ in range(5)]
    blocks[1].f.requires_grad_(False)
    stack = torchrev.ReversibleSequential(*blocks, exact=exact).to(dtype)
    inputs = [torch.randn(8, 16, dtype=dtype, requires_grad=True) for _ in range(2)]
    assert_bitwise(plain_and_reversible(stack, inputs))
    assert len(recorded) == 10 and all(r.subtracted for r in recorded)
