"""Nothing left running: SIGTERM, SIGHUP and SIGINT to a foreground `serve`, `loadtest`, `tune` and `pipeline` (real
console scripts, real TorchServe, real Locust) stop what they started — also while TorchServe is still starting —
and leave serve.json marked stopped, no child process alive and the ports free. `serve --stop` refuses to signal a
process that is not the TorchServe its state started."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import files_holding
from modelship.serving import config, processes
from modelship.serving.state import ServerState
from modelship.serving.archive import archive

pytestmark = pytest.mark.serve
MODELSHIP = str(Path(sys.executable).with_name("modelship"))


def _wait(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _state(state: Path) -> dict:
    try:
        return json.loads((state / "serve.json").read_text())
    except (OSError, ValueError):
        return {}


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _locusts(pid: int) -> list[psutil.Process]:
    return [p for p in _tree(pid) if "locust" in _cmdline(p)]


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie not yet reaped by its parent: not running
        return ""


class Command:
    """A modelship console script in its own session (so a signal reaches it alone), stopped hard if a test fails."""

    def __init__(self, *args, cwd=None, program=(MODELSHIP,)):
        self.log = open(Path(cwd or ".") / "command.log", "w") if cwd else subprocess.DEVNULL
        self.proc = subprocess.Popen([*program, *map(str, args)], stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=cwd)
        self.seen: set = set()

    def watch(self) -> list:
        kids = _tree(self.proc.pid)
        self.seen |= {(p.pid, p.create_time()) for p in kids}
        return kids

    def signal_and_wait(self, sig, timeout=90) -> int:
        self.watch()
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def leftovers(self) -> list:
        alive = []
        for pid, started in self.seen:
            try:
                p = psutil.Process(pid)
                if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(" ".join(p.cmdline())[:120])
            except psutil.NoSuchProcess:
                pass
        return alive

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid, started in self.seen:  # a failed test must not leave TorchServe behind either
            try:
                p = psutil.Process(pid)
                if p.create_time() == started:
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def _ports_free(base: int) -> bool:
    return all(config.port_free(p) for p in range(base, base + config.PORTS))


@pytest.fixture(scope="module")
def store(tmp_path_factory, cnn_onnx):
    folder = tmp_path_factory.mktemp("lifecycle") / "store"
    archive(cnn_onnx, folder, name="cnn")
    return folder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
def test_a_signal_stops_a_foreground_serve_and_everything_it_started(tmp_path, store, sig):
    state, port = tmp_path / "state", config.free_port()
    cmd = Command("serve", store, "--state", state, "--port", port, "--json", tmp_path / "serve-out.json", cwd=tmp_path)
    try:
        _wait(lambda: _state(state).get("status") == "ready", 180, "the server to be ready")
        tokens = (_state(state)["token"], _state(state)["management_token"])
        _wait(lambda: (tmp_path / "serve-out.json").is_file(), 30, "serve --json")
        assert files_holding(tokens, tmp_path) == []  # --json and the logs hold no token
        assert any("java" in _cmdline(p) for p in cmd.watch())  # TorchServe's frontend ...
        _wait(lambda: any("model_service_worker" in _cmdline(p) for p in cmd.watch()), 30, "workers")
        code = cmd.signal_and_wait(sig)
        assert code == 0, (state / "../command.log").read_text()
        assert cmd.leftovers() == []  # ... and its Python workers are gone
        assert _ports_free(port)
        after = _state(state)
        assert after["status"] == "stopped" and after["token"] is None and after["management_token"] is None
    finally:
        cmd.close()


SIGNAL_WHILE_ANNOUNCING = """
import os, signal, sys
from modelship import cli
write = cli.write_json

def write_json(path, data):  # the server is ready; SIGTERM comes before serve reaches its wait
    os.kill(os.getpid(), signal.SIGTERM)
    write(path, data)

cli.write_json = write_json
sys.argv = ["modelship", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detach"])
def test_a_signal_between_ready_and_waiting_stops_serve_and_everything_it_started(tmp_path, store, detach):
    """The window CI once hit: SIGTERM after the server was ready, while serve still wrote --json and printed its
    addresses (before it waited), ended with 143 instead of a clean stop. Sent there on purpose, in a real process:
    a foreground serve stops and exits 0; a --detach that had not detached yet stops what it started and says it
    was stopped (143), never leaving a server behind that its caller thinks failed."""
    state = tmp_path / "state"
    cmd = Command("serve", store, "--state", state, "--port", config.free_port(), "--json", tmp_path / "out.json",
                  *(["--detach"] if detach else []), cwd=tmp_path, program=(sys.executable, "-c", SIGNAL_WHILE_ANNOUNCING))

    def ended():
        cmd.watch()  # remember what it started, to look for it afterwards
        return cmd.proc.poll() is not None

    try:
        _wait(ended, 240, "serve to end")
        code = cmd.proc.wait()
        log = (tmp_path / "command.log").read_text()
        assert code == (128 + signal.SIGTERM if detach else 0), log
        assert ("stopped by SIGTERM" in log) == detach and "Traceback" not in log, log
        assert cmd.seen and cmd.leftovers() == []  # TorchServe and its workers were started, and are gone
        assert _state(state)["status"] == "stopped" and _state(state)["token"] is None
    finally:
        cmd.close()


def test_a_server_object_stops_only_the_server_it_started(tmp_path):
    """Server.stop (also at interpreter exit) passes its pid: a server started in the same state folder since, or a
    folder already removed, is left alone. Without the pid the same call refuses the stranger and marks it stopped."""
    from modelship.serving import lifecycle

    state = tmp_path / "state"
    state.mkdir()
    ServerState(str(state), pid=os.getpid(), pid_started=psutil.Process().create_time(), token="t").save()
    assert lifecycle.stop(state, pid=os.getpid() + 100000) is False
    assert _state(state)["status"] == "ready" and _state(state)["token"] == "t"  # untouched
    assert lifecycle.stop(tmp_path / "gone", pid=1) is False
    with pytest.raises(Exception, match="not the TorchServe this state started"):  # this process is not TorchServe
        lifecycle.stop(state)
    assert _state(state)["status"] == "stopped"


def test_sigterm_while_torchserve_is_still_starting(tmp_path, store):
    """The measured gap: SIGTERM during start-up left TorchServe running with no serve.json. Now serve.json exists
    from the first moment, the start-up is abandoned, and everything it started stops."""
    state, port = tmp_path / "state", config.free_port()
    cmd = Command("serve", store, "--state", state, "--port", port, "--detach", cwd=tmp_path)
    try:
        _wait(lambda: _state(state).get("status") == "starting" and any("java" in _cmdline(p)
                                                                        for p in cmd.watch()), 120, "TorchServe")
        code = cmd.signal_and_wait(signal.SIGTERM)
        assert code == 128 + signal.SIGTERM
        assert cmd.leftovers() == [] and _ports_free(port)
        assert _state(state)["status"] == "stopped"
        p = subprocess.run([MODELSHIP, "serve", "--stop", "--state", state], capture_output=True, text=True)
        assert p.returncode == 0 and "no server was running" in p.stdout
    finally:
        cmd.close()


def test_sigterm_stops_a_load_test_and_its_locust_processes(served, work, tmp_path):
    cmd = Command("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "2", "--duration", "60s",
                  "--workers", "1", "--out", tmp_path / "lt", cwd=tmp_path)
    try:
        _wait(lambda: len(_locusts(cmd.proc.pid)) >= 2, 120, "Locust's master and worker")
        code = cmd.signal_and_wait(signal.SIGTERM)
        assert code == 128 + signal.SIGTERM
        assert cmd.leftovers() == []
        info = ServerState.load(work / "state")  # the server it tested is not its to stop: still serving
        assert processes.alive(info.pid)
    finally:
        cmd.close()


def test_sigterm_stops_tune_and_its_private_server(tmp_path, cnn_onnx):
    cmd = Command("tune", cnn_onnx.path, "--slo-p95-ms", "1000", "--out", tmp_path / "t", "--budget-minutes", "5",
                  "--seconds", "20", cwd=tmp_path)
    try:
        _wait(lambda: _locusts(cmd.proc.pid), 180, "tune's first load test")
        port = int(_state(tmp_path / "t" / "state")["inference_url"].rsplit(":", 1)[1])
        code = cmd.signal_and_wait(signal.SIGHUP)
        assert code == 128 + signal.SIGHUP
        assert cmd.leftovers() == [] and _ports_free(port)
        assert _state(tmp_path / "t" / "state")["status"] == "stopped"
    finally:
        cmd.close()


def test_sigterm_stops_a_pipeline_while_it_serves(tmp_path, cnn):
    out = tmp_path / "run"
    cmd = Command("pipeline", cnn.path, "--variants", "", "--no-text", "--tune-minutes", "0", "--loadtest-seconds",
                  "60", "--out", out, cwd=tmp_path)
    try:
        _wait(lambda: _locusts(cmd.proc.pid), 300, "the pipeline's load test")
        port = int(_state(out / "serve-state")["inference_url"].rsplit(":", 1)[1])
        code = cmd.signal_and_wait(signal.SIGTERM)
        assert code == 128 + signal.SIGTERM
        assert cmd.leftovers() == [] and _ports_free(port)
        assert _state(out / "serve-state")["status"] == "stopped"
    finally:
        cmd.close()


def test_stop_refuses_a_pid_that_is_not_its_torchserve(tmp_path):
    """A stale serve.json (after a reboot, its pid now someone else's) must not make `serve --stop` kill a stranger."""
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "serve.json").write_text(json.dumps({"status": "ready", "pid": stranger.pid, "pid_started": 1.0,
                                                      "token": "t", "management_token": "m", "models": [],
                                                      "inference_url": "http://127.0.0.1:1"}))  # an older file's keys
        p = subprocess.run([MODELSHIP, "serve", "--stop", "--state", state], capture_output=True, text=True)
        assert p.returncode == 2 and "is not the TorchServe this state started" in p.stderr
        assert "nothing was signalled" in p.stderr and stranger.poll() is None  # still alive
        assert _state(state)["status"] == "stopped" and _state(state)["token"] is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_benchmark_scratch_folder_is_gone_when_it_exits():
    """The benchmarks build their artifacts in ``bench.scratch()``: removed when the process ends, not left in /tmp."""
    p = subprocess.run([sys.executable, "-c", "from pathlib import Path; from modelship.bench import scratch; "
                        "d = Path(scratch()); (d / 'model.onnx').write_bytes(b'x'); print(d)"],
                       capture_output=True, text=True, timeout=120)
    folder = Path(p.stdout.strip())
    assert p.returncode == 0 and folder.name.startswith("modelship-bench-") and not folder.exists()
