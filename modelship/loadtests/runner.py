"""``modelship loadtest``: prepare golden outputs, run headless Locust (local or distributed on
loopback), read its CSV and the parity counts, and apply the SLO / failure / agreement gates."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, GateError, ServeError
from ..manifest import load_artifact
from ..models import data as datasets
from ..serve.archive import read_mar
from ..serve.codec import softmax
from ..serve.server import free_port, read_state
from .monitor import Monitor

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass
class Gates:
    slo_p95_ms: float | None = None
    max_failure_ratio: float = 0.0
    min_agreement: float = 0.99
    max_recovery_s: float | None = None  # with a worker fault: until a replaced worker answers correctly
    max_memory_growth: float | None = None  # worker RSS, end vs after warm-up, as a fraction

    def judge(self, r: dict) -> list[str]:
        out = []
        fault = r.get("fault")
        if fault is not None:
            if not fault.get("answer_after_recovery_correct"):
                out.append(f"fault: no correct answer after the worker kill ({fault.get('error', 'wrong answer')})")
            elif self.max_recovery_s is not None and fault["recovery_s"] > self.max_recovery_s:
                out.append(f"recovery: {fault['recovery_s']:.1f} s > {self.max_recovery_s} s")
        if self.max_memory_growth is not None:
            g = (r.get("memory") or {}).get("growth")
            if g is None:
                out.append("memory: too few worker memory samples to judge growth (run longer)")
            elif g > self.max_memory_growth:
                m = r["memory"]
                out.append(f"memory: worker RSS grew {g:.1%} ({m['start_mb']:.0f} -> {m['end_mb']:.0f} MiB) > "
                           f"{self.max_memory_growth:.0%}")
        if self.slo_p95_ms is not None and (r["p95_ms"] is None or r["p95_ms"] > self.slo_p95_ms):
            out.append(f"latency: p95 {r['p95_ms']} ms > SLO {self.slo_p95_ms} ms")
        if r["requests"] == 0:
            out.append("no requests completed")
        elif r["failures"] / r["requests"] > self.max_failure_ratio:
            out.append(f"failures: {r['failures']}/{r['requests']} = {r['failures'] / r['requests']:.4f} > "
                       f"{self.max_failure_ratio}")
        if r["top1_agreement"] is not None and r["top1_agreement"] < self.min_agreement:
            out.append(f"agreement: {r['top1_agreement']:.4f} < {self.min_agreement} "
                       f"({r['mismatches']} answers differ from the reference)")
        return out


def prepare(state: str | Path, model: str, out_dir: Path, reference: str | Path | None = None,
            samples: int | None = None) -> dict:
    """Write the request bodies and golden outputs (from the PyTorch reference) for one served model."""
    from ..runners.torch_runner import TorchRunner
    from ..stages import reference_of
    from ..models.checkpoints import open_source

    info = read_state(state)
    if model not in info["models"]:
        raise ServeError(f"model '{model}' is not served from {state}; served: {', '.join(info['models'])}")
    served = read_mar(Path(info["store"]) / f"{model}.mar")
    source = (served.extra.get("archive") or {}).get("source")
    if reference:
        ref_art, module = open_source(reference)
    elif source and Path(source).is_dir():
        ref_art, module = reference_of(load_artifact(source, verify=False))
    else:
        raise ArtifactError(f"cannot find the reference model of '{model}'; pass --reference PATH")
    feed, _ = datasets.load(served.data, "test", served.inputs)
    if samples:
        feed = {k: v[:samples] for k, v in feed.items()}
    ref = TorchRunner(ref_art, module=module).infer(feed)
    n = len(next(iter(feed.values())))
    names = [t.name for t in served.inputs]
    bodies = [json.dumps({"inputs": feed[names[0]][i].tolist()} if len(names) == 1 else
                         {"inputs": {k: feed[k][i].tolist() for k in names}}) for i in range(n)]
    out_dir.mkdir(parents=True, exist_ok=True)
    first = ref[served.outputs[0].name]
    if served.task == "classification":
        probs = softmax(first)
        np.savez(out_dir / "golden.npz", probabilities=probs, index=probs.argmax(-1))
    else:
        np.savez(out_dir / "golden.npz", outputs=first)
    (out_dir / "bodies.json").write_text(json.dumps(bodies))
    return {"model": model, "path": f"/predictions/{model}", "token": info.get("token"), "task": served.task,
            "golden": str(out_dir / "golden.npz"), "bodies": str(out_dir / "bodies.json"),
            "report": str(out_dir / "parity_counts.json"), "host": info["inference_url"],
            "reference": str(ref_art.path), "samples": n}


def run_locust(spec: dict, out_dir: Path, users: int, spawn_rate: float, duration_s: float, workers: int = 0,
               tag: str = "locust", rate: float | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / f"{tag}.spec.json"
    spec = {**spec, "report": str(out_dir / f"{tag}.counts.json"), "rate_per_user": rate / users if rate else None}
    spec_path.write_text(json.dumps(spec))
    Path(spec["report"]).unlink(missing_ok=True)
    env = {**os.environ, "MODELSHIP_LOADTEST": str(spec_path), "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "--host", spec["host"], "-u", str(users), "-r", str(spawn_rate), "-t", f"{max(1, int(round(duration_s)))}s",
            "--stop-timeout", "5", "--csv", str(out_dir / tag), "--html", str(out_dir / f"{tag}.html"),
            "--exit-code-on-error", "0", "--loglevel", "WARNING"]
    log = open(out_dir / f"{tag}.log", "w")
    procs = []
    if workers:
        port = free_port(2)
        master = subprocess.Popen(base + ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                                          "--expect-workers", str(workers), "--expect-workers-max-wait", "30"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        procs = [subprocess.Popen([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-host",
                                   "127.0.0.1", "--master-port", str(port), "--loglevel", "WARNING"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT) for _ in range(workers)]
    else:
        master = subprocess.Popen(base, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        master.wait(timeout=duration_s + 90)  # bounded: Locust stops itself at -t; this is the backstop
    except subprocess.TimeoutExpired:
        master.kill()
        raise GateError(f"Locust did not finish within {duration_s + 90:.0f} s; see {out_dir / (tag + '.log')}")
    finally:
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    return summarize(out_dir, tag, spec, users)


def summarize(out_dir: Path, tag: str, spec: dict, users: int) -> dict:
    stats = out_dir / f"{tag}_stats.csv"
    if not stats.is_file():
        tail = (out_dir / f"{tag}.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise GateError(f"Locust wrote no statistics ({' | '.join(tail)})")
    rows = {r["Name"]: r for r in csv.DictReader(open(stats))}
    agg = rows.get("Aggregated", {})
    counts = json.loads(Path(spec["report"]).read_text()) if Path(spec["report"]).is_file() else {}
    lat = np.array(counts.get("latencies_ms", []), dtype=float)
    final = counts.get("stats") or {}
    requests = int(final.get("requests", agg.get("Request Count", 0)))
    failures = int(final.get("failures", agg.get("Failure Count", 0)))
    checked = counts.get("checked", 0)
    # requests Locust itself cancelled when the run ended (not failures: the server never got to answer)
    cancelled = max(0, counts.get("started", 0) - counts.get("responses", 0))
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: _num(agg.get(f"{q}%")))
    return {
        "model": spec.get("model"), "users": users, "requests": requests, "failures": failures, "cancelled_at_stop": cancelled,
        "max_ms": _num(final.get("max_ms")),  # slowest request, failed ones included
        "rps": _num(final.get("rps", agg.get("Requests/s"))), "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "mean_ms": float(lat.mean()) if len(lat) else _num(agg.get("Average Response Time")),
        "checked": checked, "mismatches": counts.get("mismatches", 0),
        "top1_agreement": (1 - counts.get("mismatches", 0) / checked) if checked else None,
        "max_abs_diff": counts.get("max_prob_diff") if checked else None,
        "mismatch_examples": counts.get("examples", []), "per_worker": counts.get("per_worker", {}),
        "locust_responses": counts.get("responses"), "latencies_ms": lat.round(3).tolist(),
        "csv": str(stats), "html": str(out_dir / f"{tag}.html"),
    }


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise ArtifactError(f"duration '{text}': expected e.g. 30s, 2m or 45") from None


def loadtest(state, model, out_dir, users=(4,), spawn_rate=None, duration_s=30.0, workers=0, gates: Gates | None = None,
             reference=None, samples=None, rate: float | None = None, kill_worker_at_s: float | None = None) -> dict:
    """Load-test one served model at each user level. ``rate``: fixed total requests/s (soak);
    ``kill_worker_at_s``: kill one of its TorchServe workers that many seconds into each level."""
    gates = gates or Gates()
    out_dir = Path(out_dir)
    spec = prepare(state, model, out_dir, reference=reference, samples=samples)
    info = read_state(state)
    if kill_worker_at_s is not None and not 0 < kill_worker_at_s < duration_s:
        raise ArtifactError(f"--kill-worker-at {kill_worker_at_s:g} s: expected a time inside the run (0 to {duration_s:g} s)")
    levels = []
    for u in users:
        mon = Monitor(info, spec, kill_at_s=kill_worker_at_s)
        mon.start()
        try:
            r = run_locust(spec, out_dir, u, spawn_rate or u, duration_s, workers, tag=f"locust_u{u}", rate=rate)
        finally:
            mon.done.set()
            mon.join(timeout=90)
        r["memory"] = mon.memory(warmup_s=min(10.0, duration_s / 5))
        if kill_worker_at_s is not None:
            r["fault"] = mon.fault or {"error": mon.error or "the worker kill did not happen"}
        if mon.error:
            r["monitor_error"] = mon.error
        r["gate_failures"] = gates.judge(r)
        r["passed"] = not r["gate_failures"]
        levels.append(r)
    result = {**levels[-1], "levels": levels, "slo": asdict(gates),
              "reference": spec["reference"], "workers": workers, "rate": rate,
              "passed": all(lv["passed"] for lv in levels),
              "gate_failures": [f"users={lv['users']}: {f}" for lv in levels for f in lv["gate_failures"]]}
    return result
