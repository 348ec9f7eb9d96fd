"""HTTP fuzzing of the real TorchServe with hypothesis: random and malformed bodies, headers, methods
and paths on every route TorchServe publishes (its OPTIONS / API description) on the inference and
management ports, plus the metrics port and the Open Inference Protocol's port. No 5xx may come back except the documented ones, every 200
answer must equal the PyTorch reference, and /ping is healthy afterwards.

Examples per test: MODELSHIP_FUZZ_EXAMPLES (default 150, derandomized so CI is reproducible);
MODELSHIP_FUZZ_SEED=random explores new cases on every run (see README, "Fuzzing")."""

import http.client
import json
import os
import string
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modelship.runners.torch_runner import TorchRunner
from modelship.serving.codec import softmax

pytestmark = pytest.mark.serve

FUZZ = settings(max_examples=int(os.environ.get("MODELSHIP_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                derandomize=os.environ.get("MODELSHIP_FUZZ_SEED") != "random",
                suppress_health_check=list(HealthCheck))
DOCUMENTED_5XX = {507}  # "Worker died": only when a worker process dies mid-request (see README); never expected here
TRIED = {"cases": 0}
MODELS = ("cnn-torch", "cnn-onnx")  # fp32 variants: answers must match the reference within 1e-4


def send(url: str, method: str, path: str, headers: dict, body: bytes | None = None):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()
        TRIED["cases"] += 1


def check_status(status: int, method: str, path: str, data: bytes):
    assert status < 500 or status in DOCUMENTED_5XX, f"{method} {path} -> {status}: {data[:300]!r}"


@pytest.fixture(scope="module")
def api(served, cnn):
    """Route templates from TorchServe's published API description (OPTIONS /) on each port."""
    routes = {}
    for kind, url, token in (("inference", served.inference_url, served.token),
                             ("management", served.management_url, served.management_token)):
        status, data = send(url, "OPTIONS", "/", {"Authorization": f"Bearer {token}"})
        assert status == 200
        paths = json.loads(data)["paths"]
        routes[kind] = [(p, m.upper()) for p, ms in paths.items() for m in ms]
    inference = {p for p, _ in routes["inference"]}
    assert {"/ping", "/predictions/{model_name}", "/v2/models/{model_name}/infer"} <= inference
    assert {"/models", "/models/{model_name}"} <= {p for p, _ in routes["management"]}
    routes["inference"] += [("/explanations/{model_name}", "POST")]  # served but not in the description
    routes["management"] += [("/token", "POST")]
    routes["metrics"] = [("/metrics", "GET")]
    routes["v2"] = [("/v2", "GET"), ("/v2/health/live", "GET"), ("/v2/health/ready", "GET"), ("/v2/models", "GET"),
                    ("/v2/models/{model_name}", "GET"), ("/v2/models/{model_name}/ready", "GET"),
                    ("/v2/models/{model_name}/versions/{model_version}", "GET"),
                    ("/v2/models/{model_name}/versions/{model_version}/ready", "GET"),
                    ("/v2/models/{model_name}/infer", "POST"),
                    ("/v2/models/{model_name}/versions/{model_version}/infer", "POST")]  # the Open Inference Protocol
    yield {"routes": routes, "reference": TorchRunner(cnn), "info": served}
    print(f"\nfuzz cases sent: {TRIED['cases']}")


SEGMENT = st.one_of(st.sampled_from(["cnn-onnx", "cnn-torch", "cnn-int8", "nope", "..", "%2e%2e", "%00", "1.0", ""]),
                    st.text(max_size=30).map(lambda s: quote(s, safe="")))
HEADER_TEXT = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=60)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids, max_size=6),
                    max_leaves=40)
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def near_valid(draw):
    """Bodies close to the contract: (bytes, the pixels array when the body is a well-formed request)."""
    kind = draw(st.sampled_from(["simple", "batch", "v2", "shape"]))
    if kind == "shape":  # wrong shapes, ranks and sizes
        shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=4))
        arr = np.asarray(draw(st.lists(FLOAT32, min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))),
                         dtype=np.float32).reshape(shape)
        return json.dumps({"inputs": arr.tolist()}).encode(), None
    n = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1.0, 1e3, 1e30]))
    x = np.asarray(draw(st.lists(FLOAT32.map(lambda v: v % 17.0), min_size=n * 64, max_size=n * 64)),
                   dtype=np.float32).reshape(n, 1, 8, 8) * np.float32(scale)
    if kind == "simple":
        return json.dumps({"inputs": x[0].tolist()}).encode(), x[:1]
    if kind == "batch":
        return json.dumps({"inputs": x.tolist()}).encode(), x
    t = {"name": draw(st.sampled_from(["pixels", "pixels", "x"])), "shape": draw(st.sampled_from(
        [[n, 1, 8, 8], [n, 64], [-1, 1, 8, 8], [n, 1, 8, 8, 1], [10**12]])),
         "datatype": draw(st.sampled_from(["FP32", "FP32", "FP64", "INT64", "BYTES", "fp32"])),
         "data": x.reshape(-1).tolist()}
    t = {k: v for k, v in t.items() if draw(st.floats(0, 1)) < 0.95}  # sometimes a field is missing
    ok = t == {"name": "pixels", "shape": [n, 1, 8, 8], "datatype": "FP32", "data": x.reshape(-1).tolist()}
    return json.dumps({"id": draw(st.text(max_size=5)), "inputs": [t]}).encode(), x if ok else None


BODY = st.one_of(near_valid(), st.binary(max_size=600).map(lambda b: (b, None)),
                 JSON.map(lambda j: (json.dumps(j).encode(), None)),
                 JSON.map(lambda j: (json.dumps({"inputs": j}).encode(), None)))
CONTENT_TYPE = st.sampled_from(["application/json", "application/octet-stream", "text/plain", "multipart/form-data",
                                "application/json; charset=latin-1", None]) | HEADER_TEXT


def parity(api, x, data):
    """A 200 answer to a well-formed request must equal the reference within the fp32 tolerance."""
    want = softmax(api["reference"].infer({"pixels": x})["logits"])
    got = json.loads(data)
    if "outputs" in got:  # Open Inference Protocol
        logits = np.asarray(got["outputs"][0]["data"], dtype=np.float64).reshape(len(x), -1)
        np.testing.assert_allclose(softmax(logits), want, atol=1e-4)
        return
    items = got["predictions"] if "predictions" in got else [got]
    np.testing.assert_allclose(np.array([i["probabilities"] for i in items]), want, atol=1e-4)


@FUZZ
@given(body=BODY, model=st.sampled_from(MODELS), content_type=CONTENT_TYPE,
       route=st.sampled_from(["/predictions/{m}", "/predictions/{m}/1.0", "/v2/models/{m}/infer", "/v1/models/{m}:predict",
                              "v2:/v2/models/{m}/infer", "v2:/v2/models/{m}/versions/1.0/infer"]))
@example(body=(b"[" * 200_000, None), model="cnn-onnx", content_type="application/json", route="/predictions/{m}")
@example(body=(b'{"inputs": [[' + b"1e39," * 63 + b"1e39]]}", None), model="cnn-onnx", content_type="application/json",
         route="/predictions/{m}")
@example(body=(b'{"inputs": [{"name": ["pixels"], "shape": [1], "datatype": "FP32", "data": [1]}]}', None),
         model="cnn-torch", content_type="application/json", route="/v2/models/{m}/infer")
def test_prediction_bodies(api, body, model, content_type, route):
    raw, x = body
    hdr = {"Authorization": f"Bearer {api['info'].token}", **({"Content-Type": content_type} if content_type else {})}
    front, path = route.startswith("v2:"), route.removeprefix("v2:").format(m=model)  # v2: the protocol's own port
    status, data = send(api["info"].v2_url if front else api["info"].inference_url, "POST", path, hdr, raw)
    check_status(status, "POST", path, data)
    if status == 200:
        assert x is not None, f"accepted a malformed body: {raw[:200]!r} -> {data[:200]!r}"
        parity(api, x, data)
    elif x is not None and route != "/v1/models/{m}:predict" and np.all(np.abs(x) < 1e30):
        pytest.fail(f"well-formed request refused: {status} {data[:300]!r}")
    else:
        assert status in (400, 404, 405, 413), f"{status}: {data[:200]!r}"


@FUZZ
@given(data=st.data(), method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"]),
       auth=st.sampled_from(["valid", "wrong", "none", "garbage"]), extra=st.dictionaries(
           st.text(alphabet=string.ascii_letters + "-", min_size=1, max_size=20), HEADER_TEXT, max_size=3),
       query=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3))
def test_any_route_method_and_header(api, data, method, auth, extra, query):
    kind = data.draw(st.sampled_from(["inference", "management", "metrics", "v2"]))
    template, _ = data.draw(st.sampled_from(api["routes"][kind]))
    if data.draw(st.booleans()):  # sometimes a path that matches no route at all
        template = "/" + "/".join(data.draw(st.lists(SEGMENT, max_size=4)))
    path = template.replace("{model_name}", data.draw(SEGMENT)).replace("{model_version}", data.draw(SEGMENT))
    if query:
        path += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query.items())
    info = api["info"]
    token = {"inference": info.token, "management": info.management_token, "metrics": None,
             "v2": info.token}[kind]
    if kind == "management" and auth == "valid" and method not in ("GET", "OPTIONS", "HEAD"):
        auth = "wrong"  # a valid management token may legitimately scale workers: fuzz changes with bad tokens
    hdr = {k: v for k, v in extra.items() if k.lower() not in ("content-length", "transfer-encoding", "host",
                                                                 "connection", "expect")}
    if auth != "none" and token:
        hdr["Authorization"] = {"valid": f"Bearer {token}", "wrong": "Bearer not-the-token",
                                "garbage": data.draw(HEADER_TEXT)}[auth]
    raw, _ = data.draw(BODY) if method in ("POST", "PUT", "PATCH") else (None, None)
    url = getattr(info, f"{kind}_url")
    status, out = send(url, method, path, hdr, raw)
    check_status(status, method, path, out)
    if kind == "management" and auth != "valid" and status == 200:
        assert method == "OPTIONS" or path.split("?")[0] in ("/", "/api-description"), f"{method} {path} without a token"
    if kind == "v2":  # every path of the protocol's port wants the token, and answers in its error form
        assert status == 200 or (method == "HEAD" or json.loads(out).keys() == {"error"}), f"{method} {path}: {out[:200]!r}"
        if auth != "valid":
            assert status == 401, f"{method} {path} without the token: {status}"


def test_ping_and_answers_healthy_after_fuzzing(api):
    """Runs after the fuzzers (file order): the server still answers /ping and predicts correctly."""
    info = api["info"]
    assert TRIED["cases"] > 0
    status, data = send(info.inference_url, "GET", "/ping", {"Authorization": f"Bearer {info.token}"})
    assert status == 200 and json.loads(data)["status"] == "Healthy"
    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    for m in MODELS:
        status, data = send(info.inference_url, "POST", f"/predictions/{m}", {
            "Authorization": f"Bearer {info.token}", "Content-Type": "application/json"},
            json.dumps({"inputs": x.tolist()}).encode())
        assert status == 200
        parity(api, x, data)
