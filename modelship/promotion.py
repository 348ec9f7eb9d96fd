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

import json
import os
import shutil
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
from .serving.server import bearer, read_state

RECORD = "promote.json"
KEPT = "promote"  # STATE/promote/: the store files promote replaced, for --rollback


@dataclass
class Promotion:
    model: str
    decision: str  # promoted | refused | rolled back
    version: str
    previous: str | None
    samples: int = 0  # evaluation samples judged (against the reference and the current version)
    live: int = 0  # live requests replayed from the shadow spool (judged against the current version)
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


def _api(info: dict, method: str, path: str, timeout_s: float = 180.0, **params):
    import requests

    try:
        r = requests.request(method, f"{info['management_url']}{path}", params=params or None, timeout=timeout_s,
                             headers=bearer(info.get("management_token")))
    except requests.RequestException as e:
        raise ServeError(f"the management API did not answer {method} {path}: {e}") from None
    if r.status_code != 200:
        raise ServeError(f"{method} {path}: HTTP {r.status_code} {_message(r)}")
    return r.json()


def _message(r) -> str:
    try:
        return r.json().get("message") or r.text[:300]
    except ValueError:
        return r.text[:300]


def versions(info: dict, model: str) -> tuple[list[str], str]:
    """(every registered version of ``model``, its default version)."""
    every = [m["modelVersion"] for m in _api(info, "GET", f"/models/{model}/all")]
    default = _api(info, "GET", f"/models/{model}")[0]["modelVersion"]
    return every, default


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


def _history(state: Path) -> list[dict]:
    p = state / RECORD
    if not p.is_file():
        return []
    try:
        return json.loads(p.read_text()).get("history", [])
    except (json.JSONDecodeError, AttributeError):
        raise ServeError(f"{p}: not a promote record; move it away and promote again") from None


def _record(state: Path, result: Promotion) -> Path:
    history = _history(state) + [asdict(result)]
    path = state / RECORD
    path.write_text(json.dumps({**asdict(result), "history": history}, indent=2) + "\n")
    return path


def _ready(info: dict, model: str) -> None:
    if not info.get("model_api"):
        raise ServeError(f"the server in {info['state']} does not take new model versions: start it with "
                         f"modelship serve STORE --state {info['state']} --allow-promote (registration is then "
                         "open to the management token's holder only)")
    if model not in info["models"]:
        raise ServeError(f"model '{model}' is not served from {info['state']}; served: {', '.join(info['models'])}")


def _withdraw(info: dict, model: str, version: str) -> None:
    """Unregister ``version`` of ``model`` and remove its hidden store file."""
    _api(info, "DELETE", f"/models/{model}/{version}")
    (Path(info["store"]) / _hidden(model, version)).unlink(missing_ok=True)


def _clear_kept(info: dict, model: str, default: str, every: list[str]) -> None:
    """Withdraw what a previous promote kept for --rollback: every version but the default."""
    for v in every:
        if v != default:
            _withdraw(info, model, v)


def promote(state: str | Path, model: str, candidate: str | Path, samples: int = 200,
            slo_p95_ms: float | None = None, min_agreement: float | None = None, reference: str | Path | None = None,
            live: int | None = None, log=lambda msg: None) -> Promotion:
    """Register ``candidate`` as a new version of ``model``, judge it on ``samples`` answers to its evaluation data
    and on up to ``live`` (default: as many) live requests the current version's shadow sampled, and make it the
    default or unregister it. Raises GateError (with the Promotion as its result) when it is refused."""
    state = Path(state).resolve()
    info = read_state(state)
    _ready(info, model)
    candidate = Path(candidate).resolve()
    read_mar(candidate)  # integrity, seal, model file: a broken archive is refused here
    version = mar_version(candidate)
    every, current = versions(info, model)
    if version in every:
        raise ServeError(f"version {version} of '{model}' is already registered ({', '.join(every)}); archive the "
                         f"candidate with a new one: modelship archive ARTIFACT --name {model} --version NEW")
    if samples < 1:
        raise ServeError(f"--samples {samples}: expected 1 or more answers to judge")
    _clear_kept(info, model, current, every)
    store = Path(info["store"])
    hidden = store / _hidden(model, version)
    shutil.copyfile(candidate, hidden)
    log(f"registering {candidate.name} as version {version} of {model} (default stays {current})")
    try:
        _api(info, "POST", "/models", url=hidden.name, model_name=model, initial_workers=_workers(candidate),
             synchronous="true")
    except ServeError:
        hidden.unlink(missing_ok=True)
        raise
    result = Promotion(model, "refused", version, current, slo_p95_ms=slo_p95_ms, candidate=str(candidate),
                       at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            spec = golden.prepare(state, model, Path(tmp), reference=reference, mar=hidden)
            replay = spooled(state, model, current, samples if live is None else live)
            log(f"judging {samples} answers of version {version} beside version {current}"
                + (f", and {len(replay)} live requests its shadow sampled" if replay else ""))
            _judge(info, spec, model, current, version, samples, min_agreement, result, replay)
    except BaseException:
        _withdraw(info, model, version)
        raise
    if result.failures:
        _withdraw(info, model, version)
        path = _record(state, result)
        raise GateError(f"version {version} of {model} refused; version {current} stays the default: "
                        + "; ".join(f["message"] for f in result.failures) + f" (evidence in {path})",
                        result, result.kind)
    _api(info, "PUT", f"/models/{model}/{version}/set-default")
    _swap_store_file(state, store, model, current, candidate)
    result.decision = "promoted"
    _record(state, result)
    return result


def _swap_store_file(state: Path, store: Path, model: str, previous: str, new: Path) -> None:
    """STORE/MODEL.mar becomes the promoted archive (a restart serves it); the replaced one is kept in
    STATE/promote/ for --rollback."""
    kept = state / KEPT
    kept.mkdir(exist_ok=True)
    live = store / f"{model}.mar"
    if live.is_file():
        shutil.copyfile(live, kept / f"{model}-{previous}.mar")
    _place(new, store, model)


def _place(src: Path, store: Path, model: str) -> None:
    """STORE/MODEL.mar replaced by a copy of ``src`` at once (a partial copy is never seen under that name)."""
    tmp = store / f".{model}.mar.partial"
    shutil.copyfile(src, tmp)
    os.replace(tmp, store / f"{model}.mar")


def spooled(state: Path, model: str, version: str, n: int) -> list[tuple[str, bytes]]:
    """The newest ``n`` live requests to ``model`` ``version`` that its shadow parity sampled (content type, body)."""
    from .serving.server import SPOOL_DIR

    out = []
    for path in sorted((state / SPOOL_DIR / model / version).glob("*.req"), reverse=True)[:n]:
        try:
            head, _, body = path.read_bytes().partition(b"\n")
        except OSError:  # deleted by the worker as newer ones came
            continue
        out.append((head.decode(errors="replace"), body))
    return out


def _judge(info: dict, spec: dict, model: str, current: str, version: str, samples: int,
           min_agreement: float | None, result: Promotion, replay: list | None = None) -> None:
    import requests

    # bytes: sent in one piece with the headers (a str body waits out Nagle and a delayed ACK, ~40 ms)
    bodies = [b.encode() if isinstance(b, str) else b for b in golden.request_bodies(spec)]
    ref = np.load(spec["golden"])
    hdr = golden.request_headers({**spec, "token": info.get("token")})
    url = info["inference_url"] + f"/predictions/{model}/"
    lat = {current: [], version: []}
    ok_ref = beyond = label_same = judged = errors = 0
    diff_ref = diff_cur = 0.0
    example = ""
    # (index into the evaluation data or None for a live request, body, headers)
    work = [(k % len(bodies), bodies[k % len(bodies)], hdr) for k in range(samples)]
    work += [(None, body, {**hdr, "Content-Type": ct}) for ct, body in replay or []]
    with requests.Session() as http:
        for k, (i, body, headers) in enumerate(work):
            answers = {}
            for v in ((current, version) if k % 2 == 0 else (version, current)):  # neither always goes first
                t0 = time.perf_counter()
                try:
                    r = http.post(url + v, data=body, headers=headers, timeout=30)
                except requests.RequestException as e:
                    r = None
                    example = example or f"version {v}: {type(e).__name__}: {e}"
                lat[v].append((time.perf_counter() - t0) * 1e3)
                if r is not None and r.status_code == 200:
                    answers[v] = r.json()
                elif r is not None:
                    example = example or f"version {v}: HTTP {r.status_code} {r.text[:200]}"
            if version not in answers or current not in answers:
                if current in answers or i is not None:  # a live request the current version refuses is no fault
                    errors += 1
                continue
            same, d = _versus(answers[version], answers[current])
            label_same += same
            diff_cur = max(diff_cur, d)
            if i is None:
                result.live += 1
                continue
            judged += 1
            verdict = golden.check(spec, ref, i, answers[version])
            ok_ref += verdict.label_ok is not False
            beyond += not verdict.within
            diff_ref = max(diff_ref, verdict.diff)
            if not verdict.ok and not example:
                example = verdict.why
    result.samples = judged
    result.p95_ms_current = float(np.percentile(lat[current], 95))  # every request sent, live ones too
    result.p95_ms_candidate = float(np.percentile(lat[version], 95))
    result.max_abs_diff_reference, result.max_abs_diff_current = diff_ref, diff_cur
    result.beyond_tolerance = beyond
    fail = result.failures
    if errors:
        fail.append(asdict(GateFailure("errors", f"{errors} of {len(work)} requests were not answered by both "
                                                 f"versions (e.g. {example})")))
    if not judged:
        return
    both = judged + result.live
    result.agreement_reference = ok_ref / judged
    result.agreement_current = label_same / both
    result.agreement = min(result.agreement_reference, result.agreement_current)
    result.max_abs_diff = diff_ref
    floor = min_agreement if min_agreement is not None else (spec["tolerance"] or {}).get("min_top1_agreement") or 1.0
    for what, agree, n in (("the reference", ok_ref, judged), (f"version {current}", label_same, both)):
        upper = wilson_upper(agree, n)
        if upper < floor:  # judged as the load test judges: a short sample cannot fail a variant on chance alone
            fail.append(asdict(GateFailure("parity", f"agreement with {what}: {agree / n:.4f} of {n} answers "
                                                     f"(95% upper bound {upper:.4f}) < {floor}"
                                                     + (f"; e.g. {example}" if what == "the reference" and example
                                                        else ""))))
    if beyond:  # as the load test judges: no answer beyond the tolerance
        fail.append(asdict(GateFailure("parity", f"difference: {beyond} of {judged} answers beyond the "
                                                 f"{spec.get('precision')} tolerance of the reference's (max |diff| "
                                                 f"{diff_ref:.3g}; e.g. {example})")))
    if result.slo_p95_ms is not None and result.p95_ms_candidate > result.slo_p95_ms:
        fail.append(asdict(GateFailure("slo", f"latency: version {version} p95 {result.p95_ms_candidate:.1f} ms > SLO "
                                              f"{result.slo_p95_ms:g} ms (version {current}: "
                                              f"{result.p95_ms_current:.1f} ms)")))


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
    """Make the version the last promote replaced the default again (it stays registered until the next promote),
    and put its archive back in the store."""
    state = Path(state).resolve()
    info = read_state(state)
    _ready(info, model)
    last = next((h for h in reversed(_history(state)) if h["model"] == model and h["decision"] == "promoted"), None)
    if last is None:
        raise ServeError(f"no promote of '{model}' is recorded in {state / RECORD}: nothing to roll back")
    every, current = versions(info, model)
    previous = last["previous"]
    if current != last["version"]:
        raise ServeError(f"the default version of '{model}' is {current}, not {last['version']} that the last promote "
                         "made default; nothing was changed")
    if previous not in every:
        raise ServeError(f"version {previous} of '{model}' is no longer registered; promote it again instead")
    log(f"making version {previous} of {model} the default again (was {current})")
    _api(info, "PUT", f"/models/{model}/{previous}/set-default")
    kept = state / KEPT / f"{model}-{previous}.mar"
    if kept.is_file():
        _place(kept, Path(info["store"]), model)
    result = Promotion(model, "rolled back", previous, current, at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _record(state, result)
    return result
