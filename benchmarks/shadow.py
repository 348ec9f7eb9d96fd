"""What shadow parity costs the served requests, through real TorchServe with real Locust.

The digits CNN as ONNX, archived three times with one single-threaded worker each: shadow off, rate 0.01 and
rate 1.0 (every request re-run on the root PyTorch model in the worker's shadow thread). Each round drives each
model in turn with the same Locust load (4 users, every answer checked); ratios are taken within a round (so
the machine's drift cancels) and their medians reported, with the shadow counters at the end. Usage:
  python benchmarks/shadow.py [--rounds 3] [--seconds 10] [--users 4] [--json PATH]
--json writes shadow_p50_ratio_001, shadow_rps_ratio_001, shadow_p50_ratio_1, shadow_rps_ratio_1 (shadow / off;
goal at 0.01: p50 ratio <= 1.03 and requests/s ratio >= 0.97) and the medians they come from.
"""

import argparse
import statistics
from pathlib import Path

import requests

import modelship as ms
from modelship.bench import scratch, write_figures
from modelship.loadtests.golden import prepare
from modelship.loadtests.runner import run_locust
from modelship.models.train import train_artifact
from modelship.serving import config, lifecycle
from modelship.serving.state import ServerState

RATES = {"off": 0.0, "r001": 0.01, "r1": 1.0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    tmp = Path(scratch())
    torch_art = train_artifact("cnn", tmp / "cnn")
    onnx_art = ms.export(torch_art, tmp / "onnx")
    store = tmp / "store"
    for name, rate in RATES.items():
        ms.archive(onnx_art, store, name=name, workers=1, threads=1, shadow_rate=rate)
    state = tmp / "state"
    lifecycle.start(store, state, config.ServeConfig(port=config.free_port()))
    try:
        specs = {m: prepare(state, m, tmp / f"lt-{m}") for m in RATES}
        p50 = {m: [] for m in RATES}
        rps = {m: [] for m in RATES}
        for r in range(args.rounds):
            for m in RATES:
                res = run_locust(specs[m], tmp / m, args.users, args.users, args.seconds, tag=f"{m}_{r}", warmup_s=1.0)
                assert res["failures"] == 0 and res["mismatches"] == 0, res
                p50[m].append(res["p50_ms"])
                rps[m].append(res["rps"])
                print(f"round {r + 1} {m:5s}: p50 {res['p50_ms']:.2f} ms, {res['rps']:.1f} req/s")
        counters = shadow_counters(ServerState.load(state))
    finally:
        lifecycle.stop(state)
    figures = {}
    for m, key in (("r001", "001"), ("r1", "1")):
        figures[f"shadow_p50_ratio_{key}"] = statistics.median(s / o for s, o in zip(p50[m], p50["off"]))
        figures[f"shadow_rps_ratio_{key}"] = statistics.median(s / o for s, o in zip(rps[m], rps["off"]))
    for m in RATES:
        figures[f"p50_ms_{m}"] = statistics.median(p50[m])
        figures[f"rps_{m}"] = statistics.median(rps[m])
    figures.update(counters)
    print(f"{args.users} users, {args.rounds} rounds of {args.seconds:g} s, medians of per-round ratios to shadow off:")
    for key, rate in (("001", 0.01), ("1", 1.0)):
        print(f"  rate {rate:<4g}: p50 x{figures[f'shadow_p50_ratio_{key}']:.3f}, requests/s "
              f"x{figures[f'shadow_rps_ratio_{key}']:.3f}" + ("  (goal: p50 <= 1.03, req/s >= 0.97)" if key == "001" else ""))
    print("shadow counters: " + ", ".join(f"{k} {v:g}" for k, v in counters.items()))
    write_figures(args.json, figures)


def shadow_counters(info: ServerState) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{info.shadow_metrics_url}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels.get("model") in RATES:
                key = f"{s.name.removeprefix('modelship_shadow_').removesuffix('_total')}_{s.labels['model']}"
                out[key] = out.get(key, 0) + s.value
    return out


if __name__ == "__main__":
    main()
