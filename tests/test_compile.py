"""torch.compile: each training stack call is one operator, everything around it compiles."""

import weakref

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import stack_of
from torchrev.bench import peak_live_bytes
from torchrev.models import create_model


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


def test_a_training_stack_call_is_one_operator_whatever_its_depth():
    x = torch.randn(5, 8)
    shallow, deep = breaks(model(2), x), breaks(model(8), x)
    assert shallow == deep == (1, 0, [], 2)  # one graph: the stem, the stack's operator, the head


def test_a_stack_called_in_a_loop_compiles_with_the_layers_around_it():
    """nn.Sequential.forward loops over its layers: a graph break there would leave the whole
    frame eager (NOTE [compile])."""
    m = model()
    assert breaks(nn.Sequential(m.stem, m.stage, m.head), torch.randn(5, 8)) == (1, 0, [], 2)


def test_compiled_branches_compose_with_a_compiled_model():
    x = torch.randn(5, 8)
    assert breaks(model(compiled_branches=True), x) == breaks(model(), x)


def train_step(module, x, seed=1):
    torch.manual_seed(seed)  # the same dropout masks
    module(x).square().sum().backward()
    return [p.grad.clone() for p in module.parameters()]


def assert_equal(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("compiled_branches", [False, True])
def test_compiled_models_train_on_the_same_gradients(compiled_branches):
    x = torch.randn(5, 8)
    reference = train_step(model(), x)
    torch._dynamo.reset()
    eager = model(compiled_branches=compiled_branches)
    compiled = torch.compile(nn.Sequential(eager.stem, eager.stage, eager.head), fullgraph=True)
    assert_equal(train_step(compiled, x), reference)
    for p in eager.parameters():
        p.grad = None
    assert_equal(train_step(compiled, x), reference)  # the compiled graph, run again


class Autocast(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        with torch.autocast("cpu", torch.bfloat16):
            return self.module(x).float()


def test_a_compiled_stack_takes_every_batch_size_in_one_graph():
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]
    reference, compiled = model(), model()
    run = torch.compile(compiled, backend="aot_eager", dynamic=True, fullgraph=True)
    for batch in (5, 7, 9):
        for p in (*reference.parameters(), *compiled.parameters()):
            p.grad = None
        x = torch.randn(batch, 8)
        assert_equal(train_step(run, x), train_step(reference, x))
    assert graphs["unique_graphs"] - before == 1


@pytest.mark.parametrize("inside", [False, True])
def test_compiled_stacks_run_under_the_autocast_state_of_their_call(inside):
    """Autocast entered inside the compiled module, or around the compiled module; the
    backward runs outside it, as it should."""
    x = torch.randn(5, 8)
    torch._dynamo.reset()
    reference, compiled = Autocast(model()), model()
    if inside:
        compiled = torch.compile(Autocast(compiled), backend="aot_eager", fullgraph=True)
    else:
        compiled = Autocast(torch.compile(compiled, backend="aot_eager", fullgraph=True))
    assert_equal(train_step(compiled, x), train_step(reference, x))


class Masked(nn.Module):
    """A branch with keyword inputs: a mask, a trained (scale, shift) pair, a flag."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x, *, mask, affine, square):
        scale, shift = affine
        h = self.linear(x) * mask * scale + shift
        return h.square() if square else h


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_compiled_stacks_take_nested_keyword_tensors_and_return_their_gradients(direction):
    torch.manual_seed(0)
    blocks = [torchrev.ScaledCoupling(Masked(), Masked(), lam=0.7) for _ in range(3)]
    stack = torchrev.ReversibleSequential(*blocks).double()
    x1, x2 = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True).unbind(0)
    mask = (torch.rand(4, 16) > 0.3).double()
    scale = torch.rand(16, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(16, dtype=torch.float64, requires_grad=True)

    def step(run):
        out = getattr(run, direction)(x1, x2, mask=mask, affine=(scale, shift), square=False)
        loss = sum((o * torch.arange(16.0)).sum() for o in out)
        return torch.autograd.grad(loss, [x1, x2, scale, shift, *stack.parameters()])

    torch._dynamo.reset()
    reference = step(stack)

    class Call(nn.Module):
        def forward(self, *args, **kwargs):
            return stack(*args, **kwargs)

        def inverse(self, *args, **kwargs):
            return stack.inverse(*args, **kwargs)

    call = Call()
    call.forward = torch.compile(call.forward, backend="aot_eager", fullgraph=True)
    call.inverse = torch.compile(call.inverse, backend="aot_eager", fullgraph=True)
    assert_equal(step(call), reference)


def test_a_compiled_stack_holds_nothing_once_its_graph_is_freed():
    from torchrev._core import opaque

    compiled = torch.compile(model(), backend="aot_eager")
    x = torch.randn(5, 8)
    loss = compiled(x).sum()
    (run,) = opaque._RUNS.values()
    run = weakref.ref(run)
    loss.backward(retain_graph=True)
    loss.backward()  # retain_graph: the run is kept for a second backward
    del loss
    assert not opaque._RUNS and run() is None  # freed at once: no reference cycle
    with torch.no_grad():
        compiled(x)
    assert not opaque._RUNS


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_training_step_peaks_where_the_eager_one_does(backend):
    """The operator keeps what the eager engine keeps: not the stack's input (its gradient
    leaves through a node that holds nothing), and nothing that grows with depth."""

    def peak(depth, compiled):
        torch.manual_seed(0)
        stack = stack_of(torchrev.AdditiveCoupling, depth, width=16, dtype=torch.float32)
        stack.check_recompute = False  # its fingerprints grow with depth (test_memory.py)
        run = torch.compile(stack, backend=backend) if compiled else stack
        x = torch.randn(32, 32)

        def step():
            y1, y2 = run(*torchrev.Split(1)(x.clone()))
            (y1.square().sum() + y2.square().sum()).backward()

        step()
        stack.zero_grad(set_to_none=False)
        return peak_live_bytes(step)

    torch._dynamo.reset()
    assert peak(3, True) == peak(12, True) == peak(12, False)


def test_a_compiled_meft_decoder_is_one_graph_with_the_eager_gradients():
    pytest.importorskip("transformers")
    from tests.tiny_models import decoder, tokens

    model = torchrev.meft(decoder("llama")).train()
    batch = tokens()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradients(run):
        torch.manual_seed(1)
        return torch.autograd.grad(run(**batch).loss, params)

    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert_equal(gradients(torch.compile(model, backend="aot_eager")), gradients(model))


def test_inductor_trains_a_revnet_with_batch_norm_on_the_eager_gradients():
    """Inductor passes detached aliases of the parameters to the backward operator, which
    therefore differentiates the stack's own (it used to fail here); convolutions and batch
    norm around the stacks are fused, so the gradients agree to rounding."""
    torch._dynamo.reset()

    def revnet():
        torch.manual_seed(0)
        return create_model("revnet38", channels=(8, 16, 16), blocks=(1, 1, 1), num_classes=10)

    eager, compiled = revnet(), revnet()
    x = torch.randn(16, 3, 8, 8)
    reference = train_step(eager, x)
    got = train_step(torch.compile(compiled), x)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b)  # batch norm's running statistics, updated once


def test_a_compiled_branch_that_modifies_its_input_in_place_is_detected():
    """The operator lifts the exclusion of ADInplaceOrView, so version counters move inside it
    and the engine's check still sees the in-place write."""
    torch._dynamo.reset()
    inplace = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(16, 16))
    stack = torchrev.ReversibleSequential(torchrev.AdditiveCoupling(inplace, branch()))
    x1, x2 = torch.randn(2, 5, 16, requires_grad=True).unbind(0)
    with pytest.raises(torchrev.ReversibilityError, match="inplace=False"):
        torch.compile(stack, backend="aot_eager")(x1, x2)


class ToFloat32(nn.Module):
    def forward(self, x):
        return x.float()


def test_a_compiled_stack_that_changes_its_streams_dtype_is_refused():
    """The operator's output metadata is its input's; a stack promoting bf16 streams to
    float32 (a float32 branch output added to them) would break that, so it raises."""
    torch._dynamo.reset()
    stack = torchrev.ReversibleSequential(torchrev.AdditiveCoupling(ToFloat32(), ToFloat32()))
    x1, x2 = torch.randn(2, 3, 4, dtype=torch.bfloat16, requires_grad=True).unbind(0)
    assert stack(x1, x2)[0].dtype == torch.float32  # eager promotes, as plain autograd does
    with pytest.raises(RuntimeError, match="must keep its streams' shapes and dtypes"):
        torch.compile(stack, backend="aot_eager")(x1, x2)


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


def test_stack_operators_are_left_out_of_cuda_graphs():
    """NOTE [CUDA graphs]: the engine reads the host, so its operators are tagged
    cudagraph-unsafe and Inductor partitions a captured step around them."""
    unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
    if unsafe is None:
        pytest.skip("this torch has no cudagraph_unsafe tag")
    for op in (torch.ops.torchrev.stack_call, torch.ops.torchrev.stack_call_backward):
        assert unsafe in op.default.tags


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_captures_the_step_around_the_stack_on_the_eager_gradients():
    """``mode="reduce-overhead"``: the stem and head run as CUDA graphs, the stack between
    them eagerly (NOTE [CUDA graphs]); no graph is skipped, and three steps give the eager
    model's gradients (to rounding: Inductor fuses the layers around the stack)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, captured = model().cuda(), model().cuda()
    compiled = torch.compile(captured, mode="reduce-overhead")
    x = torch.randn(5, 8, device="cuda")
    for step in range(3):
        for p in (*eager.parameters(), *captured.parameters()):
            p.grad = None
        reference = train_step(eager, x, seed=step)
        got = train_step(compiled, x, seed=step)
        for a, b in zip(got, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counters["inductor"]["cudagraph_skips"] == 0
