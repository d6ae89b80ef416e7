"""The chunked language-model loss: plain head's loss and gradients, without the logits."""

from __future__ import annotations

import pytest
import torch

import torchrev
from tests.tiny_models import tokens
from torchrev.bench import LiveTensorBytes
from torchrev.convert import chunked_cross_entropy, chunked_lm_loss, default_chunk_tokens


def _step(model, batch):
    torch.manual_seed(0)  # dropout
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with LiveTensorBytes() as tracker:
        out = model(**batch)
        out.loss.backward()
    return out, [p.grad for p in params], tracker.peak_excluding(p.grad for p in params)


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_chunked_loss_has_the_plain_heads_gradients_and_keeps_less(name, dtype):
    from torchrev.cli.finetune_decoder import random_decoder

    torch.manual_seed(0)
    model = random_decoder(name, layers=1, width=32, vocab=1024).to(dtype).train()
    batch = tokens(batch=2, length=48)
    plain, reference, plain_peak = _step(model, batch)
    chunked_lm_loss(model, chunk_tokens=16)
    out, grads, peak = _step(model, batch)
    assert out.logits is None
    # The loss is float32 as transformers computes it; summing by chunks rounds differently.
    assert torch.allclose(out.loss, plain.loss, rtol=1e-6)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    for g, r in zip(grads, reference):
        assert torch.allclose(g, r, rtol=tolerance, atol=tolerance * r.abs().max())
    logits = 2 * 48 * 1024 * dtype.itemsize
    assert plain_peak - peak > logits  # the plain head keeps them, and their float32 copy
    model.eval()  # evaluation keeps the model's own forward, logits included
    with torch.no_grad():
        assert model(**batch).logits.shape == (*batch["input_ids"].shape, 1024)


def test_chunked_cross_entropy_matches_a_plain_one_in_float64():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :2] = -100
    loss = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    logits = (hidden @ weight.T).float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1))
    assert torch.allclose(loss, expected, rtol=1e-6)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(expected, (hidden, weight))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="one label per position"):
        chunked_cross_entropy(hidden, weight, labels[:, 1:])


def test_the_default_chunk_keeps_a_few_hidden_states_not_the_logits():
    # A chunk's logits are about four hidden states, whatever the vocabulary.
    assert default_chunk_tokens(1023, 32000, 768) == 128  # the decoder benchmark's shape
    assert default_chunk_tokens(8 * 4096, 128256, 4096) == 4096
    assert default_chunk_tokens(8 * 4096, 128256, 4096, hidden_states=1) == 1024  # Liger's
    assert default_chunk_tokens(1, 50257, 64) == 1
    torch.manual_seed(0)
    hidden = torch.randn(1, 256, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2048, 16, dtype=torch.float64)  # frozen, as under MEFT or LoRA
    labels = torch.randint(0, 2048, (1, 256))
    logits = (hidden @ weight.T).float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 2048), labels.reshape(-1))
    (want,) = torch.autograd.grad(expected, hidden)
    peaks = {}
    for chunk in (None, 1024):
        hidden.grad = None
        with LiveTensorBytes() as tracker:
            loss = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
            loss.backward()
        peaks[chunk] = tracker.peak_excluding([hidden.grad])
        assert torch.allclose(loss, expected, rtol=1e-6)
        assert torch.allclose(hidden.grad, want, rtol=1e-12, atol=1e-12 * want.abs().max())
    hidden_bytes, logits_bytes = hidden.nbytes, logits.nbytes
    # 8 tokens a chunk: its logits in hidden's dtype are four hidden states' bytes; with their
    # float32 copy, log-softmax and gradients, a few of those, against three whole logits.
    assert peaks[None] <= 8 * hidden_bytes  # two chunks of logits in the dtype of hidden
    assert peaks[1024] >= 3 * logits_bytes


def test_a_meft_decoder_trains_on_the_chunked_loss_under_a_memory_budget():
    from torchrev.cli.finetune_decoder import random_decoder

    torch.manual_seed(0)
    model = torchrev.meft(random_decoder("qwen2", layers=2, width=32, vocab=512)).train()
    batch = tokens(batch=2, length=24)
    _, reference, _ = _step(model, batch)
    chunked_lm_loss(model, chunk_tokens=8)
    plan = torchrev.fit_memory(model, batch, 0.5)
    _, grads, peak = _step(model, batch)
    assert peak <= plan.budget
    for g, r in zip(grads, reference):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6 * r.abs().max())
