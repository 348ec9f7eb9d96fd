"""Locust user for modelship: sends real evaluation samples and checks each answer against golden
outputs computed beforehand from the reference PyTorch model.

HTTP failures are Locust failures; answer mismatches are counted separately and, in distributed runs,
summed on the master from every worker's reports. Configured by the JSON spec named in the
MODELSHIP_LOADTEST environment variable (written by ``modelship loadtest``).
"""

import itertools
import json
import os
import random
import time
from collections import defaultdict

import numpy as np
from locust import FastHttpUser, constant, constant_throughput, events, task

from modelship.loadtests.golden import check, request_bodies, request_headers

SPEC = json.loads(open(os.environ["MODELSHIP_LOADTEST"]).read())
GOLDEN = np.load(SPEC["golden"], allow_pickle=False) if SPEC.get("golden") else None
BODIES = request_bodies(SPEC)  # JSON, or the bytes of encoded images sent with their content type
HEADERS = request_headers(SPEC)


def _fresh():
    # samples: one [seconds since the test started, latency ms, ok, verdict] per answered request, failed ones
    # included (at their time to failure); verdict: None (not checked: HTTP error), or
    # [label agreed (or None), within tolerance, max |diff| (1e30: inf), NaN or inf where the reference is finite]
    return {"started": 0, "responses": 0, "checked": 0, "mismatches": 0, "samples": [], "examples": []}


LOCAL = _fresh()  # this process's counts since its last report
TOTAL = _fresh()  # master / local runner: everything
PER_WORKER = defaultdict(_fresh)  # per worker: the counters (latencies are kept once, in TOTAL)


T0 = {"t": time.time()}
USERS = itertools.count()


@events.test_start.add_listener
def _start(**_):
    T0["t"] = time.time()


def _merge(into, part):
    for k in ("started", "responses", "checked", "mismatches"):
        into[k] += part[k]
    into["samples"].extend(part["samples"])
    into["examples"] = (into["examples"] + part["examples"])[:5]


class ModelUser(FastHttpUser):
    # a fixed request rate (soak tests) when the spec gives one per user, else back-to-back requests
    wait_time = constant_throughput(SPEC["rate_per_user"]) if SPEC.get("rate_per_user") else constant(SPEC.get("wait_s", 0))
    # a request unanswered this long is a failure (a hang shows up in the failure count, never unseen)
    network_timeout = connection_timeout = float(SPEC.get("timeout_s", 30))

    def on_start(self):  # seeded: the same users send the same samples in the same order on every run
        worker = getattr(self.environment.runner, "worker_index", 0)
        rng = random.Random(f"{SPEC.get('seed', 0)}-{worker}-{next(USERS)}")
        self.i = rng.randrange(max(1, len(BODIES)))

    @task
    def predict(self):
        if SPEC.get("mode") == "ping":  # the load generator's own ceiling: TorchServe's trivial /ping
            LOCAL["started"] += 1
            sent, t = time.time() - T0["t"], time.perf_counter()
            r = self.client.get("/ping", headers=HEADERS, name="/ping")
            LOCAL["responses"] += 1
            LOCAL["samples"].append([round(sent, 3), (time.perf_counter() - t) * 1e3, r.status_code == 200, None])
            return
        i = self.i = (self.i + 1) % len(BODIES)
        if SPEC.get("mode") == "floor":  # a bare server's floor: the same requests, timed the same way, not checked
            LOCAL["started"] += 1
            sent = time.time() - T0["t"]
            with self.client.post(SPEC["path"], data=BODIES[i], headers=HEADERS, catch_response=True,
                                  name=SPEC["path"]) as r:
                LOCAL["responses"] += 1
                LOCAL["samples"].append([round(sent, 3), r.request_meta["response_time"], r.status_code == 200, None])
                r.success()
            return
        LOCAL["started"] += 1
        sent = time.time() - T0["t"]
        with self.client.post(SPEC["path"], data=BODIES[i], headers=HEADERS, catch_response=True,
                              name=SPEC["path"]) as r:
            LOCAL["responses"] += 1
            sample = [round(sent, 3), r.request_meta["response_time"], False, None]
            LOCAL["samples"].append(sample)
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
                return
            try:
                v = check(SPEC, GOLDEN, i, r.json())
            except (ValueError, KeyError, TypeError) as e:
                r.failure(f"malformed answer: {type(e).__name__}")
                return
            sample[2], sample[3] = True, [v.label_ok, v.within, v.diff if v.diff != float("inf") else 1e30,
                                          v.nonfinite]
            LOCAL["checked"] += 1
            if not v.ok:
                LOCAL["mismatches"] += 1
                if len(LOCAL["examples"]) < 5:
                    LOCAL["examples"].append(v.why)
            r.success()


@events.report_to_master.add_listener
def _to_master(client_id, data, **_):
    global LOCAL
    data["modelship"] = LOCAL
    LOCAL = _fresh()


@events.worker_report.add_listener
def _from_worker(client_id, data, **_):
    part = data.get("modelship")
    if part:
        _merge(TOTAL, part)
        _merge(PER_WORKER[client_id], {**part, "samples": []})


@events.quitting.add_listener
def _write(environment, **_):
    from locust.runners import WorkerRunner

    if isinstance(environment.runner, WorkerRunner):
        return
    _merge(TOTAL, LOCAL)
    out = {k: v for k, v in TOTAL.items()}
    t = environment.stats.total  # final totals (the CSV is a periodic snapshot)
    out["stats"] = {"requests": t.num_requests, "failures": t.num_failures, "rps": t.total_rps, "max_ms": t.max_response_time}
    out["per_worker"] = {cid: {k: v for k, v in w.items() if k in ("started", "responses", "checked", "mismatches")}
                         for cid, w in PER_WORKER.items()}
    with open(SPEC["report"], "w") as f:
        json.dump(out, f)
