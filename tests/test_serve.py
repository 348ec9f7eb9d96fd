"""Real TorchServe on 127.0.0.1: served answers equal in-process ones, bad requests get clear 4xx,
auth and management are locked down, and broken or tampered archives are refused at startup."""

import dataclasses
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from conftest import cli, rewrite_mar
from modelship.errors import ArtifactError, MissingDependencyError, ServeError
from modelship import data as datasets
from modelship.runners import open_runner
from modelship.serving import config, lifecycle
from modelship.serving.state import ServerState, bearer
from modelship.serving.archive import archive
from modelship.serving.codec import softmax

pytestmark = pytest.mark.serve


def _post(info, model, body, token=True, raw=False):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {info.token if token is True else token}"
    data = body if raw else json.dumps(body)
    return requests.post(f"{info.inference_url}/predictions/{model}", data=data, headers=headers, timeout=30)


def _sample():
    return {"inputs": np.full((1, 8, 8), 0.5).tolist()}


@pytest.mark.parametrize("model,artifact", [("cnn-torch", "cnn"), ("cnn-onnx", "cnn_onnx"), ("cnn-int8", "cnn_int8")])
def test_served_answers_match_in_process_runner(served, request, model, artifact):
    art = request.getfixturevalue(artifact)
    feed, _ = datasets.load(art.manifest.data, "test", art.manifest.inputs)
    x = feed["pixels"]
    expected = softmax(open_runner(art).infer({"pixels": x})["logits"])
    with requests.Session() as s, ThreadPoolExecutor(8) as pool:  # concurrent: exercises dynamic batching
        s.headers.update({"Authorization": f"Bearer {served.token}", "Content-Type": "application/json"})
        url = f"{served.inference_url}/predictions/{model}"
        replies = list(pool.map(lambda i: s.post(url, data=json.dumps({"inputs": x[i].tolist()}), timeout=30), range(len(x))))
    assert all(r.status_code == 200 for r in replies)
    for r in replies[:5]:  # where the handler's time went, in the W3C Server-Timing header
        timing = dict(part.split(";dur=") for part in r.headers["Server-Timing"].split(", "))
        assert set(timing) == {"decode", "infer", "encode"} and all(float(v) >= 0 for v in timing.values())
        assert float(timing["infer"]) > 0
    got = [r.json() for r in replies]
    assert [g["index"] for g in got] == expected.argmax(1).tolist()  # agreement 1.0 on all 360
    assert [g["label"] for g in got] == [str(i) for i in expected.argmax(1)]
    np.testing.assert_allclose(np.array([g["probabilities"] for g in got]), expected, atol=1e-5)


def test_open_inference_protocol_v2(served, cnn_onnx):
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    r = _post(served, "cnn-onnx", {"id": "req-1", "inputs": [
        {"name": "pixels", "shape": [3, 1, 8, 8], "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["outputs"][0]["name"] == "logits" and body["outputs"][0]["shape"] == [3, 10]
    assert (body["model_name"], body["model_version"]) == ("cnn-onnx", "1.0")  # as served, not the manifest's name
    np.testing.assert_allclose(np.array(body["outputs"][0]["data"]).reshape(3, 10),
                               open_runner(cnn_onnx).infer({"pixels": x})["logits"], atol=1e-5)


def _binary(info, path, head: dict, blobs: list[bytes]):
    """A request in the Open Inference Protocol's binary tensor extension, built by the spec: the JSON header, its
    length in Inference-Header-Content-Length, then each input's raw bytes."""
    h = json.dumps(head).encode()
    return requests.post(f"{info.inference_url}{path}", data=h + b"".join(blobs), timeout=30,
                         headers={"Inference-Header-Content-Length": str(len(h)),
                                  "Authorization": f"Bearer {info.token}"})


def _split(r):
    n = int(r.headers["Inference-Header-Content-Length"])
    return json.loads(r.content[:n]), r.content[n:]


def test_open_inference_protocol_binary_tensors(served, cnn_onnx, text_onnx):
    x = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    want = open_runner(cnn_onnx).infer({"pixels": x})["logits"]
    tensor = {"name": "pixels", "shape": [3, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
    # binary in, binary out (what Triton's client sends by default: binary_data_output)
    r = _binary(served, "/v2/models/cnn-onnx/infer", {"inputs": [tensor], "parameters": {"binary_data_output": True}},
                [x.tobytes()])
    assert r.status_code == 200, r.text
    head, rest = _split(r)
    (out,) = head["outputs"]
    assert (out["name"], out["shape"], out["datatype"]) == ("logits", [3, 10], "FP32") and "data" not in out
    assert out["parameters"]["binary_data_size"] == len(rest) == 3 * 10 * 4 and head["model_name"] == "cnn-onnx"
    np.testing.assert_allclose(np.frombuffer(rest, "<f4").reshape(3, 10), want, atol=1e-5)
    # binary in, JSON out when the client does not ask for bytes
    r = _binary(served, "/v2/models/cnn-onnx/infer", {"inputs": [tensor]}, [x.tobytes()])
    assert "Inference-Header-Content-Length" not in r.headers
    np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(3, 10), want, atol=1e-5)
    # raw text as BYTES elements (4-byte little-endian length, then the UTF-8 bytes), one output asked as bytes
    texts = ["Worked well, no side effects.", "Made me dizzy and sick."]
    blob = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)
    r = _binary(served, "/v2/models/text-onnx/infer",
                {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                             "parameters": {"binary_data_size": len(blob)}}],
                 "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}, [blob])
    assert r.status_code == 200, r.text
    head, rest = _split(r)
    json_texts = requests.post(f"{served.inference_url}/predictions/text-onnx", json={"inputs": texts}, timeout=30,
                               headers={"Authorization": f"Bearer {served.token}"}).json()["predictions"]
    got = np.frombuffer(rest, "<f4").reshape(2, -1)
    assert [int(g.argmax()) for g in got] == [p["index"] for p in json_texts]
    # malformed: a header length past the body, sizes that do not add up -> 400 saying what is wrong
    bad = _binary(served, "/v2/models/cnn-onnx/infer", {"inputs": [{**tensor, "parameters": {"binary_data_size": 9999}}]},
                  [x.tobytes()])
    assert bad.status_code == 400 and "binary_data_size" in bad.json()["message"]
    bad = _binary(served, "/v2/models/cnn-onnx/infer", {"inputs": [tensor]}, [x.tobytes() + b"xx"])
    assert bad.status_code == 400 and "belong to no input" in bad.json()["message"]
    h = json.dumps({"inputs": [tensor]}).encode()
    bad = requests.post(f"{served.inference_url}/v2/models/cnn-onnx/infer", data=h + x.tobytes(), timeout=30,
                        headers={"Inference-Header-Content-Length": str(len(h) + x.nbytes + 1),
                                 "Authorization": f"Bearer {served.token}"})
    assert bad.status_code == 400 and "Inference-Header-Content-Length" in bad.json()["message"]


def test_fault_in_one_request_of_a_batch_fails_only_that_request(served, text_onnx):
    """Eight concurrent requests share one dynamic batch; one carries a token id beyond the vocabulary, which
    makes ONNX Runtime's Gather raise inside the batched call. Only that request gets its 500."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 400, size=(8, 16))
    ids[5, 3] = 10**6  # out of the embedding table: a fault inside inference, not a malformed request
    mask = np.ones_like(ids)
    expected = open_runner(text_onnx).infer({"input_ids": np.delete(ids, 5, 0), "attention_mask": mask[:7]})["logits"]
    body = lambda i: {"inputs": {"input_ids": ids[i].tolist(), "attention_mask": mask[i].tolist()}}  # noqa: E731
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: _post(served, "text-onnx", body(i)), range(8)))
    assert [r.status_code for r in replies] == [200] * 5 + [500] + [200] * 2, [r.text[:200] for r in replies]
    message = replies[5].json()["message"]
    error_id = re.fullmatch(r"internal error \(error id ([0-9a-f]{16})\); the server log holds its details", message)
    assert error_id, message  # the client learns an id, not the exception's type or text
    got = np.array([r.json()["probabilities"] for i, r in enumerate(replies) if i != 5])
    np.testing.assert_allclose(got, softmax(expected), atol=1e-5)
    log = open(os.path.join(served.state, "logs", "model_log.log")).read()
    assert re.search(r"a batch of [2-8] requests failed", log)  # it really shared a batch, answered one by one
    logged = log[log.index(f"error id {error_id.group(1)}"):]
    assert "Traceback" in logged[:3000] and "Gather" in logged[:3000]  # the id leads to the traceback


def test_simple_json_batch_of_samples(served):
    r = _post(served, "cnn-onnx", {"inputs": np.zeros((4, 1, 8, 8)).tolist()})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4


BAD = {
    "not_json": (b"{not json", "body is not JSON"),
    "no_inputs_key": ({"data": [1]}, "'inputs' key"),
    "missing_input": ({"inputs": {}}, "missing input(s) pixels"),
    "extra_input": ({"inputs": {"pixels": np.zeros((1, 8, 8)).tolist(), "mask": [1]}}, "unexpected input(s) mask"),
    "wrong_shape": ({"inputs": np.zeros((1, 8, 7)).tolist()}, "expected [1, 8, 8]"),
    "wrong_rank": ({"inputs": [1.0, 2.0]}, "expected one sample of shape [1, 8, 8]"),
    "wrong_dtype_v2": ({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [0] * 64}]},
                       "datatype 'INT64', expected 'FP32'"),
    "non_numeric": ({"inputs": [[["a"] * 8] * 8]}, "non-numeric"),
    "ragged": ({"inputs": [[[0.1] * 8] * 7 + [[0.1] * 3]]}, "ragged"),
    "nan": (b'{"inputs": [[[NaN, 0, 0, 0, 0, 0, 0, 0]' + b', [0, 0, 0, 0, 0, 0, 0, 0]' * 7 + b']]}', "NaN or infinite"),
    "too_many_items": ({"inputs": np.zeros((65, 1, 8, 8)).tolist()}, "at most 64"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_400_and_server_keeps_serving(served, case):
    body, message = BAD[case]
    r = _post(served, "cnn-onnx", body, raw=isinstance(body, bytes))
    assert r.status_code == 400, r.text
    assert r.json()["code"] == 400 and message in r.json()["message"], r.json()
    assert _post(served, "cnn-onnx", _sample()).status_code == 200


def test_oversize_body_gets_413(served):
    big = b'{"inputs": [' + b"0.5," * (served.max_request_bytes // 4 + 10) + b"0.5]}"
    r = _post(served, "cnn-onnx", big, raw=True)
    assert r.status_code == 413
    assert _post(served, "cnn-onnx", _sample()).status_code == 200


def _refused(r):
    return r.status_code in (400, 401) and "InvalidKeyException" in r.text


def test_token_required(served):
    """Inference, /ping and management each refuse a missing and a wrong token (and the other API's token)."""
    for token in (False, "wrong-token", served.management_token):
        r = _post(served, "cnn-onnx", _sample(), token=token)
        assert _refused(r) and "Token Authorization failed" in r.text
    for token in (None, "wrong-token"):
        hdr = {"Authorization": f"Bearer {token}"} if token else {}
        assert _refused(requests.get(f"{served.inference_url}/ping", headers=hdr, timeout=10))
        assert _refused(requests.get(f"{served.management_url}/models", headers=hdr, timeout=10))
    assert _refused(requests.get(f"{served.management_url}/models", timeout=10,
                                 headers={"Authorization": f"Bearer {served.token}"}))
    assert requests.get(f"{served.inference_url}/ping", timeout=10,
                        headers={"Authorization": f"Bearer {served.token}"}).status_code == 200
    assert requests.get(f"{served.management_url}/models", timeout=10,
                        headers={"Authorization": f"Bearer {served.management_token}"}).status_code == 200
    assert _post(served, "cnn-onnx", _sample()).status_code == 200


def test_state_folder_and_key_files_are_owner_only(served):
    import stat

    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(served.state) == 0o700
    assert mode(os.path.join(served.state, "serve.json")) == 0o600
    assert mode(os.path.join(served.state, "key_file.json")) == 0o600


def test_rotate_token(served, work, tmp_path):
    old = dataclasses.replace(served)
    cli("serve", "--rotate-token", "--token-type", "both", "--state", work / "state", "--json", tmp_path / "r.json",
        check=0)
    new = ServerState.load(work / "state")
    served.token, served.management_token = new.token, new.management_token  # the other tests share the fixture
    assert new.token != old.token and new.management_token != old.management_token
    assert "token" not in json.loads((tmp_path / "r.json").read_text())  # --json never holds a secret
    assert _refused(_post(old, "cnn-onnx", _sample()))  # clients holding the old token are refused ...
    assert _post(new, "cnn-onnx", _sample()).status_code == 200  # ... and re-read serve.json to carry on
    live = f"{served.v2_url}/v2/health/live"  # the Open Inference Protocol front follows the rotation
    assert requests.get(live, headers=bearer(old.token), timeout=10).status_code == 401
    assert requests.get(live, headers=bearer(new.token), timeout=10).status_code == 200
    assert _refused(requests.get(f"{served.management_url}/models", timeout=10,
                                 headers={"Authorization": f"Bearer {old.management_token}"}))
    assert oct(os.stat(os.path.join(served.state, "serve.json")).st_mode & 0o777) == "0o600"


def test_state_inside_the_store_is_refused(tmp_path, cnn_onnx):
    archive(cnn_onnx, tmp_path / "store", name="cnn")
    p = cli("serve", tmp_path / "store", "--state", tmp_path / "store" / "state", "--detach")
    assert p.returncode != 0 and "inside the model store" in p.stderr


def test_management_registration_refused(served):
    hdr = {"Authorization": f"Bearer {served.management_token}"}
    r = requests.post(f"{served.management_url}/models", params={"url": "cnn-onnx.mar"}, headers=hdr, timeout=10)
    assert r.status_code == 405
    r = requests.delete(f"{served.management_url}/models/cnn-onnx", headers=hdr, timeout=10)
    assert r.status_code == 405
    assert _post(served, "cnn-onnx", _sample()).status_code == 200


def test_every_listening_socket_is_loopback_and_metrics_exported(served):
    """Read the real sockets of the server's process tree (frontend JVM and Python workers), not our own URLs."""
    import psutil

    root = psutil.Process(served.pid)
    listening = [c for p in [root, *root.children(recursive=True)]
                 for c in getattr(p, "net_connections", p.connections)(kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port for c in listening}
    base = int(served.inference_url.rsplit(":", 1)[1])
    # inference, management, metrics, gRPC x2, modelship's metrics, Open Inference Protocol REST and gRPC: all found
    assert set(range(base, base + config.PORTS)) <= ports
    assert all(c.laddr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for c in listening), listening
    before = _requests_counted(served, "cnn-onnx")
    sent = 7
    assert all(_post(served, "cnn-onnx", _sample()).status_code == 200 for _ in range(sent))
    assert _requests_counted(served, "cnn-onnx") - before == sent  # TorchServe's own counter, request by request
    cfg = (open(os.path.join(served.state, "config.properties")).read())
    assert "enable_model_api=false" in cfg and "disable_token_authorization=false" in cfg


def _requests_counted(info, model) -> float:
    """TorchServe's ts_inference_requests_total for ``model``, read from its Prometheus endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{info.metrics_url}/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "ts_inference_requests_total" and s.labels.get("model_name") == model]
    assert samples, f"no ts_inference_requests_total for {model} in:\n{text[:2000]}"
    return sum(s.value for s in samples)


def test_predict_cli(served, tmp_path, work):
    np.save(tmp_path / "x.npy", np.full((1, 8, 8), 0.5, np.float32))
    p = cli("predict", tmp_path / "x.npy", "--state", work / "state", "--model", "cnn-onnx", "--json",
            tmp_path / "r.json", check=0)
    assert json.loads((tmp_path / "r.json").read_text())["label"] in [str(i) for i in range(10)]
    (tmp_path / "bad.json").write_text('{"inputs": [1, 2]}')
    p = cli("predict", tmp_path / "bad.json", "--state", work / "state", "--model", "cnn-onnx")
    assert p.returncode != 0 and "HTTP 400" in p.stderr


# ---- startup failures: each explained in one line, quickly ----------------------------------------

def _tampered_mar(src_mar, dst):
    rewrite_mar(src_mar, dst, edit=lambda name, data: data[:-1] + bytes([data[-1] ^ 1]) if name == "model.onnx" else data)


def test_tampered_model_file_does_not_load(tmp_path, cnn_onnx):
    store = tmp_path / "store"
    mar = archive(cnn_onnx, tmp_path / "good", name="cnn")
    store.mkdir()
    _tampered_mar(mar, store / "cnn.mar")
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        lifecycle.start(store, tmp_path / "state", config.ServeConfig(port=config.free_port()))


def test_handler_refuses_tampered_file_inside_torchserve(tmp_path, cnn_onnx, monkeypatch):
    """Even past the CLI's own check, the worker refuses to load it and startup fails fast."""
    from modelship.serving import config, lifecycle

    store = tmp_path / "store"
    store.mkdir()
    _tampered_mar(archive(cnn_onnx, tmp_path / "good", name="cnn"), store / "cnn.mar")
    monkeypatch.setattr(lifecycle, "read_mar", lambda p: type("M", (), {"name": "cnn"})())
    with pytest.raises(ServeError, match=r"refusing to load .*member 'model\.onnx' sha256 does not match"):
        lifecycle.start(store, tmp_path / "state", config.ServeConfig(port=config.free_port(), startup_timeout_s=60))


def test_broken_mar_and_empty_store(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    p = cli("serve", store, "--state", tmp_path / "s", "--detach")
    assert p.returncode != 0 and "no .mar files" in p.stderr
    (store / "x.mar").write_bytes(b"garbage")
    p = cli("serve", store, "--state", tmp_path / "s", "--detach")
    assert p.returncode != 0 and "not a zip archive" in p.stderr and "Traceback" not in p.stderr


def test_port_taken(tmp_path, cnn_onnx):
    import socket

    archive(cnn_onnx, tmp_path / "store", name="cnn")
    port = config.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port + 1))
        s.listen()
        p = cli("serve", tmp_path / "store", "--state", tmp_path / "s", "--detach", "--port", port)
    assert p.returncode != 0 and f"port {port + 1} on 127.0.0.1 is already in use" in p.stderr


def test_java_missing(tmp_path, monkeypatch, cnn_onnx):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependencyError, match="Java not found"):
        lifecycle.start(tmp_path, tmp_path / "s")
    java = tmp_path / "java"  # a Java 11, as the README says: TorchServe 0.12 needs 17
    java.write_text('#!/bin/sh\necho \'openjdk version "11.0.22" 2024-01-16\' >&2\n')
    java.chmod(0o755)
    with pytest.raises(MissingDependencyError, match="Java 11 found; TorchServe needs Java 17"):
        lifecycle.start(tmp_path, tmp_path / "s")


def test_archive_refuses_unpassed_parity(tmp_path, cnn_onnx):
    from modelship.manifest import load_artifact, write_artifact

    shutil.copytree(cnn_onnx.path, tmp_path / "a")
    art = load_artifact(tmp_path / "a")
    art.manifest.parity = {**art.manifest.parity, "passed": False}
    write_artifact(art.path, art.manifest)
    with pytest.raises(ArtifactError, match="only artifacts that passed parity"):
        archive(load_artifact(tmp_path / "a"), tmp_path / "store")
    assert archive(load_artifact(tmp_path / "a"), tmp_path / "store", force=True).is_file()


def test_restart_after_a_failed_start(tmp_path, cnn_onnx, monkeypatch):
    """A failed start leaves its logs behind; the next start in the same state dir must not trip on them."""
    from modelship.serving import config, lifecycle

    store = tmp_path / "store"
    store.mkdir()
    _tampered_mar(archive(cnn_onnx, tmp_path / "good", name="cnn"), store / "cnn.mar")
    with monkeypatch.context() as m:  # get past the CLI's own check so the worker refuses the file
        m.setattr(lifecycle, "read_mar", lambda p: type("M", (), {"name": "cnn"})())
        with pytest.raises(ServeError):
            lifecycle.start(store, tmp_path / "state", config.ServeConfig(port=config.free_port(), startup_timeout_s=60))
    archive(cnn_onnx, store, name="cnn")  # a good archive in its place
    info = lifecycle.start(store, tmp_path / "state", config.ServeConfig(port=config.free_port()))
    try:
        assert _post(info, "cnn", _sample()).status_code == 200
        assert (tmp_path / "state" / "logs.prev").is_dir()
    finally:
        lifecycle.stop(tmp_path / "state")


def test_an_archive_from_another_modelship_version_is_refused_by_name(tmp_path, cnn_onnx):
    """Its handler imports that version's modules: refused before TorchServe starts, with what to do, instead of a
    worker that dies at load."""
    from modelship.integrity import seal_archive

    good = archive(cnn_onnx, tmp_path / "good", name="cnn")
    (tmp_path / "store").mkdir()
    old = tmp_path / "store" / "cnn.mar"
    rewrite_mar(good, old, edit=lambda n, d: d + b"\n# an older handler\n" if n == "handler.py" else d,
                drop="modelship-integrity.json")
    seal_archive(old)  # intact as that version wrote it: only the handler differs from this version's
    p = cli("serve", tmp_path / "store", "--state", tmp_path / "s", "--detach", "--port", config.free_port())
    assert p.returncode == 2 and "archived by another modelship version" in p.stderr
    assert "archive the artifact again" in p.stderr and not (tmp_path / "s").exists()
