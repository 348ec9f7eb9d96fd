"""Stop what was started when the process is asked to stop.

SIGTERM (``docker stop``, systemd, Kubernetes) and SIGHUP (a closed terminal) end a Python process without
running its ``finally`` blocks; SIGINT raises KeyboardInterrupt, which does. Inside ``stopping()`` all three
raise ``Stopped`` (a KeyboardInterrupt), so the code that started TorchServe or Locust stops it on the way out.
The first signal starts the shutdown; later ones are ignored until it is done, so a second Ctrl-C cannot leave a
server half stopped (SIGKILL still ends everything at once).
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGHUP", "SIGINT")) if s is not None)


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; exit status 128 + signum by convention."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Received:
    """What ``stopping()`` saw: the signal that stopped the block, if any (a caller may have caught ``Stopped``)."""

    signum: int | None = None

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else 128 + self.signum


@contextlib.contextmanager
def stopping():
    """Within this block SIGTERM, SIGHUP and SIGINT raise ``Stopped`` (only the main thread can take signals;
    elsewhere it does nothing). Yields a ``Received``; the previous handlers come back on exit."""
    received = Received()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        for s in SIGNALS:  # the shutdown that follows runs to its end
            signal.signal(s, signal.SIG_IGN)
        for r in _ACTIVE:  # every enclosing block learns it too (a command that serves nests two)
            r.signum = signum
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    _ACTIVE.append(received)
    try:
        yield received
    finally:
        _ACTIVE.remove(received)
        for s, h in previous.items():
            signal.signal(s, h)


_ACTIVE: list = []  # the Received of every stopping() block now open
