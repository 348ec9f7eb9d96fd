"""Every decoder error is the client's 400: images and texts damaged from valid files (tests/mutants_of_files.py:
each byte offset truncated, one bit flipped at each byte, one format's header on another's body, huge declared
dimensions) are decoded or refused with a message, never a crash. The codec takes every one of them (seconds); the
real server takes a spread of them through /predictions, the v2 REST front (JSON and the binary extension) and v2
gRPC, answers none with a 5xx, and keeps answering correctly."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

import mutants_of_files as damaged
from modelship.errors import InputError
from modelship.preprocess import open_preprocessor
from modelship.serving.codec import BINARY_HEADER, Codec


@pytest.fixture(scope="module")
def image_codec(cnn_onnx):
    return Codec(cnn_onnx.manifest, prep=open_preprocessor(cnn_onnx))


@pytest.fixture(scope="module")
def text_codec(text_onnx):
    return Codec(text_onnx.manifest, prep=open_preprocessor(text_onnx))


def outcomes(decode, cases) -> dict:
    """{"decoded": n, "refused": n, "crashed": [(case, exception)]} for ``decode`` over every case."""
    out = {"decoded": 0, "refused": 0, "crashed": []}
    for what, body in cases:
        try:
            decode(body)
            out["decoded"] += 1
        except InputError as e:
            assert str(e), what
            out["refused"] += 1
        except Exception as e:  # noqa: BLE001 — what the test is looking for
            out["crashed"].append((what, f"{type(e).__name__}: {e}"))
    return out


def test_the_issue_cases_are_400s(image_codec):
    for body in (b"\x89PNG\r\n\x1a\nnot really", b"\xff\xd8\xff\xe0junk"):
        with pytest.raises(InputError, match="corrupt image"):
            image_codec.decode(body, "image/png")


def test_every_damaged_image_is_decoded_or_refused(image_codec):
    cases = damaged.images()
    found = outcomes(lambda b: image_codec.decode(b, "image/png"), cases)
    assert not found["crashed"], found["crashed"][:5]
    assert found["refused"] > len(cases) // 3  # most damage is seen; bits flipped in pixel data may still decode
    for what, body in cases[-4:]:  # the huge declared dimensions: refused from the header, before any decoding
        with pytest.raises(InputError, match="at most|too large|corrupt|not an image"):
            image_codec.decode(body, "image/png")
    b64 = outcomes(lambda b: image_codec.decode({"inputs": {"image_b64": base64.b64encode(b).decode()}}), cases)
    assert not b64["crashed"] and b64["refused"] == found["refused"]


def test_every_damaged_text_is_decoded_or_refused(text_codec):
    cases = damaged.texts()
    raw = outcomes(lambda b: text_codec.decode(b, "text/plain"), cases)
    assert not raw["crashed"], raw["crashed"][:5]
    assert raw["refused"] > 0 and raw["decoded"] > 0  # cut inside a character: not UTF-8; elsewhere: a shorter text
    head = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 0}}]})

    def binary(b):
        h = head.replace('"binary_data_size": 0', f'"binary_data_size": {len(b) + 4}').encode()
        return text_codec.decode(h + len(b).to_bytes(4, "little") + b, None, str(len(h)))
    assert not outcomes(binary, cases)["crashed"]


# ---- through the real server ----------------------------------------------------------------------------------

def _v2_json(b: bytes) -> tuple[bytes, dict]:
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(b).decode()]}]}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _v2_binary(b: bytes) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(b) + 4}}]}).encode()
    return head + len(b).to_bytes(4, "little") + b, {"Content-Type": "application/octet-stream",
                                                      BINARY_HEADER: str(len(head))}


def _v2_text_binary(b: bytes) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(b) + 4}}]}).encode()
    return head + len(b).to_bytes(4, "little") + b, {"Content-Type": "application/octet-stream",
                                                      BINARY_HEADER: str(len(head))}


@pytest.mark.serve
def _over_grpc(served, model: str, kind: str, cases: list, tmp_path) -> list:
    """Each (what, body) of ``cases`` sent to ``model`` over v2 gRPC as one BYTES input (tests/grpc_send_bytes.py,
    a process of its own): the status each got."""
    bodies = tmp_path / f"bodies-{kind}.json"
    bodies.write_text(json.dumps([base64.b64encode(b).decode() for _, b in cases]))
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("grpc_send_bytes.py")),
                        served.v2_grpc_address, served.token, model, kind, str(bodies)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_damaged_images_and_texts_get_400s_on_every_path_and_the_server_keeps_answering(served, cnn, tmp_path):
    from modelship import data as datasets

    cases = damaged.images(step=7)
    auth = {"Authorization": f"Bearer {served.token}"}
    routes = {"/predictions": (served.inference_url + "/predictions/cnn-onnx",
                               lambda b: (b, {"Content-Type": "image/png"})),
              "v2 REST JSON": (served.v2_url + "/v2/models/cnn-onnx/infer", _v2_json),
              "v2 REST binary": (served.v2_url + "/v2/models/cnn-onnx/infer", _v2_binary)}
    seen = {}
    with requests.Session() as http:
        for route, (url, form) in routes.items():
            for what, b in cases:
                body, headers = form(b)
                r = http.post(url, data=body, headers={**auth, **headers}, timeout=30)
                seen.setdefault(route, {}).setdefault(r.status_code, 0)
                seen[route][r.status_code] += 1
                assert r.status_code in (200, 400), f"{route}, {what}: {r.status_code} {r.text[:300]}"
                if r.status_code == 400:
                    assert "image" in r.text, r.text
    assert all(v.get(400) for v in seen.values()), seen
    statuses = _over_grpc(served, "cnn-onnx", "image", cases, tmp_path)
    bad = [(what, s) for (what, _), s in zip(cases, statuses) if s[0] not in ("OK", "INVALID_ARGUMENT")]
    assert not bad and any(s[0] == "INVALID_ARGUMENT" for s in statuses), bad[:5]
    # texts, damaged the same ways, to the text model: raw bodies, the v2 binary extension, gRPC
    texts = damaged.texts(step=7)  # the text model waits out a 500 ms batch delay per request
    text_routes = {"/predictions": (served.inference_url + "/predictions/text-onnx",
                                    lambda b: (b, {"Content-Type": "text/plain"})),
                   "v2 REST binary": (served.v2_url + "/v2/models/text-onnx/infer", _v2_text_binary)}
    with requests.Session() as http:
        for route, (url, form) in text_routes.items():
            for what, b in texts:
                body, headers = form(b)
                r = http.post(url, data=body, headers={**auth, **headers}, timeout=30)
                assert r.status_code in (200, 400), f"text {route}, {what}: {r.status_code} {r.text[:300]}"
    statuses = _over_grpc(served, "text-onnx", "text", texts, tmp_path)
    assert all(s[0] in ("OK", "INVALID_ARGUMENT") for s in statuses), statuses
    assert {s[0] for s in statuses} == {"OK", "INVALID_ARGUMENT"}  # cut inside a character: refused; else answered
    # still serving, and still right
    raw, _ = datasets.digits_raw({}, "test")
    r = requests.post(routes["/predictions"][0], data=raw[0], headers={**auth, "Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 200 and requests.get(served.inference_url + "/ping", headers=auth, timeout=10).status_code == 200
    from modelship.models.reference import reference_preprocessor
    from modelship.runners.torch_runner import TorchRunner

    want = TorchRunner(cnn).infer(reference_preprocessor(cnn)(raw[:1]))["logits"][0]
    assert r.json()["index"] == int(np.argmax(want))
