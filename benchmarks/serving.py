"""Serving overhead and dynamic batching, measured through real TorchServe with real Locust.

1. served p50 - in-process p50 at concurrency 1 (digits CNN, ONNX, batching off);
2. requests/s at concurrency 16 with dynamic batching on (batch 8, 5 ms delay) vs off (batch 1);
3. the load generator's own ceiling: Locust against TorchServe's trivial /ping;
4. the Open Inference Protocol's REST path (/v2/models/NAME/infer, through the v2 front) against /predictions,
   p50 at concurrency 1 on the same model and samples;
5. with --text (instead of 1-4): the built-in text model served as ONNX, p50 at concurrency 1 of a raw-text
   request ({"inputs": "review"}) against the same review sent as its token ids: the tokenizer's cost.
Runs are interleaved (off, on, off, on, ...) and medians reported. Usage:
  python benchmarks/serving.py [--rounds 3] [--seconds 10] [--users 16] [--locust-workers 0] [--text] [--json PATH]
--json writes served_minus_inprocess_ms, batching_gain, locust_ceiling_rps, v2_over_predictions_p50 and
served_over_floor_p50 (the served p50 over a bare loopback server's, benchmarks/floor_server.py, sent the same
requests by the same Locust user: the floor of this machine; absolute ms differ two-fold between machines) (with
--text: raw_text_p50_ms,
token_ids_p50_ms, tokenizer_ms).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from modelship.bench import feed_for, measure, scratch, write_figures
import modelship as ms
from modelship.loadtests.golden import prepare
from modelship.loadtests.runner import run_locust
from modelship.models.train import train_artifact
from modelship.runners import open_runner
from modelship.serving import config, lifecycle
from modelship.serving.state import ServerState
from modelship.serving.archive import ModelConfig, archive


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--locust-workers", type=int, default=0)
    ap.add_argument("--text", action="store_true", help="raw text vs token ids on the built-in text model instead")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    tmp = Path(scratch())
    if args.text:
        return write_figures(args.json, text_vs_ids(tmp, args.rounds, args.seconds))
    onnx_art = ms.export(train_artifact("cnn", tmp / "cnn"), tmp / "onnx")
    store = tmp / "store"
    one = {"workers": 1, "threads": 1}  # the same worker for both: the comparison is batching alone
    archive(onnx_art, store, name="nobatch", config=ModelConfig(batch_size=1, max_batch_delay_ms=0, **one))
    archive(onnx_art, store, name="batch", config=ModelConfig(batch_size=8, max_batch_delay_ms=5, **one))
    state = tmp / "state"
    lifecycle.start(store, state, config.ServeConfig(port=config.free_port()))
    try:
        specs = {m: prepare(state, m, tmp / f"lt-{m}") for m in ("nobatch", "batch")}
        v2_spec = prepare(state, "nobatch", tmp / "lt-v2", protocol="v2")
        runner = open_runner(onnx_art, threads=1)
        feed = feed_for(runner, 1)
        floor_spec, floor = start_floor(specs["nobatch"], tmp)
        served1, inproc, rps, v2, bare = [], [], {"nobatch": [], "batch": []}, [], []
        for r in range(args.rounds):
            inproc.append(float(np.median(measure(lambda: runner.infer(feed), 1.0))))
            res = run_locust(floor_spec, tmp / "floor", 1, 1, args.seconds, tag=f"floor_{r}")
            assert res["failures"] == 0 and res["requests"] > 0, res
            bare.append(res["p50_ms"])
            res = run_locust(specs["nobatch"], tmp / "c1", 1, 1, args.seconds, tag=f"c1_{r}")
            served1.append(res["p50_ms"])
            res = run_locust(v2_spec, tmp / "v2", 1, 1, args.seconds, tag=f"v2_{r}")
            assert res["mismatches"] == 0 and res["failures"] == 0, res
            v2.append(res["p50_ms"])
            for m in ("nobatch", "batch"):
                res = run_locust(specs[m], tmp / f"c{args.users}", args.users, args.users, args.seconds,
                                 args.locust_workers, tag=f"{m}_{r}")
                assert res["mismatches"] == 0 and res["failures"] == 0, res
                rps[m].append(res["rps"])
        ping = run_locust({**specs["nobatch"], "mode": "ping"}, tmp / "ping", args.users, args.users, args.seconds,
                          args.locust_workers, tag="ping")
        parts = breakdown(ServerState.load(state), specs["nobatch"])
    finally:
        if "floor" in locals():
            floor.terminate()
            floor.wait(10)
        lifecycle.stop(state)
    p_served, p_in = statistics.median(served1), statistics.median(inproc)
    floor_ratio = statistics.median(a / b for a, b in zip(served1, bare))
    print(f"concurrency 1, batching off: served p50 {p_served:.2f} ms, a bare loopback server's {statistics.median(bare):.2f}"
          f" ms (the same Locust user and requests): ratio {floor_ratio:.2f} (goal <= 3; rounds: "
          f"{', '.join(f'{a:.2f}/{b:.2f}' for a, b in zip(served1, bare))})")
    print(f"concurrency 1, batching off: served p50 {p_served:.2f} ms, in-process p50 {p_in:.3f} ms, "
          f"difference {p_served - p_in:.2f} ms (goal <= 2 ms)")
    v2_ratio = statistics.median(a / b for a, b in zip(v2, served1))
    print(f"concurrency 1: Open Inference Protocol v2 p50 {statistics.median(v2):.2f} ms vs /predictions "
          f"{p_served:.2f} ms: ratio {v2_ratio:.3f} (rounds: {', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(v2, served1))})")
    for m in rps:
        print(f"concurrency {args.users}, {m:8s}: {statistics.median(rps[m]):7.1f} req/s  (rounds: "
              f"{', '.join(f'{x:.0f}' for x in rps[m])})")
    ratio = statistics.median(b / n for b, n in zip(rps["batch"], rps["nobatch"]))
    print(f"ratio dynamic batching on / off at concurrency {args.users}: {ratio:.2f} (goal >= 1.3)")
    print(f"load generator ceiling (Locust -> /ping, {args.users} users, {args.locust_workers} workers): "
          f"{ping['rps']:.0f} req/s, p50 {ping['p50_ms']} ms")
    print("where one served request's time goes (concurrency 1, batching off; "
          f"{parts['requests']} requests from a keep-alive Python client):")
    for k, v in parts.items():
        if k.endswith("_ms"):
            print(f"  {k[:-3].replace('_', ' '):44s} {v:7.3f} ms")
    write_figures(args.json, {**{f"breakdown_{k}": v for k, v in parts.items()},
                              "served_minus_inprocess_ms": p_served - p_in, "batching_gain": ratio,
                              "locust_ceiling_rps": ping["rps"], "served_p50_ms": p_served, "inprocess_p50_ms": p_in,
                              "rps_batching_on": statistics.median(rps["batch"]),
                              "rps_batching_off": statistics.median(rps["nobatch"]),
                              "v2_p50_ms": statistics.median(v2), "v2_over_predictions_p50": v2_ratio,
                              "floor_p50_ms": statistics.median(bare), "served_over_floor_p50": floor_ratio})


def start_floor(spec: dict, tmp: Path):
    """The bare server (benchmarks/floor_server.py) answering every request with a real answer of the served model,
    and a load-test spec that sends it the same requests: (spec, process)."""
    import subprocess
    import sys

    import requests

    from modelship.loadtests.golden import request_bodies, request_headers

    answer = requests.post(spec["host"] + spec["path"], data=request_bodies(spec)[0], headers=request_headers(spec),
                           timeout=30)
    assert answer.status_code == 200, answer.text
    (tmp / "floor-answer.json").write_bytes(answer.content)
    port = config.free_port(1)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("floor_server.py")), str(port),
                             str(tmp / "floor-answer.json")])
    deadline = time.monotonic() + 10
    while config.port_free(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {**spec, "mode": "floor", "host": f"http://127.0.0.1:{port}", "token": None}, proc


def _counters(info: ServerState, model: str) -> dict:
    """TorchServe's per-model Prometheus counters: requests, frontend latency and queue latency (µs, summed)."""
    import re

    import requests

    text = requests.get(f"{info.metrics_url}/metrics", timeout=10).text
    out = {}
    for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds"):
        m = re.search(rf'^{name}{{[^}}]*model_name="{model}"[^}}]*}} ([0-9.eE+-]+)', text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def breakdown(info: ServerState, spec: dict, n: int = 400) -> dict:
    """Serial requests with a keep-alive client: the round trip it sees, TorchServe's frontend latency and queue
    time (its counters, per request), and the handler's own decode / infer / encode (its Server-Timing header)."""
    import requests

    from modelship.loadtests.golden import request_bodies, request_headers

    bodies, hdr = request_bodies(spec), request_headers(spec)
    url = f"{spec['host']}{spec['path']}"
    sess = requests.Session()
    for b in bodies[:20]:
        sess.post(url, data=b, headers=hdr, timeout=10)
    before = _counters(info, spec["model"])
    rt, parts = [], {"decode": [], "infer": [], "encode": []}
    for i in range(n):
        t0 = time.perf_counter()
        r = sess.post(url, data=bodies[i % len(bodies)], headers=hdr, timeout=10)
        rt.append((time.perf_counter() - t0) * 1e3)
        assert r.status_code == 200, r.text
        for item in r.headers.get("Server-Timing", "").split(","):
            name, _, dur = item.strip().partition(";dur=")
            if name in parts:
                parts[name].append(float(dur))
    after = _counters(info, spec["model"])
    k = after["ts_inference_requests_total"] - before["ts_inference_requests_total"]
    frontend = (after["ts_inference_latency_microseconds"] - before["ts_inference_latency_microseconds"]) / k / 1e3
    queue = (after["ts_queue_latency_microseconds"] - before["ts_queue_latency_microseconds"]) / k / 1e3
    handler = {p: statistics.median(v) for p, v in parts.items() if v}
    round_trip = statistics.median(rt)
    return {"requests": n, "round_trip_p50_ms": round_trip,
            "client_and_http_ms": round_trip - frontend,
            "torchserve_frontend_mean_ms": frontend, "queue_mean_ms": queue,
            "frontend_to_worker_ipc_and_python_service_ms": frontend - queue - sum(handler.values()),
            **{f"handler_{p}_p50_ms": v for p, v in handler.items()}}


def text_vs_ids(tmp: Path, rounds: int, seconds: float) -> dict:
    """Served p50 at concurrency 1: raw review texts vs the same reviews as token ids (each tokenized alone,
    as a client would), both judged against the same golden outputs."""
    from modelship.models import text as text_model

    art = ms.export(train_artifact("text", tmp / "text"), tmp / "text-onnx")
    archive(art, tmp / "text-store", name="text", config=ModelConfig(batch_size=1, max_batch_delay_ms=0, workers=1))
    state = tmp / "text-state"
    lifecycle.start(tmp / "text-store", state, config.ServeConfig(port=config.free_port()))
    try:
        raw = prepare(state, "text", tmp / "lt-raw")
        texts = [json.loads(b)["inputs"] for b in json.loads(Path(raw["bodies"]).read_text())]
        tok = text_model.tokenizer()
        max_length = art.manifest.preprocess["max_length"]
        ids = [{"inputs": {k: v for k, v in tok(t, truncation=True, max_length=max_length).items()
                           if k in ("input_ids", "attention_mask")}} for t in texts]
        (tmp / "lt-ids").mkdir(exist_ok=True)
        (tmp / "lt-ids" / "bodies.json").write_text(json.dumps([json.dumps(b) for b in ids]))
        specs = {"raw text": raw, "token ids": {**raw, "bodies": str(tmp / "lt-ids" / "bodies.json")}}
        p50 = {k: [] for k in specs}
        for r in range(rounds):
            for k, spec in specs.items():
                res = run_locust(spec, tmp / "text-c1", 1, 1, seconds, tag=f"text_{k.replace(' ', '_')}_{r}")
                assert res["mismatches"] == 0 and res["failures"] == 0, res
                p50[k].append(res["p50_ms"])
    finally:
        lifecycle.stop(state)
    a, b = statistics.median(p50["raw text"]), statistics.median(p50["token ids"])
    print(f"text model, concurrency 1: raw text p50 {a:.2f} ms, token ids p50 {b:.2f} ms, tokenizer cost "
          f"{a - b:.2f} ms ({a / b:.3f}x) (rounds: {', '.join(f'{x:.1f}/{y:.1f}' for x, y in zip(p50['raw text'], p50['token ids']))})")
    return {"raw_text_p50_ms": a, "token_ids_p50_ms": b, "tokenizer_ms": a - b}


if __name__ == "__main__":
    main()
