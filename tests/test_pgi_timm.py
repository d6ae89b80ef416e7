"""PGI around a real timm ``features_only`` CNN (random init, nothing downloaded).

timm imports torchvision, whose PyPI wheels are CUDA builds: beside the CPU torch that CI pins
their compiled ops fail to load and ``import torchvision`` raises (pytorch/vision#9085), so
timm is not in the ``test`` extra and this file skips where timm cannot be imported (see
docs/concepts/pgi.md, "timm models"). It runs wherever timm works (a CUDA torch, or a
torchvision built for the installed torch).
"""

import pytest
import torch
from torch import nn

from torchrev.pgi import PGI

NAME = "mobilenetv3_small_050"  # the smallest timm CNN with levels at strides 8, 16, 32


def timm_or_skip():
    try:
        import timm
    except (ImportError, RuntimeError) as error:  # RuntimeError: torchvision's ops missing
        pytest.skip(f"timm cannot be imported here ({type(error).__name__}: {error})")
    return timm


def features_only(timm):
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False, features_only=True, out_indices=(2, 3, 4))


class PooledHead(nn.Module):
    """The auxiliary head: a linear map of every level's spatial mean."""

    def __init__(self, channels):
        super().__init__()
        self.linear = nn.Linear(sum(channels), 5)

    def forward(self, levels):
        return self.linear(torch.cat([level.mean((2, 3)) for level in levels], 1))


def weighted_sum(tensors, seed):
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g)).sum() for t in tensors)


def test_a_timm_features_only_cnn_trains_under_pgi_with_exact_gradients():
    timm = timm_or_skip()
    main = features_only(timm)
    assert main.feature_info.reduction() == [8, 16, 32]
    aux_widths = (8, 8, 16)
    model = PGI(main, PooledHead(aux_widths), aux_widths=aux_widths)
    assert [linear.conv.in_channels for linear in model.linears] == main.feature_info.channels()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    buffers = [b.clone() for b in model.buffers()]  # BatchNorm's running statistics
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # oneDNN's weight gradients sum in a thread-dependent order
    try:
        results = []
        for reversible in (False, True):
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            model.reversible = reversible
            levels, aux = model.forward_with_aux(x)
            loss = model.loss(weighted_sum(levels, 1), weighted_sum([aux], 2))
            results.append(torch.autograd.grad(loss, [x, *model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    names = ["input", *(n for n, _ in model.named_parameters())]
    assert not [n for n, a, b in zip(names, *results) if not torch.equal(a, b)]
    grads = dict(zip(names, results[1]))
    assert any(n.startswith("aux.columns") for n in grads)
    # the auxiliary loss reaches the timm backbone: its first layer's gradient has aux's share
    model.reversible = True
    _, aux = model.forward_with_aux(x)
    first = next(p for n, p in model.main.named_parameters())
    (only_aux,) = torch.autograd.grad(weighted_sum([aux], 2), [first])
    assert only_aux.abs().sum() > 0


def test_strip_gives_the_timm_model_back_bit_for_bit():
    timm = timm_or_skip()
    model = PGI(features_only(timm), PooledHead((8, 8, 16)), aux_widths=(8, 8, 16))
    x = torch.randn(2, 3, 64, 64)
    model.forward_with_aux(x)  # a training step's forward moves BatchNorm's statistics
    stripped = model.strip()
    plain = features_only(timm)
    plain.load_state_dict(stripped.state_dict())  # strict: the plain timm model's keys
    model.eval(), plain.eval()
    with torch.no_grad():
        for a, b, c in zip(model(x), stripped(x), plain(x)):
            assert torch.equal(a, c) and torch.equal(b, c)
    count = sum(p.numel() for p in stripped.parameters())
    assert count == sum(p.numel() for p in plain.parameters())
    assert count < sum(p.numel() for p in model.parameters())
