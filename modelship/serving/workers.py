"""A served model's TorchServe worker processes: list them, measure their memory, kill one (fault
injection) and wait until TorchServe has replaced it. Works on a server started by ``modelship serve``
on this machine (its management URL and token come from ``serve.json``)."""

from __future__ import annotations

import os
import signal
import time

import psutil

from ..errors import ServeError
from .state import ServerState
from .torchserve import TorchServe


def describe(info: ServerState, model: str, timeout_s: float = 5.0) -> list[dict]:
    """The model's workers as the management API reports them (id, pid, status)."""
    return TorchServe(info).describe(model, timeout_s)


def pids(info: ServerState, model: str) -> list[int]:
    return [int(w["pid"]) for w in describe(info, model) if w.get("pid") and w.get("status") == "READY"]


def rss_mb(info: ServerState, model: str) -> float:
    """Resident memory of the model's worker processes, summed, in MiB."""
    total = 0
    for pid in pids(info, model):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def kill_one(info: ServerState, model: str, sig: int = signal.SIGKILL) -> int:
    """Kill one READY worker of ``model`` (the first the management API lists); returns its pid."""
    live = pids(info, model)
    if not live:
        raise ServeError(f"model '{model}' has no READY worker to kill")
    victim = live[0]
    proc = psutil.Process(victim)
    if "model_service_worker" not in " ".join(proc.cmdline()):
        raise ServeError(f"pid {victim} is not a TorchServe worker; refusing to kill it")
    os.kill(victim, sig)
    return victim


def wait_replaced(info: ServerState, model: str, dead: int, expected: int, timeout_s: float = 60.0) -> float:
    """Seconds until ``model`` again has ``expected`` READY workers, none of them ``dead``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            live = pids(info, model)
        except ServeError:
            live = []
        if len(live) >= expected and dead not in live:
            return time.monotonic() - start
        time.sleep(0.05)
    raise ServeError(f"model '{model}': worker {dead} was not replaced within {timeout_s:.0f} s")
