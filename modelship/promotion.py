"""``modelship promote``: a new version of a served model judged beside the current one before any client gets
it, then made the default version or unregistered; ``--rollback`` makes the previous default the default again.

The candidate is registered as another version of the model (TorchServe serves ``/predictions/NAME`` from the
default version only, so it takes no client traffic). Each sample of the candidate's evaluation data is sent to
the current version and to the candidate by their versioned paths, one at a time, and the candidate's answer is
judged against the reference (the load test's verdict and served tolerance) and against the current version's
answer (its label, and the largest difference). The switch is TorchServe's set-default: requests in flight
finish on the version that took them. STATE/promote.json keeps the evidence of every promote and rollback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .comparison import abs_diff
from .errors import GateError, ServeError
from .loadtests import golden
from .loadtests.summary import GateFailure, kind_of, wilson_upper
from .serving.archive import read_mar
from .serving.state import SPOOL_DIR, ServerState
from .serving.torchserve import TorchServe

RECORD = "promote.json"
KEPT = "promote"  # STATE/promote/MODEL/VERSION.mar: the store file promote replaced, for --rollback
LOCK = "promote.lock"  # one promote or rollback at a time


@dataclass
class Promotion:
    model: str
    decision: str  # promoted | refused | rolled back
    version: str
    previous: str | None
    samples: int = 0  # evaluation samples judged (against the reference and the current version)
    live: int = 0  # live requests replayed from the shadow spool (judged against the current version)
    burst: int = 0  # evaluation samples also sent to the candidate all at once (judged against the reference)
    agreement_reference: float | None = None  # share of candidate labels equal to the reference's
    beyond_tolerance: int = 0  # candidate answers beyond the served tolerance of the reference's
    agreement_current: float | None = None  # share of candidate labels equal to the current version's (all)
    max_abs_diff_reference: float | None = None
    max_abs_diff_current: float | None = None
    agreement: float | None = None  # the lower of the two agreements
    max_abs_diff: float | None = None  # the worst difference from the reference
    p95_ms_current: float | None = None
    p95_ms_candidate: float | None = None
    slo_p95_ms: float | None = None
    failures: list = field(default_factory=list)  # [{"kind", "message"}]
    candidate: str | None = None
    at: str = ""

    @property
    def kind(self) -> str | None:
        return kind_of(self.failures)


def versions(info: ServerState, model: str) -> tuple[list[str], str]:
    """(every registered version of ``model``, its default version)."""
    return TorchServe(info).versions(model)


def mar_version(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]


def _workers(path: Path) -> int:
    import yaml

    with zipfile.ZipFile(path) as z:
        return int((yaml.safe_load(z.read("model-config.yaml")) or {}).get("minWorkers") or 1)


def _hidden(model: str, version: str) -> str:
    """The candidate's file name in the store: hidden, so a restart of the server never loads it on its own."""
    return f".promote-{model}-{version}.mar"


# ---- the record: STATE/promote.json ------------------------------------------------------------------------------
# Its "defaults" say, per model, which version must be the default, where its judged bytes are (sha256), and the
# rollback target; "applied": false while a promote or rollback that committed has not finished putting it in place.

def _read(state: Path) -> dict:
    p = state / RECORD
    if not p.is_file():
        return {}
    try:
        found = json.loads(p.read_text())
        if not isinstance(found, dict):
            raise AttributeError
        return found
    except (json.JSONDecodeError, AttributeError):
        raise ServeError(f"{p}: not a promote record; move it away and promote again") from None


def _history(state: Path) -> list[dict]:
    return _read(state).get("history", [])


def _record(state: Path, result: Promotion, default: dict | None = None) -> Path:
    """promote.json with ``result`` added to its history (and ``default`` as the model's recorded default), written
    to a temporary file, flushed to disk and renamed over the old one: a crash leaves the old record or the new."""
    old = _read(state)
    defaults = dict(old.get("defaults") or {})
    if default is not None:
        defaults[result.model] = default
    path = state / RECORD
    _atomic_write(path, (json.dumps({**asdict(result), "history": old.get("history", []) + [asdict(result)],
                                     "defaults": defaults}, indent=2) + "\n").encode())
    return path


def _applied(state: Path, model: str) -> None:
    """The recorded default of ``model`` is in place: the store file and the server's default version."""
    old = _read(state)
    entry = (old.get("defaults") or {}).get(model)
    if entry and not entry.get("applied"):
        old["defaults"][model] = {**entry, "applied": True}
        _atomic_write(state / RECORD, (json.dumps(old, indent=2) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: Path, dst: Path) -> str:
    """``dst`` replaced by a copy of ``src`` at once (flushed, renamed: never a partial file under that name);
    returns the sha256 of the bytes copied."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    _sync_dir(dst.parent)
    return h.hexdigest()


def _sha(path: Path) -> str | None:
    from .manifest import sha256_path

    return sha256_path(path) if path.is_file() else None


# ---- one at a time, and steps a crash can stop at ---------------------------------------------------------------

FAULT_ENV = "MODELSHIP_FAULT"  # "promote:STEP" or "rollback:STEP": the command SIGKILLs itself after STEP (tests)


def _step(op: str, name: str) -> None:
    """A point a crash can stop the command at; the tests kill it here (``MODELSHIP_FAULT``) to show that every
    such point leaves the old or the new version in place with a record that says which."""
    if os.environ.get(FAULT_ENV) == f"{op}:{name}":
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def _locked(state: Path):
    """STATE/promote.lock, held for the whole command (released by the kernel if the process dies)."""
    import fcntl

    fd = os.open(state / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ServeError(f"another promote or rollback of this server is running ({holder}); wait for it to "
                             "finish and try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _ready(info: ServerState, model: str) -> None:
    if not info.model_api:
        raise ServeError(f"the server in {info.state} does not take new model versions: start it with "
                         f"modelship serve STORE --state {info.state} --allow-promote (registration is then "
                         "open to the management token's holder only)")
    if model not in info.models:
        raise ServeError(f"model '{model}' is not served from {info.state}; served: {', '.join(info.models)}")


def _register(info: ServerState, model: str, mar: Path) -> None:
    TorchServe(info).register(mar.name, model, workers=_workers(mar))


def _withdraw(info: ServerState, model: str, version: str) -> None:
    """Unregister ``version`` of ``model`` and remove its hidden store file."""
    TorchServe(info).unregister(model, version, timeout_s=180.0)
    (Path(info.store) / _hidden(model, version)).unlink(missing_ok=True)


def restore_store(store: Path, state: Path, log=lambda msg: None) -> list[str]:
    """Before a server starts (no server of this state runs): each model whose recorded default was committed but
    not yet put in place (a promote or rollback killed after its commit) gets its store file from the recorded,
    judged bytes; the server then loads it. Returns the models."""
    with _locked(state):
        done = []
        for model, entry in (_read(state).get("defaults") or {}).items():
            if not entry.get("applied"):  # applied: in place when recorded; a store file changed since is the user's
                _place_recorded(Path(store), state, model, entry, log)
                _applied(state, model)
                done.append(model)
        return done


def _place_recorded(store: Path, state: Path, model: str, entry: dict, log) -> dict:
    """STORE/MODEL.mar made the recorded default's bytes. Where those are gone (a hidden archive deleted by hand)
    and the store still holds the version before it, the record goes back to that version instead."""
    live = store / f"{model}.mar"
    if _sha(live) == entry["sha256"]:
        return entry
    if _sha(Path(entry["archive"])) == entry["sha256"]:
        _copy(Path(entry["archive"]), live)
        return entry
    prev = entry.get("previous") or {}
    if prev and _sha(live) == prev.get("sha256"):
        log(f"the judged archive of version {entry['version']} of {model} is gone ({entry['archive']}); "
            f"version {prev['version']}, still in the store, stays the default")
        back = Promotion(model, "reverted", prev["version"], entry["version"], at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        entry = {"op": "revert", "version": prev["version"], "archive": prev["archive"], "sha256": prev["sha256"],
                 "previous": None, "applied": False}
        _record(state, back, entry)
        return entry
    raise ServeError(f"{state / RECORD} makes version {entry['version']} of '{model}' the default, but its archive "
                     f"{entry['archive']} is missing or changed and {live} holds neither it nor the version before; "
                     "restore the archive, or move the record away")


def reconcile(state: Path, info: ServerState, model: str, log=lambda msg: None) -> None:
    """Finish what a killed promote or rollback committed (the store file and the running server's default made
    what the record says; marked applied only once both are), and withdraw versions a killed promote registered
    but never committed."""
    entry = (_read(state).get("defaults") or {}).get(model)
    if entry and not entry.get("applied"):
        log(f"finishing the {entry.get('op', 'promote')} of {model} to version {entry['version']} that stopped "
            "half-way")
        entry = _place_recorded(Path(info.store), state, model, entry, log)
        every, current = versions(info, model)
        if entry["version"] not in every:
            hidden = Path(info.store) / _hidden(model, entry["version"])
            _copy(Path(entry["archive"]), hidden)
            _register(info, model, hidden)
        if current != entry["version"]:
            TorchServe(info).set_default(model, entry['version'])
        _applied(state, model)
    every, current = versions(info, model)
    keep = {current} | _recorded_versions(state, model)
    for v in every:
        if v not in keep:  # registered by a promote killed before its commit: never judged to the end
            log(f"withdrawing version {v} of {model}, which a promote that stopped half-way left registered")
            _withdraw(info, model, v)


def _recorded_versions(state: Path, model: str) -> set:
    entry = (_read(state).get("defaults") or {}).get(model) or {}
    return {entry.get("version"), (entry.get("previous") or {}).get("version")} - {None}


# ---- promote -----------------------------------------------------------------------------------------------------

def promote(state: str | Path, model: str, candidate: str | Path, samples: int = 200,
            slo_p95_ms: float | None = None, min_agreement: float | None = None, reference: str | Path | None = None,
            live: int | None = None, log=lambda msg: None) -> Promotion:
    """Register ``candidate`` as a new version of ``model``, judge it on ``samples`` answers to its evaluation data
    and on up to ``live`` (default: as many) live requests the current version's shadow sampled, and make it the
    default or unregister it. Raises GateError (with the Promotion as its result) when it is refused.

    A transaction: the candidate's bytes are copied once into the store's hidden name and everything after uses
    those bytes; the record is committed (renamed into place) before the store file is replaced and the default
    switched, so a crash before the commit leaves the old version, and after it, a record of the new one that the
    next promote, rollback or server start finishes putting in place."""
    state = Path(state).resolve()
    if samples < 1:
        raise ServeError(f"--samples {samples}: expected 1 or more answers to judge")
    candidate = Path(candidate).resolve()
    if not candidate.is_file():
        raise ServeError(f"{candidate}: no such archive; expected a .mar written by modelship archive")
    info = ServerState.load(state)
    _ready(info, model)
    with _locked(state):
        reconcile(state, info, model, log)
        store = Path(info.store)
        _sweep(state, info, model)
        incoming, version = _take(candidate, store, model)
        every, current = versions(info, model)
        if version in every:
            incoming.unlink(missing_ok=True)
            raise ServeError(f"version {version} of '{model}' is already registered ({', '.join(every)}); archive "
                             f"the candidate with a new one: modelship archive ARTIFACT --name {model} --version NEW")
        hidden = store / _hidden(model, version)
        os.replace(incoming, hidden)
        _step("promote", "copied")
        log(f"registering {candidate.name} as version {version} of {model} (default stays {current})")
        try:
            _register(info, model, hidden)
        except ServeError:
            hidden.unlink(missing_ok=True)
            raise
        _step("promote", "registered")
        result = Promotion(model, "refused", version, current, slo_p95_ms=slo_p95_ms, candidate=str(candidate),
                           at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        try:
            _judge_candidate(state, info, model, current, version, hidden, samples, live, min_agreement, reference,
                             result, log)
        except BaseException:
            _withdraw(info, model, version)
            raise
        _step("promote", "judged")
        if result.failures:
            _withdraw(info, model, version)
            path = _record(state, result)
            raise GateError(f"version {version} of {model} refused; version {current} stays the default: "
                            + "; ".join(f["message"] for f in result.failures) + f" (evidence in {path})",
                            result, result.kind)
        _switch(state, info, model, current, version, hidden, result)
    return result


def _take(candidate: Path, store: Path, model: str) -> tuple[Path, str]:
    """The candidate's bytes, copied once into the store under a hidden name and checked there (integrity, seal,
    model file): (that file, its version). Everything after judges, registers and serves these bytes."""
    incoming = store / f".promote-{model}-incoming-{os.getpid()}.mar"
    try:
        _copy(candidate, incoming)
        read_mar(incoming)  # a broken archive is refused here
        return incoming, mar_version(incoming)
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise


def _same_reference(live: Path, hidden: Path, tmp: Path, reference) -> None:
    """The candidate is judged against the reference the served version was proven against (its sealed copy): a
    candidate sealed with a reference of its own (another model, or itself) is refused unless ``reference`` is
    given on purpose."""
    if reference is not None or not live.is_file():
        return
    mine, theirs = (golden.sealed_reference(m, tmp / name) for m, name in ((live, "served"), (hidden, "candidate")))
    if mine is not None and theirs is not None and mine.manifest.sha256 != theirs.manifest.sha256:
        raise ServeError(f"{hidden.name} carries another reference (model sha256 {theirs.manifest.sha256[:12]}) than "
                         f"the served version's ({mine.manifest.sha256[:12]}); a candidate is judged against what "
                         "production is proven against: archive it with the same reference, or pass --reference")


def _sweep(state: Path, info: ServerState, model: str) -> None:
    """Remove what killed promotes left in the store: hidden copies of versions neither registered nor recorded
    (the record's archives stay), and half-written files."""
    store = Path(info.store)
    every, _ = versions(info, model)
    entry = (_read(state).get("defaults") or {}).get(model) or {}
    keep = {str(store / _hidden(model, v)) for v in every} | {entry.get("archive")}
    for stale in list(store.glob(f".promote-{model}-*.mar")) + list(store.glob(f".*{model}*.partial")):
        if str(stale) not in keep:
            stale.unlink(missing_ok=True)


def _judge_candidate(state, info, model, current, version, hidden, samples, live, min_agreement, reference,
                     result, log) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        served = Path(info.store) / f"{model}.mar"
        _same_reference(served, hidden, Path(tmp), reference)
        spec = golden.prepare(state, model, Path(tmp), reference=reference, mar=hidden,
                              reference_mar=served if served.is_file() else None)
        replay = spooled(state, model, current, samples if live is None else live)
        log(f"judging {samples} answers of version {version} beside version {current}"
            + (f", and {len(replay)} live requests its shadow sampled" if replay else ""))
        answers = collect(info, spec, model, current, version, samples, replay)
        floor = min_agreement if min_agreement is not None else \
            (spec["tolerance"] or {}).get("min_top1_agreement") or 1.0
        judge(answers, spec, np.load(spec["golden"]), floor, result)


def _switch(state: Path, info: ServerState, model: str, current: str, version: str, hidden: Path,
            result: Promotion) -> None:
    """The judged version made the default: the current store file kept for --rollback, the decision committed in
    the record, the store file replaced by the judged bytes, TorchServe's default switched, older versions
    withdrawn."""
    store = Path(info.store)
    kept = state / KEPT / model / f"{current}.mar"
    kept.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    live = store / f"{model}.mar"
    if live.is_file() and mar_version(live) != current:
        raise ServeError(f"{live} is version {mar_version(live)}, but the server's default is {current}: the store "
                         f"was changed by hand since the server started; restart it (modelship serve --stop, then "
                         f"serve) and promote again; version {version} stays registered beside it")
    previous = {"version": current, "archive": str(kept), "sha256": _copy(live, kept)} if live.is_file() else None
    _step("promote", "kept")
    result.decision = "promoted"
    _record(state, result, {"op": "promote", "version": version, "archive": str(hidden), "sha256": _sha(hidden),
                            "previous": previous, "applied": False})
    _step("promote", "committed")
    _copy(hidden, live)
    _step("promote", "placed")
    TorchServe(info).set_default(model, version)
    _step("promote", "default")
    _applied(state, model)
    every, _ = versions(info, model)
    for v in every:  # what an earlier promote kept for --rollback: only this one's previous version stays
        if v not in (version, current):
            _withdraw(info, model, v)
    for old in (state / KEPT / model).glob("*.mar"):
        if old != kept:
            old.unlink(missing_ok=True)
    _step("promote", "cleared")


def spooled(state: Path, model: str, version: str, n: int) -> list[tuple[dict, bytes]]:
    """The newest ``n`` live requests to ``model`` ``version`` that its shadow parity sampled: (the headers that
    say how to read the body: its content type, and the binary extension's header length; the body as sent)."""
    from .serving.shadow import read_spooled

    out = []
    for path in sorted((state / SPOOL_DIR / model / version).glob("*.req"), reverse=True)[:n]:
        try:
            out.append(read_spooled(path.read_bytes()))
        except OSError:  # deleted by the worker as newer ones came
            continue
    return out


@dataclass
class Answers:
    """What ``collect`` gathered: per request sent to both versions, the evaluation sample it was (None: a replayed
    live request) and each version's answer (None when it gave none), with every latency and the first error."""

    current: str
    version: str
    work: list = field(default_factory=list)  # [(sample index | None, {version: answer dict | None})]
    latency_ms: dict = field(default_factory=dict)  # version -> [ms, ...] for every request sent
    example: str = ""  # the first request a version did not answer
    burst: list = field(default_factory=list)  # [(sample index, candidate's answer | None)], sent all at once


def collect(info: ServerState, spec: dict, model: str, current: str, version: str, samples: int,
            replay: list | None = None) -> Answers:
    """Send ``samples`` evaluation requests and the ``replay``ed live ones to both versions by their versioned
    paths, one at a time, alternating which goes first; then the burst (``_burst``, ``_batched``)."""
    import requests

    # bytes: sent in one piece with the headers (a str body waits out Nagle and a delayed ACK, ~40 ms)
    bodies = [b.encode() if isinstance(b, str) else b for b in golden.request_bodies(spec)]
    ts, ct = TorchServe(info), {"Content-Type": spec.get("content_type", "application/json")}
    out = Answers(current, version, latency_ms={current: [], version: []})
    work = [(k % len(bodies), bodies[k % len(bodies)], ct) for k in range(samples)]
    work += [(None, _replayable(body, headers), headers) for headers, body in replay or []]
    with requests.Session() as http:
        for k, (i, body, headers) in enumerate(work):
            order = (current, version) if k % 2 == 0 else (version, current)  # neither always goes first
            out.work.append((i, {v: _timed(ts, model, v, body, headers, http, out) for v in order}))
    indices = list(range(min(BURST, len(bodies))))
    out.burst = _burst(ts, model, version, bodies, ct, indices, out) + _batched(ts, model, version, spec, indices, out)
    return out


def _timed(ts: TorchServe, model: str, version: str, body: bytes, headers: dict, http, out: "Answers") -> dict | None:
    """One request to one version: its answer (None when it gave none), its latency recorded."""
    t0 = time.perf_counter()
    try:
        r = ts.predict(model, body, headers, version=version, session=http)
    except ServeError as e:
        out.example = out.example or f"version {version}: {e}"
        r = None
    out.latency_ms[version].append((time.perf_counter() - t0) * 1e3)
    if r is not None and r.status_code != 200:
        out.example = out.example or f"version {version}: HTTP {r.status_code} {r.text[:200]}"
    return _answer(r) if r is not None and r.status_code == 200 else None


BURST = 16  # evaluation samples sent to the candidate at once, then in one request: answers inside a batch


def _burst(ts: TorchServe, model: str, version: str, bodies: list, headers: dict, indices: list,
           out: "Answers") -> list:
    """The samples ``indices`` sent to ``version`` concurrently, so a candidate that batches takes them in batches: an
    answer that depends on what it is batched with differs here from its answer alone."""
    from concurrent.futures import ThreadPoolExecutor

    def send(i):
        got = _once(ts, model, version, bodies[i], headers, f"version {version} (in a burst)", out)
        return i, got
    with ThreadPoolExecutor(max_workers=max(1, len(indices))) as pool:
        return list(pool.map(send, indices))


def _batched(ts: TorchServe, model: str, version: str, spec: dict, indices: list, out: "Answers") -> list:
    """The same samples in one request (a list of them): answered as one batch whatever the server's timing."""
    from .comparison import per_sample

    body = golden.batch_body(spec, indices)
    if body is None:
        return []
    got = _once(ts, model, version, body, {"Content-Type": "application/json"},
                f"version {version} (one request of {len(indices)})", out, timeout_s=60)
    items = per_sample(got) if got is not None else []
    if got is not None and len(items) != len(indices):
        out.example = out.example or f"version {version}: {len(items)} answers to one request of {len(indices)}"
    return list(zip(indices, items)) if len(items) == len(indices) else [(indices[0], None)]


def _once(ts: TorchServe, model: str, version: str, body: bytes, headers: dict, what: str, out: "Answers",
          timeout_s: float = 30.0) -> dict | None:
    try:
        r = ts.predict(model, body, headers, version=version, timeout_s=timeout_s)
    except ServeError as e:
        out.example = out.example or f"{what}: {e}"
        return None
    if r.status_code != 200:
        out.example = out.example or f"{what}: HTTP {r.status_code} {r.text[:200]}"
        return None
    return _answer(r)


def _replayable(body: bytes, headers: dict) -> bytes:
    """A spooled v2 JSON body without the model version its client named (it is sent to both versions)."""
    from .serving.codec import BINARY_HEADER

    if BINARY_HEADER in headers or not body.lstrip().startswith(b"{"):
        return body
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if isinstance(parsed, dict) and "model_version" in parsed:
        parsed.pop("model_version")
        return json.dumps(parsed).encode()
    return body


def _answer(r) -> dict:
    """A 200 answer as a dict: JSON, or the v2 binary extension's JSON header with its tensors' data filled in."""
    from .serving.codec import BINARY_HEADER, read_binary_answer

    length = r.headers.get(BINARY_HEADER)
    return read_binary_answer(r.content, int(length)) if length else r.json()


@dataclass
class _Tally:
    """The candidate's answers judged against the reference, counted."""

    judged: int = 0
    agree: int = 0  # labels equal to the reference's (every answer of a model without labels)
    beyond: int = 0  # answers beyond the served tolerance (or NaN/inf, or malformed)
    nonfinite: int = 0  # answers holding NaN or inf where the reference is finite
    worst: float = 0.0
    example: str = ""

    def add(self, verdict, where: str = "") -> None:
        self.judged += 1
        self.agree += verdict.label_ok is not False
        self.beyond += not verdict.within
        self.nonfinite += verdict.nonfinite
        self.worst = max(self.worst, verdict.diff)
        if not verdict.ok and not self.example:
            self.example = where + verdict.why


def judge(answers: Answers, spec: dict, golden_arrays, floor: float, result: Promotion) -> None:
    """The verdict on ``answers`` (pure: no server). Each candidate answer to an evaluation sample, in turn and in
    the burst, is judged against the reference (the load test's check, the served tolerance); every answer given in
    turn against the current version's (its labels and largest difference). Agreement is judged by its 95 % upper
    bound against ``floor``; any answer beyond the tolerance or holding NaN/inf refuses the candidate, and so does
    a p95 over the SLO. Fills ``result``."""
    current, version = answers.current, answers.version
    ref, errors, same, diff_cur = _Tally(), 0, 0, 0.0
    for i, got in answers.work:
        if got.get(version) is None or got.get(current) is None:
            errors += got.get(current) is not None or i is not None  # a live request both refuse is no fault
            continue
        agree, d = _versus(got[version], got[current])
        same, diff_cur = same + agree, max(diff_cur, d)
        if i is None:
            result.live += 1
        else:
            result.samples += 1
            ref.add(golden.check(spec, golden_arrays, i, got[version]))
    for i, got in answers.burst:  # the same samples answered inside batches of each other
        if got is None:
            errors += 1
            continue
        result.burst += 1
        ref.add(golden.check(spec, golden_arrays, i, got), f"in a burst of {len(answers.burst)}: ")
    _latency(answers, result)
    result.max_abs_diff_reference, result.max_abs_diff_current = ref.worst, diff_cur
    result.beyond_tolerance = ref.beyond
    example = answers.example or ref.example
    if errors:
        result.failures.append(asdict(GateFailure("errors", f"{errors} of {len(answers.work) + len(answers.burst)} "
                                                            f"requests were not answered (e.g. {example})")))
    if not ref.judged:
        if not errors:
            result.failures.append(asdict(GateFailure("errors", "no evaluation sample was answered by both "
                                                                "versions")))
        return
    both = result.samples + result.live  # the requests both versions answered in turn
    result.agreement_reference = ref.agree / ref.judged
    result.agreement_current = same / both if both else None
    result.agreement = min(a for a in (result.agreement_reference, result.agreement_current) if a is not None)
    result.max_abs_diff = ref.worst
    result.failures += [asdict(f) for f in _verdicts(ref, same, both, floor, current, spec, result)]


def _latency(answers: Answers, result: Promotion) -> None:
    lat = answers.latency_ms
    result.p95_ms_current = float(np.percentile(lat[answers.current], 95)) if lat[answers.current] else None
    result.p95_ms_candidate = float(np.percentile(lat[answers.version], 95)) if lat[answers.version] else None


def _verdicts(ref: _Tally, same: int, both: int, floor: float, current: str, spec: dict,
              result: Promotion) -> list[GateFailure]:
    out = []
    for what, agree, n in (("the reference", ref.agree, ref.judged), (f"version {current}", same, both)):
        upper = wilson_upper(agree, n) if n else 1.0
        if upper < floor:  # judged as the load test judges: a short sample cannot fail a variant on chance alone
            out.append(GateFailure("parity", f"agreement with {what}: {agree / n:.4f} of {n} answers (95% upper "
                                             f"bound {upper:.4f}) < {floor}"
                                             + (f"; e.g. {ref.example}" if what == "the reference" and ref.example
                                                else "")))
    if ref.nonfinite:
        out.append(GateFailure("parity", f"non-finite: {ref.nonfinite} of {ref.judged} answers hold NaN or inf where "
                                         f"the reference is finite (e.g. {ref.example})"))
    if ref.beyond > ref.nonfinite:  # as the load test judges: no answer beyond the tolerance
        out.append(GateFailure("parity", f"difference: {ref.beyond - ref.nonfinite} of {ref.judged} answers beyond "
                                         f"the {spec.get('precision')} tolerance of the reference's (max |diff| "
                                         f"{ref.worst:.3g}; e.g. {ref.example})"))
    slo, p95 = result.slo_p95_ms, result.p95_ms_candidate
    if slo is not None and (p95 is None or p95 > slo):
        out.append(GateFailure("slo", f"latency: version {result.version} p95 {p95 or float('nan'):.1f} ms > SLO "
                                      f"{slo:g} ms (version {current}: {result.p95_ms_current or float('nan'):.1f} ms)"))
    return out


def _versus(a: dict, b: dict) -> tuple[bool, float]:
    """Whether two answers to one request give the same labels (none: always), and their largest difference over
    every number they answer with (one item, a batch's "predictions", or v2 "outputs")."""
    (la, va), (lb, vb) = _numbers(a), _numbers(b)
    if va.shape != vb.shape or len(la) != len(lb):
        return False, float("inf")
    d, wrong_a = abs_diff(vb, va)
    _, wrong_b = abs_diff(va, vb)
    if wrong_a.any() or wrong_b.any():  # NaN or inf on one side only: no label to share, infinitely far
        return False, float("inf")
    return la == lb, float(d.max()) if d.size else 0.0


def _numbers(answer: dict) -> tuple[list, np.ndarray]:
    items = answer["predictions"] if "predictions" in answer else [answer]
    labels, parts = [], []
    for it in items:
        labels.append(it.get("index"))
        if "probabilities" in it:
            parts.append(np.ravel(np.asarray(it["probabilities"], dtype=np.float64)))
        outs = it.get("outputs") or {}
        if isinstance(outs, list):  # the v2 form: [{"name", "data", ...}]
            outs = {o.get("name"): o.get("data") for o in outs}
        parts += [np.ravel(np.asarray(outs[k], dtype=np.float64)) for k in sorted(outs)]
    return labels, np.concatenate(parts) if parts else np.zeros(0)


def rollback(state: str | Path, model: str, log=lambda msg: None) -> Promotion:
    """Make the version the last promote replaced the default again, from the archive that promote kept (registered
    again if the server was restarted since), and put that archive back in the store. A transaction like promote:
    committed in the record first, then put in place."""
    state = Path(state).resolve()
    info = ServerState.load(state)
    _ready(info, model)
    with _locked(state):
        reconcile(state, info, model, log)
        entry = (_read(state).get("defaults") or {}).get(model)
        if not entry or entry.get("op") != "promote" or not entry.get("previous"):
            raise ServeError(f"no promote of '{model}' to roll back is recorded in {state / RECORD}"
                             + (" (the last change was a rollback)" if entry else ""))
        every, current = versions(info, model)
        if current != entry["version"]:
            raise ServeError(f"the default version of '{model}' is {current}, not {entry['version']} that the last "
                             "promote made default; nothing was changed")
        prev = entry["previous"]
        live = Path(info.store) / f"{model}.mar"
        if _sha(live) != entry["sha256"]:
            raise ServeError(f"{live} is not the archive the last promote put there (changed by hand?); nothing was "
                             "changed")
        kept = Path(prev["archive"])
        if _sha(kept) != prev["sha256"]:
            raise ServeError(f"{kept}: the archive of version {prev['version']} that promote kept is missing or "
                             "changed; promote that version again instead")
        if prev["version"] not in every:  # the server was restarted since: the kept archive is registered again
            log(f"registering the kept archive of version {prev['version']} again")
            hidden = Path(info.store) / _hidden(model, prev["version"])
            _copy(kept, hidden)
            _register(info, model, hidden)
        _step("rollback", "registered")
        log(f"making version {prev['version']} of {model} the default again (was {current})")
        result = Promotion(model, "rolled back", prev["version"], current, at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        _record(state, result, {"op": "rollback", "version": prev["version"], "archive": str(kept),
                                "sha256": prev["sha256"], "previous": None, "applied": False})
        _step("rollback", "committed")
        _copy(kept, Path(info.store) / f"{model}.mar")
        _step("rollback", "placed")
        TorchServe(info).set_default(model, prev['version'])
        _step("rollback", "default")
        _applied(state, model)
    return result
