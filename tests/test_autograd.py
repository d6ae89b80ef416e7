"""How reversible stacks live inside autograd: grad(), accumulation, hooks, frozen weights."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import torchrev
from tests.helpers import (
    F64,
    assert_close_tensors,
    compare_with_plain,
    grads_of,
    mlp,
    stack_of,
    streams,
)


def frozen_backbone_stack(depth):
    """MEFT's situation: pretrained f frozen, small trainable g (an adapter)."""
    couplings = []
    for _ in range(depth):
        backbone = mlp(6).requires_grad_(False)
        adapter = mlp(6, hidden=2)
        couplings.append(torchrev.AdditiveCoupling(backbone, adapter))
    return torchrev.ReversibleSequential(*couplings).to(F64)


@pytest.mark.parametrize("depth", [3, 4])
def test_frozen_backbone_and_inputs_without_grad(depth):
    stack = frozen_backbone_stack(depth)
    x1, x2 = streams(5, 6, grad=False)  # e.g. embeddings of a frozen model
    compare_with_plain(stack, (x1, x2), rtol=1e-10)
    y1, y2 = stack(x1, x2)
    (y1.sum() + y2.sum()).backward()
    for coupling in stack:
        assert all(p.grad is None for p in coupling.f.parameters())
        assert all(p.grad is not None for p in coupling.g.parameters())


def step_flops(stack, x1, x2, reversible):
    """Matmul flops of one step: (forward, recomputation and backward) by operator."""
    stack.reversible = reversible
    with FlopCounterMode(display=False) as counter:
        y1, y2 = stack(x1, x2)
        forward = counter.get_total_flops()
        (y1.sum() + y2.sum()).backward()
    stack.reversible = True
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return forward, by_op


def test_backward_recomputes_each_block_exactly_once():
    stack = stack_of(torchrev.AdditiveCoupling, 5)
    x1, x2 = streams(5, 6, grad=False)
    forward, plain = step_flops(stack, x1, x2, reversible=False)
    _, reversible = step_flops(stack, x1, x2, reversible=True)
    # Forward matmuls are addmm, gradient matmuls mm: exactly one more forward.
    assert reversible["aten.addmm"] == plain["aten.addmm"] + forward
    assert reversible["aten.mm"] == plain["aten.mm"]


def test_frozen_weights_cost_no_gradient_work():
    stack = frozen_backbone_stack(5)
    x1, x2 = streams(5, 6, grad=False)
    forward, plain = step_flops(stack, x1, x2, reversible=False)
    _, reversible = step_flops(stack, x1, x2, reversible=True)
    assert reversible["aten.mm"] == plain["aten.mm"]
    # The bottom frozen branch, which nothing trainable depends on, is not even recomputed.
    assert reversible["aten.addmm"] < plain["aten.addmm"] + forward


def test_autograd_grad_returns_grads_and_writes_none():
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    x1, x2 = streams(5, 6)
    y1, y2 = stack(x1, x2)
    params = list(stack.parameters())
    grads = torch.autograd.grad(y1.sum() + y2.sum(), params)
    assert all(g is not None for g in grads)
    assert all(p.grad is None for p in params) and x1.grad is None


def test_backward_accumulates_into_existing_grads():
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    x1, x2 = streams(5, 6)
    for _ in range(2):
        y1, y2 = stack(x1, x2)
        (y1.sum() + y2.sum()).backward()
    twice = [p.grad.clone() for p in stack.parameters()] + [x1.grad.clone()]
    y1, y2 = stack(x1, x2)
    once = grads_of(y1.sum() + y2.sum(), [*stack.parameters(), x1])
    assert_close_tensors(twice, [2 * g for g in once], 1e-12)


def test_parameter_hooks_run_once():
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    calls = []
    for p in stack.parameters():
        p.register_hook(lambda g: calls.append(1) or 3 * g)
    x1, x2 = streams(5, 6)
    compare_with_plain(stack, (x1, x2), rtol=1e-10)  # both runs triple once
    assert len(calls) == 2 * len(list(stack.parameters()))


def test_caller_inputs_are_neither_freed_nor_modified():
    stack = stack_of(torchrev.AdditiveCoupling, 4)
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    kept = x.detach().clone()
    x1, x2 = torchrev.Split(1)(x)
    y1, y2 = stack(x1, x2)
    (y1.sum() + y2.sum()).backward()
    assert torch.equal(x.detach(), kept) and x.untyped_storage().nbytes() == kept.nbytes
    assert x._version == 0


def test_outputs_may_be_modified_in_place():
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    x1, x2 = streams(5, 6)
    wanted = [x1, x2, *stack.parameters()]
    y1, y2 = stack(x1, x2)
    y1.mul_(2)
    y2.relu_()
    reversible = grads_of((y1 * y2).sum(), wanted)
    stack.reversible = False
    y1, y2 = stack(x1, x2)  # plain autograd saved y1 inside g: modify copies instead
    plain = grads_of((2 * y1 * y2.relu()).sum(), wanted)
    assert_close_tensors(reversible, plain, 1e-10)


def test_eval_and_no_grad_run_plain_forward():
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    x1, x2 = streams(5, 6)
    with torch.no_grad():
        y1, _ = stack(x1, x2)
    assert y1.grad_fn is None
    stack.eval()
    y1, _ = stack(x1, x2)
    assert "Outputs" not in type(y1.grad_fn).__name__
    stack.train()
    y1, _ = stack(x1, x2)
    assert type(y1.grad_fn).__name__ == "_OutputsBackward"


def test_an_unused_output_gives_none_not_zeros_as_plain_autograd():
    stack = stack_of(torchrev.AdditiveCoupling, 3)
    x1, x2 = streams(5, 6)
    y1, _ = stack(x1, x2)
    y1.sum().backward()  # the last g only moves y2
    assert all(p.grad is None for p in stack[-1].g.parameters())
    assert all(p.grad is not None for p in stack[-1].f.parameters())
    stack.zero_grad(set_to_none=True)
    compare_with_plain(stack, (x1, x2), rtol=1e-10)
