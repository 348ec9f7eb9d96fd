"""The Open Inference Protocol v2 of a served model, called with the clients users already have: Triton's
(tritonclient[http], tritonclient[grpc]) and KServe's InferenceRESTClient, all from PyPI. Health, metadata, ready
and infer (JSON and the binary tensor extension) for a tensor request, a raw image (BYTES) and raw texts (BYTES);
every answer equal to the in-process runner's; the token on every path; bad requests answered in the protocol's
``{"error": ...}`` form while the server keeps serving."""

import base64
import json

import numpy as np
import pytest
import requests

import hf_models
from modelship import data as datasets
from modelship.preprocess import open_preprocessor
from modelship.runners import open_runner
from modelship.serving.codec import Codec

pytestmark = pytest.mark.serve

ATOL = 1e-5  # FP32 served against FP32 in-process: the same runner, the same numbers


def _token(info) -> dict:
    return {"Authorization": f"Bearer {info.token}"}


def _in_process(art, body) -> np.ndarray:
    """What the artifact answers in this process for a request body (decoded by the server's own codec)."""
    feed = Codec(art.manifest, prep=open_preprocessor(art)).decode(json.dumps(body)).feed
    return open_runner(art).infer(feed)[art.manifest.outputs[0].name]


@pytest.fixture(scope="module")
def images():
    raw, _ = datasets.digits_raw({}, "test")
    return raw[:3]


@pytest.fixture(scope="module")
def texts():
    return hf_models.reviews(3)[0][:3]


def test_triton_http_client(served, cnn_onnx, text_onnx, images, texts):
    import tritonclient.http as triton

    c = triton.InferenceServerClient(served.v2_url.removeprefix("http://"))
    h = _token(served)  # the client adds its own headers to the dict it is given: a fresh copy per call
    assert c.is_server_live(headers=dict(h)) and c.is_server_ready(headers=dict(h))
    assert not c.is_server_live()  # no token: refused (401), which the client reports as not live
    assert c.get_server_metadata(headers=dict(h))["name"] == "modelship"
    for name in ("cnn-onnx", "text-onnx"):
        assert c.is_model_ready(name, headers=dict(h))
        assert c.is_model_ready(name, "1.0", headers=dict(h))
        assert not c.is_model_ready(name, "9.9", headers=dict(h))
    meta = c.get_model_metadata("cnn-onnx", headers=dict(h))
    assert meta["versions"] == ["1.0"]
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]  # raw input: an encoded image
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert c.get_model_metadata("text-onnx", headers=dict(h))["inputs"] == [
        {"name": "text", "datatype": "BYTES", "shape": [-1]}]

    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    want = _in_process(cnn_onnx, {"inputs": [{"name": "pixels", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                               "data": x.ravel().tolist()}]})
    for binary_in in (True, False):
        for binary_out in (True, False):
            t = triton.InferInput("pixels", [2, 1, 8, 8], "FP32")
            t.set_data_from_numpy(x, binary_data=binary_in)
            r = c.infer("cnn-onnx", [t], outputs=[triton.InferRequestedOutput("logits", binary_data=binary_out)],
                        headers=dict(h), request_id="r-1")
            answer = r.get_response()
            assert (answer["model_name"], answer["model_version"], answer["id"]) == ("cnn-onnx", "1.0", "r-1")
            assert ("binary_data_size" in (answer["outputs"][0].get("parameters") or {})) == binary_out
            np.testing.assert_allclose(r.as_numpy("logits"), want, atol=ATOL)
    r = c.infer("cnn-onnx", [t], model_version="1.0", headers=dict(h))  # the versioned path
    assert r.get_response()["model_version"] == "1.0"

    t = triton.InferInput("image", [3], "BYTES")  # raw PNG files, in the binary extension
    t.set_data_from_numpy(np.array(images, dtype=object))
    want = _in_process(cnn_onnx, {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES",
                                               "data": [base64.b64encode(b).decode() for b in images]}]})
    np.testing.assert_allclose(c.infer("cnn-onnx", [t], headers=dict(h)).as_numpy("logits"), want, atol=ATOL)

    want = _in_process(text_onnx, {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]})
    for binary_in in (True, False):
        t = triton.InferInput("text", [3], "BYTES")
        t.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary_in)
        np.testing.assert_allclose(c.infer("text-onnx", [t], headers=dict(h)).as_numpy("logits"), want, atol=ATOL)


def test_triton_grpc_client(served, cnn_onnx, text_onnx, texts):
    """tritonclient[grpc] (in a process of its own: tests/oip_grpc_client.py) on the v2 gRPC service."""
    import subprocess
    import sys
    from pathlib import Path

    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    script = Path(__file__).with_name("oip_grpc_client.py")
    p = subprocess.run([sys.executable, str(script), served.v2_grpc_address, served.token, json.dumps(texts),
                        json.dumps(x.tolist())], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["live"] and got["ready"] and got["model_ready"] and got["ready_after"]
    assert got["metadata"]["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]  # int64s
    want = _in_process(cnn_onnx, {"inputs": [{"name": "pixels", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                               "data": x.ravel().tolist()}]})
    np.testing.assert_allclose(got["pixels"], want, atol=ATOL)
    assert got["served"] == ["cnn-onnx", "1.0"]
    want = _in_process(text_onnx, {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]})
    np.testing.assert_allclose(got["texts"], want, atol=ATOL)
    assert len(got["refused"]) == 8 and all("UNAUTHENTICATED" in v for v in got["refused"].values()), got["refused"]
    assert "INVALID_ARGUMENT" in got["bad"] and "shape [2, 3], expected [batch, 1, 8, 8]" in got["bad"]
    v = got["versions"]
    assert v["ready 1.0"] is True and v["metadata 1.0"] == "cnn-onnx", v
    assert v["ready 9.9"] is False or "NOT_FOUND" in str(v["ready 9.9"]), v
    assert "NOT_FOUND" in v["metadata 9.9"] or "not found" in v["metadata 9.9"].lower(), v
    assert "UNIMPLEMENTED" in v["load"] and "UNIMPLEMENTED" in v["unload"] and "modelship promote" in v["load"], v
    assert "RESOURCE_EXHAUSTED" in got["big"] and got["ready_at_end"], got["big"]


def test_bodies_over_the_cap_are_refused_before_being_read(served):
    """v2 REST under --max-request-bytes (1 MiB here), as /predictions is: 413 in the protocol's error form, for a
    declared length and for a chunked body that never says its length; the front answers the next request."""
    url = served.v2_url + "/v2/models/cnn-onnx/infer"
    big = json.dumps({"inputs": [{"name": "pixels", "shape": [5000, 1, 8, 8], "datatype": "FP32",
                                  "data": [0.0] * 320000}]}).encode()
    assert len(big) > 1 << 20
    r = requests.post(url, data=big, headers={**_token(served), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "limit of 1048576 bytes" in r.json()["error"]

    def chunks():
        for k in range(0, len(big), 64 << 10):
            yield big[k:k + (64 << 10)]
    r = requests.post(url, data=chunks(), headers={**_token(served), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "at least" in r.json()["error"]
    ok = requests.post(url, json={"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                              "data": [0.0] * 64}]}, headers=_token(served), timeout=30)
    assert ok.status_code == 200


KSERVE_CLIENT = """
import asyncio, json, sys
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

async def main(base, token, texts):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
    h = {"Authorization": f"Bearer {token}"}
    try:
        live = await client.is_server_live(base, headers=h)
        ready = await client.is_model_ready(base, "text-onnx", headers=h)
        answer = await client.infer(base, InferRequest("text-onnx", [InferInput("text", [len(texts)], "BYTES",
                                                                                 data=texts)]),
                                    model_name="text-onnx", headers=h)
    finally:
        await client.close()
    print(json.dumps({"live": live, "ready": ready, "model_name": answer.model_name,
                      "logits": answer.outputs[0].as_numpy().tolist()}))

asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
"""


def test_kserve_rest_client(served, text_onnx, texts):
    """KServe's own client (in a process of its own: its protobuf package 'inference' and tritonclient.grpc's
    cannot both be loaded in one process)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", KSERVE_CLIENT, served.v2_url, served.token, json.dumps(texts)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["live"] and got["ready"] and got["model_name"] == "text-onnx"
    want = _in_process(text_onnx, {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]})
    np.testing.assert_allclose(got["logits"], want, atol=ATOL)


V2_PATHS = [("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2/models/cnn-onnx"),
            ("GET", "/v2/models/cnn-onnx/ready"), ("GET", "/v2/models/cnn-onnx/versions/1.0"),
            ("POST", "/v2/models/cnn-onnx/infer"), ("POST", "/v2/models/cnn-onnx/versions/1.0/infer"),
            ("GET", "/v2/models/no-such-model"), ("GET", "/metrics"), ("GET", "/docs")]


def test_token_on_every_v2_path(served):
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]})
    for method, path in V2_PATHS:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": served.token}):
            r = requests.request(method, served.v2_url + path, headers=headers, data=body, timeout=10)
            assert r.status_code == 401 and "token" in r.json()["error"], (method, path, headers, r.text)
    r = requests.post(served.v2_url + "/v2/models/cnn-onnx/infer", headers=_token(served), data=body, timeout=30)
    assert r.status_code == 200 and r.json()["model_name"] == "cnn-onnx"


@pytest.mark.parametrize("path,body,code,message", [
    ("/v2/models/cnn-onnx/infer", b"{not json", 400, "not JSON"),
    ("/v2/models/cnn-onnx/infer", {"model_name": "text-onnx", "inputs": [{"name": "pixels", "shape": [1, 1, 8, 8],
                                   "datatype": "FP32", "data": [0.5] * 64}]}, 400, "sent to cnn-onnx"),
    ("/v2/models/cnn-onnx/infer", {"inputs": [{"name": "pixels", "shape": [1, 3], "datatype": "FP32",
                                               "data": [0, 0, 0]}]}, 400, "expected [batch, 1, 8, 8]"),
    ("/v2/models/cnn-onnx/infer", {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "INT64",
                                               "data": [0] * 64}]}, 400, "expected 'FP32'"),
    ("/v2/models/cnn-onnx/infer", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                               "data": ["bm90IGFuIGltYWdl"]}]}, 400, "PNG"),
    ("/v2/models/text-onnx/infer", {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES",
                                                "data": ["one text"]}]}, 400, "shape [2] for 1 strings"),
    ("/v2/models/no-such-model/infer", {"inputs": []}, 404, "no-such-model"),
    ("/v2/models/cnn-onnx/versions/9.9/infer", {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8],
                                                            "datatype": "FP32", "data": [0.5] * 64}]}, 404, "9.9"),
    ("/v2/models/cnn-onnx/versions/9.9", None, 404, "9.9"),
    ("/v2/models/cnn-onnx/versions/9.9/ready", None, 404, "9.9"),
    ("/v2/nothing/here", None, 404, "/v2/nothing/here"),
])
def test_bad_requests_get_the_protocols_error_form(served, path, body, code, message):
    send = body if body is None or isinstance(body, bytes) else json.dumps(body)
    r = requests.request("GET" if body is None else "POST", served.v2_url + path, data=send,
                         headers={**_token(served), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == code, r.text
    assert set(r.json()) == {"error"} and message in r.json()["error"], r.text
    ok = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
    assert requests.post(served.v2_url + "/v2/models/cnn-onnx/infer", data=json.dumps(ok), headers=_token(served),
                         timeout=30).status_code == 200  # and it keeps serving


def test_loadtest_drives_the_v2_path_and_judges_every_answer(served, tmp_path):
    import modelship as ms

    for model in ("text-onnx", "cnn-onnx"):  # raw texts; encoded images (as BYTES base64)
        res = ms.loadtest(served.state, model, users=1, duration="4s", warmup="1s", protocol="v2",
                          out=tmp_path / model)
        r = res.record
        assert res.passed and r["protocol"] == "v2" and r["spec"]["path"] == f"/v2/models/{model}/infer", r
        assert r["checked"] == r["requests"] > 0 and r["failures"] == 0 and r["mismatches"] == 0, r
        assert r["served_on"]  # the machine's facts came back through the front


def test_a_v2_answer_is_judged_as_a_predictions_answer():
    """The verdict on an Open Inference Protocol answer: the same label and tolerance checks, so a wrong label or
    a logit beyond the tolerance fails it."""
    from modelship.comparison import check, golden_of

    logits = np.array([[0.1, 2.0, -1.0]], np.float32)
    golden = golden_of("classification", ["logits"], {"logits": logits})
    spec = {"task": "classification", "outputs": ["logits"],
            "tolerance": {"max_abs_diff": 1e-3, "rtol": 0.0, "min_top1_agreement": 1.0, "max_accuracy_drop": None,
                          "max_prob_diff": 1e-3}}

    def answer(values):
        return {"model_name": "m", "outputs": [{"name": "logits", "shape": [1, 3], "datatype": "FP32",
                                                "data": list(values)}]}
    assert check(spec, golden, 0, answer(logits[0])).ok
    shifted = check(spec, golden, 0, answer([2.1, 0.1, -1.0]))
    assert not shifted.ok and shifted.label_ok is False
    off = check(spec, golden, 0, answer(logits[0] + [0, 0, 0.1]))
    assert not off.ok and off.label_ok is True and not off.within


def test_metadata_of_a_tensor_model(cnn_onnx):
    """Without preprocessing a client sends the tensors: the metadata lists them (named dims as -1)."""
    from dataclasses import replace

    from modelship.serving.oip.models import metadata

    inputs, outputs = metadata(replace(cnn_onnx.manifest, preprocess=None))
    assert inputs == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert outputs == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]


def test_docs_triton_block_runs_as_written(served, cnn_int8, capsys, monkeypatch, tmp_path):
    """The docs' Triton client block (docs/how-to/serving.md), against this suite's server (its state folder in
    place of the quick start's runs/x/state, which serves cnn-int8 too)."""
    from test_docs import marked_block

    code = marked_block("triton-client")
    assert code.startswith("# Triton's client") and code.count("runs/x/state") == 2
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code.replace("runs/x/state", served.state), "docs/how-to/serving.md", "exec"), scope)
    want = _in_process(cnn_int8, {"inputs": [{"name": "pixels", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                               "data": [0.5] * 128}]})
    np.testing.assert_allclose(scope["answer"].as_numpy("logits"), want, atol=ATOL)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "[{'name': 'logits', 'datatype': 'FP32', 'shape': [-1, 10]}]"
    assert printed[1] == f"1.0 {want.argmax(1)}"


def test_a_front_that_cannot_start_fails_the_start_and_leaves_nothing_running(tmp_path, cnn_onnx, monkeypatch):
    """The v2 front runs beside TorchServe in its process group: when it dies at start, `serve` says so in one line
    (not a 120 s wait) and stops TorchServe too."""
    import psutil

    from modelship.errors import ServeError
    from modelship.serving import config, lifecycle
    from modelship.serving.archive import archive
    from modelship.serving.state import ServerState

    archive(cnn_onnx, tmp_path / "store", name="cnn")
    wrong = config.front_args
    monkeypatch.setattr(lifecycle, "front_args", lambda *a: wrong(*a) + ["--grpc-port", "not-a-port"])
    cfg = config.ServeConfig(port=config.free_port(), startup_timeout_s=90)
    with pytest.raises(ServeError, match=r"the Open Inference Protocol front failed: .*--grpc-port: invalid int value"):
        lifecycle.start(tmp_path / "store", tmp_path / "state", cfg)
    info = ServerState.load(tmp_path / "state", running=False)
    assert info.status == "stopped" and not psutil.pid_exists(info.pid) or \
        psutil.Process(info.pid).status() == psutil.STATUS_ZOMBIE
    assert all(config.port_free(p) for p in range(cfg.port, cfg.port + config.PORTS))
