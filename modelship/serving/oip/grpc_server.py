"""The v2 front's gRPC side: KServe's ``GRPCInferenceService`` servicer with the token checked on every call (an
interceptor), the version a client names honoured, the repository extension refused as unimplemented, malformed
tensors refused as the client's error, messages over the size cap refused by gRPC itself, TLS when given."""

from __future__ import annotations

import struct
from pathlib import Path

import grpc
from grpc import aio
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer

from .models import VERSION
from .tokens import Token

REPOSITORY = ("the model repository extension is not served: models are loaded from the store when the server "
              "starts; new versions come through modelship promote")


class Servicer(InferenceServicer):
    """KServe's servicer, with the version a client names honoured (readiness, metadata), malformed tensors refused
    as INVALID_ARGUMENT, and the model repository extension, which modelship does not serve, as UNIMPLEMENTED."""

    async def ModelReady(self, request, context):
        VERSION.set(request.version or None)
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request, context):
        VERSION.set(request.version or None)
        return await super().ModelMetadata(request, context)

    async def ModelInfer(self, request, context):
        try:
            return await super().ModelInfer(request, context)
        except (ValueError, struct.error, IndexError) as e:
            raise InvalidInput(f"malformed input tensor: {str(e)[:200] or type(e).__name__}; expected raw contents "
                               "that fill each input's shape in its datatype") from None

    async def RepositoryModelLoad(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY)

    async def RepositoryModelUnload(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY)


class Authorized(aio.ServerInterceptor):
    """The inference token on every call; a refused one answered UNAUTHENTICATED with the reason."""

    def __init__(self, token: Token):
        self.token = token

    async def intercept_service(self, continuation, details):
        why = self.token.refusal(dict(details.invocation_metadata or ()).get("authorization"))
        if why is None:
            return await continuation(details)

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        return grpc.unary_unary_rpc_method_handler(refuse)


def grpc_server(plane, token: Token, host: str, port: int, max_bytes: int = 1 << 20,
                tls: tuple[str, str] | None = None):
    """The gRPC server, bound (not started). A message over ``max_bytes`` is refused by gRPC (RESOURCE_EXHAUSTED)
    before it is handed over."""
    server = aio.server(interceptors=(Authorized(token), ExceptionToStatusInterceptor()),
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
