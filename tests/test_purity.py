"""NOTE [pure branches]: which branches skip the RNG capture and the closure walk, and that
everything else still gets both (a hook, a mode or a shadowed weight that draws or closes over)."""

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import torchrev
import torchrev._core.recompute as recompute
import torchrev._core.step as engine
from tests.helpers import F64, compare_with_plain, mlp, streams
from torchrev._core.purity import pure_layers


def layers(module: nn.Module) -> list[nn.Module]:
    return list(module.modules())


def test_torch_nn_layers_are_pure():
    conv = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())
    assert pure_layers(layers(mlp(4)))
    assert pure_layers(layers(conv))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x)


class MyLinear(nn.Linear):
    pass


def shadowed_weight() -> nn.Module:
    """A Linear whose forward reads a plain tensor attribute instead of its parameter."""
    linear = nn.Linear(4, 4)
    del linear.weight
    linear.weight = torch.randn(4, 4, requires_grad=True)
    return linear


def with_hook(hook_kind: str) -> nn.Module:
    linear = nn.Linear(4, 4)
    getattr(linear, hook_kind)(lambda *args: None)
    return linear


def with_own_forward() -> nn.Module:
    linear = nn.Linear(4, 4)
    linear.forward = lambda x: x
    return linear


def trainable_buffer() -> nn.Module:
    norm = nn.BatchNorm1d(4)
    norm.running_mean = torch.zeros(4, requires_grad=True)
    return norm


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)),
        Custom,
        lambda: MyLinear(4, 4),
        lambda: with_hook("register_forward_hook"),
        lambda: with_hook("register_forward_pre_hook"),
        with_own_forward,
        shadowed_weight,
        trainable_buffer,
    ],
    ids=[
        "dropout",
        "custom",
        "subclass",
        "forward-hook",
        "pre-hook",
        "own-forward",
        "shadowed",
        "buffer",
    ],
)
def test_anything_else_is_not_pure(build):
    assert not pure_layers(layers(nn.Sequential(nn.Tanh(), build())))


def test_a_global_forward_hook_makes_every_branch_impure():
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not pure_layers(layers(mlp(4)))
    finally:
        handle.remove()
    assert pure_layers(layers(mlp(4)))


def test_a_module_is_scanned_again_when_its_attributes_change():
    branch = mlp(4)
    assert pure_layers(layers(branch))
    del branch[0].weight
    branch[0].weight = torch.randn(8, 4)
    assert not pure_layers(layers(branch))


def pure_stack(depth: int, dropout_in_g: bool = False) -> torchrev.ReversibleSequential:
    couplings = [
        torchrev.AdditiveCoupling(mlp(6), mlp(6, dropout=0.3 if dropout_in_g else 0.0))
        for _ in range(depth)
    ]
    return torchrev.ReversibleSequential(*couplings).to(F64)


def counting(monkeypatch) -> dict[str, int]:
    """Count the engine's RNG captures and closure walks."""
    counts = {"captures": 0, "walks": 0}
    capture, check = engine.RngState.capture, recompute.check_tracked

    def counted_capture(device):
        counts["captures"] += 1
        return capture(device)

    def counted_check(*args):
        counts["walks"] += 1
        return check(*args)

    monkeypatch.setattr(engine.RngState, "capture", counted_capture)
    monkeypatch.setattr(recompute, "check_tracked", counted_check)
    return counts


@pytest.mark.parametrize(("dropout_in_g", "captures", "walks"), [(False, 1, 0), (True, 7, 3)])
def test_pure_branches_skip_both_checks(monkeypatch, dropout_in_g, captures, walks):
    stack = pure_stack(3, dropout_in_g)
    counts = counting(monkeypatch)
    sum(y.sum() for y in stack(*streams(5, 6))).backward()
    # One capture for the call; per impure step (each g), one after its forward and one of the
    # caller's state around its replay, and one walk.
    assert counts == {"captures": captures, "walks": walks}


@pytest.mark.parametrize("depth", [3, 4])
def test_pure_and_dropout_branches_interleaved_match_plain(depth):
    compare_with_plain(pure_stack(depth, dropout_in_g=True), streams(8, 6), rtol=1e-10)


class Opaque(nn.Module):
    """The same layers behind a custom module: the general path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("depth", [3, 4])
def test_general_path_matches_plain_on_the_same_layers(depth):
    couplings = [torchrev.AdditiveCoupling(Opaque(mlp(6)), Opaque(mlp(6))) for _ in range(depth)]
    stack = torchrev.ReversibleSequential(*couplings).to(F64)
    compare_with_plain(stack, streams(5, 6), rtol=1e-10)


def test_noise_from_a_global_hook_is_replayed():
    def noisy(module, args, output):
        return output + 0.1 * torch.randn_like(output) if isinstance(module, nn.Linear) else None

    handle = nn.modules.module.register_module_forward_hook(noisy)
    try:
        compare_with_plain(pure_stack(3), streams(5, 6), rtol=1e-10)
    finally:
        handle.remove()


class NoisyLinear(TorchFunctionMode):
    """Adds noise to every linear layer's output, and optionally a trainable shift."""

    def __init__(self, shift: torch.Tensor | None = None):
        super().__init__()
        self.shift = shift

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear:
            out = out + 0.1 * torch.randn_like(out)
            if self.shift is not None:
                out = out + self.shift
        return out


def test_noise_from_a_torch_function_mode_is_replayed():
    with NoisyLinear():
        compare_with_plain(pure_stack(3), streams(5, 6), rtol=1e-10)


def test_a_tensor_closed_over_by_a_mode_is_refused():
    shift = torch.zeros((), dtype=F64, requires_grad=True)
    with NoisyLinear(shift), pytest.raises(torchrev.ReversibilityError, match="uses 1 tensor"):
        sum(y.sum() for y in pure_stack(2)(*streams(5, 6))).backward()


def test_a_shadowed_weight_is_refused():
    f = nn.Sequential(nn.Linear(6, 6), nn.Tanh()).to(F64)
    del f[0].weight
    f[0].weight = torch.randn(6, 6, dtype=F64, requires_grad=True)
    stack = torchrev.ReversibleSequential(torchrev.AdditiveCoupling(f, mlp(6).to(F64)))
    with pytest.raises(torchrev.ReversibilityError, match="uses 1 tensor"):
        sum(y.sum() for y in stack(*streams(5, 6))).backward()
