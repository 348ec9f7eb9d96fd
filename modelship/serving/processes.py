"""The processes a server runs (TorchServe's JVM leading its group, its workers, the metrics exporter and the v2
front) and what their logs say when they fail: alive, ours, killed as a group."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

FATAL_LOG = re.compile(r"(modelship: refusing to load.*|ModuleNotFoundError.*|Load model failed.*|"
                       r"Failed to load model.*|ArtifactError.*|Backend worker process died.*)")
FRONT_PID = "oip.pid"  # in the state folder: the running v2 front's pid (it writes it itself)


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


def started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def is_ours(pid: int, pid_started: float | None) -> tuple[bool, str]:
    """Whether ``pid`` is still the TorchServe a state started (the same process: its start time and command line),
    and what runs under that pid otherwise."""
    import psutil

    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline())
        when = proc.create_time()
    except psutil.NoSuchProcess:
        return False, "no process"
    except psutil.Error as e:
        return False, f"a process modelship cannot inspect ({type(e).__name__})"
    same = pid_started is None or abs(when - pid_started) < 1.0
    return same and ("torchserve" in cmd or "org.pytorch.serve" in cmd), cmd[:160]


def group_alive(pgid: int | None) -> bool:
    """A process group led by ``pgid`` still has members (TorchServe's Java and workers outlive a killed leader)."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_group(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM to the group, SIGKILL to what is left after ``timeout``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def front_alive(state: str | Path) -> bool:
    """The v2 front a state started still runs (its pid file; a zombie, which its parent the JVM never reaps, is
    dead). True before it wrote its pid."""
    import psutil

    try:
        pid = int((Path(state) / FRONT_PID).read_text())
    except (OSError, ValueError):
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def fatal_line(state: Path) -> str | None:
    """The line of a log that says a start failed (a model refused, a worker died, the v2 front crashed)."""
    for log in ("model_log.log", "ts_log.log"):
        p = state / "logs" / log
        if p.is_file():
            m = FATAL_LOG.search(p.read_text(errors="replace"))
            if m:
                return m.group(1).strip()[:400]
    return front_failure(state)


def front_failure(state: Path) -> str | None:
    """Why the v2 front died, from its log: a traceback's last line, or its argument parser's complaint."""
    front = state / "logs" / "oip.out"
    text = front.read_text(errors="replace") if front.is_file() else ""
    if "Traceback" in text or ": error:" in text:
        last = [l for l in text.splitlines() if l.strip() and not l.startswith((" ", "\t"))][-1]
        return f"the Open Inference Protocol front failed: {last.strip()[:300]} (see {front})"
    return None


def exit_cause(state: Path) -> str:
    """Why TorchServe exited during startup, from its output."""
    text = ""
    for log in ("torchserve.out", "ts_log.log"):
        p = state / "logs" / log
        if p.is_file():
            text += p.read_text(errors="replace")
    lines = [l for l in text.splitlines() if re.search(r"address already in use|failed to bind", l, re.I)] or \
            [l for l in text.splitlines() if re.search(r"(error|exception|failed)", l, re.I) and "-smi" not in l]
    return (lines[-1] if lines else (text.strip().splitlines() or ["no output"])[-1]).strip()[:400]
