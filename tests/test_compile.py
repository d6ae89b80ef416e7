"""torch.compile: the engine is one opaque call, everything around it compiles."""

import pytest
import torch
from torch import nn

import torchrev


def branch():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16))


class Model(nn.Module):
    """Stem, reversible stage, head, called in a straight line (no loop around the stage)."""

    def __init__(self, depth=3, compiled_branches=False):
        super().__init__()
        torch.manual_seed(0)
        blocks = []
        for _ in range(depth):
            f, g = branch(), branch()
            if compiled_branches:
                f.compile(backend="aot_eager")
                g.compile(backend="aot_eager")
            blocks.append(torchrev.ScaledCoupling(f, g, lam=0.5))
        self.stem = nn.Linear(8, 32)
        self.stage = torchrev.ReversibleStage(torchrev.ReversibleSequential(*blocks))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)))


def model(depth=3, compiled_branches=False):
    return Model(depth, compiled_branches)


def explain(module, x):
    torch._dynamo.reset()
    return torch._dynamo.explain(module)(x)


def breaks(module, x):
    """Graphs, break count, the innermost frame of each break, and the linear layers compiled."""
    explained = explain(module, x)
    sites = [(b.user_stack[-1].filename, b.user_stack[-1].lineno) for b in explained.break_reasons]
    linears = sum(str(op).endswith("linear>") for ops in explained.ops_per_graph for op in ops)
    return explained.graph_count, explained.graph_break_count, sites, linears


def test_the_stack_call_is_one_opaque_region_whatever_its_depth():
    x = torch.randn(5, 8)
    shallow, deep = breaks(model(2), x), breaks(model(8), x)
    assert shallow == deep  # breaks per stack call, not per block or step
    graphs, count, sites, linears = deep
    # One break site, the engine's entry, which Dynamo reports once per enclosing frame
    # (model, stage, stack); everything around it is compiled: the stem and the head.
    assert len(set(sites)) == 1 and sites[0][0].endswith("sequence.py")
    assert count == len(sites) + 1 and graphs == 5 and linears == 2


def test_compiled_branches_compose_with_a_compiled_model():
    x = torch.randn(5, 8)
    assert breaks(model(compiled_branches=True), x) == breaks(model(), x)


@pytest.mark.parametrize("compiled_branches", [False, True])
def test_compiled_models_train_on_the_same_gradients(compiled_branches):
    x = torch.randn(5, 8)
    reference = model()
    torch.manual_seed(1)
    reference(x).square().sum().backward()
    torch._dynamo.reset()
    eager = model(compiled_branches=compiled_branches)
    compiled = torch.compile(eager, backend="aot_eager")
    torch.manual_seed(1)
    compiled(x).square().sum().backward()
    for a, b in zip(eager.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("path", ["eval", "no_grad", "reversible=False"])
def test_plain_paths_compile_into_one_graph(path):
    torch._dynamo.reset()
    module = model()
    if path == "eval":
        module.eval()
    if path == "reversible=False":
        module.stage.stack.reversible = False
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 8)
    if path == "no_grad":
        with torch.no_grad():
            compiled(x)
    elif path == "eval":
        compiled(x)
    else:
        compiled(x).sum().backward()


def test_a_stack_called_in_a_loop_leaves_that_frame_eager():
    """What the README says does not compile yet: Dynamo gives up on a frame with a graph
    break inside a loop, as nn.Sequential.forward's loop over its layers is."""
    m = model()
    sequential = nn.Sequential(m.stem, m.stage, m.head)
    _, _, sites, linears = breaks(sequential, torch.randn(5, 8))
    assert sites and linears == 0  # the stem and the head run eagerly
