"""Start, wait for and stop a server, with secure defaults: TorchServe, modelship's metrics exporter and the v2 front in
one process group on 127.0.0.1, token authorization on, registration off, a request size cap. Startup failures are
explained in one line (Java missing, a port taken, a broken .mar, a model that refuses to load) instead of a hang.
Models registered or tokens rotated on a running server are recorded in its state here too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import MissingDependencyError, ServeError
from . import processes
from .archive import read_mar
from .config import PORTS, ServeConfig, client_host, front_args, port_free
from .state import KEY_FILE, METRICS_DIR, SPOOL_DIR, STATE_FILE, ServerState, read_keys, visible_mars
from .torchserve import TorchServe


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


def start(store: str | Path, state: str | Path, config: ServeConfig | None = None, before_launch=None) -> ServerState:
    """Start a server; return its state once every model is ready. ``before_launch(store, state)`` runs once every
    check passed (no server of this state runs, the ports are free) and before anything is launched: modelship
    promote's unfinished switch is put in place there."""
    config = config or ServeConfig()
    store, state = Path(store).resolve(), Path(state).resolve()
    _check(store, state, config)
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)  # it holds the key file and serve.json: owner only
    if before_launch is not None:
        before_launch(store, state)
    models = sorted(m.stem for m in visible_mars(store) if read_mar(m))  # a broken .mar fails here, in one line
    sockets = _fresh_folders(state)
    proc = _launch(store, state, config, sockets)
    info = ServerState(
        state=str(state), store=str(store), status="starting", models=models, pid=proc.pid,
        pid_started=processes.started(proc.pid), model_api=config.model_api,
        inference_url=f"http://127.0.0.1:{config.port}", management_url=f"http://127.0.0.1:{config.port + 1}",
        metrics_url=f"http://127.0.0.1:{config.port + 2}", shadow_metrics_url=f"http://127.0.0.1:{config.port + 5}",
        v2_url=f"{'https' if config.v2_tls_cert else 'http'}://{client_host(config.v2_host)}:{config.port + 6}"
        if config.oip else None,
        v2_grpc_address=f"{client_host(config.v2_host)}:{config.port + 7}" if config.oip else None,
        v2_tls=bool(config.v2_tls_cert) if config.oip else None, max_request_bytes=config.max_request_bytes,
        sockets=str(sockets) if sockets != state / "tmp" else None)
    try:
        info.save()  # from now on `serve --stop` finds it, even while it is still loading
        _wait_ready(proc, info, config)
        info.status = "ready"
        info.save()
    except BaseException:  # a failed start, or a signal while starting: nothing is left running
        processes.kill_group(proc.pid)
        _mark_stopped(info)
        raise
    return info


def _check(store: Path, state: Path, config: ServeConfig) -> None:
    config.check_front()
    check_java()
    if not store.is_dir():
        raise ServeError(f"{store}: model store not found; expected a folder of .mar files (modelship archive)")
    if not visible_mars(store) and not config.model_api:  # with the model API, models are registered once it runs
        raise ServeError(f"{store}: no .mar files; create one with: modelship archive ARTIFACT --out {store}")
    for m in visible_mars(store):
        read_mar(m)  # a broken .mar fails here, in one line
    if (state / STATE_FILE).is_file():
        prev = ServerState.load(state, running=False)
        if prev.status != "stopped" and prev.pid and processes.is_ours(prev.pid, prev.pid_started)[0]:
            raise ServeError(f"a server from {state} is still running; stop it: modelship serve --stop --state {state}")
    for p in range(config.port, config.port + PORTS):
        if not port_free(p):
            raise ServeError(f"port {p} on 127.0.0.1 is already in use; pass --port with a free base port "
                             f"(it uses PORT to PORT+{PORTS - 1})")
    if state == store or store in state.parents:
        raise ServeError(f"{state}: the state folder is inside the model store {store}; TorchServe would try to load "
                         "it as a model — pass a --state outside the store")


def _fresh_folders(state: Path) -> Path:
    """Clean logs (startup failures are read from them), no key file, counters from zero, no spooled request of an
    earlier run; returns the folder for the workers' sockets."""
    if (state / "logs").is_dir():
        shutil.rmtree(state / "logs.prev", ignore_errors=True)
        (state / "logs").rename(state / "logs.prev")
    (state / "logs").mkdir()
    (state / "tmp").mkdir(exist_ok=True)
    for stale in (KEY_FILE, STATE_FILE, processes.FRONT_PID):
        (state / stale).unlink(missing_ok=True)
    shutil.rmtree(state / METRICS_DIR, ignore_errors=True)
    shutil.rmtree(state / SPOOL_DIR, ignore_errors=True)
    (state / METRICS_DIR).mkdir()
    # TorchServe names each worker's Unix socket java.io.tmpdir/.ts.sock.9000, 9001, ... (TEMP sets it): a folder per
    # server, so two servers on one machine never take over each other's restarted workers (108-byte path limit)
    return state / "tmp" if len(str(state)) < 80 else Path(tempfile.mkdtemp(prefix="modelship-"))


def _launch(store: Path, state: Path, config: ServeConfig, sockets: Path) -> subprocess.Popen:
    """TorchServe in a session of its own, the metrics exporter and the v2 front started in it by the shell that then
    becomes TorchServe: every stop that ends TorchServe's group ends them too."""
    cfg = state / "config.properties"
    cfg.write_text(config.properties(store))
    env = {**os.environ, "TMPDIR": str(state / "tmp"), "TEMP": str(sockets), "LOG_LOCATION": str(state / "logs"),
           "METRICS_LOCATION": str(state / "logs"), "TS_DISABLE_SYSTEM_METRICS": "false",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PROMETHEUS_MULTIPROC_DIR": str(state / METRICS_DIR), "MODELSHIP_PY": sys.executable,
           "MODELSHIP_METRICS_PORT": str(config.port + 5), "MODELSHIP_METRICS_LOG": str(state / "logs" / "metrics.out")}
    if config.model_api:  # shadow parity keeps the requests it samples for modelship promote to replay
        from .shadow import SPOOL_ENV

        env[SPOOL_ENV] = str(state / SPOOL_DIR)
    launch = ('"$MODELSHIP_PY" -m modelship.serving.metrics "$PROMETHEUS_MULTIPROC_DIR" "$MODELSHIP_METRICS_PORT" '
              '>> "$MODELSHIP_METRICS_LOG" 2>&1 < /dev/null & ')
    if config.oip:
        env.update(MODELSHIP_OIP_ARGS=json.dumps(front_args(store, state, config)),
                   MODELSHIP_OIP_LOG=str(state / "logs" / "oip.out"))
        launch += ('"$MODELSHIP_PY" -m modelship.serving.oip --json-args "$MODELSHIP_OIP_ARGS" '
                   '>> "$MODELSHIP_OIP_LOG" 2>&1 < /dev/null & ')
    exe = shutil.which("torchserve") or str(Path(sys.executable).with_name("torchserve"))
    with open(state / "logs" / "torchserve.out", "ab") as out:  # the child keeps its own handle
        return subprocess.Popen(["/bin/sh", "-c", launch + 'exec "$@"', "sh", exe, "--start", "--foreground", "--ncs",
                                 "--model-store", str(store), "--ts-config", str(cfg)], cwd=state, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_ready(proc, info: ServerState, config: ServeConfig) -> None:
    """Until every model's workers are READY (and the management API and the v2 front answer), or a failure."""
    state, ts = info.folder, TorchServe(info)
    deadline = time.monotonic() + config.startup_timeout_s
    pending = set(info.models)
    while True:
        if proc.poll() is not None:
            raise ServeError(f"TorchServe exited during startup (code {proc.returncode}): "
                             f"{processes.exit_cause(state)}")
        cause = processes.fatal_line(state)
        if cause:
            raise ServeError(cause if cause.startswith("the Open") else f"a model failed to load: {cause}")
        if time.monotonic() > deadline:
            raise ServeError(f"TorchServe not ready after {config.startup_timeout_s:.0f} s (waiting for "
                             f"{', '.join(sorted(pending))}); see {state / 'logs'}")
        if config.token_auth and info.token is None and (state / KEY_FILE).is_file():
            try:
                info.take_keys(read_keys(state))
            except (ServeError, KeyError):
                pass  # half-written: read again
        if info.token or not config.token_auth:
            pending = {m for m in pending if not _workers_ready(ts, m)}
            if not pending and (info.models or ts.answers("management", "/models")) and _front_up(info):
                return
        time.sleep(0.25)


def _workers_ready(ts: TorchServe, model: str) -> bool:
    try:
        listed = ts.describe(model, timeout_s=2)
    except ServeError:  # not answering yet, or the model not registered yet
        return False
    return bool(listed) and all(w.get("status") == "READY" for w in listed)


def _front_up(info: ServerState) -> bool:
    """The v2 front answers (or is not run): our own front, asked on this machine, TLS not verified."""
    import warnings

    import requests
    import urllib3

    if not info.v2_url:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            return requests.get(f"{info.v2_url}/v2/health/live", headers=TorchServe(info).headers("inference"),
                                timeout=2, verify=False).status_code == 200
    except requests.RequestException:
        return False


def stop(state: str | Path, pid: int | None = None) -> bool:
    """Stop the server recorded in STATE/serve.json (TorchServe and its workers); False if none was running.
    Refuses to signal a process that is not the TorchServe this state started (a stale serve.json). With ``pid``:
    only the server of that pid (what a ``Server`` object started; another one started there since is left
    alone, and so is a state folder already gone)."""
    if pid is not None and not (Path(state) / STATE_FILE).is_file():
        return False
    info = ServerState.load(state, running=False)
    if pid is not None and info.pid not in (None, pid):
        return False
    pid = info.pid
    if info.status == "stopped" and not processes.group_alive(pid):
        return False
    ours, what = processes.is_ours(pid, info.pid_started) if pid else (False, "no pid")
    if pid and not ours and processes.alive(pid):
        _mark_stopped(info)
        raise ServeError(f"pid {pid} in {Path(state) / STATE_FILE} is not the TorchServe this state started (it runs "
                         f"'{what}'); nothing was signalled. The state is marked stopped; if a TorchServe of yours "
                         "is still running, stop it by hand")
    running = ours or processes.group_alive(pid)
    if running:
        processes.kill_group(pid)
    _mark_stopped(info)
    return running


def _mark_stopped(info: ServerState) -> None:
    """serve.json marked stopped, without its tokens (they died with the server); the sockets folder removed and
    no sampled request of users kept."""
    if info.sockets:
        shutil.rmtree(info.sockets, ignore_errors=True)
    shutil.rmtree(info.folder / SPOOL_DIR, ignore_errors=True)
    info.status, info.token, info.management_token = "stopped", None, None
    info.save()


def front_died(state: str | Path) -> ServerState:
    """serve.json marked: the v2 front is gone (its addresses taken out, the reason in ``v2_status``)."""
    info = ServerState.load(state, running=False)
    info.v2_status = f"stopped: {processes.front_failure(Path(state)) or 'it exited'}"
    info.v2_url = info.v2_grpc_address = None
    info.save()
    return info


def running_state(state: str | Path) -> ServerState:
    """The state of a server that runs (its process checked, not only its file)."""
    info = ServerState.load(Path(state).resolve())
    if not processes.alive(info.pid):
        raise ServeError(f"no server from {state} is running; start one with modelship serve STORE --state {state}")
    return info


def rotate_token(state: str | Path, kinds=("inference",), timeout_s: float = 10.0) -> ServerState:
    """Replace the running server's inference (and/or management) token through TorchServe's token API and refresh
    serve.json; the old token is refused from then on. Clients re-read serve.json to pick it up."""
    info = running_state(state)
    if not info.token:
        raise ServeError("this server runs without token authorization (--no-auth); there is no token to rotate")
    for kind in kinds:
        if kind not in ("inference", "management"):
            raise ServeError(f"unknown token type '{kind}'; expected inference or management")
        info.take_keys(TorchServe(info).rotate_token(kind, timeout_s))
    info.save()
    return info


def register(state: str | Path, mar: str, workers: int, timeout_s: float = 180.0) -> ServerState:
    """Register STORE/``mar`` on a server started with the model API (``modelship tune``'s own) and return once its
    ``workers`` are READY; serve.json then lists it. The .mar's model-config.yaml sets its batching and threads."""
    info = ServerState.load(Path(state).resolve())
    try:
        TorchServe(info).register(mar, workers=workers, timeout_s=timeout_s)
    except ServeError as e:
        raise ServeError(f"registering {mar}: {e}") from None
    info.models = sorted(set(info.models) | {Path(mar).stem})
    info.save()
    return info


def unregister(state: str | Path, model: str, timeout_s: float = 60.0) -> ServerState:
    info = ServerState.load(Path(state).resolve())
    try:
        TorchServe(info).unregister(model, timeout_s=timeout_s)
    except ServeError as e:
        raise ServeError(f"unregistering {model}: {e}") from None
    info.models = [m for m in info.models if m != model]
    info.save()
    return info
