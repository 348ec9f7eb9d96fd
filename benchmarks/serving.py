"""Serving overhead and dynamic batching, measured through real TorchServe with real Locust.

1. served p50 - in-process p50 at concurrency 1 (digits CNN, ONNX, batching off);
2. requests/s at concurrency 16 with dynamic batching on (batch 8, 5 ms delay) vs off (batch 1);
3. the load generator's own ceiling: Locust against TorchServe's trivial /ping.
Runs are interleaved (off, on, off, on, ...) and medians reported. Usage:
  python benchmarks/serving.py [--rounds 3] [--seconds 10] [--users 16] [--locust-workers 0]
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

from modelship.bench import feed_for, measure
from modelship.export.onnx_export import export
from modelship.loadtests.golden import prepare
from modelship.loadtests.runner import run_locust
from modelship.models.checkpoints import open_source
from modelship.models.train import train_artifact
from modelship.runners import open_runner
from modelship.serve import server
from modelship.serve.archive import ModelConfig, archive
from modelship.stages import gate_parity


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--locust-workers", type=int, default=0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    src, module = open_source(train_artifact("cnn", tmp / "cnn").path)
    onnx_art = export(src, module, tmp / "onnx")
    gate_parity(onnx_art, reference=(src, module))
    store = tmp / "store"
    archive(onnx_art, store, name="nobatch", config=ModelConfig(batch_size=1, max_batch_delay_ms=0))
    archive(onnx_art, store, name="batch", config=ModelConfig(batch_size=8, max_batch_delay_ms=5))
    state = tmp / "state"
    server.start(store, state, server.ServeConfig(port=server.free_port()))
    try:
        specs = {m: prepare(state, m, tmp / f"lt-{m}") for m in ("nobatch", "batch")}
        runner = open_runner(onnx_art, threads=1)
        feed = feed_for(runner, 1)
        served1, inproc, rps = [], [], {"nobatch": [], "batch": []}
        for r in range(args.rounds):
            inproc.append(float(np.median(measure(lambda: runner.infer(feed), 1.0))))
            res = run_locust(specs["nobatch"], tmp / "c1", 1, 1, args.seconds, tag=f"c1_{r}")
            served1.append(res["p50_ms"])
            for m in ("nobatch", "batch"):
                res = run_locust(specs[m], tmp / f"c{args.users}", args.users, args.users, args.seconds,
                                 args.locust_workers, tag=f"{m}_{r}")
                assert res["mismatches"] == 0 and res["failures"] == 0, res
                rps[m].append(res["rps"])
        ping = run_locust({**specs["nobatch"], "mode": "ping"}, tmp / "ping", args.users, args.users, args.seconds,
                          args.locust_workers, tag="ping")
    finally:
        server.stop(state)
    p_served, p_in = statistics.median(served1), statistics.median(inproc)
    print(f"concurrency 1, batching off: served p50 {p_served:.2f} ms, in-process p50 {p_in:.3f} ms, "
          f"difference {p_served - p_in:.2f} ms (goal <= 2 ms)")
    for m in rps:
        print(f"concurrency {args.users}, {m:8s}: {statistics.median(rps[m]):7.1f} req/s  (rounds: "
              f"{', '.join(f'{x:.0f}' for x in rps[m])})")
    ratio = statistics.median(b / n for b, n in zip(rps["batch"], rps["nobatch"]))
    print(f"ratio dynamic batching on / off at concurrency {args.users}: {ratio:.2f} (goal >= 1.3)")
    print(f"load generator ceiling (Locust -> /ping, {args.users} users, {args.locust_workers} workers): "
          f"{ping['rps']:.0f} req/s, p50 {ping['p50_ms']} ms")


if __name__ == "__main__":
    main()
