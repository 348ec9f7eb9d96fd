"""The v2 front is as safe as the REST path: a public front needs TLS or the user's word; its guard takes every
scope and caps every body before reading it whole; TLS on REST and gRPC when a certificate is given; a front that
dies is noticed and taken out of serve.json; signal handlers come back whatever order their blocks close in."""

import asyncio
import datetime
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

import modelship as ms
from modelship.errors import ServeError
from modelship.serving.config import ServeConfig


# ---- what `serve` accepts ----------------------------------------------------------------------------------------

def test_a_public_front_needs_tls_or_the_users_word(tmp_path):
    cert, key = self_signed(tmp_path)
    ServeConfig().check_front()  # loopback: anything goes
    ServeConfig(v2_host="::1", token_auth=False).check_front()
    with pytest.raises(ServeError, match="--insecure-public"):
        ServeConfig(v2_host="0.0.0.0", token_auth=False).check_front()
    ServeConfig(v2_host="0.0.0.0", token_auth=False, insecure_public=True).check_front()  # the KServe runtime
    with pytest.raises(ServeError, match="clear text"):
        ServeConfig(v2_host="0.0.0.0").check_front()
    with pytest.raises(ServeError, match="clear text"):  # the user's word covers no token, not a token in clear
        ServeConfig(v2_host="10.1.2.3", insecure_public=True).check_front()
    ServeConfig(v2_host="0.0.0.0", v2_tls_cert=str(cert), v2_tls_key=str(key)).check_front()
    with pytest.raises(ServeError, match="go together"):
        ServeConfig(v2_tls_cert=str(cert)).check_front()
    with pytest.raises(ServeError, match="no such file"):
        ServeConfig(v2_tls_cert=str(tmp_path / "nope.pem"), v2_tls_key=str(key)).check_front()
    ServeConfig(v2_host="0.0.0.0", token_auth=False, oip=False).check_front()  # no front, nothing to guard


def test_serve_refuses_a_public_front_without_a_token_before_starting_anything(tmp_path, cnn_onnx):
    from conftest import cli

    store = tmp_path / "store"
    ms.archive(cnn_onnx, store, name="m")
    p = cli("serve", store, "--state", tmp_path / "state", "--v2-host", "0.0.0.0", "--no-auth")
    assert p.returncode != 0 and "--insecure-public" in p.stderr and not (tmp_path / "state" / "serve.json").exists()


# ---- the guard, as ASGI (no server) ------------------------------------------------------------------------------

class Recorder:
    """An ASGI app that records what reached it (and the body it read)."""

    def __init__(self):
        self.calls = []

    async def __call__(self, scope, receive, send):
        body = b""
        if scope["type"] == "http":
            message = await receive()
            body = message.get("body", b"")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        self.calls.append((scope["type"], body))


def run(guard, scope, chunks=(b"",)):
    """Call ``guard`` with ``scope`` and a body in ``chunks``: (messages sent, chunks the guard read)."""
    sent, read = [], []
    queue = list(chunks)

    async def receive():
        if not queue:
            return {"type": "http.disconnect"}
        chunk = queue.pop(0)
        read.append(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(queue)}

    async def send(message):
        sent.append(message)
    asyncio.run(guard(scope, receive, send))
    return sent, read


def guard_of(tmp_path, max_bytes=100):
    from modelship.serving.oip.rest import Guard
    from modelship.serving.oip.tokens import Token

    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"inference": {"key": "secret"}, "management": {"key": "m"}}))
    app = Recorder()

    async def infer(name, headers, body):
        return 200, [], b"inferred " + body
    return Guard(app, Token(keys), infer, max_bytes), app


def http(path="/v2/models/m/infer", method="POST", headers=()):
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(),
            "headers": [(k.encode(), v.encode()) for k, v in headers]}


AUTH = ("authorization", "Bearer secret")


def test_the_guard_takes_every_scope_and_caps_every_body(tmp_path):
    guard, app = guard_of(tmp_path)
    sent, _ = run(guard, {"type": "websocket", "path": "/v2", "headers": [(b"authorization", b"Bearer secret")]})
    assert sent == [{"type": "websocket.close", "code": 1008}] and not app.calls  # nothing speaks websocket here
    sent, _ = run(guard, {"type": "something-else", "headers": []})
    assert sent == [] and not app.calls
    run(guard, {"type": "lifespan"})  # the server's start-up and shutdown reach the app
    assert app.calls == [("lifespan", b"")]
    sent, _ = run(guard, http(headers=[]), [b"x"])
    assert sent[0]["status"] == 401
    sent, _ = run(guard, http(headers=[AUTH]), [b"small"])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"inferred small"
    # declared too large: refused without reading a byte
    sent, read = run(guard, http(headers=[AUTH, ("content-length", "101")]), [b"a" * 101])
    assert sent[0]["status"] == 413 and read == [] and b"limit of 100 bytes" in sent[1]["body"]
    # chunked: refused as soon as it is over, the rest never read
    sent, read = run(guard, http(headers=[AUTH]), [b"a" * 60, b"b" * 60, b"c" * 60])
    assert sent[0]["status"] == 413 and len(read) == 2
    # every route, not only infer
    sent, read = run(guard, http("/v2/models/m", "POST", [AUTH]), [b"a" * 60, b"b" * 60])
    assert sent[0]["status"] == 413
    sent, _ = run(guard, http("/v2/models/m/versions/2/ready", "GET", [AUTH]))
    assert sent[0]["status"] == 200 and app.calls[-1] == ("http", b"")


# ---- signals -------------------------------------------------------------------------------------------------------

def test_signal_handlers_come_back_whatever_order_blocks_close_in():
    from modelship.signals import Stopped, stopping

    before = signal.getsignal(signal.SIGTERM)
    outer, inner = stopping(), stopping()
    outer.__enter__()
    got = inner.__enter__()
    outer.__exit__(None, None, None)  # a server stopped before a block opened inside its lifetime closes
    with pytest.raises(Stopped):  # the still-open block still stops on SIGTERM
        signal.raise_signal(signal.SIGTERM)
    assert got.signum == signal.SIGTERM
    inner.__exit__(None, None, None)
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGHUP) is not None
    for order in ((0, 1, 2), (1, 0, 2), (2, 0, 1), (1, 2, 0)):
        blocks = [stopping() for _ in range(3)]
        [b.__enter__() for b in blocks]
        for k in order:
            blocks[k].__exit__(None, None, None)
        assert signal.getsignal(signal.SIGTERM) is before, order


def test_a_signal_in_a_deferred_block_comes_when_it_ends():
    """Server.stop() runs deferred: a signal meanwhile (a second Ctrl-C, or a first one while a server is stopped by
    its with block), even one the kernel hands to another thread, cannot cut the shutdown in two; it arrives
    afterwards. After a first signal, later ones do nothing until the block that took it closes."""
    import os

    from modelship.signals import Stopped, deferred, stopping

    done, stop = [], threading.Event()
    busy = threading.Thread(target=stop.wait, daemon=True)  # a thread that does not block signals
    busy.start()
    try:
        with stopping() as got:
            with pytest.raises(Stopped):
                with deferred():
                    os.kill(os.getpid(), signal.SIGTERM)  # to the process: any thread may take it
                    time.sleep(0.2)
                    done.append("the whole shutdown")
            assert done == ["the whole shutdown"] and got.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGHUP)  # the shutdown goes on: no second Stopped, no error
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
    finally:
        stop.set()


# ---- a real front: TLS, and a front that dies ----------------------------------------------------------------------

def self_signed(folder):
    """A self-signed certificate for 127.0.0.1 and localhost (PEM files: cert, key)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    c, k = folder / "cert.pem", folder / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    k.chmod(0o600)
    return c, k


GRPC_TLS = """
import json, sys
import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

address, token, cert = sys.argv[1:4]
out = {}
c = triton.InferenceServerClient(address, ssl=True, root_certificates=cert)
h = {"authorization": f"Bearer {token}"}
t = triton.InferInput("pixels", [1, 1, 8, 8], "FP32")
t.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
out["tls"] = c.infer("m", [t], headers=h).as_numpy("logits").shape
try:
    triton.InferenceServerClient(address).is_server_live(headers=h, client_timeout=5)
    out["plain"] = "answered"
except InferenceServerException as e:
    out["plain"] = str(e)[:200]
print(json.dumps(out))
"""


@pytest.mark.serve
def test_tls_on_both_v2_paths_and_a_front_that_dies_is_noticed(tmp_path, cnn_onnx):
    from modelship.serving.state import ServerState

    cert, key = self_signed(tmp_path)
    store = tmp_path / "store"
    ms.archive(cnn_onnx, store, name="m", workers=1)
    server = ms.serve(store, tmp_path / "state", v2_tls=(str(cert), str(key)))
    try:
        info = server.info
        assert info.v2_url.startswith("https://") and info.v2_tls
        auth = {"Authorization": f"Bearer {info.token}"}
        r = requests.get(info.v2_url + "/v2/models/m", headers=auth, verify=str(cert), timeout=10)
        assert r.status_code == 200 and r.json()["name"] == "m"
        with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP beside it
            requests.get(info.v2_url.replace("https://", "http://") + "/v2/health/live", headers=auth, timeout=10)
        p = subprocess.run([sys.executable, "-c", GRPC_TLS, info.v2_grpc_address, info.token,
                            str(cert)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        got = json.loads(p.stdout.splitlines()[-1])
        assert got["tls"] == [1, 10] and got["plain"] != "answered"

        # the front dies (killed): Server.wait notices, serve.json no longer advertises it, /predictions serves on
        waiting = threading.Thread(target=server.wait, daemon=True)
        with pytest.warns(UserWarning, match="Open Inference Protocol front stopped"):
            waiting.start()
            pid = int((tmp_path / "state" / "oip.pid").read_text())
            subprocess.run(["kill", "-9", str(pid)], check=True)
            deadline = time.monotonic() + 30
            while ServerState.load(tmp_path / "state").v2_url and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.5)
        marked = ServerState.load(tmp_path / "state")
        assert marked.v2_url is None and marked.v2_grpc_address is None
        assert marked.v2_status.startswith("stopped")
        assert requests.post(info.inference_url + "/predictions/m", json={"inputs": [[[0.0] * 8] * 8]},
                             headers=auth, timeout=30).status_code == 200
    finally:
        server.stop()
    waiting.join(10)
    assert not waiting.is_alive()  # stop() ends the wait quietly
