"""The one client of TorchServe's APIs: where each call goes, with which token, how long it may take, and what a
refusal means to modelship (a ``ServeError`` of kind errors; ``InputError`` for a request TorchServe calls bad).
Management (describe, versions, register, unregister, set-default, token rotation) and inference (/predictions).
The v2 front, which is asynchronous, builds its calls with ``url``/``headers`` here and sends them itself."""

from __future__ import annotations

import time

from ..errors import InputError, ServeError
from .state import ServerState, bearer, read_keys


class TorchServe:
    def __init__(self, server: ServerState, timeout_s: float = 30.0):
        self.server, self.timeout_s = server, timeout_s

    # ---- where and how ------------------------------------------------------------------------------------------
    def url(self, api: str, path: str) -> str:
        """``api``: management | inference."""
        return (self.server.management_url if api == "management" else self.server.inference_url) + path

    def headers(self, api: str) -> dict:
        return bearer(self.server.management_token if api == "management" else self.server.token)

    def call(self, api: str, method: str, path: str, timeout_s: float | None = None, retries: int = 0,
             headers: dict | None = None, **kw):
        """One call; connection failures are retried ``retries`` times (for calls that change nothing)."""
        import requests

        for attempt in range(retries + 1):
            try:
                return requests.request(method, self.url(api, path), timeout=timeout_s or self.timeout_s,
                                        headers={**self.headers(api), **(headers or {})}, **kw)
            except requests.ConnectionError as e:
                if attempt == retries:
                    raise ServeError(f"TorchServe's {api} API did not answer {method} {path}: {e}") from None
                time.sleep(0.2 * (attempt + 1))
            except requests.RequestException as e:
                raise ServeError(f"TorchServe's {api} API did not answer {method} {path}: {e}") from None

    def json(self, api: str, method: str, path: str, ok=(200,), **kw):
        r = self.call(api, method, path, **kw)
        if r.status_code not in ok:
            raise ServeError(f"{method} {path}: HTTP {r.status_code} {message(r)}")
        try:
            return r.json()
        except ValueError:
            raise ServeError(f"{method} {path}: TorchServe answered something that is not JSON: {r.text[:200]}") \
                from None

    # ---- management ---------------------------------------------------------------------------------------------
    def describe(self, model: str, timeout_s: float = 5.0) -> list[dict]:
        """The default version's workers (id, pid, status)."""
        found = self.json("management", "GET", f"/models/{model}", timeout_s=timeout_s, retries=2)
        try:
            return found[0].get("workers", [])
        except (IndexError, KeyError, AttributeError, TypeError):
            raise ServeError(f"management API: unexpected answer for model '{model}': {str(found)[:200]}") from None

    def versions(self, model: str) -> tuple[list[str], str]:
        """(every registered version of ``model``, its default version)."""
        every = [m["modelVersion"] for m in self.json("management", "GET", versions_path(model), retries=2)]
        default = self.json("management", "GET", f"/models/{model}", retries=2)[0]["modelVersion"]
        return every, default

    def register(self, mar: str, model: str | None = None, workers: int = 1, timeout_s: float = 180.0) -> None:
        """Register ``mar`` (a file name in the store) and return once its workers are ready."""
        params = {"url": mar, "initial_workers": workers, "synchronous": "true", **({"model_name": model} if model
                                                                                   else {})}
        self.json("management", "POST", "/models", params=params, timeout_s=timeout_s)

    def unregister(self, model: str, version: str | None = None, timeout_s: float = 60.0) -> None:
        """Unregister ``model`` (one ``version`` of it); a model not registered is no error."""
        self.json("management", "DELETE", f"/models/{model}" + (f"/{version}" if version else ""), ok=(200, 404),
                  timeout_s=timeout_s)

    def set_default(self, model: str, version: str) -> None:
        self.json("management", "PUT", f"/models/{model}/{version}/set-default")

    def rotate_token(self, kind: str, timeout_s: float = 10.0) -> dict:
        """A new ``kind`` token (inference | management) through TorchServe's token API; returns the key file once
        TorchServe has written it there."""
        state = self.server.folder
        before, api_key = read_keys(state)[kind]["key"], read_keys(state)["API"]["key"]
        r = self.call("management", "POST", "/token", params={"type": kind}, timeout_s=timeout_s,
                      headers=bearer(api_key))
        if r.status_code != 200:
            raise ServeError(f"TorchServe refused to rotate the {kind} token: HTTP {r.status_code} {message(r)}")
        deadline = time.monotonic() + timeout_s
        while read_keys(state)[kind]["key"] == before:
            if time.monotonic() > deadline:
                raise ServeError(f"TorchServe did not write a new {kind} token to its key file in {state}")
            time.sleep(0.05)
        return read_keys(state)

    def answers(self, api: str, path: str, timeout_s: float = 2.0) -> bool:
        """Whether ``path`` answers 200 now (readiness probes)."""
        try:
            return self.call(api, "GET", path, timeout_s=timeout_s).status_code == 200
        except ServeError:
            return False

    # ---- inference ----------------------------------------------------------------------------------------------
    def predict(self, model: str, body: bytes | str, headers: dict | None = None, version: str | None = None,
                timeout_s: float | None = None, session=None):
        """POST /predictions/MODEL[/VERSION] with ``headers`` (its Content-Type; JSON by default): the raw response
        (its status is the caller's to read). ``session``: a requests.Session to keep the connection."""
        import requests

        path = predictions_path(model, version)
        send = {"Content-Type": "application/json", **self.headers("inference"), **(headers or {})}
        try:
            return (session or requests).post(self.url("inference", path), data=body, headers=send,
                                              timeout=timeout_s or self.timeout_s)
        except requests.RequestException as e:
            raise ServeError(f"{self.server.inference_url} did not answer ({type(e).__name__}: {e}); is the server "
                             f"running? (modelship serve STORE --state {self.server.state} --detach)") from None

    def answer(self, r) -> dict:
        """A /predictions answer as JSON; a 400 as the InputError it is, any other failure a ServeError."""
        try:
            payload = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else \
                {"message": r.text}
        except ValueError:
            payload = {"message": r.text[:300]}
        if r.status_code == 400:
            raise InputError(f"HTTP 400: {payload.get('message', payload)}")
        if r.status_code != 200:
            raise ServeError(f"HTTP {r.status_code}: {payload.get('message', payload)}")
        return payload


def predictions_path(model: str, version: str | None = None) -> str:
    """Where TorchServe answers inference for ``model`` (its default version, or ``version``)."""
    return f"/predictions/{model}" + (f"/{version}" if version else "")


def versions_path(model: str) -> str:
    """Where TorchServe's management API lists every version of ``model`` with its workers."""
    return f"/models/{model}/all"


def message(r) -> str:
    """What TorchServe (or the handler) said in a refusal."""
    try:
        found = r.json()
        return (found.get("message") if isinstance(found, dict) else None) or r.text[:300]
    except ValueError:
        return r.text[:300]
