r"""A language-model head and cross-entropy that never hold the whole logits tensor.

The trade-off: the logits of a step are :math:`N \times V` floats (N tokens, a vocabulary of V),
which at 1024 tokens and V = 32000 is 125 MiB per sequence in float32, kept for backward along
with the log-softmax: more than all of a reversible decoder's layers keep. Computing the loss
chunk by chunk over tokens,

.. math:: L = \frac{1}{|T|} \sum_{c} \sum_{i \in c,\, i \in T}
          \Big(\log \sum_v e^{h_i \cdot w_v + b_v} - (h_i \cdot w_{y_i} + b_{y_i})\Big),

with each chunk under non-reentrant checkpointing, keeps only the hidden states (:math:`N
\times D`) and one chunk's logits at a time (with their log-softmax and its gradient in the
chunk's backward: three chunks' worth), for one more head matmul per chunk in backward
(:math:`2NDV` flops, about a layer's worth). By default a chunk's logits are about four times
the size of the hidden states (:func:`default_chunk_tokens`), so the loss's backward holds
less than one decoder layer's recomputation, whatever the vocabulary. The math is the plain
head's (logits upcast to float32, ``ignore_index=-100``, the mean over labelled tokens as
transformers computes it); only the order of summation differs (the head's weight gradient is
summed over chunks), so gradients agree with the plain head's to rounding: to 1e-12 relative
in float64, to about 1e-6 in float32. Liger Kernel's fused linear cross-entropy and Apple's
Cut Cross-Entropy do the same on GPUs with Triton kernels that also never write a chunk's
logits; this one is plain PyTorch and runs anywhere.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
#: Config fields of decoders whose head does more than a linear map (not supported here).
UNSUPPORTED = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    chunk_tokens: int | None = None,
    num_items: int | Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels`` (``-100``
    ignored), computed ``chunk_tokens`` tokens at a time and recomputed in backward.

    ``hidden``: ``(..., D)``; ``labels``: ``hidden.shape[:-1]``, already aligned (shifted).
    ``chunk_tokens``: tokens per chunk; by default (None) :func:`default_chunk_tokens`, so that
    a chunk's logits are about four times as large as the hidden states. ``num_items``: the
    divisor (transformers' ``num_items_in_batch`` under gradient accumulation); the number of
    labelled tokens by default.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match hidden states of shape "
            f"{tuple(hidden.shape)}: give one label per position (shifted for next-token loss)."
        )
    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    keep = targets != IGNORE
    if not bool(keep.all()):  # a copy of the labelled tokens only where some are ignored
        flat, targets = flat[keep], targets[keep]
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(len(targets), weight.shape[0], weight.shape[1])
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            _chunk_loss, flat[part], weight, bias, targets[part], use_reentrant=False
        )
    count = len(targets) if num_items is None else num_items
    return total / count


def default_chunk_tokens(tokens: int, vocab: int, width: int, hidden_states: int = 4) -> int:
    """Tokens per chunk such that a chunk's logits (``chunk x vocab`` elements) are about
    ``hidden_states`` times the hidden states (``tokens x width``), rounded up to a power of
    two: ``ceil(hidden_states * tokens / ceil(vocab / width))``.

    The trade-off: smaller chunks hold less but run more, narrower head matmuls. The loss's
    backward holds three chunks' worth (logits' log-softmax and two gradients), so four hidden
    states' worth keeps it under what one decoder layer's recomputation holds anyway (some 16
    to 20 hidden states in a Llama layer: the MLP's two projections are 2.7 times as wide,
    with their gradients), while the chunks stay wide enough for the matmuls to run at speed.
    Liger Kernel's fused linear cross-entropy picks one hidden state's worth
    (``hidden_states=1``): on a 24-layer, sequence-1024 MEFT decoder step on a CPU that took
    1.06x the time of 1024-token chunks against 1.01x for four, for the same peak
    (``benchmarks/lm_chunks.py``). A step that keeps every layer's activations peaks in the
    loss's backward, where the chunks add on top (there 753 MiB against 727 for one).
    """
    per_chunk = -(-hidden_states * max(tokens, 1) // -(-vocab // max(width, 1)))
    return 1 << (per_chunk - 1).bit_length()


def _chunk_loss(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(h, weight, bias).float(), targets, reduction="sum")


def chunked_lm_loss(model: nn.Module, chunk_tokens: int | None = None) -> nn.Module:
    """Make a transformers causal LM compute its training loss with
    :func:`chunked_cross_entropy`, in place; returns ``model``.

    While training with grad enabled and ``labels`` given, ``model(...)`` runs the decoder,
    computes the next-token loss chunk by chunk and returns ``logits=None`` (that is the point:
    no logits exist); otherwise (eval, ``torch.no_grad``, no labels, generation) it is the
    model's own forward. Works on any decoder whose head is one linear map (GPT-2, OPT, Llama,
    Mistral, Qwen), converted (:func:`torchrev.meft`, :func:`torchrev.rewire`) or not, and under
    peft's LoRA (call it on the model before ``get_peft_model``). ``del model.forward`` undoes
    it. ``chunk_tokens``: see :func:`chunked_cross_entropy` (by default a chunk's logits are
    about four times the size of the hidden states).
    """
    for name in UNSUPPORTED:
        if getattr(getattr(model, "config", None), name, None):
            raise ValueError(
                f"{type(model).__name__} sets config.{name}: its head is more than a linear map, "
                f"which chunked_lm_loss does not reproduce; train it with its own loss."
            )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"chunked_lm_loss needs a causal LM whose output embedding is an nn.Linear (a "
            f"transformers *ForCausalLM); {type(model).__name__} has {type(head).__name__}."
        )
    original = type(model).forward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if labels is None or args or not (self.training and torch.is_grad_enabled()):
            return original(self, *args, **kwargs)
        return _chunked_forward(self, chunk_tokens, **kwargs)

    model.forward = types.MethodType(forward, model)
    return model


def _chunked_forward(
    model: nn.Module,
    chunk_tokens: int | None,
    labels: Tensor,
    num_items_in_batch: int | Tensor | None = None,
    **kwargs: Any,
) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    kwargs.setdefault("use_cache", False)
    out = model.base_model(**kwargs)
    hidden = out[0]
    head: nn.Linear = model.get_output_embeddings()
    loss = chunked_cross_entropy(
        hidden[:, :-1],
        head.weight,
        labels[:, 1:].to(hidden.device),
        head.bias,
        chunk_tokens,
        num_items_in_batch,
    )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(out, "past_key_values", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
