"""Memory budgets: the measured peak stays under the budget, and every plan computes plain
autograd's gradients bit for bit (kept and checkpointed blocks are plain autograd, reversed
runs reverse exactly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import mlp
from torchrev.bench import LiveTensorBytes

F64 = torch.float64


def coupling_stack(depth: int = 5, width: int = 16, budget=None, norm: bool = False, **options):
    """Exact additive couplings whose branches use dropout (and batch norm with ``norm``)."""
    torch.manual_seed(0)

    def branch() -> nn.Module:
        layers = [mlp(width, dropout=0.2)]
        if norm:
            layers.append(nn.BatchNorm1d(width))
        return nn.Sequential(*layers)

    blocks = [torchrev.AdditiveCoupling(branch(), branch()) for _ in range(depth)]
    return torchrev.ReversibleSequential(*blocks, exact=True, memory_budget=budget, **options).to(
        F64
    )


def step(model, inputs, loss=None, **kwargs):
    """Peak live bytes of one step beyond parameters, gradients and inputs, and the gradients
    (parameters, then inputs), with dropout's RNG seeded."""
    torch.manual_seed(1)
    leaves = [t for t in [*model.parameters(), *inputs, *kwargs.values()] if t.requires_grad]
    for t in leaves:
        t.grad = None
    with LiveTensorBytes() as tracker:
        out = model(*inputs, **kwargs)
        (loss or (lambda o: sum(t.sum() for t in o)))(out).backward()
    grads = [t.grad for t in leaves]
    return tracker.peak_excluding(g for g in grads if g is not None), grads


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)


def x(batch: int = 8, width: int = 16):
    torch.manual_seed(2)
    return [torch.randn(batch, width, dtype=F64, requires_grad=True) for _ in range(2)]


def plain_of(stack):
    stack.memory_budget, stack.reversible = None, False
    return stack


@pytest.mark.parametrize("budget", [0.0, 0.4, 1.0])
def test_a_stack_keeps_under_its_budget_with_plain_gradients(budget):
    stack = coupling_stack(budget=budget)
    step(stack, x())  # plans on this shape
    peak, grads = step(stack, x())
    _, reference = step(plain_of(coupling_stack()), x())
    plan = stack.plan
    assert peak <= plan.peak <= plan.budget  # the plan's peak has 1% headroom
    assert plan.floor <= plan.budget <= plan.plain
    assert_same(grads, reference)


def test_more_budget_keeps_more_and_a_full_budget_is_plain_autograd():
    plans = []
    for budget in (0.0, 0.3, 0.6, 1.0):
        stack = coupling_stack(budget=budget)
        step(stack, x())
        plans.append(stack.plan)
    kept = [sum(r.bytes for r in p.rows) for p in plans]
    assert kept == sorted(kept) and kept[0] == 0
    assert plans[0].choices == ("reverse",) * 5
    assert plans[-1].choices == ("keep",) * 5 and plans[-1].peak == plans[-1].plain
    peak_plain = step(plain_of(coupling_stack()), x())[0]
    assert peak_plain <= plans[-1].plain <= 1.01 * peak_plain + 1
    assert plans[0].peak < peak_plain / 3  # the measurement can fail: plain keeps far more


def test_bytes_budgets_and_the_floor_error():
    stack = coupling_stack(budget=0.0)
    step(stack, x())
    floor = stack.plan.floor
    for budget in (floor, floor + 40_000, floor + 150_000):
        stack = coupling_stack(budget=budget)
        step(stack, x())
        assert step(stack, x())[0] <= budget
    stack = coupling_stack(budget=floor - 1)
    with pytest.raises(ValueError, match=f"below this model's floor of {floor} bytes"):
        step(stack, x())


def test_plans_are_deterministic_printable_and_follow_the_input_shape():
    first, second = coupling_stack(budget=0.5), coupling_stack(budget=0.5)
    step(first, x())
    step(second, x())
    assert first.plan == second.plan
    table = str(first.plan)
    assert "choice" in table and ("keep" in table or "checkpoint" in table)
    before = first.plan
    step(first, x(batch=32))
    assert first.plan is not before and first.plan.floor > before.floor
    step(first, x(batch=8))
    assert first.plan == before


@pytest.mark.parametrize(
    "choices",
    [
        ("keep", "checkpoint", "reverse", "reverse", "keep"),
        ("reverse", "keep", "reverse", "checkpoint", "reverse"),
    ],
)
def test_every_plan_gives_plain_gradients_and_statistics_with_batch_norm_and_kwargs(choices):
    """Dropout, batch norm (updated once per step), a trained keyword tensor and autocast."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(mlp(16, dropout=0.2), nn.BatchNorm1d(16))

        def forward(self, h, scale):
            return self.inner(h) * scale

    def build():
        torch.manual_seed(0)
        blocks = [torchrev.AdditiveCoupling(Scaled(), Scaled()) for _ in range(5)]
        return torchrev.ReversibleSequential(*blocks, exact=True).to(F64)

    scale = torch.full((16,), 1.5, dtype=F64, requires_grad=True)
    planned, plain = build(), plain_of(build())
    with planned._forced_choices(choices):
        _, grads = step(planned, x(), scale=scale)
    _, reference = step(plain, x(), scale=scale)
    assert_same(grads, reference)
    assert_same(list(planned.buffers()), list(plain.buffers()))


def test_plans_under_autocast_give_plain_gradients():
    def build():
        torch.manual_seed(0)
        return torchrev.ReversibleSequential(
            *(torchrev.AdditiveCoupling(mlp(16), mlp(16)) for _ in range(4)), exact=True
        )

    planned, plain = build(), plain_of(build())
    inputs = [t.detach().float().requires_grad_() for t in x()]
    for choices in (("keep", "reverse", "checkpoint", "reverse"), ("checkpoint", "keep") * 2):
        with torch.autocast("cpu", dtype=torch.bfloat16), planned._forced_choices(choices):
            _, grads = step(planned, inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, reference = step(plain, inputs)
        assert_same(grads, reference)


def test_the_inverse_of_a_planned_stack_trains_reversed_on_plain_gradients():
    stack, plain = coupling_stack(budget=0.5), plain_of(coupling_stack())
    step(stack, x())
    assert stack.plan.choices != ("reverse",) * 5
    stack.train(), plain.train()
    for s in (stack, plain):
        for m in s.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0  # the inverse is exact only for a deterministic function
    ys = x()
    loss = lambda o: sum(t.square().sum() for t in o)  # noqa: E731
    torch.manual_seed(1)
    g_planned = torch.autograd.grad(loss(stack.inverse(*ys)), ys)
    g_plain = torch.autograd.grad(loss(plain.inverse(*ys)), ys)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(g_planned, g_plain))


def test_fit_memory_shares_one_budget_across_a_models_stacks():
    torch.manual_seed(0)
    model = _Streams(nn.ModuleList([coupling_stack(3), coupling_stack(3)]))
    inputs = (torch.randn(8, 32, dtype=F64),)
    with pytest.raises(ValueError, match="floor"):
        torchrev.fit_memory(model, inputs, 10)
    reference = None
    for budget in (0.0, 0.4, 1.0):
        plan = torchrev.fit_memory(model, inputs, budget, loss_fn=lambda o: o.sum())
        assert {r.stack for r in plan.rows} == {"inner.0", "inner.1"}
        peak, grads = step(model, inputs, loss=lambda o: o.sum())
        assert peak <= plan.budget
        reference = reference or grads
        assert_same(grads, reference)


class _Streams(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.split, self.merge = torchrev.Split(-1), torchrev.Concat(-1)

    def forward(self, x):
        a, b = self.inner[0](*self.split(x))
        return self.merge(*self.inner[1](a, b)).square()


@pytest.mark.parametrize("family", ["revvit", "meft-llama"])
def test_fit_memory_on_a_revvit_and_a_meft_decoder(family):
    """Stack parameters' gradients are plain autograd's bit for bit at every budget; those
    upstream of a stack whose first block reverses (RevViT's embedding, whose two streams are
    one tensor) may differ by the order in which the two streams' gradients are summed."""
    if family == "revvit":
        model = torchrev.create_model(
            "revvit_tiny", exact=True, dim=16, depth=3, heads=2, image_size=8, patch_size=2
        ).to(F64)
        inputs, loss = (torch.randn(4, 3, 8, 8, dtype=F64),), (lambda o: o.sum())
        stacks = [model.blocks]
    else:
        from tests.tiny_models import decoder, tokens
        from torchrev.convert.meft import meft_stage

        model = torchrev.meft(decoder("llama", layers=3))
        inputs, loss = tokens(batch=2, length=8), (lambda o: o.loss)
        stacks = [meft_stage(model).stack]
    model.train()
    for stack in stacks:
        stack.reversible = False
    _, reference = _model_step(model, inputs, loss)
    for stack in stacks:
        stack.reversible = True
    inside = {id(p) for stack in stacks for p in stack.parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    for budget in (0.0, 0.5, 1.0):
        plan = torchrev.fit_memory(model, inputs, budget, loss_fn=loss)
        peak, grads = _model_step(model, inputs, loss)
        assert peak <= plan.budget
        for p, g, r in zip(trained, grads, reference):
            assert torch.equal(g, r) if id(p) in inside else torch.allclose(g, r, rtol=1e-12)


def _model_step(model, inputs, loss):
    torch.manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with LiveTensorBytes() as tracker:
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
        loss(out).backward()
    return tracker.peak_excluding(p.grad for p in params), [p.grad for p in params]


def test_budgets_reach_every_stack_through_models_and_conversions():
    from tests.tiny_models import decoder
    from torchrev.convert.meft import meft_stage

    model = torchrev.create_model("revvit_tiny", memory_budget=0.5, **_TINY_VIT)
    assert model.blocks.memory_budget == 0.5
    revnet = torchrev.create_model("revnet38", memory_budget=0.25)
    stacks = [m for m in revnet.modules() if isinstance(m, torchrev.ReversibleSequential)]
    assert len(stacks) > 1 and all(s.memory_budget == 0.25 for s in stacks)
    with pytest.raises(ValueError, match="fit_memory"):
        torchrev.create_model("revnet38", memory_budget=2**20)
    assert meft_stage(torchrev.meft(decoder("llama"), memory_budget=0.3)).stack.memory_budget == 0.3
    rewired = torchrev.rewire(decoder("gpt2"), memory_budget=0.7)
    stacks = [m for m in rewired.modules() if isinstance(m, torchrev.ReversibleSequential)]
    assert stacks and all(s.memory_budget == 0.7 for s in stacks)


_TINY_VIT = {"dim": 16, "depth": 3, "heads": 2, "image_size": 8, "patch_size": 2}


def test_the_command_lines_take_a_budget_in_mib_and_plan_each_shape_once(capsys):
    import argparse

    from torchrev.cli import finetune, train
    from torchrev.cli.budget import Budget
    from torchrev.cli.errors import CliError

    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    train.add_parser(commands)
    finetune.add_parser(commands)
    assert parser.parse_args(["train", "--memory-budget", "2.5"]).memory_budget == 2.5
    args = parser.parse_args(["finetune", "--decoder", "llama", "--memory-budget", "40"])
    assert args.memory_budget == 40 and not args.full_logits
    model = _Streams(nn.ModuleList([coupling_stack(3), coupling_stack(3)]))
    budget = Budget(model, 0.001)
    inputs = (torch.randn(8, 32, dtype=F64),)
    with pytest.raises(CliError, match="below this model's floor"):
        budget(inputs, lambda o: o.sum())
    budget.mib = 1.0
    budget(inputs, lambda o: o.sum())
    budget(inputs, lambda o: o.sum())
    assert capsys.readouterr().out.count("memory plan") == 1
    assert _step_peak(model, inputs) <= 2**20
    Budget(nn.Linear(2, 2), 1.0)((torch.randn(1, 2),))
    assert "no reversible stack" in capsys.readouterr().out


def _step_peak(model, inputs):
    return step(model, inputs, loss=lambda o: o.sum())[0]


def test_a_planned_stack_compiles_on_the_eager_gradients():
    """Plan eagerly, then compile: kept and checkpointed blocks trace, reversed runs are the
    engine's operator."""
    stack, plain = coupling_stack(3, width=8, budget=0.5), plain_of(coupling_stack(3, width=8))
    for s in (stack, plain):
        for m in s.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    step(stack, x(width=8))
    assert set(stack.plan.choices) != {"reverse"}
    compiled = torch.compile(stack, backend="aot_eager")  # no dispatch mode: it compiles
    inputs = x(width=8)
    stack.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    sum(t.sum() for t in compiled(*inputs)).backward()
    _, reference = step(plain, x(width=8))
    assert_same([*(p.grad for p in stack.parameters()), *(t.grad for t in inputs)], reference)
