"""Decoder language models after MEFT and rewiring: outputs, generation, saving, the Trainer.

Tiny random GPT-2, OPT (pre- and post-norm), Llama, Mistral, Qwen2 and Qwen3 models (2 layers,
width 64) from ``tests/tiny_models.py``; no downloads.
"""

import contextlib
import json

import pytest
import torch
from torch import nn

import torchrev
from tests.tiny_models import DECODERS, VOCAB, decoder, tokens
from torchrev.bench import training_step_peak
from torchrev.cli.finetune_decoder import random_decoder
from torchrev.convert import (
    LayerFamily,
    Sublayer,
    from_adapters,
    meft_stage,
    save_adapters,
)
from torchrev.convert.branches import Call

transformers = pytest.importorskip("transformers")


def convert(model, method):
    if method == "meft":
        return torchrev.meft(model)
    return torchrev.rewire(model, exact=True, trainable=("lm_head",))


def stacks_of(model):
    return [m for m in model.modules() if isinstance(m, torchrev.ReversibleSequential)]


def grads(model, batch, reversible, autocast=contextlib.nullcontext):
    for stack in stacks_of(model):
        stack.reversible = reversible
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    with autocast():
        loss = model(**batch).loss
    return torch.autograd.grad(loss, params)


def cache_length(output):
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    return 0 if cache is None else cache.get_seq_length()


@pytest.mark.parametrize("name", DECODERS)
def test_meft_keeps_outputs_and_trains_only_adapters(name):
    model = decoder(name)
    frozen = {id(p): p.detach().clone() for p in model.parameters()}
    torchrev.meft(model).train()
    output = model(**tokens())
    assert output.loss.ndim == 0 and output.logits.shape == (2, 10, VOCAB)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".down." in n or ".up." in n for n in trainable)
    optimizer = torch.optim.SGD(trainable.values(), lr=0.1)
    output.loss.backward()
    optimizer.step()
    kept = [p for p in model.parameters() if not p.requires_grad]
    assert len(kept) == len(frozen) and all(torch.equal(p, frozen[id(p)]) for p in kept)


@pytest.mark.parametrize("method", ["meft", "rewire"])
@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generation_with_the_cache_equals_without(name, method):
    model = convert(decoder(name), method).eval()
    batch = tokens()
    prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        assert cache_length(model(**prompt, use_cache=True)) == 10  # the layers filled it
        runs = [
            model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=cache)
            for cache in (True, False)
        ]
    assert runs[0].shape == (2, 15) and torch.equal(runs[0], runs[1])


def test_recomputed_attention_lowers_the_peak_and_keeps_the_gradients():
    """MEFT1's branch recomputes its attention sublayer in its own backward (the default): a
    lower peak, the same gradients bit for bit."""
    batch = tokens(length=32)
    peaks, results = [], []
    for recompute in (False, True):
        model = torchrev.meft(decoder("llama"), recompute_attention=recompute).train()
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(1)
        results.append(torch.autograd.grad(model(**batch).loss, params))
        peaks.append(training_step_peak(lambda m=model: m(**batch).loss.backward(), params))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert peaks[1] < 0.9 * peaks[0]


def test_training_leaves_the_cache_alone():
    """A training step recomputes every attention in backward: the cache is not written."""
    model = torchrev.meft(decoder("llama")).train()
    output = model(**tokens(), use_cache=True)
    assert cache_length(output) == 0
    output.loss.backward()


def test_llama_bf16_autocast_gradients_bitwise():
    model = torchrev.meft(decoder("llama"), variant=3).train()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    want = grads(model, tokens(), False, bf16)
    assert all(torch.equal(a, b) for a, b in zip(grads(model, tokens(), True, bf16), want))


# peft, some versions:
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_lora_on_a_rewired_decoder_gradients_bitwise():
    """peft's LoRA injects into the same attention modules the rewired branches call."""
    from peft import LoraConfig, get_peft_model

    model = torchrev.rewire(decoder("qwen2"), exact=True, trainable=())
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config).train()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    want = grads(model, tokens(), False)
    assert all(torch.equal(a, b) for a, b in zip(grads(model, tokens(), True), want))


@pytest.mark.parametrize("method", ["meft", "rewire"])
def test_adapters_saved_in_safetensors_reload_on_the_pretrained_model(tmp_path, method):
    from safetensors.torch import load_file

    model = convert(decoder("mistral"), method)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapters(model, tmp_path)
    saved = load_file(tmp_path / "adapters.safetensors")
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert json.loads((tmp_path / "torchrev_config.json").read_text())["method"] == method
    fresh = from_adapters(decoder("mistral"), tmp_path)
    batch = tokens()
    with torch.no_grad():
        assert torch.equal(fresh.eval()(**batch).logits, model.eval()(**batch).logits)
        untrained = convert(decoder("mistral"), method).eval()
        assert not torch.equal(untrained(**batch).logits, model(**batch).logits)


def test_transformers_trainer_trains_a_converted_decoder(tmp_path):
    """A few Trainer steps lower the loss; a step's gradients under the Trainer's own loss are
    those of plain autograd, bit for bit (exact reversal, MEFT's default)."""
    model = torchrev.meft(decoder("llama"), rank=16)
    steps = torch.arange(16)
    data = [
        {
            "input_ids": (steps * k + k) % VOCAB,
            "attention_mask": torch.ones(16, dtype=torch.long),
            "labels": (steps * k + k) % VOCAB,
        }
        for k in range(1, 9)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=12,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    batch = {key: torch.stack([row[key] for row in data[:4]]) for key in data[0]}
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for reversible in (False, True):
        meft_stage(model).stack.reversible = reversible
        torch.manual_seed(1)
        results.append(torch.autograd.grad(trainer.compute_loss(model, batch), params))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_cli_finetunes_a_built_in_decoder_and_saves_reloadable_adapters(tmp_path, capsys):
    from torchrev.cli import main

    argv = ["finetune", "--decoder", "qwen2", "--methods", "meft", "--epochs", "2"]
    argv += ["--train-size", "32", "--batch-size", "16", "--seq-len", "16"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "metrics.json").read_text())
    assert row["method"] == "meft" and 0 <= row["test_accuracy"] <= 1
    assert row["activation_mib"] > 0 and row["trainable_parameters"] < 20_000
    epochs = [line for line in capsys.readouterr().out.splitlines() if "epoch" in line]
    assert len(epochs) == 2 and float(epochs[1].split()[4]) < float(epochs[0].split()[4])
    reloaded = from_adapters(random_decoder("qwen2"), tmp_path / "meft")
    assert meft_stage(reloaded).reversible_layers == 4


# --- architectures torchrev does not recognise ----------------------------------------------


class Mixer(nn.Module):
    """An attention stand-in taking a tuple keyword input, as Llama's rotary embeddings."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, shift=None):
        scale, bias = shift
        return self.proj(x) * scale + bias


class ToyLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm_a, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer, self.ff = Mixer(dim), nn.Sequential(nn.Linear(dim, dim), nn.GELU())

    def forward(self, x, shift=None):
        x = x + self.mixer(self.norm_a(x), shift=shift)
        return x + self.ff(self.norm_b(x))


class ToyModel(nn.Module):
    def __init__(self, dim=16, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(ToyLayer(dim) for _ in range(depth))

    def forward(self, x, shift):
        for block in self.blocks:
            x = block(x, shift=shift)
        return x


TOY = LayerFamily(
    name="toy",
    covers="the test's ToyLayer",
    match=lambda layer: isinstance(layer, ToyLayer),
    sublayers=lambda layer: (
        Sublayer(Call(layer.mixer, ("shift",)), layer.norm_a, pre_norm=True),
        Sublayer(Call(layer.ff), layer.norm_b, pre_norm=True),
    ),
    inputs=("shift",),
    width=lambda layer: layer.norm_a.normalized_shape[0],
)


def test_unrecognised_architecture_lists_the_families_and_spec():
    for convert_ in (torchrev.meft, torchrev.rewire):
        with pytest.raises(ValueError, match=r"gpt2 .*opt .*llama \(Llama, Mistral.*spec="):
            convert_(ToyModel())


@pytest.mark.parametrize("method", ["meft", "rewire"])
def test_spec_converts_other_architectures_with_tuple_inputs_receiving_gradients(method):
    torch.manual_seed(0)
    model = getattr(torchrev, method)(ToyModel().double(), spec=TOY)
    if method == "rewire":
        for stack in stacks_of(model):
            stack.exact = True
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    shift = tuple(torch.randn(16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    params = [p for p in model.parameters() if p.requires_grad] + list(shift)
    results = []
    for reversible in (False, True):
        for stack in stacks_of(model):
            stack.reversible = reversible
        results.append(torch.autograd.grad(model(x, shift).square().sum(), params))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert all(g.abs().sum() > 0 for g in results[1][-2:])


def test_models_calling_layers_differently_are_refused():
    sliding = decoder("qwen2", use_sliding_window=True, max_window_layers=1, sliding_window=4)
    with pytest.raises(ValueError, match="different attention masks"):
        torchrev.meft(sliding)
    with pytest.raises(ValueError, match="layerdrop"):
        torchrev.rewire(decoder("opt", layerdrop=0.1))
    with pytest.raises(ValueError, match="received encoder_hidden_states"):
        model = torchrev.meft(decoder("gpt2"))
        model.transformer.h[0](torch.randn(1, 3, 64), None, None, torch.randn(1, 4, 64))
