"""Start, wait for and stop TorchServe with secure defaults; the ``serve.json`` state contract.

Defaults: every address on 127.0.0.1, token authorization on, model registration through the
management API off, a request size cap, Prometheus metrics. Startup failures are explained in one
line (Java missing, port taken, a broken .mar, a model that refuses to load) instead of a long hang.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingDependencyError, ServeError
from .archive import read_mar

STATE_FILE = "serve.json"


def bearer(token: str | None) -> dict:
    """The Authorization header TorchServe's token check wants (none when auth is off)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def public(info: dict) -> dict:
    """serve.json without its secrets (the tokens; their expiry stays): what --json and reports may hold."""
    return {k: v for k, v in info.items() if "token" not in k or k.endswith("_expires")}


FATAL_LOG = re.compile(r"(modelship: refusing to load.*|ModuleNotFoundError.*|Load model failed.*|"
                       r"Failed to load model.*|ArtifactError.*|Backend worker process died.*)")


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


def visible_mars(store: Path) -> list[Path]:
    return sorted(m for m in Path(store).glob("*.mar") if not m.name.startswith("."))


def check_java() -> str:
    java = shutil.which("java")
    if not java:
        raise MissingDependencyError("Java not found: TorchServe needs Java 17 "
                                     "(apt-get install -y openjdk-17-jre-headless, or make setup)")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)', out)
    if not m or int(m.group(1)) < 17:
        raise MissingDependencyError(f"Java {m.group(1) if m else '?'} found; TorchServe needs Java 17 "
                                     "(apt-get install -y openjdk-17-jre-headless)")
    return java


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


PORTS = 8  # inference, management, metrics, gRPC inference, gRPC management, modelship's metrics, v2 REST, v2 gRPC
METRICS_DIR = "metrics"  # in the state folder: every worker's prometheus-client counters (multiprocess mode)
SPOOL_DIR = "spool"  # in the state folder, with --allow-promote: live requests sampled by shadow parity


def free_port(span: int = PORTS) -> int:
    """A base port with ``span`` consecutive free ports, below the ephemeral range (where client
    connections could take one between this check and the server's bind)."""
    import random

    for _ in range(500):
        base = random.randrange(20000, 32000)
        if all(port_free(base + i) for i in range(span)):
            return base
    raise ServeError("no free ports on 127.0.0.1")


def read_state(state: str | Path, running: bool = True) -> dict:
    """serve.json of the server started in ``state``; with ``running``, refused unless that server is ready."""
    path = Path(state) / STATE_FILE
    if not path.is_file():
        raise ServeError(f"{path} not found; start a server with: modelship serve STORE --state {state} --detach")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ServeError(f"{path}: not valid JSON ({e}); start the server again") from None
    status = info.get("status", "ready")
    if running and status != "ready":
        raise ServeError(f"the server recorded in {path} is {status}"
                         + ("; wait until it is ready" if status == "starting" else
                            f"; start one with: modelship serve STORE --state {state} --detach"))
    return info


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def start(store: str | Path, state: str | Path, config: ServeConfig | None = None, before_launch=None) -> dict:
    """Start TorchServe in its own process group; return the serve.json contents once all models are ready.
    ``before_launch(store, state)`` runs once every check passed (no server of this state runs, the ports are free)
    and before anything is launched: ``modelship promote``'s unfinished switch is put in place there."""
    config = config or ServeConfig()
    config.check_front()
    check_java()
    store, state = Path(store).resolve(), Path(state).resolve()
    if not store.is_dir():
        raise ServeError(f"{store}: model store not found; expected a folder of .mar files (modelship archive)")
    mars = visible_mars(store)
    if not mars and not config.model_api:  # with the model API, models are registered once it runs
        raise ServeError(f"{store}: no .mar files; create one with: modelship archive ARTIFACT --out {store}")
    models = {m.stem: read_mar(m).name for m in mars}  # a broken .mar fails here, in one line
    old = state / STATE_FILE
    if old.is_file():
        prev = read_state(state, running=False)
        if prev.get("status") != "stopped" and prev.get("pid") and _is_ours(prev)[0]:
            raise ServeError(f"a server from {state} is still running; stop it: modelship serve --stop --state {state}")
    for p in range(config.port, config.port + PORTS):
        if not port_free(p):
            raise ServeError(f"port {p} on 127.0.0.1 is already in use; pass --port with a free base port "
                             f"(it uses PORT to PORT+{PORTS - 1})")
    if state == store or store in state.parents:
        raise ServeError(f"{state}: the state folder is inside the model store {store}; TorchServe would try to load "
                         "it as a model — pass a --state outside the store")
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)  # it holds the key file and serve.json: owner only
    if before_launch is not None:
        before_launch(store, state)
        mars = visible_mars(store)
        models = {m.stem: read_mar(m).name for m in mars}
    if (state / "logs").is_dir():  # startup failures are read from these logs: start from clean ones
        shutil.rmtree(state / "logs.prev", ignore_errors=True)
        (state / "logs").rename(state / "logs.prev")
    (state / "logs").mkdir()
    (state / "tmp").mkdir(exist_ok=True)
    for stale in ("key_file.json", STATE_FILE, "oip.pid"):
        (state / stale).unlink(missing_ok=True)
    shutil.rmtree(state / METRICS_DIR, ignore_errors=True)  # counters start from zero with the server
    shutil.rmtree(state / SPOOL_DIR, ignore_errors=True)  # and no request of an earlier run is kept
    (state / METRICS_DIR).mkdir()
    cfg = state / "config.properties"
    cfg.write_text(config.properties(store))
    # TorchServe names each worker's Unix socket java.io.tmpdir/.ts.sock.9000, 9001, ... (TEMP sets it): a
    # folder per server, so two servers on one machine never take over each other's restarted workers
    sockets = state / "tmp" if len(str(state)) < 80 else Path(tempfile.mkdtemp(prefix="modelship-"))  # 108-byte limit
    env = {**os.environ, "TMPDIR": str(state / "tmp"), "TEMP": str(sockets), "LOG_LOCATION": str(state / "logs"),
           "METRICS_LOCATION": str(state / "logs"), "TS_DISABLE_SYSTEM_METRICS": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PROMETHEUS_MULTIPROC_DIR": str(state / METRICS_DIR)}
    if config.model_api:  # shadow parity keeps the requests it samples for modelship promote to replay
        from .shadow import SPOOL_ENV

        env[SPOOL_ENV] = str(state / SPOOL_DIR)
    exe = shutil.which("torchserve") or str(Path(sys.executable).with_name("torchserve"))
    # modelship's metrics exporter starts in TorchServe's session and process group (a shell starts it, then
    # becomes TorchServe): every stop that ends TorchServe's group ends it too
    env.update(MODELSHIP_PY=sys.executable, MODELSHIP_METRICS_PORT=str(config.port + 5),
               MODELSHIP_METRICS_LOG=str(state / "logs" / "metrics.out"))
    launch = ('"$MODELSHIP_PY" -m modelship.serving.metrics "$PROMETHEUS_MULTIPROC_DIR" "$MODELSHIP_METRICS_PORT" '
              '>> "$MODELSHIP_METRICS_LOG" 2>&1 < /dev/null & ')
    if config.oip:  # the v2 front too, in the same group: KServe's model server forwarding to TorchServe
        env.update(MODELSHIP_OIP_ARGS=json.dumps(front_args(store, state, config)),
                   MODELSHIP_OIP_LOG=str(state / "logs" / "oip.out"))
        launch += ('"$MODELSHIP_PY" -m modelship.serving.oip --json-args "$MODELSHIP_OIP_ARGS" '
                   '>> "$MODELSHIP_OIP_LOG" 2>&1 < /dev/null & ')
    launch += 'exec "$@"'
    with open(state / "logs" / "torchserve.out", "ab") as out:  # the child keeps its own handle
        proc = subprocess.Popen(["/bin/sh", "-c", launch, "sh", exe, "--start", "--foreground", "--ncs",
                                 "--model-store", str(store), "--ts-config", str(cfg)], cwd=state, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    info = {"status": "starting", "inference_url": f"http://127.0.0.1:{config.port}",
            "management_url": f"http://127.0.0.1:{config.port + 1}", "metrics_url": f"http://127.0.0.1:{config.port + 2}",
            "shadow_metrics_url": f"http://127.0.0.1:{config.port + 5}", "model_api": config.model_api,
            "v2_url": f"{'https' if config.v2_tls_cert else 'http'}://{_client_host(config.v2_host)}:{config.port + 6}"
            if config.oip else None,
            "v2_grpc_address": f"{_client_host(config.v2_host)}:{config.port + 7}" if config.oip else None,
            "v2_tls": bool(config.v2_tls_cert) if config.oip else None,
            "token": None, "management_token": None, "models": sorted(models), "pid": proc.pid,
            "pid_started": _started(proc.pid), "store": str(store), "state": str(state),
            "max_request_bytes": config.max_request_bytes,
            "sockets": str(sockets) if sockets != state / "tmp" else None}
    try:
        _write_state(state, info)  # from now on `serve --stop` finds it, even while it is still loading
        _wait_ready(proc, state, info, config)
        info["status"] = "ready"
        _write_state(state, info)
    except BaseException:  # a failed start, or a signal while starting: nothing is left running
        _kill_group(proc.pid)
        _stopped(state, info)
        raise
    return info


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a front listening on ``host`` (every address: loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"[{host}]" if ":" in host else host  # an IPv6 literal in a URL or address


def _write_state(state: Path, info: dict) -> None:
    """serve.json (and TorchServe's key file beside it) readable by the owner only."""
    path = state / STATE_FILE
    tmp = state / f".{STATE_FILE}.{os.getpid()}.partial"  # written whole, then renamed: a reader never sees half
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)
    path.chmod(0o600)
    if (state / "key_file.json").is_file():
        (state / "key_file.json").chmod(0o600)


def _keys(state: Path) -> dict:
    try:
        return json.loads((state / "key_file.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ServeError(f"{state / 'key_file.json'}: TorchServe's key file is unreadable ({e}); is the server "
                         "running with token authorization?") from None


TOKEN_TYPES = {"inference": ("token", "token_expires"), "management": ("management_token", "management_token_expires")}


def rotate_token(state: str | Path, kinds=("inference",), timeout_s: float = 10.0) -> dict:
    """Replace the running server's inference (and/or management) token through TorchServe's token API and
    refresh serve.json; the old token is refused from then on. Clients re-read serve.json to pick it up."""
    import requests

    state = Path(state).resolve()
    info = read_state(state)
    if not alive(info.get("pid")):
        raise ServeError(f"no server from {state} is running; start one with modelship serve STORE --state {state}")
    if not info.get("token"):
        raise ServeError("this server runs without token authorization (--no-auth); there is no token to rotate")
    for kind in kinds:
        if kind not in TOKEN_TYPES:
            raise ServeError(f"unknown token type '{kind}'; expected {' or '.join(TOKEN_TYPES)}")
        before = _keys(state)[kind]["key"]
        api = _keys(state)["API"]["key"]
        r = requests.post(f"{info['management_url']}/token", params={"type": kind},
                          headers=bearer(api), timeout=timeout_s)
        if r.status_code != 200:
            raise ServeError(f"TorchServe refused to rotate the {kind} token: HTTP {r.status_code} {r.text[:200]}")
        deadline = time.monotonic() + timeout_s
        while _keys(state)[kind]["key"] == before:
            if time.monotonic() > deadline:
                raise ServeError(f"TorchServe did not write a new {kind} token to {state / 'key_file.json'}")
            time.sleep(0.05)
    keys = _keys(state)
    for kind, (field, expires) in TOKEN_TYPES.items():
        info[field], info[expires] = keys[kind]["key"], keys[kind].get("expiration time")
    _write_state(state, info)
    return info


def register(state: str | Path, mar: str, workers: int, timeout_s: float = 180.0) -> dict:
    """Register STORE/``mar`` on a server started with the model API (``modelship tune``'s own) and return once
    its ``workers`` are READY; serve.json then lists it. The .mar's model-config.yaml sets its batching and
    threads."""
    import requests

    state = Path(state).resolve()
    info = read_state(state)
    try:
        r = requests.post(f"{info['management_url']}/models", headers=bearer(info.get("management_token")),
                          params={"url": mar, "initial_workers": workers, "synchronous": "true"}, timeout=timeout_s)
    except requests.RequestException as e:
        raise ServeError(f"registering {mar}: the management API did not answer: {e}") from None
    if r.status_code != 200:
        raise ServeError(f"registering {mar}: HTTP {r.status_code} {r.text[:300]}")
    info["models"] = sorted(set(info["models"]) | {Path(mar).stem})
    _write_state(state, info)
    return info


def unregister(state: str | Path, model: str, timeout_s: float = 60.0) -> dict:
    import requests

    state = Path(state).resolve()
    info = read_state(state)
    try:
        r = requests.delete(f"{info['management_url']}/models/{model}", headers=bearer(info.get("management_token")),
                            timeout=timeout_s)
    except requests.RequestException as e:
        raise ServeError(f"unregistering {model}: the management API did not answer: {e}") from None
    if r.status_code not in (200, 404):
        raise ServeError(f"unregistering {model}: HTTP {r.status_code} {r.text[:300]}")
    info["models"] = [m for m in info["models"] if m != model]
    _write_state(state, info)
    return info


def _wait_ready(proc, state: Path, info: dict, config: ServeConfig) -> None:
    from . import workers

    deadline = time.monotonic() + config.startup_timeout_s
    pending = set(info["models"])
    while True:
        if proc.poll() is not None:
            raise ServeError(f"TorchServe exited during startup (code {proc.returncode}): {_log_cause(state)}")
        cause = _fatal_line(state)
        if cause:
            raise ServeError(cause if cause.startswith("the Open") else f"a model failed to load: {cause}")
        if time.monotonic() > deadline:
            raise ServeError(f"TorchServe not ready after {config.startup_timeout_s:.0f} s (waiting for "
                             f"{', '.join(sorted(pending))}); see {state / 'logs'}")
        if config.token_auth and info["token"] is None and (state / "key_file.json").is_file():
            try:
                keys = json.loads((state / "key_file.json").read_text())
                for kind, (field, expires) in TOKEN_TYPES.items():
                    info[field], info[expires] = keys[kind]["key"], keys[kind].get("expiration time")
            except (json.JSONDecodeError, KeyError):
                pass
        if info["token"] or not config.token_auth:
            for name in sorted(pending):
                try:
                    listed = workers.describe(info, name, timeout_s=2)
                except ServeError:  # not answering yet, or the model not registered yet
                    break
                if listed and all(w.get("status") == "READY" for w in listed):
                    pending.discard(name)
            if not pending and (info["models"] or _management_up(info)) and _v2_up(info):
                return
        time.sleep(0.25)


def _management_up(info: dict) -> bool:
    """The management API answers (a server started with no models has nothing else to wait for)."""
    return _answers(f"{info['management_url']}/models", info.get("management_token"))


def _v2_up(info: dict) -> bool:
    """The Open Inference Protocol front answers (or is not run)."""
    return not info.get("v2_url") or _answers(f"{info['v2_url']}/v2/health/live", info.get("token"))


def _answers(url: str, token: str | None) -> bool:
    import requests
    import urllib3

    try:
        with warnings.catch_warnings():  # our own TLS front, asked on this machine whether it answers
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            return requests.get(url, headers=bearer(token), timeout=2, verify=False).status_code == 200
    except requests.RequestException:
        return False


def front_alive(state: Path) -> bool:
    """The Open Inference Protocol front this state started still runs (its pid file, its process)."""
    import psutil

    try:
        pid = int((Path(state) / "oip.pid").read_text())
    except (OSError, ValueError):
        return True  # not written yet: starting
    try:  # its parent (TorchServe's JVM, which the launching shell became) does not reap it: a zombie is dead
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def front_died(state: Path) -> dict:
    """serve.json marked: the v2 front is gone (its addresses taken out, the reason in ``v2_status``)."""
    info = read_state(state, running=False)
    cause = _front_failure(Path(state)) or "it exited"
    info.update(v2_status=f"stopped: {cause}", v2_url=None, v2_grpc_address=None)
    _write_state(Path(state), info)
    return info


def _fatal_line(state: Path) -> str | None:
    for log in ("model_log.log", "ts_log.log"):
        p = state / "logs" / log
        if p.is_file():
            m = FATAL_LOG.search(p.read_text(errors="replace"))
            if m:
                return m.group(1).strip()[:400]
    return _front_failure(state)


def _front_failure(state: Path) -> str | None:
    """Why the v2 front died, from its log: a traceback's last line, or its argument parser's complaint."""
    front = state / "logs" / "oip.out"
    text = front.read_text(errors="replace") if front.is_file() else ""
    if "Traceback" in text or ": error:" in text:
        last = [l for l in text.splitlines() if l.strip() and not l.startswith((" ", "\t"))][-1]
        return f"the Open Inference Protocol front failed: {last.strip()[:300]} (see {front})"
    return None


def _log_cause(state: Path) -> str:
    text = ""
    for log in ("torchserve.out", "ts_log.log"):
        p = state / "logs" / log
        if p.is_file():
            text += p.read_text(errors="replace")
    lines = [l for l in text.splitlines() if re.search(r"address already in use|failed to bind", l, re.I)] or \
            [l for l in text.splitlines() if re.search(r"(error|exception|failed)", l, re.I) and "-smi" not in l]
    return (lines[-1] if lines else (text.strip().splitlines() or ["no output"])[-1]).strip()[:400]


def _kill_group(pid: int, timeout: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _is_ours(info: dict) -> tuple[bool, str]:
    """Whether serve.json's pid is still the TorchServe this state started (the same process: its start time and
    command line), and what runs under that pid otherwise."""
    import psutil

    try:
        proc = psutil.Process(info["pid"])
        cmd = " ".join(proc.cmdline())
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return False, "no process"
    except psutil.Error as e:
        return False, f"a process modelship cannot inspect ({type(e).__name__})"
    recorded = info.get("pid_started")
    same = recorded is None or abs(started - recorded) < 1.0
    return same and ("torchserve" in cmd or "org.pytorch.serve" in cmd), cmd[:160]


def _stopped(state: Path, info: dict) -> None:
    """serve.json marked stopped, without its tokens (they died with the server); the sockets folder removed."""
    if info.get("sockets"):
        shutil.rmtree(info["sockets"], ignore_errors=True)
    shutil.rmtree(Path(state) / SPOOL_DIR, ignore_errors=True)  # users' requests do not outlive the server
    _write_state(Path(state), {**public(info), "status": "stopped", "token": None, "management_token": None})


def stop(state: str | Path) -> bool:
    """Stop the server recorded in STATE/serve.json (TorchServe and its workers); False if none was running.
    Refuses to signal a process that is not the TorchServe this state started (a stale serve.json)."""
    state = Path(state)
    info = read_state(state, running=False)
    pid = info.get("pid")
    if info.get("status") == "stopped" and not _group_alive(pid):
        return False
    ours, what = _is_ours(info) if pid else (False, "no pid")
    if pid and not ours and alive(pid):
        _stopped(state, info)
        raise ServeError(f"pid {pid} in {state / STATE_FILE} is not the TorchServe this state started (it runs "
                         f"'{what}'); nothing was signalled. The state is marked stopped; if a TorchServe of yours "
                         "is still running, stop it by hand")
    running = ours or _group_alive(pid)
    if running:
        _kill_group(pid)
    _stopped(state, info)
    return running


def _group_alive(pgid: int | None) -> bool:
    """A process group led by ``pgid`` still has members (TorchServe's Java and workers outlive a killed leader)."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
