"""Evaluation, calibration and training data, named by a small spec stored in each manifest.

``{"name": "digits"}``: scikit-learn's 1797 real 8x8 handwritten digits, fixed-seed split
(train 1257 / val 180 / test 360). ``{"name": "tokens", "vocab_size": V, "seq_len": L}``: generated
token batches with random lengths (no labelled text ships offline). ``{"name": "random"}``: inputs
generated from the manifest signature (for checkpoints that bring no data). ``{"name": "npz", "path":
P, "sha256": H}``: the user's own data (``--data FILE.npz``): one array per input name and optional
integer ``labels``; every split reads the whole file, and a file changed since it was recorded is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ArtifactError
from ..manifest import sha256_path

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


def npz(spec: dict, split: str, inputs) -> tuple[dict, np.ndarray | None]:
    p = Path(spec["path"])
    if not p.is_file():
        raise ArtifactError(f"{p}: evaluation data not found; expected the .npz recorded in the manifest "
                            "(pass --data FILE again)")
    if spec.get("sha256") and sha256_path(p) != spec["sha256"]:
        raise ArtifactError(f"{p}: sha256 differs from the one recorded with the artifact; the data changed since "
                            "it was used (pass --data FILE again to record the new one)")
    return read_npz(p, inputs)


def read_npz(path, inputs) -> tuple[dict, np.ndarray | None]:
    """One array per input name (cast to the input's dtype, same number of samples) and optional labels."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable .npz ({e}); expected one array per input name") from None
    with z:
        names = [t.name for t in inputs]
        missing = [n for n in names if n not in z.files]
        if missing:
            raise ArtifactError(f"{path}: no array for input(s) {', '.join(missing)}; it has {', '.join(z.files) or 'none'}; "
                                f"expected {', '.join(names)} (and optionally labels)")
        feed = {}
        for t in inputs:
            a = z[t.name]
            if a.ndim != len(t.shape) or any(isinstance(d, int) and a.shape[i] != d for i, d in enumerate(t.shape)):
                raise ArtifactError(f"{path}: array '{t.name}' has shape {list(a.shape)}; expected {t.shape}")
            if np.dtype(t.dtype).kind in "iu" and a.dtype.kind == "f":
                raise ArtifactError(f"{path}: array '{t.name}' holds floats; expected whole numbers ({t.dtype})")
            feed[t.name] = a.astype(t.dtype)
        labels = z["labels"] if "labels" in z.files else None
    counts = {len(v) for v in feed.values()} | ({len(labels)} if labels is not None else set())
    if len(counts) != 1 or 0 in counts:
        raise ArtifactError(f"{path}: arrays hold different or zero numbers of samples ({sorted(counts)}); expected "
                            "the same first dimension in every array")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ArtifactError(f"{path}: 'labels' must be a 1-D array of class indices, got {labels.dtype}{list(labels.shape)}")
        labels = labels.astype(np.int64)
    return feed, labels


def user_data(path) -> dict:
    """The data spec for a user's .npz, with its sha256 (recorded in the manifest)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: no such file; expected an .npz with one array per input name and optional labels")
    return {"name": "npz", "path": str(p.resolve()), "sha256": sha256_path(p)}


def resolve(data: str | None) -> dict | None:
    """``--data``: a shipped dataset's name (digits) or a path to the user's .npz."""
    if not data:
        return None
    if data in SHIPPED:
        return {"name": data}
    return user_data(data)


def is_generated(spec: dict | None) -> bool:
    """Inputs made up from the signature (no real samples, no labels)."""
    return (spec or {"name": "random"}).get("name") in ("random", "tokens")


def describe(spec: dict | None) -> dict:
    spec = spec or {"name": "random"}
    return {k: spec[k] for k in ("name", "path", "sha256") if k in spec}


SHIPPED = {"digits": "classification"}  # shipped datasets and the task their labels define
DATASETS = {"digits": digits, "tokens": tokens, "random": random, "npz": npz}


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
