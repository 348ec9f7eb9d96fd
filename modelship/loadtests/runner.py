"""``modelship loadtest``: golden outputs (golden.py), headless Locust processes (local or distributed on
loopback) with the server monitor beside them, then the summary and gates (summary.py) per user level."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import ArtifactError, GateError
from ..machine import differences
from ..serving.config import free_port
from ..serving.state import ServerState
from .golden import TOKEN_ENV, prepare, probe, retarget
from .monitor import Monitor
from .summary import Gates, kind_of, summarize

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def run_locust(spec: dict, out_dir: Path, users: int, spawn_rate: float, duration_s: float, workers: int = 0,
               tag: str = "locust", rate: float | None = None, warmup_s: float = 0.0) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / f"{tag}.spec.json"
    spec = {**spec, "report": str(out_dir / f"{tag}.counts.json"), "rate_per_user": rate / users if rate else None}
    spec_path.write_text(json.dumps({k: v for k, v in spec.items() if k != "token"}))  # no secret in a file
    Path(spec["report"]).unlink(missing_ok=True)
    env = {**os.environ, "MODELSHIP_LOADTEST": str(spec_path), "PYTHONWARNINGS": "ignore"}
    if spec.get("token"):  # Locust gets the bearer token through its environment, never from a file
        env[TOKEN_ENV] = spec["token"]
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "--host", spec["host"], "-u", str(users), "-r", str(spawn_rate), "-t", f"{max(1, int(round(duration_s)))}s",
            "--stop-timeout", "5", "--csv", str(out_dir / tag), "--html", str(out_dir / f"{tag}.html"),
            "--exit-code-on-error", "0", "--loglevel", "WARNING"]
    procs = []
    with open(out_dir / f"{tag}.log", "w") as log:
        try:
            if workers:
                port = free_port(2)
                procs.append(subprocess.Popen(base + ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port",
                                                      str(port), "--expect-workers", str(workers),
                                                      "--expect-workers-max-wait", "30"],
                                              env=env, stdout=log, stderr=subprocess.STDOUT))
                procs += [subprocess.Popen([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                                            "--master-host", "127.0.0.1", "--master-port", str(port), "--loglevel",
                                            "WARNING"], env=env, stdout=log, stderr=subprocess.STDOUT)
                          for _ in range(workers)]
            else:
                procs.append(subprocess.Popen(base, env=env, stdout=log, stderr=subprocess.STDOUT))
            try:
                procs[0].wait(timeout=duration_s + 90)  # bounded: Locust stops itself at -t; this is the backstop
            except subprocess.TimeoutExpired:
                raise GateError(f"Locust did not finish within {duration_s + 90:.0f} s; see "
                                f"{out_dir / (tag + '.log')}", kind="errors") from None
            for p in procs[1:]:
                p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        finally:  # an error, a signal or a hang: no Locust process outlives the load test
            _end(procs)
    return summarize(out_dir, tag, spec, users, duration_s, warmup_s)


def _end(procs: list, grace_s: float = 5.0) -> None:
    """Terminate whichever of ``procs`` still run, then kill what does not stop within ``grace_s``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def starved(r: dict) -> bool:
    """A level whose load generator measured nothing after the warm-up while every request it sent was answered
    (each user's first request only): on a machine short of CPU, Locust itself got no time for the rest of a short
    run. Not a verdict on the server — a failed or refused request, or a hang, is one."""
    started, answered = r.get("locust_responses") or 0, r.get("requests", 0)
    return (answered == 0 and started > 0 and not r.get("failures") and not r.get("failures_in_warmup")
            and not r.get("cancelled_at_stop"))


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise ArtifactError(f"duration '{text}': expected e.g. 30s, 2m or 45") from None


WARM_TIMEOUT_S = 60.0


def default_warmup(duration_s: float) -> float:
    """Seconds at the start of each level left out of every statistic: a tenth of the run, at most 5 s."""
    return min(5.0, duration_s / 10)


def loadtest(state, model, out_dir, users=(4,), spawn_rate=None, duration_s=30.0, workers=0, gates: Gates | None = None,
             reference=None, samples=None, rate: float | None = None, kill_worker_at_s: float | None = None,
             warmup_s: float | None = None, data: dict | None = None, overrides: dict | None = None,
             per_output: dict | None = None, prepared: dict | None = None, protocol: str = "predictions") -> dict:
    """Load-test one served model at each user level. ``rate``: fixed total requests/s (soak);
    ``kill_worker_at_s``: kill one of its TorchServe workers that many seconds into each level; ``prepared``:
    the ``spec`` of an earlier run on the same artifact and data, whose bodies and golden outputs are reused
    (the result's ``spec``); ``protocol``: ``predictions`` or ``v2`` (the Open Inference Protocol's infer path)."""
    gates = gates or Gates()
    out_dir = Path(out_dir)
    warmup_s = default_warmup(duration_s) if warmup_s is None else warmup_s
    if not 0 <= warmup_s < duration_s:
        raise ArtifactError(f"--warmup {warmup_s:g} s: expected 0 or more and less than the run ({duration_s:g} s)")
    if kill_worker_at_s is not None and not 0 < kill_worker_at_s < duration_s:
        raise ArtifactError(f"--kill-worker-at {kill_worker_at_s:g} s: expected a time inside the run (0 to {duration_s:g} s)")
    if prepared:
        spec = retarget(prepared, state, model, out_dir)
    else:
        spec = prepare(state, model, out_dir, reference=reference, samples=samples, data=data, overrides=overrides,
                       per_output=per_output, protocol=protocol)
    info = ServerState.load(state)
    t0 = time.perf_counter()  # the first answer is not timed: a cold worker's first request can take seconds
    verdict, why = probe(spec, timeout_s=WARM_TIMEOUT_S)
    if verdict is None:
        raise GateError(f"'{model}' did not answer a warm-up request within {WARM_TIMEOUT_S:.0f} s ({why})")
    first_ms = round((time.perf_counter() - t0) * 1e3, 1)
    levels = []
    for u in users:
        mon = Monitor(info, spec, kill_at_s=kill_worker_at_s)
        mon.start()
        try:
            r = run_locust(spec, out_dir, u, spawn_rate or u, duration_s, workers, tag=f"locust_u{u}", rate=rate,
                           warmup_s=warmup_s)
            if starved(r) and kill_worker_at_s is None:  # measured nothing: measure again, once, and say so
                first = r
                r = run_locust(spec, out_dir, u, spawn_rate or u, duration_s, workers, tag=f"locust_u{u}_again",
                               rate=rate, warmup_s=warmup_s)
                r["measured_again"] = (f"the first run answered {first['locust_responses']} request(s), none after "
                                       f"the {warmup_s:g} s warm-up and none failed: the load generator, not the "
                                       f"server, got no time (its log: {first['log']})")
        finally:
            mon.done.set()
            mon.join(timeout=90)
        r["memory"] = mon.memory(warmup_s=min(10.0, duration_s / 5))
        if kill_worker_at_s is not None:
            r["fault"] = mon.fault or {"error": mon.error or "the worker kill did not happen"}
        if mon.error:
            r["monitor_error"] = mon.error
        r["first_answer_ms"] = first_ms
        failed = gates.judge(r)
        r["gate_failures"] = [f.message for f in failed]
        r["failed_gates"] = [asdict(f) for f in failed]
        r["kind"] = kind_of(failed)
        r["passed"] = not failed
        levels.append(r)
    differ = differences(spec.get("judged_on"), verdict.served_on)
    result = {**levels[-1], "levels": levels, "protocol": spec.get("protocol", "predictions"), "slo": asdict(gates),
              "data": spec["data"], "reference": spec["reference"], "workers": workers, "rate": rate,
              # the gate's verdict is evidence for machines like the one that judged it; where the serving machine
              # computes with other kernels, this load test's checked answers are the evidence for it
              "judged_on": spec.get("judged_on"), "served_on": verdict.served_on, "kernels_differ": differ,
              "passed": all(lv["passed"] for lv in levels),
              "spec": {k: v for k, v in spec.items() if k != "token"},  # retarget() reads the token again
              "gate_failures": [f"users={lv['users']}: {f}" for lv in levels for f in lv["gate_failures"]],
              "failed_gates": [{**f, "users": lv["users"]} for lv in levels for f in lv["failed_gates"]]}
    result["kind"] = kind_of(result["failed_gates"])
    return result
