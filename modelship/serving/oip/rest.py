"""The v2 front's REST side: KServe's FastAPI endpoints (health, metadata, ready) with the protocol's error answers,
and an ASGI guard in front of them that checks the token on every path, caps every body before it is read whole,
takes the version out of versioned paths, and sends REST infer bodies straight on to TorchServe (``infer``)."""

from __future__ import annotations

import json
import logging

from ..codec import BINARY_HEADER, SERVED_ON
from .models import VERSION, Plane
from .tokens import Token
from .upstream import Upstream, message

FORWARD = ("authorization", "content-type", BINARY_HEADER.lower(), "modelship-describe", "x-request-id")
log = logging.getLogger("modelship.oip")


def rest_app(plane: Plane, upstream: Upstream, token: Token, max_bytes: int):
    """KServe's v2 REST app for ``plane``, behind the guard."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from kserve import errors as ke
    from kserve.protocol.rest.v2_endpoints import register_v2_endpoints
    from starlette.exceptions import HTTPException

    app = FastAPI(title="modelship", docs_url=None, redoc_url=None, openapi_url=None,
                  default_response_class=JSONResponse)
    register_v2_endpoints(app, plane, None)
    app.router.routes = [r for r in app.router.routes if "/repository/" not in getattr(r, "path", "")]
    for exc, handler in [(ke.InvalidInput, ke.invalid_input_handler), (ke.InferenceError, ke.inference_error_handler),
                         (ke.ModelNotFound, ke.model_not_found_handler), (ke.ModelNotReady, ke.model_not_ready_handler),
                         (NotImplementedError, ke.not_implemented_error_handler),
                         (ke.ServerNotLive, ke.server_not_live_handler), (ke.ServerNotReady, ke.server_not_ready_handler),
                         (HTTPException, protocol_error), (RequestValidationError, malformed), (Exception, unexpected)]:
        app.add_exception_handler(exc, handler)
    return Guard(app, token, lambda name, headers, body: infer(plane, upstream, name, headers, body), max_bytes)


async def protocol_error(request, exc):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, exc.status_code)


async def malformed(request, exc):
    from fastapi.responses import JSONResponse

    first = (exc.errors() or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return JSONResponse({"error": f"malformed inference request: {where or 'body'}: {first.get('msg', exc)}"}, 400)


async def unexpected(request, exc):
    from fastapi.responses import JSONResponse

    log.error("modelship: %s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server log holds its details"}, 500)


async def infer(plane: Plane, upstream: Upstream, name: str, headers: dict, body: bytes) -> tuple[int, list, bytes]:
    """REST infer: the body goes to the handler as it came (JSON, or the binary tensor extension, which the handler
    decodes and answers itself); TorchServe's refusals come back in the protocol's error form."""
    if not plane.has(name):
        return error(404, f"Model with name {name} does not exist.")
    send = {k: headers[k] for k in FORWARD if k in headers}
    if BINARY_HEADER.lower() not in send:  # the protocol's JSON, whatever content type a client labels it with
        send["content-type"] = "application/json"
    try:
        status, got, content = await upstream.predict(name, VERSION.get(), body, send)
    except OSError as e:
        return error(502, f"TorchServe did not answer: {e}")
    if status != 200:
        return error(status, message(content))
    return 200, [(k.encode(), got[k].encode()) for k in ("content-type", BINARY_HEADER.lower(), SERVED_ON.lower())
                 if k in got], content


class Guard:
    """ASGI: the token on every path and scope (the lifespan excepted; no websocket is served); a body over
    ``max_bytes`` refused with 413 before it is read whole; /v2/models/NAME/versions/V/... served by the unversioned
    route with the version in VERSION (KServe's own routes do not take versions); REST infer passed to ``infer``."""

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
            status, out, body = error(401, why)
            return await answer(send, status, out + [(b"www-authenticate", b"Bearer")], body)
        body = await self.body(headers, receive)
        if isinstance(body, tuple):
            return await answer(send, *body)
        if body is None:
            return  # the client went away
        parts = scope["path"].split("/")
        if len(parts) >= 6 and parts[1:3] == ["v2", "models"] and parts[4] == "versions" and parts[5]:
            VERSION.set(parts[5])
            parts = parts[:4] + parts[6:]
            path = "/".join(parts)
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if scope["method"] == "POST" and len(parts) == 5 and parts[1:3] == ["v2", "models"] and parts[4] == "infer":
            return await answer(send, *await self.infer(parts[3], headers, body))
        return await self.app(scope, replay(body), send)

    async def body(self, headers: dict, receive):
        """The request body, read up to the cap: bytes; a 413 answer (a tuple) once it is over; None when the
        client disconnected."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return too_large(int(declared), self.max_bytes)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # a chunked body: refused as soon as it is over, not read to its end
                return too_large(size, self.max_bytes, "at least ")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def replay(body: bytes):
    """An ASGI receive that hands the app the body the guard read."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive


async def answer(send, status: int, headers: list, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error(status: int, text: str) -> tuple[int, list, bytes]:
    return status, [(b"content-type", b"application/json")], json.dumps({"error": text}).encode()


def too_large(size: int, limit: int, qualifier: str = "") -> tuple[int, list, bytes]:
    return error(413, f"request body of {qualifier}{size} bytes is over this server's limit of {limit} bytes "
                      "(modelship serve --max-request-bytes); send fewer samples per request")
