"""What a running server is, as ``STATE/serve.json`` records it: the one place that knows that file's keys and which of
them are secrets. ``ServerState.load(state)`` reads it (files of earlier versions too: unknown keys are kept, missing
ones take their defaults), ``save()`` writes it whole and renames it into place, owner-only. TorchServe's key file
beside it is read here too (``read_keys``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ServeError

STATE_FILE = "serve.json"
KEY_FILE = "key_file.json"  # TorchServe's own: the inference, management and API tokens
METRICS_DIR = "metrics"  # every worker's prometheus-client counters (multiprocess mode)
SPOOL_DIR = "spool"  # with --allow-promote: live requests sampled by shadow parity
TOKEN_TYPES = {"inference": ("token", "token_expires"), "management": ("management_token", "management_token_expires")}


@dataclass
class ServerState:
    state: str  # the state folder
    store: str = ""  # the model store
    inference_url: str = ""
    management_url: str = ""
    metrics_url: str = ""
    shadow_metrics_url: str = ""
    models: list = field(default_factory=list)
    status: str = "ready"  # starting | ready | stopped
    pid: int | None = None  # TorchServe's (the leader of its process group)
    pid_started: float | None = None
    model_api: bool = False  # registration open to the management token's holder (promote, tune)
    v2_url: str | None = None  # the Open Inference Protocol front; None when not run (or when it died)
    v2_grpc_address: str | None = None
    v2_tls: bool | None = None
    v2_status: str | None = None  # why the front is gone, once it is
    max_request_bytes: int = 1 << 20
    sockets: str | None = None  # a folder of TorchServe's worker sockets outside the state folder (long paths)
    token: str | None = None  # secrets: only serve.json and TorchServe's key file ever hold them
    token_expires: str | None = None
    management_token: str | None = None
    management_token_expires: str | None = None
    extra: dict = field(default_factory=dict)  # keys of other versions, kept as they were

    SECRETS = ("token", "management_token")

    @classmethod
    def from_dict(cls, d: dict) -> "ServerState":
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **d["extra"]}

    def public(self) -> dict:
        """Without its secrets (their expiry stays): what --json output and reports may hold."""
        return {k: v for k, v in self.to_dict().items() if k not in self.SECRETS}

    @property
    def folder(self) -> Path:
        return Path(self.state)

    @classmethod
    def load(cls, state: str | Path, running: bool = True) -> "ServerState":
        """serve.json of the server started in ``state``; with ``running``, refused unless that server is ready."""
        path = Path(state) / STATE_FILE
        if not path.is_file():
            raise ServeError(f"{path} not found; start a server with: modelship serve STORE --state {state} --detach")
        try:
            found = json.loads(path.read_text())
            if not isinstance(found, dict):
                raise ValueError("not an object")
            info = cls.from_dict({"state": str(Path(state)), **found})
        except (ValueError, TypeError) as e:
            raise ServeError(f"{path}: not a serve.json modelship wrote ({e}); start the server again") from None
        if running and info.status != "ready":
            raise ServeError(f"the server recorded in {path} is {info.status}"
                             + ("; wait until it is ready" if info.status == "starting" else
                                f"; start one with: modelship serve STORE --state {state} --detach"))
        return info

    def save(self) -> None:
        """serve.json (and TorchServe's key file beside it) readable by the owner only, written whole and renamed."""
        folder = self.folder
        tmp = folder / f".{STATE_FILE}.{os.getpid()}.partial"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, folder / STATE_FILE)
        if (folder / KEY_FILE).is_file():
            (folder / KEY_FILE).chmod(0o600)

    def take_keys(self, keys: dict) -> None:
        """The tokens and their expiry from TorchServe's key file (``read_keys``)."""
        for kind, (name, expires) in TOKEN_TYPES.items():
            setattr(self, name, keys[kind]["key"])
            setattr(self, expires, keys[kind].get("expiration time"))


def read_keys(state: str | Path) -> dict:
    """TorchServe's key file: {"inference": {"key", "expiration time"}, "management": {...}, "API": {...}}."""
    path = Path(state) / KEY_FILE
    try:
        keys = json.loads(path.read_text())
        if not all(isinstance(keys.get(k), dict) and "key" in keys[k] for k in ("inference", "management")):
            raise ValueError("no inference and management keys")
        return keys
    except (OSError, ValueError) as e:
        raise ServeError(f"{path}: TorchServe's key file is unreadable ({e}); is the server running with token "
                         "authorization?") from None


def bearer(token: str | None) -> dict:
    """The Authorization header TorchServe's token check wants (none when auth is off)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def visible_mars(store: str | Path) -> list[Path]:
    """The store's models: its .mar files but the hidden ones (a candidate modelship promote keeps there)."""
    return sorted(m for m in Path(store).glob("*.mar") if not m.name.startswith("."))
