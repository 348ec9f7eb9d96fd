"""The token the v2 front checks: TorchServe's own, read from its key file (again whenever the file changes, so a
rotated token takes effect at once)."""

from __future__ import annotations

import hmac
from pathlib import Path

from ...errors import ServeError
from ..state import read_keys


class Token:
    def __init__(self, key_file: Path | None):
        self.key_file, self._seen, self._keys = key_file, None, {}

    def key(self, kind: str = "inference") -> str | None:
        """The ``inference`` or ``management`` token; None without token authorization or before it is written."""
        if self.key_file is None:
            return None
        try:
            stamp = self.key_file.stat().st_mtime_ns
            if stamp != self._seen:
                found = read_keys(self.key_file.parent)
                self._keys, self._seen = {k: found[k]["key"] for k in ("inference", "management")}, stamp
        except (OSError, ServeError):
            pass  # not written yet (TorchServe starting), or half-written: keep the last ones
        return self._keys.get(kind)

    def refusal(self, authorization: str | None) -> str | None:
        """Why ``authorization`` is refused, or None when it carries the inference token."""
        if self.key_file is None:
            return None
        key = self.key()
        if key is None:
            return "the server is starting; no token is issued yet"
        if not authorization:
            return "token authorization is on: send 'Authorization: Bearer <inference token>' (serve.json's token)"
        if not hmac.compare_digest(authorization.encode(), f"Bearer {key}".encode()):
            return "the token is not this server's inference token (rotated? read serve.json again)"
        return None
