"""Evaluation, calibration and training data, named by a small spec stored in each manifest.

``{"name": "digits"}``: scikit-learn's 1797 real 8x8 handwritten digits, fixed-seed split
(train 1257 / val 180 / test 360). ``{"name": "tokens", "vocab_size": V, "seq_len": L}``: generated
token batches with random lengths (no labelled text ships offline). ``{"name": "random"}``: inputs
generated from the manifest signature (for checkpoints that bring no data).
"""

from __future__ import annotations

import numpy as np

from ..errors import ArtifactError

SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2, "calib": 3}


def _digits_split(split: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=360, random_state=0, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=180, random_state=0, stratify=y_rest)
    parts = {"train": (x_train, y_train), "val": (x_val, y_val), "calib": (x_val, y_val), "test": (x_test, y_test)}
    return parts[split]


def digits(spec: dict, split: str, inputs) -> tuple[dict, np.ndarray | None]:
    x, y = _digits_split(split)
    return {inputs[0].name: x}, y


def tokens(spec: dict, split: str, inputs) -> tuple[dict, None]:
    n = int(spec.get("samples", 256))
    seq = int(spec.get("seq_len", 32))
    vocab = int(spec["vocab_size"])
    rng = np.random.default_rng(1000 + SPLIT_SEEDS[split] + int(spec.get("seed", 0)))
    ids = rng.integers(3, vocab, size=(n, seq), dtype=np.int64)
    lengths = rng.integers(max(2, seq // 4), seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    ids[:, 0] = 2  # a [CLS]-like first token
    feed = {}
    for spec_in in inputs:
        feed[spec_in.name] = mask if "mask" in spec_in.name else (np.zeros_like(ids) if "type" in spec_in.name else ids)
    return feed, None


def random(spec: dict, split: str, inputs) -> tuple[dict, None]:
    n = int(spec.get("samples", 128))
    dims = {k: int(v) for k, v in spec.get("dims", {}).items()}
    rng = np.random.default_rng(2000 + SPLIT_SEEDS[split])
    feed = {}
    for t in inputs:
        shape = [n if i == 0 else (d if isinstance(d, int) else dims.get(d, 16)) for i, d in enumerate(t.shape)]
        if t.dtype.startswith("float"):
            feed[t.name] = rng.standard_normal(shape).astype(t.dtype)
        else:
            lo, hi = spec.get("int_range", [0, 2])
            feed[t.name] = rng.integers(lo, hi, size=shape).astype(t.dtype)
    return feed, None


DATASETS = {"digits": digits, "tokens": tokens, "random": random}


def load(spec: dict | None, split: str, inputs) -> tuple[dict, np.ndarray | None]:
    """Return (feed of numpy arrays keyed by input name, labels or None) for a data spec."""
    spec = spec or {"name": "random"}
    if spec.get("name") not in DATASETS:
        raise ArtifactError(f"unknown data '{spec.get('name')}'; expected one of {', '.join(DATASETS)}")
    if split not in SPLIT_SEEDS:
        raise ArtifactError(f"unknown split '{split}'; expected one of {', '.join(SPLIT_SEEDS)}")
    return DATASETS[spec["name"]](spec, split, inputs)


def has_training_data(spec: dict | None) -> bool:
    return bool(spec) and spec.get("name") == "digits"


def batches(feed: dict, size: int):
    n = len(next(iter(feed.values())))
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in feed.items()}
