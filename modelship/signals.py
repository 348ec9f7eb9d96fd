"""Stop what was started when the process is asked to stop.

SIGTERM (``docker stop``, systemd, Kubernetes) and SIGHUP (a closed terminal) end a Python process without
running its ``finally`` blocks; SIGINT raises KeyboardInterrupt, which does. Inside ``stopping()`` all three
raise ``Stopped`` (a KeyboardInterrupt), so the code that started TorchServe or Locust stops it on the way out.
The first signal starts the shutdown; later ones are ignored until the block that took it closes, and a server's
shutdown runs ``deferred()`` (signals held back until it is done), so a second Ctrl-C cannot leave a server half
stopped (SIGKILL still ends everything at once); one that comes after reaches the enclosing block, if any.
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
        if _HELD:  # a shutdown is running: it is delivered when that ends
            _HELD[-1].append(signum)
            return
        for s in SIGNALS:  # the shutdown that follows runs to its end (a Python no-op, not SIG_IGN: a second
            signal.signal(s, _ignore)  # signal already noted by the interpreter must find a handler)
        for r, _ in _OPEN:  # every enclosing block learns it too (a command that serves nests two)
            r.signum = signum
        raise Stopped(signum)

    entry = [received, {s: signal.signal(s, handler) for s in SIGNALS}]
    _OPEN.append(entry)
    try:
        yield received
    finally:
        _close(entry)


def _ignore(signum, frame) -> None:
    """What a signal does while the shutdown that the first one started runs."""


@contextlib.contextmanager
def deferred():
    """A shutdown that must not be cut in two: a signal that a ``stopping()`` block takes meanwhile (from any
    thread's delivery: Python runs handlers in the main thread) is held and raised again when the block ends,
    by what handles it then. Use it inside the ``stopping()`` block it protects. Off the main thread: nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _HELD.append([])
    try:
        yield
    finally:
        held = _HELD.pop()
        if held and _HELD:  # an enclosing deferred block delivers it
            _HELD[-1].extend(held)
        elif held:
            signal.raise_signal(held[0])


def _close(entry: list) -> None:
    """Leave a block: the innermost puts back the handlers it found; one left out of order (a server stopped after
    a block opened inside its lifetime has closed, or before) hands what it found to the block opened after it,
    so the handlers from before every block come back when the last one closes, and no stale one stays."""
    k = next(i for i, e in enumerate(_OPEN) if e is entry)
    if k == len(_OPEN) - 1:
        for s, h in entry[1].items():
            signal.signal(s, h)
    else:
        _OPEN[k + 1][1] = entry[1]
    del _OPEN[k]


_OPEN: list = []  # [Received, the handlers it replaced] of every stopping() block now open, oldest first
_HELD: list = []  # the signals held by each deferred() block now open

