"""Reliability under load, on a real TorchServe of its own (faults here must not disturb other tests):
a worker killed mid-run is replaced and answers stay correct, a fixed-rate soak keeps worker memory
flat, and more concurrent requests than the job queue holds get a fast 503, then normal service.
Every answer is checked against the PyTorch reference throughout."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import cli
from modelship.loadtests.summary import Gates
from modelship import data as datasets
from modelship.runners.torch_runner import TorchRunner
import modelship as ms
from modelship.serving.codec import softmax

pytestmark = pytest.mark.serve
QUEUE = 16


@pytest.fixture(scope="module")
def sturdy(work, cnn_onnx):
    store, state = work / "store-reliability", work / "state-reliability"
    ms.archive(cnn_onnx, store, name="cnn", batch_size=8, max_batch_delay_ms=5)
    with ms.serve(store, state, job_queue_size=QUEUE) as running:
        yield running.info


@pytest.fixture(scope="module")
def reference(cnn):
    feed, _ = datasets.load(cnn.manifest.data, "test", cnn.manifest.inputs)
    x = feed["pixels"][:64]
    return x, softmax(TorchRunner(cnn).infer({"pixels": x})["logits"])


def _loadtest(info, tmp_path, *args):
    p = cli("loadtest", "--state", info.state, "--model", "cnn", "--out", tmp_path / "lt",
            "--json", tmp_path / "r.json", *args)
    return p, json.loads((tmp_path / "r.json").read_text())


@pytest.mark.parametrize("duration,kill_at,ratio", [("12s", "4s", "0.03"),
                                                     pytest.param("20s", "6s", "0.01", marks=pytest.mark.slow)])
def test_worker_killed_during_load_is_replaced_and_answers_stay_correct(sturdy, tmp_path, duration, kill_at, ratio):
    """A kill fails the requests the dead worker held (at most one per user: 4); the rest are answered, right. The
    12 s run on a busy CI machine sends only a few hundred requests, so its ratio gate is 3 %; the slow run's 1 %."""
    p, r = _loadtest(sturdy, tmp_path, "--users", "4", "--duration", duration, "--kill-worker-at", kill_at,
                     "--max-recovery-s", "15", "--max-failure-ratio", ratio, "--warmup", "0")
    assert p.returncode == 0, p.stderr
    f = r["fault"]
    assert f["killed_pid"] not in f["workers_after"] and len(f["workers_after"]) == 1
    assert f["answer_after_recovery_correct"] and 0 < f["recovery_s"] < 15
    assert r["failures"] <= 4 and r["max_ms"] < 30_000  # only what was in flight; none hung until the 30 s timeout
    assert r["mismatches"] == 0 and r["checked"] == r["requests"] - r["failures"]
    assert "recovered in" in p.stdout


@pytest.mark.parametrize("seconds,rate", [(20, 20), pytest.param(60, 50, marks=pytest.mark.slow)])
def test_fixed_rate_soak_has_no_failures_and_flat_worker_memory(sturdy, tmp_path, seconds, rate):
    p, r = _loadtest(sturdy, tmp_path, "--users", "4", "--duration", f"{seconds}s", "--rate", str(rate),
                     "--max-memory-growth", "0.10", "--warmup", "0")
    assert p.returncode == 0, p.stderr
    assert r["failures"] == 0 and r["mismatches"] == 0 and r["max_ms"] < 1000
    assert abs(r["requests"] - rate * seconds) < 0.15 * rate * seconds  # it held the fixed rate
    m = r["memory"]
    assert m["samples"] >= seconds * 0.8 and m["start_mb"] > 50 and m["growth"] < 0.10


def test_gates_judge_recovery_and_memory():
    from modelship.loadtests.summary import GateFailure, kind_of

    base = {"requests": 100, "failures": 0, "top1_agreement": 1.0, "mismatches": 0, "p95_ms": 5.0}
    g = Gates(max_recovery_s=15, max_memory_growth=0.1)
    assert g.judge({**base, "memory": {"growth": 0.02}}) == []
    slow = g.judge({**base, "memory": {"growth": 0.0}, "fault": {"recovery_s": 20.0, "answer_after_recovery_correct": True}})
    assert slow == [GateFailure("slo", "recovery: 20.0 s > 15 s")]
    wrong = g.judge({**base, "memory": {"growth": 0.0}, "fault": {"recovery_s": 2.0, "answer_after_recovery_correct": False}})
    assert wrong[0].kind == "errors" and wrong[0].message.startswith("fault: no correct answer")
    leak = g.judge({**base, "memory": {"growth": 0.25, "start_mb": 200, "end_mb": 250}})
    assert leak == [GateFailure("slo", "memory: worker RSS grew 25.0% (200 -> 250 MiB) > 10%")]
    assert g.judge({**base, "memory": {"growth": None}})[0].message.startswith("memory: too few")
    # a result's kind is its most severe failed gate: a wrong answer outranks an error, an error a missed SLO
    assert kind_of(slow + wrong) == "errors" and kind_of([]) is None
    assert kind_of(slow + [GateFailure("parity", "agreement: ...")] + wrong) == "parity"


def test_overload_gets_fast_503_then_normal_service(sturdy, reference):
    x, want = reference
    hdr = {"Authorization": f"Bearer {sturdy.token}", "Content-Type": "application/json"}
    url = f"{sturdy.inference_url}/predictions/cnn"
    body = json.dumps({"inputs": x.tolist()})  # 64 samples per request: each holds the worker a little

    def one(_):
        t = time.monotonic()
        r = requests.post(url, data=body, headers=hdr, timeout=60)
        return r, time.monotonic() - t

    with ThreadPoolExecutor(128) as pool:
        replies = list(pool.map(one, range(256)))  # 16x the job queue
    codes = [r.status_code for r, _ in replies]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    shed = [(r, s) for r, s in replies if r.status_code == 503]
    assert len(shed) > 0 and codes.count(200) > 0
    assert all("ServiceUnavailableException" in r.text for r, _ in shed)
    assert max(s for _, s in shed) < 10  # refused quickly (the response timeout is 30 s), never hung
    for r, _ in replies:  # what was served is still right
        if r.status_code == 200:
            got = np.array([p["probabilities"] for p in r.json()["predictions"]])
            np.testing.assert_allclose(got, want, atol=1e-5)
    after = [requests.post(url, data=json.dumps({"inputs": x[i].tolist()}), headers=hdr, timeout=30) for i in range(20)]
    assert [a.status_code for a in after] == [200] * 20
    assert [a.json()["index"] for a in after] == want[:20].argmax(1).tolist()
    assert requests.get(f"{sturdy.inference_url}/ping", headers=hdr, timeout=5).json()["status"] == "Healthy"
