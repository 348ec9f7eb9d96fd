"""A small REST client for a server recorded in serve.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, ServeError
from .server import bearer, read_state


def body_from_file(path: str | Path) -> bytes:
    """A request body from a .json file (sent as is) or a .npy array (one sample or a batch, simple JSON)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{p}: no such file; expected a .json request body or a .npy array")
    if p.suffix == ".npy":
        return json.dumps({"inputs": np.load(p, allow_pickle=False).tolist()}).encode()
    return p.read_bytes()


def post(state: str | Path, model: str, body: bytes, timeout: float = 30.0):
    import requests

    info = read_state(state)
    if model not in info["models"]:
        raise ServeError(f"model '{model}' is not served from {state}; served: {', '.join(info['models'])}")
    headers = {"Content-Type": "application/json", **bearer(info.get("token"))}
    try:
        return requests.post(f"{info['inference_url']}/predictions/{model}", data=body, headers=headers, timeout=timeout)
    except requests.RequestException as e:
        raise ServeError(f"cannot reach {info['inference_url']} ({type(e).__name__}); is the server running? "
                         f"(modelship serve STORE --state {state} --detach)") from None
