"""Tiny random models of every layer family torchrev.convert recognises (2-3 layers, width 16-64).

``EXAMPLES`` maps each family of :data:`torchrev.convert.FAMILIES` to its cases, so tests that
iterate it cover a family the moment it is registered (and fail until it has a case here).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 96
Case = tuple[Callable[[], nn.Module], Callable[[], dict[str, Any] | tuple]]


def _transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def decoder(name: str, layers: int = 2, **overrides: Any) -> nn.Module:
    """A causal LM of architecture ``name`` (see :data:`DECODERS`), width 64, random weights,
    seed 0: the CLI's built-in shapes (4 heads of 16, 2 key-value heads, MLP 128)."""
    from torchrev.cli.finetune_decoder import random_decoder

    _transformers()
    torch.manual_seed(0)
    return random_decoder(name, layers=layers, width=64, vocab=VOCAB, **overrides)


# Architecture -> the family that recognises it (Mistral and Qwen by Llama's layout).
DECODERS = {
    "gpt2": "gpt2",
    "opt": "opt",
    "opt-post-norm": "opt",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
}


def tokens(batch: int = 2, length: int = 10, pad: int = 3) -> dict[str, torch.Tensor]:
    """Token ids with the first row left-padded by ``pad`` (mask 0, label -100)."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def bert() -> nn.Module:
    t = _transformers()
    torch.manual_seed(0)
    config = t.BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
    )
    return t.BertForSequenceClassification(config)


def hf_vit() -> nn.Module:
    t = _transformers()
    torch.manual_seed(0)
    config = t.ViTConfig(
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=4,
    )
    return t.ViTModel(config)


def hf_resnet() -> nn.Module:
    t = _transformers()
    torch.manual_seed(0)
    config = t.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[3, 3], layer_type="bottleneck"
    )
    return t.ResNetModel(config)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock, by structure."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class TimmBlock(nn.Module):
    """timm's pre-norm ViT Block, by structure."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8), BasicBlock(8, 8)),
        nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16), BasicBlock(16, 16)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).double()


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(*[TimmBlock(8) for _ in range(3)])).double()


def _image(size: int, dtype: torch.dtype = torch.float32) -> Callable[[], tuple]:
    return lambda: (torch.randn(2, 3, size, size, generator=_generator(), dtype=dtype),)


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def _text() -> dict[str, torch.Tensor]:
    batch = tokens()
    batch["labels"] = torch.tensor([0, 1])
    return batch


EXAMPLES: dict[str, dict[str, Case]] = {
    "bert": {"bert": (bert, _text)},
    "gpt2": {},
    "opt": {},
    "llama": {},
    "hf-vit": {"hf-vit": (hf_vit, lambda: {"pixel_values": _image(16)()[0]})},
    "timm-block": {
        "timm-vit": (
            tiny_vit,
            lambda: (torch.randn(2, 5, 8, generator=_generator(), dtype=torch.float64),),
        )
    },
    "resnet": {"torchvision-resnet": (tiny_resnet, _image(8, torch.float64))},
    "hf-resnet": {"hf-resnet": (hf_resnet, _image(16))},
}
for _name, _family in DECODERS.items():
    EXAMPLES[_family][_name] = (lambda n=_name: decoder(n), tokens)

CASES = [(family, name) for family, cases in EXAMPLES.items() for name in cases]
