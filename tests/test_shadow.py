"""Parity in production, with a real TorchServe: live requests re-run on the reference (shadow parity) and
counted in Prometheus metrics, and modelship promote, which a wrong or slow candidate cannot pass and a good
one passes under load without a failed or wrong answer."""

import json
import shutil
import threading
import time
import zipfile

import numpy as np
import pytest
import requests

import modelship as ms
from conftest import cli, label_shifted
from modelship.manifest import load_artifact, write_artifact
from modelship.serving.state import ServerState
from modelship.promotion import versions

pytestmark = pytest.mark.serve


def digits(n, offset=0):
    from sklearn.datasets import load_digits

    return (load_digits().data[offset:offset + n] / 16.0).astype("float32").reshape(-1, 1, 8, 8)


def biased(onnx_art, dst, shift):
    """A copy of the digits ONNX model whose class-0 bias is raised by ``shift``: answers whose margin is below
    it turn to class 0 and every probability moves. Re-hashed: it loads and serves as a well-formed artifact."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(onnx_art.path, dst)
    model = onnx.load(str(dst / "model.onnx"))
    last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for init in model.graph.initializer:
        if init.name == last.input[2]:
            b = numpy_helper.to_array(init).copy()
            b[0] += shift
            init.CopyFrom(numpy_helper.from_array(b, init.name))
    onnx.save(model, str(dst / "model.onnx"))
    art = load_artifact(dst, verify=False)
    art.manifest.reference = str(load_artifact(onnx_art.path).resolve(onnx_art.manifest.reference))
    return write_artifact(dst, art.manifest)


def edited(onnx_art, dst, edit):
    """A copy of an artifact whose manifest ``edit`` changed (re-hashed: it loads as a well-formed artifact)."""
    shutil.copytree(onnx_art.path, dst)
    art = load_artifact(dst, verify=False)
    edit(art.manifest)
    art.manifest.reference = str(load_artifact(onnx_art.path).resolve(onnx_art.manifest.reference))
    return write_artifact(dst, art.manifest)


def scrape(url) -> dict:
    """Every modelship_shadow sample of a Prometheus scrape: {(name, frozenset(labels)): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith("modelship_shadow")}


def value(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def settled(url, model, n, timeout_s=60):
    """The metrics once every sampled request of ``model`` is checked or dropped (``n`` of them)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(url)
        done = value(m, "modelship_shadow_checked_total", model=model) + \
            value(m, "modelship_shadow_dropped_total", model=model)
        if done >= n or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def post(info, path, x, token=None):
    return requests.post(info.inference_url + path, json={"inputs": x.tolist()}, timeout=30,
                         headers={"Authorization": f"Bearer {token or info.token}"})


@pytest.fixture(scope="module")
def shadow_server(tmp_path_factory, cnn, cnn_onnx):
    """A server started with --allow-promote: 'good' (the digits ONNX model, every request shadowed on the root
    PyTorch model), 'wrong' (a class-0 bias added, shadowed on the good ONNX model, mismatches captured) and
    'tiny-queue' (every request sampled into a queue of one)."""
    work = tmp_path_factory.mktemp("shadow")
    store = work / "store"
    ms.archive(cnn_onnx, store, name="good", workers=1, shadow_rate=1.0)
    wrong = biased(cnn_onnx, work / "wrong", shift=4.0)
    ms.archive(wrong, store, name="wrong", workers=1, shadow_rate=1.0, shadow_reference=cnn_onnx.path,
               shadow_capture=work / "captured", shadow_capture_mb=1.0)
    ms.archive(cnn_onnx, store, name="tiny-queue", workers=1, shadow_rate=1.0, shadow_queue=1, batch_size=1)
    ms.archive(cnn_onnx, store, name="third", workers=1, shadow_rate=0.3, batch_size=1)
    # what only a shadow that judges the request as sent and the answer as received can see: the recorded image
    # preprocessing off by a constant (the model's arithmetic is right), and the labels' names permuted
    drift = edited(cnn_onnx, work / "drift", lambda man: man.preprocess.update(mean=[0.1]))
    ms.archive(drift, store, name="drift", workers=1, shadow_rate=1.0, force=True)
    misnamed = edited(cnn_onnx, work / "misnamed", lambda man: setattr(man, "labels", man.labels[::-1]))
    ms.archive(misnamed, store, name="misnamed", workers=1, shadow_rate=1.0, force=True)
    p = cli("serve", store, "--state", work / "state", "--detach", "--allow-promote", "--port",
            str(ms_free_port()), check=0)
    info = ServerState.load(work / "state")
    assert info.shadow_metrics_url in p.stdout
    yield {"info": info, "work": work, "state": work / "state", "store": store, "wrong": wrong}
    cli("serve", "--stop", "--state", work / "state", check=0)
    assert not (work / "state" / "spool").exists()  # sampled users' requests do not outlive the server


def ms_free_port():
    from modelship.serving.config import free_port

    return free_port()


def test_every_sampled_request_is_checked_or_dropped(shadow_server):
    info = shadow_server["info"]
    x = digits(40)
    assert all(post(info, "/predictions/good", xi).status_code == 200 for xi in x)
    m = settled(info.shadow_metrics_url, "good", 40)
    assert value(m, "modelship_shadow_sampled_total", model="good", version="1.0") == 40
    assert value(m, "modelship_shadow_checked_total", model="good") + \
        value(m, "modelship_shadow_dropped_total", model="good") == 40
    assert value(m, "modelship_shadow_checked_total", model="good") == 40  # a queue of 256: none dropped
    assert value(m, "modelship_shadow_mismatch_total", model="good") == 0
    assert value(m, "modelship_shadow_abs_diff_count", model="good") == 40
    assert value(m, "modelship_shadow_abs_diff_bucket", model="good", le="0.0001") == 40  # ONNX vs PyTorch: ~1e-7
    # --allow-promote: each sampled request kept as sent, owner-only, in the 0700 state folder, for promote
    spool = sorted((shadow_server["state"] / "spool" / "good" / "1.0").glob("*.req"))
    assert len(spool) == 40 and all(p.stat().st_mode & 0o777 == 0o600 for p in spool)
    head, _, body = spool[0].read_bytes().partition(b"\n")
    assert json.loads(head) == {"Content-Type": "application/json"} and json.loads(body)["inputs"] == x[0].tolist()

    # the Python API reads the same scrape
    import contextlib
    server = ms.Server(info, None, contextlib.ExitStack())
    try:
        assert 'modelship_shadow_checked_total{model="good",version="1.0"} 40.0' in server.metrics()
    finally:
        server.detach()  # the fixture's server: left running

    # a queue of one under 8 concurrent clients: samples are dropped, and each one is accounted for
    codes = []

    def client(part):
        codes.extend(post(info, "/predictions/tiny-queue", xi).status_code for xi in part)
    threads = [threading.Thread(target=client, args=(x[k::8],)) for k in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert codes == [200] * 40
    m = settled(info.shadow_metrics_url, "tiny-queue", 40)
    checked = value(m, "modelship_shadow_checked_total", model="tiny-queue")
    dropped = value(m, "modelship_shadow_dropped_total", model="tiny-queue", reason="queue_full")
    assert checked + dropped == 40 and checked >= 1
    assert value(m, "modelship_shadow_mismatch_total", model="tiny-queue") == 0


def test_a_wrong_variant_is_caught_request_by_request(shadow_server, cnn, cnn_onnx, tmp_path):
    from modelship.comparison import served_tolerance
    from modelship.runners import open_runner
    from modelship.serving.codec import softmax

    info = shadow_server["info"]
    x = digits(60, offset=100)
    ref = softmax(open_runner(cnn_onnx).infer({"pixels": x})["logits"])
    bound = served_tolerance(shadow_server["wrong"].manifest).max_prob_diff
    labels = tolerance = 0
    for xi, want in zip(x, ref):  # the test's own verdict on each answer
        got = post(info, "/predictions/wrong", xi).json()
        if got["index"] != int(want.argmax()):
            labels += 1
        elif np.abs(np.array(got["probabilities"]) - want).max() > bound:
            tolerance += 1
    assert 0 < labels < 60  # the bias turns some answers, not all: the counter must count, not just fire
    m = settled(info.shadow_metrics_url, "wrong", 60)
    assert value(m, "modelship_shadow_mismatch_total", model="wrong", kind="label") == labels
    assert value(m, "modelship_shadow_mismatch_total", model="wrong", kind="tolerance") == tolerance
    assert value(m, "modelship_shadow_checked_total", model="wrong") == 60
    # each mismatch logged with its request id and input hash, never the input
    log = (shadow_server["state"] / "logs" / "model_log.log").read_text()
    lines = [l for l in log.splitlines() if "shadow mismatch: model wrong" in l]
    assert len(lines) == labels + tolerance and all("input sha256 " in l and "request " in l for l in lines)
    assert str(x[0].ravel()[:4].tolist())[1:-1] not in log
    # the inputs of mismatches, owner-only, as .npz files parity --data replays offline (until the 1 MB cap)
    kept = sorted((shadow_server["work"] / "captured").glob("wrong-1.0-*.npz"))
    assert len(kept) == labels + tolerance
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in kept)
    replay = cli("parity", cnn.path, shadow_server["wrong"].path, "--data", kept[0], "--json", tmp_path / "p.json")
    assert replay.returncode == 1, replay.stderr  # the offline gate fails on the captured input as the shadow did


def test_registration_needs_allow_promote(served, work, cnn_onnx, tmp_path):
    mar = ms.archive(cnn_onnx, tmp_path / "cand", name="cnn-onnx", version="2.0")
    # the shared server runs without --allow-promote: modelship says how to start one, and TorchServe refuses too
    p = cli("promote", mar, "--state", work / "state", "--model", "cnn-onnx")
    assert p.returncode != 0 and "--allow-promote" in p.stderr
    r = requests.post(served.management_url + "/models", params={"url": "cnn-onnx.mar", "model_name": "x"},
                      headers={"Authorization": f"Bearer {served.management_token}"}, timeout=30)
    assert r.status_code != 200 and versions(served, "cnn-onnx")[0] == ["1.0"]


def test_registration_needs_the_management_token(shadow_server):
    info = shadow_server["info"]  # started with --allow-promote: the inference token, or none, may not register
    for token in (info.token, "wrong", None):
        r = requests.post(info.management_url + "/models", params={"url": "good.mar", "model_name": "good"},
                          headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=30)
        assert r.status_code in (400, 401, 403), r.text
    assert versions(info, "good")[0] == ["1.0"]
    # a rollback with no promote of its own to undo changes nothing and says why (the Python API's way in)
    import contextlib
    server = ms.Server(info, None, contextlib.ExitStack())
    try:
        with pytest.raises(ms.ServeError, match="roll back|not .* that the last promote"):
            server.promote("good", rollback=True)
    finally:
        server.detach()
    assert versions(info, "good")[1] == "1.0"


def test_a_wrong_or_slow_candidate_is_refused_and_never_answers_a_client(shadow_server, cnn, cnn_onnx, tmp_path):
    info, state = shadow_server["info"], shadow_server["state"]
    shifted = label_shifted(cnn_onnx.path, tmp_path / "shifted")
    shifted.manifest.reference = str(cnn.path)  # the copy sits elsewhere: its reference by absolute path
    shifted = write_artifact(shifted.path, shifted.manifest)
    mar = ms.archive(shifted, tmp_path / "c1", name="good", version="2.0")
    x, served, stop = digits(200), [], threading.Event()
    for xi in x[:50]:  # live traffic for promote to replay: version 1.0's shadow keeps each sampled request
        assert post(info, "/predictions/good", xi).status_code == 200
    spool = state / "spool" / "good" / "1.0"
    deadline = time.monotonic() + 30
    while len(list(spool.glob("*.req"))) < 50 and time.monotonic() < deadline:
        time.sleep(0.1)

    def client():  # a client of the model during the promote: every answer the current version's
        while not stop.is_set():
            served.append(post(info, "/predictions/good", x[len(served) % 200]).json()["index"])
    t = threading.Thread(target=client)
    t.start()
    try:
        p = cli("promote", mar, "--state", state, "--model", "good", "--samples", "50", "--json", tmp_path / "r.json")
    finally:
        stop.set()
        t.join()
    assert p.returncode == 1, p.stderr
    assert "refused" in p.stderr and "agreement with the reference" in p.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["decision"] == "refused" and r["samples"] == 50 and r["agreement_reference"] == 0.0
    assert [f["kind"] for f in r["failures"]] == ["parity"] * 3  # labels vs reference and current; differences
    assert r["beyond_tolerance"] == 50 + r["burst"] and r["burst"] == 32 and r["agreement_current"] == 0.0
    assert r["live"] == 50  # and 50 live requests that version 1.0's shadow sampled, replayed to both
    assert versions(info, "good") == (["1.0"], "1.0")  # unregistered; the current version stays the default
    assert not list(shadow_server["store"].glob(".promote-*"))
    from modelship.runners import open_runner
    want = open_runner(cnn_onnx).infer({"pixels": x})["logits"].argmax(-1)
    assert len(served) > 10 and served == [int(want[i % 200]) for i in range(len(served))]

    # the right answers, but a batch delay of 200 ms: every request waits it out
    slow = ms.archive(cnn_onnx, tmp_path / "c2", name="good", version="2.0", batch_size=8, max_batch_delay_ms=200)
    p = cli("promote", slow, "--state", state, "--model", "good", "--samples", "20", "--slo-p95-ms", "100",
            "--json", tmp_path / "s.json")
    assert p.returncode == 1
    s = json.loads((tmp_path / "s.json").read_text())
    assert [f["kind"] for f in s["failures"]] == ["slo"] and s["agreement_reference"] == 1.0
    assert s["beyond_tolerance"] == 0
    assert s["p95_ms_candidate"] > 100 > s["p95_ms_current"]
    assert versions(info, "good") == (["1.0"], "1.0")
    record = json.loads((state / "promote.json").read_text())
    assert [h["decision"] for h in record["history"]] == ["refused", "refused"]


def test_a_good_candidate_is_promoted_under_load_and_rolled_back(shadow_server, cnn_onnx, tmp_path):
    info, state, store = shadow_server["info"], shadow_server["state"], shadow_server["store"]
    mar = ms.archive(cnn_onnx, tmp_path / "c", name="good", version="2.0", workers=1, shadow_rate=1.0)
    before = (store / "good.mar").read_bytes()
    outcome = {}

    def promote():
        time.sleep(4)  # inside the load test's window, after its warm-up
        outcome["p"] = cli("promote", mar, "--state", state, "--model", "good", "--samples", "60",
                           "--json", tmp_path / "r.json")
    t = threading.Thread(target=promote)
    t.start()
    load = ms.loadtest(state, "good", users=2, duration="30s", out=tmp_path / "lt")
    t.join()
    assert outcome["p"].returncode == 0, outcome["p"].stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["decision"] == "promoted" and r["agreement_reference"] == r["agreement_current"] == 1.0
    assert r["samples"] == 60 and r["live"] == 60  # the load test's own requests, sampled by the shadow, replayed
    record = json.loads((state / "promote.json").read_text())
    for key in ("samples", "agreement", "max_abs_diff", "p95_ms_current", "p95_ms_candidate", "decision"):
        assert record[key] is not None, key
    print(f"promote under load: {load.requests} requests, {load.failures} failed, {load.mismatches} wrong, p95 "
          f"{load.p95_ms:.1f} ms; promote judged {r['samples']} + {r['live']} live, p95 current "
          f"{r['p95_ms_current']:.1f} ms, candidate {r['p95_ms_candidate']:.1f} ms")
    # before, during and after the switch: every request answered, every answer right
    assert load.requests > 100 and load.failures == 0 and load.checked == load.requests and load.mismatches == 0
    assert versions(info, "good") == (["1.0", "2.0"], "2.0")
    m = scrape(info.shadow_metrics_url)
    assert value(m, "modelship_shadow_sampled_total", model="good", version="2.0") > 60  # clients reached 2.0
    assert zipfile.ZipFile(store / "good.mar").read("MAR-INF/MANIFEST.json").count(b'"2.0"')  # a restart serves 2.0

    p = cli("promote", "--rollback", "--state", state, "--model", "good", check=0)
    assert "version 1.0 is the default (was 2.0)" in p.stdout
    assert versions(info, "good") == (["1.0", "2.0"], "1.0")  # 2.0 kept registered until the next promote
    assert (store / "good.mar").read_bytes() == before
    assert post(info, "/predictions/good", digits(1)[0]).status_code == 200
    assert json.loads((state / "promote.json").read_text())["decision"] == "rolled back"


def test_archive_refuses_a_shadow_it_cannot_judge_with(cnn_onnx, cnn_int8, text_onnx, tmp_path):
    """Each archive option of shadow parity and promote, with the input that makes it refuse."""
    store = tmp_path / "store"
    with pytest.raises(ms.ModelshipError, match="must be FP32"):  # an INT8 reference would judge with INT8 errors
        ms.archive(cnn_onnx, store, shadow_rate=0.5, shadow_reference=cnn_int8.path)
    with pytest.raises(ms.ModelshipError, match="not those of"):  # another model's reference
        ms.archive(cnn_onnx, store, shadow_rate=0.5, shadow_reference=text_onnx.path)
    with pytest.raises(ms.ModelshipError, match="without a shadow rate"):
        ms.archive(cnn_onnx, store, shadow_reference=cnn_onnx.path)
    with pytest.raises(ms.ModelshipError, match="fraction of requests"):
        ms.archive(cnn_onnx, store, shadow_rate=1.5)
    with pytest.raises(ms.ModelshipError, match="version '2 0'"):
        ms.archive(cnn_onnx, store, version="2 0")
    assert not list(store.glob("*.mar"))
    p = cli("archive", cnn_onnx.path, "--out", store, "--shadow-rate", "2")  # typer's own range check
    assert p.returncode != 0 and not list(store.glob("*.mar"))


def pngs(n, offset=0):
    from modelship import data as datasets

    raw, _ = datasets.digits_raw({}, "test")
    return raw[offset:offset + n]


def test_shadow_judges_the_request_as_sent_and_the_answer_as_received(shadow_server):
    """A preprocessing recorded wrong and label names permuted: the model's arithmetic on its own inputs is right in
    both, so only a shadow that preprocesses the raw request the reference's way, and reads the answer the client
    got, sees them."""
    info = shadow_server["info"]
    hdr = {"Authorization": f"Bearer {info.token}", "Content-Type": "image/png"}
    for png in pngs(30):
        for model in ("drift", "misnamed"):
            assert requests.post(info.inference_url + f"/predictions/{model}", data=png, headers=hdr,
                                 timeout=30).status_code == 200
    m = settled(info.shadow_metrics_url, "drift", 30)
    assert value(m, "modelship_shadow_checked_total", model="drift") == 30
    assert value(m, "modelship_shadow_mismatch_total", model="drift") >= 10
    m = settled(info.shadow_metrics_url, "misnamed", 30)
    assert value(m, "modelship_shadow_mismatch_total", model="misnamed", kind="label") == 30  # every shown name
    log = (shadow_server["state"] / "logs" / "model_log.log").read_text()
    assert "for index" in log and "which is" in log


def test_binary_and_grpc_requests_are_sampled_judged_and_spooled(shadow_server, tmp_path):
    import base64
    import subprocess
    import sys
    from pathlib import Path

    from modelship.promotion import spooled
    from modelship.serving.codec import BINARY_HEADER

    info = shadow_server["info"]
    before = scrape(info.shadow_metrics_url)
    base = value(before, "modelship_shadow_checked_total", model="good", version="1.0")
    sampled = value(before, "modelship_shadow_sampled_total", model="good", version="1.0")
    x = digits(5, offset=300)
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 256}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    for xi in x:  # the binary tensor extension over v2 REST, answered in it too
        r = requests.post(info.v2_url + "/v2/models/good/infer", data=head + xi.astype("<f4").tobytes(),
                          headers={"Authorization": f"Bearer {info.token}", BINARY_HEADER: str(len(head))},
                          timeout=30)
        assert r.status_code == 200 and r.headers.get(BINARY_HEADER), r.text[:300]
    bodies = tmp_path / "bodies.json"  # and v2 gRPC (raw PNGs as BYTES)
    bodies.write_text(json.dumps([base64.b64encode(p).decode() for p in pngs(4)]))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("grpc_send_bytes.py")), info.v2_grpc_address,
                        info.token, "good", "image", str(bodies)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout.splitlines()[-1]) == [["OK", ""]] * 4, p.stderr[-2000:]
    m = settled(info.shadow_metrics_url, "good", base + value(before, "modelship_shadow_dropped_total",
                                                                 model="good") + 9)
    assert value(m, "modelship_shadow_sampled_total", model="good", version="1.0") == sampled + 9
    assert value(m, "modelship_shadow_checked_total", model="good", version="1.0") == base + 9
    assert value(m, "modelship_shadow_mismatch_total", model="good") == 0
    # spooled as they came, with what says how to read them: promote replays them to both versions
    newest = spooled(shadow_server["state"], "good", "1.0", 9)
    binary = [(h, b) for h, b in newest if BINARY_HEADER in h]
    assert len(binary) == 9, [h for h, _ in newest]
    for h, body in binary:
        r = requests.post(info.inference_url + "/predictions/good/1.0", data=body, timeout=30,
                          headers={**h, "Authorization": f"Bearer {info.token}"})
        assert r.status_code == 200


def test_a_rate_below_one_samples_its_share(shadow_server):
    """Rate 0.3 over 300 requests: the sampled count within the binomial's 99.99 % bounds (90 ± 31), every sampled
    one judged."""
    info = shadow_server["info"]
    x = digits(300)
    with requests.Session() as http:
        for xi in x:
            assert http.post(info.inference_url + "/predictions/third", json={"inputs": xi.tolist()}, timeout=30,
                             headers={"Authorization": f"Bearer {info.token}"}).status_code == 200
    time.sleep(1)
    m = scrape(info.shadow_metrics_url)
    sampled = value(m, "modelship_shadow_sampled_total", model="third")
    n, p = 300, 0.3
    half = 3.89 * (n * p * (1 - p)) ** 0.5  # 99.99 %: a false failure once in 10,000 runs
    assert n * p - half <= sampled <= n * p + half, sampled
    m = settled(info.shadow_metrics_url, "third", sampled)
    assert value(m, "modelship_shadow_checked_total", model="third") == sampled
    assert value(m, "modelship_shadow_mismatch_total", model="third") == 0
