"""The model zoo: each entry is declarative data (builder, inputs, data, training recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import ArtifactError

DIGIT_LABELS = [str(i) for i in range(10)]


class MLP(nn.Module):
    def __init__(self, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, pixels):
        return self.net(pixels)


class CNN(nn.Module):
    def __init__(self, c1: int = 32, c2: int = 64, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(hidden, classes))

    def forward(self, pixels):
        return self.head(self.features(pixels))


def build_text(**config) -> nn.Module:
    """A BERT-style encoder classifier (token ids + attention mask, multi-head self-attention,
    LayerNorm, GELU, learned positions up to max_position_embeddings), built from a config."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(**config, attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval()


TEXT_CONFIG = dict(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=1024, max_position_embeddings=512, num_labels=2, hidden_act="gelu")

IMAGE_IN = [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
TEXT_IN = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
           {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[..., nn.Module]
    config: dict
    inputs: list
    outputs: list
    labels: list | None
    data: dict
    epochs: int = 0  # 0: built from its config with a fixed seed, not trained
    lr: float = 1e-3
    loader: str = "zoo"
    augment: bool = True  # random one-pixel shifts while training
    extra: dict = field(default_factory=dict)


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(MLP, {"hidden": 512}, IMAGE_IN, [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                    DIGIT_LABELS, {"name": "digits"}, epochs=150, lr=3e-3, augment=False),
    "cnn": ZooEntry(CNN, {}, IMAGE_IN, [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                    DIGIT_LABELS, {"name": "digits"}, epochs=25, lr=2e-3),
    "cnn-small": ZooEntry(CNN, {"c1": 8, "c2": 16, "hidden": 64}, IMAGE_IN,
                          [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                          DIGIT_LABELS, {"name": "digits"}, epochs=40, lr=3e-3),
    "mlp-small": ZooEntry(MLP, {"hidden": 128}, IMAGE_IN,
                          [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                          DIGIT_LABELS, {"name": "digits"}, epochs=150, lr=3e-3, augment=False),
    "text": ZooEntry(build_text, TEXT_CONFIG, TEXT_IN, [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}],
                     ["negative", "positive"], {"name": "tokens", "vocab_size": TEXT_CONFIG["vocab_size"],
                                                "seq_len": 32, "samples": 256}, loader="hf"),
}


def entry(arch: str) -> ZooEntry:
    if arch not in ZOO:
        raise ArtifactError(f"unknown architecture '{arch}'; expected one of {', '.join(ZOO)}")
    return ZOO[arch]


def build(arch: str, config: dict | None = None) -> nn.Module:
    e = entry(arch)
    return e.build(**{**e.config, **(config or {})})


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
