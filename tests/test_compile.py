"""torch.compile: the engine is one opaque call, everything around it compiles."""

import pytest
import torch
from torch import nn

import torchrev


def branch():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 16))


def model(depth=3, compiled_branches=False):
    torch.manual_seed(0)
    blocks = []
    for _ in range(depth):
        f, g = branch(), branch()
        if compiled_branches:
            f.compile(backend="aot_eager")
            g.compile(backend="aot_eager")
        blocks.append(torchrev.ScaledCoupling(f, g, lam=0.5))
    stage = torchrev.ReversibleStage(torchrev.ReversibleSequential(*blocks))
    return nn.Sequential(nn.Linear(8, 32), stage, nn.Linear(32, 4))


def breaks(module, x):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(x)
    return explained.graph_count, [str(b.reason) for b in explained.break_reasons]


def test_the_stack_call_is_one_opaque_region_whatever_its_depth():
    x = torch.randn(5, 8)
    shallow, deep = breaks(model(2), x), breaks(model(8), x)
    assert shallow == deep  # breaks per stack call, not per block or step
    graphs, reasons = deep
    assert graphs <= 3 and reasons  # before and after the stack; Dynamo reports the break
    assert all("disable" in r for r in reasons)  # once per enclosing frame, nothing else


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
        module[1].stack.reversible = False
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 8)
    if path == "no_grad":
        with torch.no_grad():
            compiled(x)
    elif path == "eval":
        compiled(x)
    else:
        compiled(x).sum().backward()
