"""``modelship loadtest``: prepare golden outputs, run headless Locust (local or distributed on
loopback), read its CSV and the parity counts, and apply the SLO / failure / agreement gates."""

from __future__ import annotations

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
from ..parity import Tolerance, collect, tolerance_of
from ..serve.archive import read_mar
from ..serve.codec import softmax
from ..serve.server import free_port, read_state
from .monitor import Monitor

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


@dataclass
class Gates:
    slo_p95_ms: float | None = None
    max_failure_ratio: float = 0.0
    min_agreement: float | None = None  # None: the served artifact's precision tolerance (FP32: every label)
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
        floor = self.min_agreement if self.min_agreement is not None else (r.get("tolerance") or {}).get("min_top1_agreement")
        if r.get("top1_agreement") is not None and floor is not None and r["top1_agreement"] < floor:
            out.append(f"agreement: {r['top1_agreement']:.4f} < {floor} "
                       f"({r['label_mismatches']} labels differ from the reference)")
        if r.get("out_of_tolerance"):
            out.append(f"difference: {r['out_of_tolerance']} answers beyond the {r.get('precision')} tolerance "
                       f"(max |diff| {r['max_abs_diff']:.3g}; e.g. {'; '.join(r.get('mismatch_examples', [])[:1])})")
        if r.get("checked") == 0 and r["requests"]:
            out.append("no answer could be checked against the reference")
        return out


def prepare(state: str | Path, model: str, out_dir: Path, reference: str | Path | None = None,
            samples: int | None = None, data: dict | None = None, tolerance: Tolerance | None = None) -> dict:
    """Write the request bodies and the golden outputs of the root PyTorch model for one served model.
    ``data``: the user's evaluation data (default: the served artifact's); ``tolerance``: overrides of the
    served artifact's precision tolerance."""
    from ..models.checkpoints import open_source
    from ..runners.torch_runner import TorchRunner
    from ..stages import reference_of

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
    feed, _ = datasets.load(data or served.data, "test", served.inputs)
    if samples:
        feed = {k: v[:samples] for k, v in feed.items()}
    ref = collect(TorchRunner(ref_art, module=module), feed)
    n = len(next(iter(feed.values())))
    names = [t.name for t in served.inputs]
    outputs = [t.name for t in served.outputs]
    missing = [o for o in outputs if o not in ref]
    if missing:
        raise ArtifactError(f"the reference {ref_art.path} has no output(s) {', '.join(missing)} that '{model}' answers")
    bodies = [json.dumps({"inputs": feed[names[0]][i].tolist()} if len(names) == 1 else
                         {"inputs": {k: feed[k][i].tolist() for k in names}}) for i in range(n)]
    out_dir.mkdir(parents=True, exist_ok=True)
    golden = {f"out{j}": ref[o] for j, o in enumerate(outputs)}
    if served.task == "classification":
        probs = softmax(ref[outputs[0]])
        golden.update(probabilities=probs, index=probs.argmax(-1))
    np.savez(out_dir / "golden.npz", **golden)
    (out_dir / "bodies.json").write_text(json.dumps(bodies))
    tol = tolerance or tolerance_of(served)
    return {"model": model, "path": f"/predictions/{model}", "token": info.get("token"), "task": served.task,
            "precision": served.precision, "outputs": outputs, "tolerance": asdict(tol),
            "golden": str(out_dir / "golden.npz"), "bodies": str(out_dir / "bodies.json"),
            "report": str(out_dir / "parity_counts.json"), "host": info["inference_url"],
            "reference": str(ref_art.path), "data": datasets.describe(data or served.data), "samples": n}


def run_locust(spec: dict, out_dir: Path, users: int, spawn_rate: float, duration_s: float, workers: int = 0,
               tag: str = "locust", rate: float | None = None, warmup_s: float = 0.0) -> dict:
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
    return summarize(out_dir, tag, spec, users, duration_s, warmup_s)


def summarize(out_dir: Path, tag: str, spec: dict, users: int, duration_s: float | None = None,
              warmup_s: float = 0.0) -> dict:
    """Statistics over the requests sent after the warm-up: failed and timed-out ones count in the latency
    percentiles at their time to failure; every answered one is judged against the reference."""
    stats = out_dir / f"{tag}_stats.csv"
    if not stats.is_file():
        tail = (out_dir / f"{tag}.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise GateError(f"Locust wrote no statistics ({' | '.join(tail)})")
    counts = json.loads(Path(spec["report"]).read_text()) if Path(spec["report"]).is_file() else {}
    final = counts.get("stats") or {}
    rows = [s for s in counts.get("samples", []) if s[0] >= warmup_s]
    lat = np.array([s[1] for s in rows], dtype=float)
    verdicts = [s[3] for s in rows if s[3] is not None]
    diffs = np.array([v[2] for v in verdicts], dtype=float)
    labels = [v[0] for v in verdicts if v[0] is not None]
    label_mismatches = sum(1 for ok in labels if not ok)
    out_of_tol = sum(1 for v in verdicts if not v[1])
    mismatches = sum(1 for v in verdicts if not v[1] or v[0] is False)
    span = (duration_s - warmup_s) if duration_s else None
    # requests Locust itself cancelled when the run ended (not failures: the server never got to answer)
    cancelled = max(0, counts.get("started", 0) - counts.get("responses", 0))
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: None)
    return {
        "model": spec.get("model"), "users": users, "warmup_s": warmup_s, "requests": len(rows),
        "failures": sum(1 for s in rows if not s[2]), "cancelled_at_stop": cancelled,
        "max_ms": float(lat.max()) if len(lat) else None,  # slowest request, failed ones included
        "rps": len(rows) / span if span else _num(final.get("rps")),
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": float(lat.mean()) if len(lat) else None,
        "checked": len(verdicts), "mismatches": mismatches, "label_mismatches": label_mismatches,
        "out_of_tolerance": out_of_tol,
        "top1_agreement": (1 - label_mismatches / len(labels)) if labels else None,
        "max_abs_diff": float(diffs.max()) if len(diffs) else None,
        "p99_abs_diff": float(np.percentile(diffs, 99)) if len(diffs) else None,
        "precision": spec.get("precision"), "tolerance": spec.get("tolerance"), "reference": spec.get("reference"),
        "mismatch_examples": counts.get("examples", []), "per_worker": counts.get("per_worker", {}),
        "locust_requests": final.get("requests"), "locust_responses": counts.get("responses"),
        "latencies_ms": lat.round(3).tolist(), "csv": str(stats), "html": str(out_dir / f"{tag}.html"),
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


def served_tolerance(state, model: str, overrides: dict | None = None, per_output: dict | None = None) -> Tolerance:
    """The served artifact's precision tolerance with the command line's overrides."""
    info = read_state(state)
    if model not in info["models"]:
        raise ServeError(f"model '{model}' is not served from {state}; served: {', '.join(info['models'])}")
    tol = tolerance_of(read_mar(Path(info["store"]) / f"{model}.mar")).override(**(overrides or {}))
    return tol.override(per_output={**tol.per_output, **per_output}) if per_output else tol


def default_warmup(duration_s: float) -> float:
    """Seconds at the start of each level left out of every statistic: a tenth of the run, at most 5 s."""
    return min(5.0, duration_s / 10)


def loadtest(state, model, out_dir, users=(4,), spawn_rate=None, duration_s=30.0, workers=0, gates: Gates | None = None,
             reference=None, samples=None, rate: float | None = None, kill_worker_at_s: float | None = None,
             warmup_s: float | None = None, data: dict | None = None, tolerance: Tolerance | None = None) -> dict:
    """Load-test one served model at each user level. ``rate``: fixed total requests/s (soak);
    ``kill_worker_at_s``: kill one of its TorchServe workers that many seconds into each level."""
    gates = gates or Gates()
    out_dir = Path(out_dir)
    warmup_s = default_warmup(duration_s) if warmup_s is None else warmup_s
    if not 0 <= warmup_s < duration_s:
        raise ArtifactError(f"--warmup {warmup_s:g} s: expected 0 or more and less than the run ({duration_s:g} s)")
    spec = prepare(state, model, out_dir, reference=reference, samples=samples, data=data, tolerance=tolerance)
    info = read_state(state)
    if kill_worker_at_s is not None and not 0 < kill_worker_at_s < duration_s:
        raise ArtifactError(f"--kill-worker-at {kill_worker_at_s:g} s: expected a time inside the run (0 to {duration_s:g} s)")
    levels = []
    for u in users:
        mon = Monitor(info, spec, kill_at_s=kill_worker_at_s)
        mon.start()
        try:
            r = run_locust(spec, out_dir, u, spawn_rate or u, duration_s, workers, tag=f"locust_u{u}", rate=rate,
                           warmup_s=warmup_s)
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
    result = {**levels[-1], "levels": levels, "slo": asdict(gates), "data": spec["data"],
              "reference": spec["reference"], "workers": workers, "rate": rate,
              "passed": all(lv["passed"] for lv in levels),
              "gate_failures": [f"users={lv['users']}: {f}" for lv in levels for f in lv["gate_failures"]]}
    return result
