"""The Open Inference Protocol v2 (Triton's and KServe's) for every served model, over REST and gRPC.

KServe's model server provides the protocol: its v2 REST endpoints (server and model health, metadata, ready),
its gRPC ``GRPCInferenceService`` with its codecs, and its ``{"error": ...}`` answers. Each model is a KServe
model that forwards inference to TorchServe's ``/predictions/NAME[/VERSION]``, so the modelship handler checks
and answers every request as any other (shadow parity samples it too). REST infer bodies go to the handler as
they came: it implements the JSON form and the binary tensor extension itself, and KServe's REST decoder would
read each BYTES element as UTF-8 text (an encoded image fails there) and decode every body a second time.
Metadata comes from each archive's manifest; readiness and versions from TorchServe's management API.

Run by ``modelship serve`` in TorchServe's process group: ``python -m modelship.serving.oip ...``. Both servers
bind 127.0.0.1 unless ``serve --v2-host`` says otherwise (a KServe runtime container), and every path (health
included) asks for the inference token TorchServe checks (read again from its key file when it is rotated).
"""


import argparse
import asyncio
import contextvars
import hmac
import json
import logging
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from ..manifest import MANIFEST, Manifest
from .codec import BINARY_HEADER, DESCRIBE, SERVED_ON, V2_DTYPES, V2_NUMPY

FORWARD = ("authorization", "content-type", BINARY_HEADER.lower(), DESCRIBE.lower(), "x-request-id")

VERSION = contextvars.ContextVar("modelship_oip_version", default=None)  # /v2/models/NAME/versions/V/...
PID_FILE = "oip.pid"  # in the state folder: the running front's pid

log = logging.getLogger("modelship.oip")


def tensors(specs) -> list[dict]:
    """Manifest tensor specs as protocol metadata: named dynamic dims are -1."""
    return [{"name": t.name, "datatype": V2_DTYPES.get(t.dtype, t.dtype.upper()),
             "shape": [d if isinstance(d, int) else -1 for d in t.shape]} for t in specs]


def metadata(man: Manifest) -> tuple[list[dict], list[dict]]:
    """What a client sends and gets back: a raw-input model (text, image) takes one BYTES input (texts as UTF-8,
    images as PNG/JPEG bytes), a tensor model its tensors."""
    kind = (man.preprocess or {}).get("kind")
    inputs = [{"name": kind, "datatype": "BYTES", "shape": [-1]}] if kind else tensors(man.inputs)
    return inputs, tensors(man.outputs)


class Token:
    """The tokens TorchServe checks, read from its key file (read again when the file changes: rotation)."""

    def __init__(self, key_file: Path | None):
        self.key_file, self._seen, self._keys = key_file, None, {}

    def key(self, kind: str = "inference") -> str | None:
        """The ``inference`` or ``management`` token; None without token authorization or before it is written."""
        if self.key_file is None:
            return None
        try:
            stamp = self.key_file.stat().st_mtime_ns
            if stamp != self._seen:
                found = json.loads(self.key_file.read_text())
                self._keys, self._seen = {k: found[k]["key"] for k in ("inference", "management")}, stamp
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not written yet (TorchServe starting), or half-written: keep the last ones
        return self._keys.get(kind)

    def refusal(self, authorization: str | None) -> str | None:
        """Why ``authorization`` is refused, or None when it carries the inference token."""
        if self.key_file is None:
            return None
        key = self.key()
        if key is None:
            return "the server is starting; no token is issued yet"
        if not authorization:
            return "token authorization is on: send 'Authorization: Bearer <inference token>' (serve.json's token)"
        if not hmac.compare_digest(authorization.encode(), f"Bearer {key}".encode()):
            return "the token is not this server's inference token (rotated? read serve.json again)"
        return None


def build(args):
    """KServe's REST app and gRPC server for the store's models, forwarding to TorchServe."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from kserve import Model
    from kserve import errors as ke
    from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
    from starlette.exceptions import HTTPException

    token = Token(None if args.no_auth else Path(args.state) / "key_file.json")
    upstream = Upstream()

    async def describe(name: str) -> list[dict]:
        """TorchServe's record of each version of ``name`` (its workers and their status)."""
        if token.key_file is not None and token.key("management") is None:
            raise ModelNotReady(name, "TorchServe is starting (no management token yet)")
        headers = {"Authorization": f"Bearer {token.key('management')}"} if token.key_file else {}
        try:
            status, _, content = await upstream.call("GET", f"{args.management_url}/models/{name}/all", None, headers)
        except OSError as e:
            raise ModelNotReady(name, f"TorchServe's management API did not answer: {e}") from None
        if status == 404:
            raise ModelNotFound(name)
        if status != 200:
            raise ModelNotReady(name, f"TorchServe answered {status}")
        return json.loads(content)

    class Served(Model):
        """One model of the store: its protocol metadata from the manifest; gRPC infer forwarded to TorchServe."""

        def __init__(self, name: str, man: Manifest):
            super().__init__(name, return_response_headers=True)
            self.inputs, self.outputs = metadata(man)
            self.ready = True

        async def versions(self) -> list[dict]:
            listed = await describe(self.name)
            want = VERSION.get()
            if want is not None and not any(v.get("modelVersion") == want for v in listed):
                raise ModelNotFound(f"{self.name} version {want}")
            return listed

        async def healthy(self) -> bool:
            try:
                listed = await self.versions()
            except ModelNotReady:
                return False
            want = VERSION.get()
            mine = [v for v in listed if (v.get("modelVersion") == want if want else v.get("isDefault", True))]
            return bool(mine) and all(w.get("status") == "READY" for v in mine for w in v.get("workers") or [{}])

        def get_input_types(self):
            return self.inputs

        def get_output_types(self):
            return self.outputs

        async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            version = payload.model_version or VERSION.get()
            for t in payload.inputs:  # gRPC's raw_input_contents: sent on in the binary extension, sized
                if t._raw_data is not None and not (t.parameters or {}).get("binary_data_size"):
                    arr = t.as_numpy()
                    t._raw_data = None
                    t.set_data_from_numpy(arr, binary_data=True)
            body, json_length = payload.to_rest()
            head, tail = (json.loads(body[:json_length]), body[json_length:]) if json_length is not None else (body, b"")
            for key in ("model_name", "model_version"):  # the path names them; a request body does not
                head.pop(key, None)
            for p in [head.get("parameters")] + [o.get("parameters") for o in head.get("outputs") or []]:
                if p:  # TorchServe answers in JSON; the answer is encoded here as the client asked
                    p.pop("binary_data_output", None), p.pop("binary_data", None)
            head = json.dumps(head).encode()
            send = {"Content-Type": "application/json"}
            for name in ("authorization", DESCRIBE.lower(), "x-request-id"):  # the token, and what modelship asks
                if (headers or {}).get(name):
                    send[name] = headers[name]
            if tail:
                send[BINARY_HEADER] = str(len(head))
            try:
                status, got, content = await forward(self.name, version, head + tail, send)
            except OSError as e:
                raise InferenceError(f"TorchServe did not answer: {e}") from None
            if response_headers is not None and got.get(SERVED_ON.lower()):
                response_headers[SERVED_ON] = got[SERVED_ON.lower()]
            if status != 200:
                message = _message(content)
                if status == 404:
                    raise ModelNotFound(self.name + (f" version {version}" if version else ""))
                if status in (400, 413):
                    raise InvalidInput(message)
                if status == 503:
                    raise ModelNotReady(self.name, message)
                raise InferenceError(f"TorchServe answered {status}: {message}")
            answer, outputs = _loads(content), []
            for t in answer.get("outputs", []):
                out = InferOutput(t["name"], t["shape"], t["datatype"])
                if t["datatype"] == "BYTES":
                    out.data = t["data"]
                else:
                    out.set_data_from_numpy(np.asarray(t["data"], dtype=V2_NUMPY.get(t["datatype"], "float32")).reshape(t["shape"]),
                                            binary_data=False)
                outputs.append(out)
            return InferResponse(answer.get("id") or payload.id, self.name, outputs,
                                 model_version=answer.get("model_version"), from_grpc=payload.from_grpc,
                                 parameters={k: v for k, v in (answer.get("parameters") or {}).items()
                                             if isinstance(v, (bool, int, float, str))} or None,
                                 use_binary_outputs=payload.use_binary_outputs,
                                 requested_outputs=payload.request_outputs)

    class Plane(DataPlane):
        """KServe's data plane; server readiness is every model ready in TorchServe, versions listed."""

        def __init__(self, registry):
            super().__init__(registry)
            self._server_name, self._server_version = "modelship", _version()

        def metadata(self):
            return {"name": self._server_name, "version": self._server_version,
                    "extensions": ["binary_tensor_data"]}

        async def ready(self) -> bool:
            return all([await m.healthy() for m in self._model_registry.get_models().values()])

        async def model_metadata(self, model_name: str):
            versions = await self.get_model_from_registry(model_name).versions()  # a version not served: 404
            return {**await super().model_metadata(model_name), "versions": [v.get("modelVersion") for v in versions]}

    registry = ModelRepository()
    store = Path(args.store)
    for mar in sorted(m for m in store.glob("*.mar") if not m.name.startswith(".")):
        with zipfile.ZipFile(mar) as z:
            man = Manifest.from_dict(json.loads(z.read(MANIFEST)))
        registry.update(Served(mar.stem, man))
    plane = Plane(registry)

    async def unexpected(request: Request, exc: Exception):
        log.error("modelship: %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log holds its details"}, 500)

    app = FastAPI(title="modelship", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=JSONResponse)
    register_v2_endpoints(app, plane, None)
    app.router.routes = [r for r in app.router.routes if "/repository/" not in getattr(r, "path", "")]
    for exc, handler in [(InvalidInput, ke.invalid_input_handler), (InferenceError, ke.inference_error_handler),
                         (ModelNotFound, ke.model_not_found_handler), (ModelNotReady, ke.model_not_ready_handler),
                         (NotImplementedError, ke.not_implemented_error_handler),
                         (ke.ServerNotLive, ke.server_not_live_handler), (ke.ServerNotReady, ke.server_not_ready_handler),
                         (Exception, unexpected)]:
        app.add_exception_handler(exc, handler)

    async def protocol_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, exc.status_code)

    async def malformed(request: Request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"malformed inference request: {where or 'body'}: {first.get('msg', exc)}"},
                              400)

    app.add_exception_handler(HTTPException, protocol_error)
    app.add_exception_handler(RequestValidationError, malformed)
    async def forward(name: str, version: str | None, body: bytes, headers: dict) -> tuple[int, dict, bytes]:
        """An inference request to TorchServe's /predictions/NAME[/VERSION]: the handler answers it."""
        url = f"{args.inference_url}/predictions/{name}" + (f"/{version}" if version else "")
        return await upstream.call("POST", url, body, headers)

    async def infer(name: str, headers: dict, body: bytes) -> tuple[int, list, bytes]:
        """REST infer: the body goes to the handler as it came (JSON, or the binary tensor extension, which the
        handler decodes and answers itself); TorchServe's refusals come back in the protocol's error form."""
        if registry.get_model(name) is None:
            return _error(404, str(ModelNotFound(name)))
        send = {k: headers[k] for k in FORWARD if k in headers}
        if BINARY_HEADER.lower() not in send:  # the protocol's JSON, whatever content type a client labels it with
            send["content-type"] = "application/json"
        try:
            status, got, content = await forward(name, VERSION.get(), body, send)
        except OSError as e:
            return _error(502, f"TorchServe did not answer: {e}")
        if status != 200:
            return _error(status, _message(content))
        return 200, [(k.encode(), got[k].encode()) for k in ("content-type", BINARY_HEADER.lower(), SERVED_ON.lower())
                     if k in got], content

    return _Guard(app, token, infer, args.max_request_bytes), plane, registry, token


class _Guard:
    """ASGI: the token on every path and scope (the lifespan excepted; no websocket is served); a body over
    ``max_bytes`` refused with 413 before it is read whole; /v2/models/NAME/versions/V/... served by the unversioned
    route with the version in VERSION (KServe's own routes do not take versions); REST infer passed to ``infer``
    directly."""

    def __init__(self, app, token: Token, infer, max_bytes: int):
        self.app, self.token, self.infer, self.max_bytes = app, token, infer, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # a websocket (or any other scope): nothing here speaks it
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        why = self.token.refusal(headers.get("authorization"))
        if why:
            status, out, body = _error(401, why)
            return await _answer(send, status, out + [(b"www-authenticate", b"Bearer")], body)
        body = await self._body(headers, receive)
        if isinstance(body, tuple):
            return await _answer(send, *body)
        if body is None:
            return  # the client went away
        parts = scope["path"].split("/")
        if len(parts) >= 6 and parts[1:3] == ["v2", "models"] and parts[4] == "versions" and parts[5]:
            VERSION.set(parts[5])
            parts = parts[:4] + parts[6:]
            path = "/".join(parts)
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if scope["method"] == "POST" and len(parts) == 5 and parts[1:3] == ["v2", "models"] and parts[4] == "infer":
            return await _answer(send, *await self.infer(parts[3], headers, body))
        return await self.app(scope, _replay(body), send)

    async def _body(self, headers: dict, receive):
        """The request body, read up to the cap: bytes; a 413 answer (a tuple) once it is over; None when the
        client disconnected."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return _too_large(int(declared), self.max_bytes)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # a chunked body: refused as soon as it is over, not read to its end
                return _too_large(size, self.max_bytes, "at least ")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


def _too_large(size: int, limit: int, qualifier: str = "") -> tuple[int, list, bytes]:
    return _error(413, f"request body of {qualifier}{size} bytes is over this server's limit of {limit} bytes "
                       "(modelship serve --max-request-bytes); send fewer samples per request")


async def _answer(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Upstream:
    """One keep-alive HTTP client to TorchServe (aiohttp: of the async clients, the cheapest hop per request)."""

    def __init__(self):
        self.session = None

    async def call(self, method: str, url: str, body: bytes | None, headers: dict) -> tuple[int, dict, bytes]:
        """(status, headers by lowercase name, body); OSError when TorchServe does not answer."""
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60, connect=5),
                                                 connector=aiohttp.TCPConnector(limit=256))
        try:
            async with self.session.request(method, url, data=body, headers=headers) as r:
                return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise OSError(f"{type(e).__name__}: {e}") from None


def _error(status: int, message: str) -> tuple[int, list, bytes]:
    return status, [(b"content-type", b"application/json")], json.dumps({"error": message}).encode()


def _message(content: bytes) -> str:
    """What TorchServe (or the handler) said in a refusal."""
    answer = _loads(content)
    return answer.get("message") or answer.get("error") or content[:300].decode(errors="replace")


def _loads(content: bytes) -> dict:
    try:
        found = json.loads(content)
        return found if isinstance(found, dict) else {}
    except ValueError:
        return {}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelship")
    except PackageNotFoundError:
        return "0"


def _grpc_server(plane, registry, token: Token, host: str, port: int, max_bytes: int = 1 << 20,
                 tls: tuple[str, str] | None = None):
    import grpc
    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
    from kserve.protocol.grpc.servicer import InferenceServicer

    class Servicer(InferenceServicer):
        """KServe's servicer, with the version a client names honoured (readiness, metadata) and the model
        repository extension, which modelship does not serve, refused as unimplemented."""

        async def ModelReady(self, request, context):
            VERSION.set(request.version or None)
            return await super().ModelReady(request, context)

        async def ModelMetadata(self, request, context):
            VERSION.set(request.version or None)
            return await super().ModelMetadata(request, context)

        async def ModelInfer(self, request, context):
            """KServe's, with a tensor whose raw contents do not fit its shape or datatype refused as the client's
            error (INVALID_ARGUMENT), not an internal one."""
            import struct

            from kserve.errors import InvalidInput

            try:
                return await super().ModelInfer(request, context)
            except (ValueError, struct.error, IndexError) as e:
                raise InvalidInput(f"malformed input tensor: {str(e)[:200] or type(e).__name__}; expected raw "
                                   "contents that fill each input's shape in its datatype") from None

        async def RepositoryModelLoad(self, request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY)

        async def RepositoryModelUnload(self, request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY)

    class Authorized(aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            sent = dict(details.invocation_metadata or ())
            why = token.refusal(sent.get("authorization"))
            if why is None:
                return await continuation(details)

            async def refuse(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            return grpc.unary_unary_rpc_method_handler(refuse)

    # a message over the cap is refused by gRPC itself (RESOURCE_EXHAUSTED) before it is handed over
    server = aio.server(interceptors=(Authorized(), ExceptionToStatusInterceptor()),
                        options=[("grpc.max_receive_message_length", max_bytes)])
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(plane, None), server)
    if tls:
        cert, key = (Path(f).read_bytes() for f in tls)
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(key, cert)]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind {host}:{port}")
    return server


REPOSITORY = ("the model repository extension is not served: models are loaded from the store when the server "
              "starts; new versions come through modelship promote")


async def serve(args) -> None:
    import uvicorn

    app, plane, registry, token = build(args)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    rest = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.http_port, log_config=None,
                                         access_log=False, loop="auto", timeout_keep_alive=65,
                                         ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key))
    grpc_server = _grpc_server(plane, registry, token, args.host, args.grpc_port, args.max_request_bytes, tls)
    (Path(args.state) / PID_FILE).write_text(str(os.getpid()))  # how `Server.wait` knows the front still runs
    await grpc_server.start()
    try:
        await rest.serve()
    finally:
        await grpc_server.stop(grace=2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m modelship.serving.oip", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--inference-url", required=True)
    p.add_argument("--management-url", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--no-auth", action="store_true")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--json-args"]:  # modelship serve passes its arguments as one JSON list (paths with spaces)
        argv = json.loads(argv[1])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # KServe logs every refused request with its traceback; TorchServe's log already holds each one in a line
    logging.getLogger("kserve").setLevel(logging.CRITICAL)
    os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
