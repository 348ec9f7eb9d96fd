"""In-process latency/throughput per artifact and batch size, through the same runners as parity."""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time

import numpy as np

from . import data as datasets
from .runners import Runner


def feed_for(runner: Runner, batch: int, seq_len: int | None = None) -> dict:
    man = runner.manifest
    spec = dict(man.data or {"name": "random"})
    if seq_len and spec.get("name") == "tokens":
        spec["seq_len"] = seq_len
    if spec.get("name") in ("tokens", "random"):
        spec["samples"] = max(batch, 8)
    if spec.get("name") not in datasets.DATASETS:  # raw texts / images: through the recorded preprocessing
        from .preprocess import preprocessed

        feed = preprocessed(runner.artifact, spec, "test", max(batch, 8))
    else:
        feed, _ = datasets.load(spec, "test", man.inputs)
    n = len(next(iter(feed.values())))
    idx = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[idx]) for k, v in feed.items()}


def measure(fn, seconds: float = 1.0, warmup: int = 5, min_iters: int = 20, max_iters: int = 100_000) -> np.ndarray:
    """Time ``fn()`` repeatedly for about ``seconds``; returns per-call latencies in ms."""
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + seconds
    while (len(times) < min_iters or time.perf_counter() < deadline) and len(times) < max_iters:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.array(times) * 1e3


def summarize(ms: np.ndarray, batch: int) -> dict:
    p50 = float(np.percentile(ms, 50))
    return {"batch": batch, "iterations": int(len(ms)), "p50_ms": p50, "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "throughput_per_s": batch * 1e3 / p50}


def bench(runner: Runner, batch_sizes=(1, 32), seconds: float = 1.0, seq_len: int | None = None) -> list[dict]:
    rows = []
    for b in batch_sizes:
        feed = feed_for(runner, b, seq_len)
        rows.append(summarize(measure(lambda: runner.infer(feed), seconds), b))
    return rows


def scratch() -> str:
    """A temporary folder for a benchmark's artifacts, removed when the process exits."""
    folder = tempfile.mkdtemp(prefix="modelship-bench-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def write_figures(path, figures: dict) -> None:
    """A benchmark's figures under stable keys (``benchmarks/*.py --json PATH``), for CI to compare runs."""
    import json
    from pathlib import Path

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in figures.items()},
                                         indent=2) + "\n")
