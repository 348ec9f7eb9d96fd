"""What happens on the server while a load test runs: the model's worker memory, sampled every
second, and an optional fault — one worker killed at a set time — with the time until TorchServe has
replaced it and a correct answer comes back."""

from __future__ import annotations

import threading
import time

from ..serving import workers
from .golden import probe


class Monitor(threading.Thread):
    def __init__(self, info, spec: dict, kill_at_s: float | None = None, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.info, self.spec, self.kill_at_s, self.interval_s = info, spec, kill_at_s, interval_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, worker RSS MiB)
        self.fault: dict | None = None
        self.error: str | None = None
        self.done = threading.Event()

    def run(self):
        t0 = time.monotonic()
        try:
            expected = len(workers.pids(self.info, self.spec["model"]))
            while not self.done.is_set():
                now = time.monotonic() - t0
                if self.kill_at_s is not None and self.fault is None and now >= self.kill_at_s:
                    self.fault = self._kill(expected, now)
                    continue
                self.samples.append((round(now, 2), round(workers.rss_mb(self.info, self.spec["model"]), 2)))
                self.done.wait(self.interval_s)
        except Exception as e:  # noqa: BLE001 — reported in the result, the load test goes on
            self.error = f"{type(e).__name__}: {e}"

    def _kill(self, expected: int, at: float) -> dict:
        start = time.monotonic()
        pid = workers.kill_one(self.info, self.spec["model"])
        replaced = workers.wait_replaced(self.info, self.spec["model"], pid, expected)
        verdict, _ = probe(self.spec, timeout_s=start + 60 - time.monotonic())
        correct = verdict is not None and verdict.ok
        return {"killed_pid": pid, "killed_at_s": round(at, 2), "worker_replaced_s": round(replaced, 3),
                "recovery_s": round(time.monotonic() - start, 3), "answer_after_recovery_correct": correct,
                "workers_after": workers.pids(self.info, self.spec["model"])}

    def memory(self, warmup_s: float) -> dict:
        """Worker RSS after warm-up and at the end; growth as a fraction of the first."""
        after = [(t, m) for t, m in self.samples if t >= warmup_s and m > 0]
        if self.fault:  # the replacement worker starts from scratch: compare samples after it is ready
            ready = self.fault["killed_at_s"] + self.fault["recovery_s"] + warmup_s
            after = [(t, m) for t, m in after if t >= ready]
        if len(after) < 2:
            return {"start_mb": None, "end_mb": None, "peak_mb": None, "growth": None, "samples": len(self.samples)}
        start, end = after[0][1], after[-1][1]
        return {"start_mb": start, "end_mb": end, "peak_mb": max(m for _, m in after),
                "growth": round((end - start) / start, 4), "samples": len(self.samples)}
