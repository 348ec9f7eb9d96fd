"""The batch gate: a request's answer must not depend on what it is batched with.

Served with dynamic batching, one request shares a model call with other users' requests (and, for text, their
padding). A model whose answer for one sample moves with the rest of its batch (INT8 with one activation scale per
batch, a broken export) answers users differently depending on who else sent a request at that moment, and one
request with outlier values can move every answer batched with it. The gate runs each of a few samples alone, then
inside batches of several sizes with the others (text re-tokenized per batch, so padded to the longest), then the
others beside an outlier sample, and compares every sample's answer with its answer alone. The bound is not the
parity tolerance but the float model's own batch-to-batch rounding: ``REL_BOUND`` of the output's spread (its
standard deviation over the samples alone). Recorded in the parity record as ``batch``; ``archive`` refuses a
variant that fails it with a batch size above 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .comparison import abs_diff, as_inputs

SIZES = (3, 4, 16, 64)  # batch sizes tried (capped by what the runner takes); above SAMPLES, samples repeat
SAMPLES = 16  # samples judged
POOL = 256  # samples the text ones are picked from (by length, so batches mix lengths and padding)
REL_BOUND = {"fp16": 2e-3}  # of the output's spread; 1e-4 elsewhere (FP16's own rounding is ~1e-3 of a value)
DEFAULT_REL_BOUND = 1e-4
ULPS = 16  # and never below this many float32 steps of the largest answer (a big output of small spread)
OUTLIER_SCALE = 8.0  # a float sample scaled this much: values no real sample has
MESSAGE = "answers depend on what they are batched with"


@dataclass
class Samples:
    """What the gate feeds: ``feed(indices)`` is the model's input for those samples batched together (text
    tokenized together, so padded to the longest); the last index is the outlier, never judged."""
    feed: Callable[[list[int]], dict]
    count: int  # judged samples: 0 .. count-1; count is the outlier
    outlier: str  # what the outlier is, in words


def from_texts(texts: list, prep) -> Samples:
    """Texts spread over the pool's lengths; the outlier every picked text in one (truncated as serving does, so
    as long as the model takes), which pads every other text of its batch to the longest."""
    pool = [t for t in texts[:POOL] if isinstance(t, str) and t.strip()]
    lengths = np.array([len(t) for t in pool])
    order = np.argsort(lengths, kind="stable")
    picked = [pool[i] for i in order[np.linspace(0, len(pool) - 1, min(SAMPLES, len(pool))).astype(int)]]
    outlier = " ".join(reversed(picked))[:getattr(prep.spec, "max_chars", 10_000)]
    if getattr(prep.spec, "truncation", "") == "refuse":
        outlier = max(picked, key=len) if picked else outlier
    chosen = picked + [outlier]
    return Samples(lambda idx: prep([chosen[i] for i in idx])[0], len(picked), "the judged texts in one")


def from_tensors(feed: dict) -> Samples:
    """The first samples of a tensor feed; the outlier the one of largest norm, scaled ``OUTLIER_SCALE`` times
    (float inputs) or as it is (integer inputs, e.g. token ids)."""
    n = min(SAMPLES, len(next(iter(feed.values()), [])))
    if n == 0:
        return Samples(lambda idx: {}, 0, "none")
    rows = {k: np.asarray(v[:n]) for k, v in feed.items()}
    norms = sum(np.abs(v.reshape(n, -1).astype(np.float64)).sum(-1) for v in rows.values())
    big = int(np.argmax(norms))
    out = {k: (v[big:big + 1] * OUTLIER_SCALE).astype(v.dtype) if v.dtype.kind == "f" else v[big:big + 1]
           for k, v in rows.items()}
    chosen = {k: np.concatenate([rows[k], out[k]]) for k in rows}
    floats = any(v.dtype.kind == "f" for v in rows.values())
    what = f"sample {big} scaled {OUTLIER_SCALE:g} times" if floats else f"sample {big} (the largest)"
    return Samples(lambda idx: {k: v[idx] for k, v in chosen.items()}, n, what)


def fixed_batch(man) -> int | None:
    """The batch size a model's inputs are fixed to (their first dim a number), or None when it varies."""
    dims = [t.shape[0] for t in man.inputs if t.shape]
    fixed = [d for d in dims if isinstance(d, int)]
    return fixed[0] if fixed else None


def _infer(runner, feed: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float64) for k, v in runner.infer(as_inputs(runner, feed)).items()}


def failed(record: dict | None) -> dict | None:
    """The batch verdict of a parity record when it failed (answers that move with their batch), else None: what
    archive, the pipeline, tune, the pytest plugin and --until-parity ask of a record."""
    batch = (record or {}).get("batch") or {}
    return batch if batch.get("passed") is False else None


def _batches(count: int, sizes: list[int], outlier: bool):
    """(size, indices) of every batch tried: the judged samples in consecutive groups of each size (a size above
    ``count``: the samples repeated to fill it), then the biggest size's first samples beside the outlier (index
    ``count``)."""
    for s in sizes:
        if s > count:
            yield s, [i % count for i in range(s)]
            continue
        for start in range(0, count, s):
            idx = list(range(start, min(count, start + s)))
            if len(idx) > 1:
                yield s, idx
    if outlier:
        big = max(sizes)
        yield big, [i % count for i in range(big - 1)] + [count]


def _bound(values: np.ndarray, rel: float) -> float:
    """``rel`` of the spread of an output's answers alone, and never below ULPS float32 steps of its largest."""
    v = values[np.isfinite(values)]
    if not v.size:
        return 0.0
    return max(rel * float(np.std(v)), ULPS * float(np.spacing(np.float32(np.abs(v).max()))))


def _fails(rec: dict, message: str) -> dict:
    return {**rec, "passed": False, "max_abs_diff": None, "bound": None, "message": message}


def judge(runner, samples: Samples, sizes=SIZES) -> dict:
    """Each sample's answers alone vs inside batches; the record (``passed``, ``message`` when it failed)."""
    man = runner.manifest
    fixed = fixed_batch(man)
    cap = min(x for x in (getattr(runner, "max_batch", None), fixed, max(sizes)) if x)
    sizes = sorted({min(s, cap) for s in sizes if min(s, cap) > 1})
    rel = REL_BOUND.get(man.precision, DEFAULT_REL_BOUND)
    rec = {"sizes": sizes, "samples": samples.count, "outlier": samples.outlier, "rel_bound": rel}
    if not sizes or samples.count < 2:
        why = f"the model takes batches of {fixed} only" if fixed else "fewer than 2 samples"
        return {**rec, "passed": None, "skipped": why, "max_abs_diff": None, "bound": None, "message": None}
    try:
        alone = [_infer(runner, samples.feed([i])) for i in range(samples.count)]
    except Exception as e:  # noqa: BLE001 — recorded, never raised: parity's own verdict stands
        return _fails(rec, f"the model fails on one sample alone ({str(e)[:300]}); a batch of one must run")
    try:
        _infer(runner, samples.feed([samples.count]))
        outlier = True
    except Exception as e:  # noqa: BLE001 — an outlier the model cannot take alone says nothing about batching
        outlier, rec["outlier"] = False, f"none: {samples.outlier} fails alone ({str(e)[:120]})"
    names = list(alone[0])
    bound = {k: _bound(np.concatenate([a[k] for a in alone]), rel) for k in names}
    worst = None  # the sample, batch and output furthest past (or nearest to) its bound
    for size, idx in _batches(samples.count, sizes, outlier):
        try:
            got = _infer(runner, samples.feed(idx))
        except Exception as e:  # noqa: BLE001 — any backend's refusal: served batched, it would fail the same way
            return _fails(rec, f"the model fails on a batch of {len(idx)} ({str(e)[:300]}) where each sample alone "
                               "runs; serve it with batch size 1")
        short = [k for k in names if k not in got or got[k].ndim == 0 or got[k].shape[0] != len(idx)]
        if short:
            return _fails(rec, f"{MESSAGE}: output '{short[0]}' of a batch of {len(idx)} does not hold one answer per "
                               f"sample (shape {list(np.shape(got.get(short[0])))})")
        for pos, i in enumerate(idx):
            if i == samples.count:
                continue  # the outlier itself is not judged: only what it does to the others
            for k in names:
                d = float(abs_diff(alone[i][k], got[k][pos:pos + 1])[0].max())
                if worst is None or d - bound[k] > worst["excess"]:
                    worst = {"diff": d, "excess": d - bound[k], "size": size, "sample": i, "output": k,
                             "with_outlier": samples.count in idx}
    passed = bool(worst["excess"] <= 0)
    rec.update({"max_abs_diff": worst["diff"], "bound": bound[worst["output"]], "bounds": bound,
                "worst": {k: worst[k] for k in ("size", "sample", "output", "with_outlier")}, "passed": passed})
    rec["message"] = None if passed else (
        f"{MESSAGE}: sample {worst['sample']}'s output '{worst['output']}' moved by {worst['diff']:.3g} inside a "
        f"batch of {worst['size']}{' beside an outlier (' + samples.outlier + ')' if worst['with_outlier'] else ''}"
        f" (bound {bound[worst['output']]:.3g}: {rel:g} of the output's spread); serve it with batch size 1, or "
        "quantize activations per row (modelship quantize --activations per-row)")
    return rec


def samples_for(candidate_art, spec: dict | None, split: str, feed: dict) -> Samples:
    """The gate's samples for a candidate: raw texts through its own tokenizer (per batch) when it carries one
    and the data has raw texts, else the rows of its evaluation feed."""
    from . import data as datasets
    from .preprocess import open_preprocessor

    from .comparison import with_model_labels

    prep = open_preprocessor(candidate_art)
    if prep is not None and prep.kind == "text" and datasets.has_raw(spec):
        return from_texts(datasets.load_raw(with_model_labels(spec, candidate_art), split)[0], prep)
    return from_tensors(feed)
