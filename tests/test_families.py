"""Every registered layer family, on a tiny random model of each architecture it covers.

The cases come from ``tests/tiny_models.py``'s ``EXAMPLES``, keyed by the registry, so a new
family is tested (and fails until it has a tiny model) the moment it is registered.
"""

import copy

import pytest
import torch

import torchrev
from tests.tiny_models import CASES, EXAMPLES
from torchrev.convert import FAMILIES, meft_stage
from torchrev.convert.branches import Chain
from torchrev.convert.calls import LayerCall
from torchrev.convert.report import main_output

pytest.importorskip("transformers")
FAMILY = {family.name: family for family in FAMILIES}
MEFT_CASES = [case for case in CASES if FAMILY[case[0]].width is not None]


def build(family, name):
    make, inputs = EXAMPLES[family][name]
    model = make()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # the sublayer test reruns attentions: no cache to write twice
    return model, inputs()


def run(model, inputs):
    return model(*inputs) if isinstance(inputs, tuple) else model(**inputs)


def loss_of(model, inputs):
    output = run(model, inputs)
    loss = getattr(output, "loss", None)
    return loss if loss is not None else main_output(output).float().square().mean()


def grads_of(model, inputs, stacks, reversible):
    for stack in stacks:
        stack.reversible = reversible
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)  # the same dropout masks in both runs
    return torch.autograd.grad(loss_of(model, inputs), params, allow_unused=True)


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


def test_every_registered_family_has_a_tiny_model():
    assert {family.name for family in FAMILIES} == set(EXAMPLES)
    assert all(EXAMPLES[family.name] for family in FAMILIES)


@pytest.mark.parametrize(("family", "name"), MEFT_CASES)
def test_sublayers_compute_each_layer_bit_for_bit(family, name):
    """Given what the model passes each layer (padding and causal masks, rotary embeddings,
    positions), the family's sublayers compute that layer's output exactly: every input the
    layers need reaches the branches."""
    description = FAMILY[family]
    model, inputs = build(family, name)
    layers = [m for m in model.modules() if description.match(m)]
    seen = []
    for layer in layers:
        layer.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((m, args, kwargs, out)), with_kwargs=True
        )
    with torch.no_grad():
        run(model.eval(), inputs)
    assert len(seen) == len(layers) >= 2
    for layer, args, kwargs, out in seen:
        hidden, given = LayerCall(layer, description.inputs).split(args, kwargs, training=False)
        if "attention_mask" in description.inputs and "input_ids" in inputs:
            assert given["attention_mask"] is not None  # the first row is padded
        mine = Chain(*description.sublayers(layer)).eval()(hidden, **given)
        assert torch.equal(mine, out)


@pytest.mark.parametrize("variant", [1, 3])
@pytest.mark.parametrize(("family", "name"), MEFT_CASES)
def test_meft_gradients_equal_plain_autograd_bit_for_bit(family, name, variant):
    model, inputs = build(family, name)
    torchrev.meft(model, variant=variant).train()
    stacks = [meft_stage(model).stack]
    want = grads_of(model, inputs, stacks, reversible=False)
    assert_bitwise(grads_of(model, inputs, stacks, reversible=True), want)


@pytest.mark.parametrize(("family", "name"), CASES)
def test_rewire_keeps_parameters_and_gradients_equal_plain_autograd_bit_for_bit(family, name):
    original, inputs = build(family, name)
    model = torchrev.rewire(copy.deepcopy(original), exact=True)
    assert len(list(model.parameters())) == len(list(original.parameters()))
    if name == next(iter(EXAMPLES[family])):  # the report once per family: it is slow
        report = torchrev.compare(original, model, inputs)
        assert report.same_parameters and report.converted_mib < report.original_mib
    model.train()
    stacks = [m for m in model.modules() if isinstance(m, torchrev.ReversibleSequential)]
    assert stacks
    want = grads_of(model, inputs, stacks, reversible=False)
    assert_bitwise(grads_of(model, inputs, stacks, reversible=True), want)


@pytest.mark.parametrize("method", ["meft", "rewire"])
@pytest.mark.parametrize(("family", "name"), CASES)
def test_undo_restores_the_original(family, name, method):
    if method == "meft" and FAMILY[family].width is None:
        pytest.skip("MEFT converts attention + feed-forward layers only")
    model, inputs = build(family, name)
    modules = list(model.modules())
    with torch.no_grad():
        want = main_output(run(model.eval(), inputs))
    getattr(torchrev, method)(model)
    torchrev.undo(model)
    assert list(model.modules()) == modules
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(main_output(run(model.eval(), inputs)), want)
