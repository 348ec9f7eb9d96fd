"""How a server is configured: TorchServe's config.properties rendered from a ``ServeConfig``, the v2 front's
command line, the ports (eight from a base) and the rules a public v2 front must meet."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import ServeError
from .state import visible_mars


@dataclass
class ServeConfig:
    port: int = 8080  # inference; management = port+1, metrics = port+2, gRPC inference/management = port+3/+4,
    # modelship's own metrics (shadow parity) = port+5, Open Inference Protocol v2 REST / gRPC = port+6/+7
    max_request_bytes: int = 1 << 20
    job_queue_size: int = 100
    token_auth: bool = True
    token_expiration_min: int = 24 * 60
    startup_timeout_s: float = 120.0
    model_api: bool = False  # registration through the management API, for the management token's holder only
    # (modelship tune's private server, and serve --allow-promote for modelship promote)
    oip: bool = True  # the Open Inference Protocol v2 front (KServe's model server), REST and gRPC
    v2_host: str = "127.0.0.1"  # where the v2 front listens (a KServe runtime container: 0.0.0.0; TorchServe stays
    # on loopback whatever this says)
    v2_tls_cert: str | None = None  # PEM certificate and key: the v2 front's REST and gRPC speak TLS
    v2_tls_key: str | None = None
    insecure_public: bool = False  # the user's word that a public front without a token is on purpose

    def check_front(self) -> None:
        """A v2 front off loopback must not take anonymous requests by accident, nor carry the token in clear
        text: it needs TLS (with the token), or --insecure-public for a front without one (behind a proxy or mesh
        that authorizes and encrypts, as KServe's)."""
        if not self.oip:
            return
        if bool(self.v2_tls_cert) != bool(self.v2_tls_key):
            raise ServeError("--v2-tls-cert and --v2-tls-key go together: give the PEM certificate and its key")
        for f in filter(None, (self.v2_tls_cert, self.v2_tls_key)):
            if not Path(f).is_file():
                raise ServeError(f"{f}: no such file; expected a PEM certificate or key")
        if is_loopback(self.v2_host):
            return
        if not self.token_auth and not self.insecure_public:
            raise ServeError(f"--v2-host {self.v2_host} with --no-auth answers anyone who can reach it; pass "
                             "--insecure-public if a proxy or mesh in front of it authorizes requests (a KServe "
                             "runtime), or keep the token on and give --v2-tls-cert/--v2-tls-key")
        if self.token_auth and not self.v2_tls_cert:
            raise ServeError(f"--v2-host {self.v2_host} without TLS would carry the token across the network in "
                             "clear text; give --v2-tls-cert and --v2-tls-key (PEM), or keep the front on 127.0.0.1")

    def properties(self, store: Path) -> str:
        host = "http://127.0.0.1"
        lines = {
            "inference_address": f"{host}:{self.port}",
            "management_address": f"{host}:{self.port + 1}",
            "metrics_address": f"{host}:{self.port + 2}",
            "grpc_inference_address": "127.0.0.1",  # TorchServe always opens gRPC too: pin it to loopback
            "grpc_inference_port": str(self.port + 3),
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": str(self.port + 4),
            "model_store": str(store),
            # the store's models, by name: a candidate modelship promote keeps there (.promote-*.mar) is not one
            "load_models": ",".join(m.name for m in visible_mars(store)) or "all",
            "enable_model_api": "true" if self.model_api else "false",
            "disable_token_authorization": "false" if self.token_auth else "true",
            "token_expiration_min": str(self.token_expiration_min),
            "max_request_size": str(self.max_request_bytes),
            "max_response_size": str(max(self.max_request_bytes, 1 << 20) * 4),
            "job_queue_size": str(self.job_queue_size),
            "metrics_mode": "prometheus",
            "enable_metrics_api": "true",
            "install_py_dep_per_model": "false",
            "default_workers_per_model": "1",  # each archive's model-config.yaml sets its own workers
            "default_response_timeout": "30",
            "async_logging": "true",
        }
        return "".join(f"{k}={v}\n" for k, v in lines.items())


def front_args(store: Path, state: Path, config: ServeConfig) -> list[str]:
    """The Open Inference Protocol front's command line (``python -m modelship.serving.oip``)."""
    return ["--store", str(store), "--state", str(state), "--inference-url", f"http://127.0.0.1:{config.port}",
            "--management-url", f"http://127.0.0.1:{config.port + 1}", "--host", config.v2_host,
            "--http-port", str(config.port + 6), "--grpc-port", str(config.port + 7),
            "--max-request-bytes", str(config.max_request_bytes)] + \
        ([] if config.token_auth else ["--no-auth"]) + \
        (["--tls-cert", str(Path(config.v2_tls_cert).resolve()), "--tls-key", str(Path(config.v2_tls_key).resolve())]
         if config.v2_tls_cert else [])


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


PORTS = 8  # inference, management, metrics, gRPC inference, gRPC management, modelship's metrics, v2 REST, v2 gRPC


def free_port(span: int = PORTS) -> int:
    """A base port with ``span`` consecutive free ports, below the ephemeral range (where client
    connections could take one between this check and the server's bind)."""
    import random

    for _ in range(500):
        base = random.randrange(20000, 32000)
        if all(port_free(base + i) for i in range(span)):
            return base
    raise ServeError("no free ports on 127.0.0.1")


def client_host(host: str) -> str:
    """Where a client on this machine reaches a front listening on ``host`` (every address: loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"[{host}]" if ":" in host else host  # an IPv6 literal in a URL or address
