"""The Open Inference Protocol v2 (Triton's and KServe's) for every served model, over REST and gRPC.

KServe's model server provides the protocol: its v2 REST endpoints (server and model health, metadata, ready), its
gRPC ``GRPCInferenceService`` with its codecs, and its ``{"error": ...}`` answers. Each model is a KServe model that
forwards inference to TorchServe's ``/predictions/NAME[/VERSION]``, so the modelship handler checks and answers
every request as any other (shadow parity samples it too). REST infer bodies go to the handler as they came: it
implements the JSON form and the binary tensor extension itself. Metadata comes from each archive's manifest;
readiness and versions from TorchServe's management API.

Run by ``modelship serve`` in TorchServe's process group: ``python -m modelship.serving.oip ...``. Both servers bind
127.0.0.1 unless ``serve --v2-host`` says otherwise (a KServe runtime container), and every path (health included)
asks for the inference token TorchServe checks. The rooms: ``tokens`` (the token check), ``upstream`` (the hop to
TorchServe), ``models`` (KServe's model and data plane: the only module importing kserve at its top), ``rest`` (the
ASGI app and its guard), ``grpc`` (the gRPC server); this module parses the command line and runs both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

PID_FILE = "oip.pid"  # in the state folder: the running front's pid (how `Server.wait` knows it still runs)


def parser() -> argparse.ArgumentParser:
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
    return p


async def serve(args) -> None:
    import uvicorn

    from .grpc_server import grpc_server
    from .models import plane_for
    from .rest import rest_app
    from .tokens import Token
    from .upstream import Upstream

    token = Token(None if args.no_auth else Path(args.state) / "key_file.json")
    upstream = Upstream(args.inference_url, args.management_url, token)
    plane = plane_for(Path(args.store), upstream)
    app = rest_app(plane, upstream, token, args.max_request_bytes)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    rest = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.http_port, log_config=None, access_log=False,
                                         loop="auto", http="auto", timeout_keep_alive=65,
                                         ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key))
    grpc = grpc_server(plane, token, args.host, args.grpc_port, args.max_request_bytes, tls)
    await grpc.start()
    (Path(args.state) / PID_FILE).write_text(str(os.getpid()))
    try:
        await rest.serve()
    finally:
        await grpc.stop(grace=2)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--json-args"]:  # modelship serve passes its arguments as one JSON list (paths with spaces)
        argv = json.loads(argv[1])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # KServe logs every refused request with its traceback; TorchServe's log already holds each one in a line
    logging.getLogger("kserve").setLevel(logging.CRITICAL)
    os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "True")
    asyncio.run(serve(args))
