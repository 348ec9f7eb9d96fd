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


IMAGE_IN = [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 8, 8]}]
TEXT_IN = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
           {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]
# How a digit image becomes the 8x8 input: grey levels, box-filtered down to 8x8 (scikit-learn's digits are
# counts over 4x4 blocks), white ink on black, 0..255 -> 0..1 (the training data is 0..16 / 16).
DIGITS_IMAGE = {"kind": "image", "size": [8, 8], "mode": "L", "resample": "box", "scale": 1 / 255,
                "mean": [0.0], "std": [1.0]}


def build_text(**config) -> nn.Module:
    """The built-in text classifier's architecture: a BERT encoder (MiniLM's sizes), mean-pooled, a linear head."""
    from . import text

    return text.build(**config)


TEXT_LABELS = ["negative", "positive"]
# the text model's INT8 recipe (benchmarks/variants.py measures the others): activations quantized per row and block
# of 64 (MatMulNBits, 8-bit weights), so a review's answer is the same alone and inside any batch; per-tensor dynamic
# INT8 (one activation scale per batch) moves a review's logits with what it is batched with (benchmarks/variants.py)
TEXT_INT8 = {"mode": "dynamic", "activations": "per-row", "block_size": 64}
TEXT_PREPROCESS = {"kind": "text", "max_length": 64}  # MiniLM's own tokenizer (models/text.py); nearly every review fits


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
    preprocess: dict | None = None  # raw input -> tensors (modelship.preprocess), recorded in the manifest


ZOO: dict[str, ZooEntry] = {
    "mlp": ZooEntry(MLP, {"hidden": 512}, IMAGE_IN, [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                    DIGIT_LABELS, {"name": "digits"}, epochs=150, lr=3e-3, augment=False, preprocess=DIGITS_IMAGE),
    "cnn": ZooEntry(CNN, {}, IMAGE_IN, [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                    DIGIT_LABELS, {"name": "digits"}, epochs=25, lr=2e-3, preprocess=DIGITS_IMAGE),
    "cnn-small": ZooEntry(CNN, {"c1": 8, "c2": 16, "hidden": 64}, IMAGE_IN,
                          [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                          DIGIT_LABELS, {"name": "digits"}, epochs=40, lr=3e-3, preprocess=DIGITS_IMAGE),
    "mlp-small": ZooEntry(MLP, {"hidden": 128}, IMAGE_IN,
                          [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
                          DIGIT_LABELS, {"name": "digits"}, epochs=150, lr=3e-3, augment=False,
                          preprocess=DIGITS_IMAGE),
    # the pretrained all-MiniLM-L6-v2 encoder fine-tuned on Rotten Tomatoes critics' reviews (models/text.py)
    "text": ZooEntry(build_text, {}, TEXT_IN, [{"name": "logits", "dtype": "float32", "shape": ["batch", 2]}],
                     TEXT_LABELS, {"name": "rottentomatoes"}, preprocess=TEXT_PREPROCESS, extra={"int8": TEXT_INT8}),
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
