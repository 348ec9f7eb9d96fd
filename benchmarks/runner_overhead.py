"""Digits CNN at batch 1: ONNX Runtime / torch eager, and the project's runner / a bare InferenceSession.run.

Usage: python benchmarks/runner_overhead.py [--rounds 7] [--seconds 1] [--json PATH]
--json writes ort_over_torch and runner_over_session (and the p50s in microseconds).
Each round times all contenders back to back; the ratios are medians over rounds (noisy machines).
"""

import argparse
import statistics
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelship.bench import measure, scratch, write_figures
import modelship as ms
from modelship.models.train import train_artifact
from modelship.runners import open_runner


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    tmp = Path(scratch())
    art = train_artifact("cnn", tmp / "cnn")
    onnx_art = ms.export(art, tmp / "onnx")
    torch_runner = open_runner(art)
    ort_runner = open_runner(onnx_art)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    bare = ort.InferenceSession(str(onnx_art.model_path), opts, providers=["CPUExecutionProvider"])
    x = {"pixels": np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)}
    fns = {"torch eager": lambda: torch_runner.infer(x), "modelship onnxruntime runner": lambda: ort_runner.infer(x),
           "bare InferenceSession.run": lambda: bare.run(None, x)}
    p50 = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            p50[k].append(float(np.median(measure(fn, args.seconds))))
    med = {k: statistics.median(v) for k, v in p50.items()}
    for k, v in med.items():
        print(f"{k:32s} p50 {v * 1000:8.1f} us")
    ratio1 = statistics.median(o / t for o, t in zip(p50["modelship onnxruntime runner"], p50["torch eager"]))
    ratio2 = statistics.median(o / b for o, b in zip(p50["modelship onnxruntime runner"], p50["bare InferenceSession.run"]))
    print(f"ratio onnxruntime runner / torch eager (goal <= 0.35): {ratio1:.3f}")
    print(f"ratio runner / bare session.run (goal <= 1.3): {ratio2:.3f}")
    write_figures(args.json, {"ort_over_torch": ratio1, "runner_over_session": ratio2,
                              "p50_us": {k: round(v * 1e3, 2) for k, v in med.items()}})


if __name__ == "__main__":
    main()
