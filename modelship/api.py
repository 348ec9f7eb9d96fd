"""modelship's Python API (``import modelship as ms``): the functions the CLI, the pipeline, ``tune``, the pytest
plugin, the tests and the benchmarks call.

Converters (``export``, ``quantize``, ``distill``, ``compile``) return the ``Artifact`` they wrote and raise
``ParityError`` (kind ``parity`` or ``weak``) when its gate fails. Measurements (``parity``, ``loadtest``,
``Server.loadtest``, ``tune``, ``pipeline``) return a typed result — ``passed``, ``reason`` (the gate's message),
``kind`` (``parity | weak | slo | errors``), and the figures — for the caller to assert on. Bad input raises a
``ModelshipError`` of kind ``input``; a server or tool that fails, one of kind ``errors``.

    import modelship as ms
    onnx = ms.export("my-hf-bert", out="runs/x/onnx", data="reviews.csv")
    int8 = ms.quantize(onnx, mode="dynamic", until_parity=True, out="runs/x/int8")
    ms.archive(int8, store="runs/x/store")
    with ms.serve("runs/x/store") as server:  # stopped on exit, error or signal
        res = server.loadtest("int8", users=4, duration="20s", slo_p95_ms=50)
        assert res.passed, res.reason
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .convert import Judge, artifact, compile, data_spec, distill, export, quantize  # noqa: F401 — the API
from .errors import GateError, ModelshipError, ServeError
from .manifest import Artifact, load_artifact  # noqa: F401 — the API

__all__ = ["export", "quantize", "distill", "compile", "parity", "archive", "serve", "loadtest", "promote", "tune", "pipeline",
           "Judge", "Server", "Result", "ParityResult", "LoadResult", "TuneResult", "PipelineResult", "Artifact",
           "load_artifact"]


# ---- typed results --------------------------------------------------------------------------------------------

@dataclass
class Result:
    passed: bool
    reason: str | None  # the gate's message when it failed: what moved, by how much, the request that failed
    kind: str | None  # parity | weak | slo | errors (None when passed)


@dataclass
class ParityResult(Result):
    artifact: str
    precision: str
    samples: int
    max_abs_diff: float | None
    top1_agreement: float | None
    accuracy: float | None
    reference_accuracy: float | None
    weak: list = field(default_factory=list)
    judged_on: dict | None = None
    record: dict = field(default_factory=dict)  # the parity record, as the manifest and --json hold it

    @classmethod
    def of(cls, rec: dict) -> "ParityResult":
        return cls(passed=rec["passed"], reason="; ".join(rec["failures"]) or None, kind=rec.get("kind"),
                   artifact=rec["artifact"], precision=rec["precision"], samples=rec["samples"],
                   max_abs_diff=rec["max_abs_diff"], top1_agreement=rec["top1_agreement"], accuracy=rec["accuracy"],
                   reference_accuracy=rec["reference_accuracy"], weak=rec["weak"], judged_on=rec.get("judged_on"),
                   record=rec)


@dataclass
class LoadResult(Result):
    model: str
    requests: int
    failures: int
    rps: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    checked: int
    mismatches: int
    top1_agreement: float | None
    max_abs_diff: float | None
    judged_on: dict | None = None
    served_on: dict | None = None
    kernels_differ: list = field(default_factory=list)
    record: dict = field(default_factory=dict)  # what `modelship loadtest --json` writes

    @classmethod
    def of(cls, r: dict) -> "LoadResult":
        slim = {**r, "levels": [{k: v for k, v in lv.items() if k != "latencies_ms"} for lv in r["levels"]]}
        slim.pop("latencies_ms", None)
        return cls(passed=r["passed"], reason="; ".join(r["gate_failures"]) or None, kind=r.get("kind"),
                   model=r["model"], requests=r["requests"], failures=r["failures"], rps=r["rps"], p50_ms=r["p50_ms"],
                   p95_ms=r["p95_ms"], p99_ms=r["p99_ms"], checked=r["checked"], mismatches=r["mismatches"],
                   top1_agreement=r["top1_agreement"], max_abs_diff=r["max_abs_diff"], judged_on=r.get("judged_on"),
                   served_on=r.get("served_on"), kernels_differ=r.get("kernels_differ") or [], record=slim)


@dataclass
class TuneResult(Result):
    best: dict | None
    pareto: list
    trials: list
    record: dict = field(default_factory=dict)  # tune.json


@dataclass
class PipelineResult(Result):
    report: dict  # report.json
    failed_steps: list = field(default_factory=list)


# ---- measurements -----------------------------------------------------------------------------------------------

def parity(candidates, reference=None, *, data=None, split: str = "test", judge: Judge | dict | None = None,
           provider: str | None = None, device: str = "cpu"):
    """Parity records for artifacts, each against ``reference`` (a PyTorch source) or, by default, the root PyTorch
    model of its own lineage; on ``data`` (a path or a shipped dataset's name) or each artifact's own. Returns a
    ``ParityResult`` (a list of them for a list), never raising for a failed gate."""
    from .models.checkpoints import open_source
    from .stages import parity_record

    many = isinstance(candidates, (list, tuple))
    ref = open_source(reference) if reference is not None else None
    kw = {"split": split, "provider": provider, "device": device, "data": data_spec(data), **Judge.of(judge).kwargs()}
    results = []
    for c in candidates if many else [candidates]:
        cand = artifact(c)
        results.append(ParityResult.of(parity_record(cand, _named_like(ref, reference, cand), **kw)))
    return results if many else results[0]


def _named_like(ref, reference, cand):
    """A .pt2 reference names its outputs by position only (output0, output1, ...): export named them for the
    candidate in that order (--output-names), so they are named the same way here and then matched by name."""
    from .models.checkpoints import open_source

    if ref is None or ref[0].manifest.loader != "pt2":
        return ref
    mine, theirs = [t.name for t in ref[0].manifest.outputs], [t.name for t in cand.manifest.outputs]
    if set(mine) == set(theirs) or len(mine) != len(theirs):
        return ref
    return open_source(reference, output_names=theirs)


def archive(art, store, *, name: str | None = None, batch_size: int = 8, max_batch_delay_ms: int = 5,
            workers: int | None = None, threads: int | None = None, response_timeout_s: int = 30,
            max_items: int = 64, provider: str | None = None, device: str = "cpu", force: bool = False,
            version: str = "1.0", shadow_rate: float = 0.0, shadow_reference=None, shadow_capture=None,
            shadow_capture_mb: float = 64.0, shadow_queue: int = 256) -> Path:
    """``STORE/NAME.mar`` for TorchServe (name: the artifact folder's; ``version``: its model version); refuses an
    artifact without a passed parity record unless ``force``. Workers and threads default from the machine and the
    model. ``shadow_rate``: the fraction of live requests re-run on the reference (``shadow_reference``, default
    the root PyTorch model, packed in the archive) and judged; ``shadow_capture``: a folder for the inputs of
    mismatches (at most ``shadow_capture_mb``); ``shadow_queue``: samples waiting per worker (more are dropped)."""
    from .serving.archive import ModelConfig, archive as pack

    cfg = ModelConfig(batch_size, max_batch_delay_ms, workers, response_timeout_s, max_items, threads, provider, device,
                      shadow_rate=shadow_rate, shadow_capture=str(shadow_capture) if shadow_capture else None,
                      shadow_capture_mb=shadow_capture_mb, shadow_queue=shadow_queue)
    return pack(artifact(art), store, name=name, config=cfg, force=force, version=version,
                shadow_reference_of=shadow_reference)


def _gates(slo_p95_ms, max_failure_ratio, min_agreement, max_recovery_s, max_memory_growth):
    from .loadtests.summary import Gates

    return Gates(slo_p95_ms, max_failure_ratio, min_agreement, max_recovery_s, max_memory_growth)


def _seconds(value) -> float | None:
    from .loadtests.runner import parse_duration

    return None if value is None else float(value) if isinstance(value, (int, float)) else parse_duration(str(value))


def loadtest(state, model: str, *, users=4, duration="30s", out=None, slo_p95_ms: float | None = None,
             max_failure_ratio: float = 0.0, min_agreement: float | None = None, max_recovery_s: float | None = None,
             max_memory_growth: float | None = None, data=None, reference=None, rate: float | None = None,
             kill_worker_at=None, warmup=None, workers: int = 0, spawn_rate: float | None = None,
             judge: Judge | dict | None = None, max_prob_diff: float | None = None, prepared: dict | None = None,
             protocol: str = "predictions") -> LoadResult:
    """A Locust load test of ``model`` served from ``state`` (a folder holding serve.json): latency at each level of
    ``users`` (an int or a list), every answer judged against the root PyTorch model of the served artifact;
    ``protocol="v2"``: through the Open Inference Protocol's ``/v2/models/MODEL/infer`` instead of ``/predictions``."""
    from .loadtests.runner import loadtest as run

    j = Judge.of(judge)
    levels = [users] if isinstance(users, int) else list(users)
    r = run(state, model, Path(out) if out else Path(state) / f"loadtest-{model}", users=levels, spawn_rate=spawn_rate,
            duration_s=_seconds(duration), workers=workers, rate=rate, reference=reference,
            gates=_gates(slo_p95_ms, max_failure_ratio, min_agreement, max_recovery_s, max_memory_growth),
            kill_worker_at_s=_seconds(kill_worker_at), warmup_s=_seconds(warmup), data=data_spec(data),
            overrides={"max_abs_diff": j.max_abs_diff, "rtol": j.rtol, "min_top1_agreement": j.min_agreement,
                       "max_prob_diff": max_prob_diff},
            per_output=j.output_tol, prepared=prepared, protocol=protocol)
    return LoadResult.of(r)


class Server:
    """A TorchServe started by ``serve``: ``predict``, ``loadtest``, ``stop`` (also on leaving a ``with`` block, on an
    error, on SIGTERM / SIGHUP / SIGINT, and at interpreter exit)."""

    def __init__(self, info, temporary: Path | None, signals: contextlib.ExitStack):
        self.info, self._temporary, self._signals = info, temporary, signals  # info: serving.state.ServerState
        self.stopped = self.detached = False
        atexit.register(self.stop)

    @property
    def state(self) -> Path:
        return Path(self.info.state)

    @property
    def models(self) -> list:
        return list(self.info.models)

    @property
    def inference_url(self) -> str:
        return self.info.inference_url

    def predict(self, model: str, inputs=None, *, body: bytes | str | None = None,
                content_type: str = "application/json", timeout: float = 30.0) -> dict:
        """One request: ``inputs`` (a sample or a list of them, a text, an array) sent as ``{"inputs": ...}``, or a
        raw ``body`` (an encoded image, with its ``content_type``). Returns the answer; a 400 raises InputError with
        the server's message, any other failure ServeError."""
        from .serving.state import ServerState
        from .serving.torchserve import TorchServe

        if body is None:
            body = json.dumps({"inputs": inputs.tolist() if hasattr(inputs, "tolist") else inputs})
        ts = TorchServe(ServerState.load(self.state))  # read again: a rotated token is picked up
        return ts.answer(ts.predict(model, body, {"Content-Type": content_type}, timeout_s=timeout))

    def loadtest(self, model: str, **kw) -> LoadResult:
        """``loadtest`` against this server (same options)."""
        return loadtest(self.state, model, **kw)

    def promote(self, model: str, candidate=None, **kw):
        """``promote`` on this server (started with ``allow_promote=True``; same options, ``rollback=True`` too)."""
        return promote(self.state, model, candidate, **kw)

    def metrics(self) -> str:
        """modelship's Prometheus metrics (shadow parity), as a scrape returns them."""
        import requests

        return requests.get(f"{self.info.shadow_metrics_url}/metrics", timeout=10).text

    def wait(self) -> None:
        """Block while TorchServe runs; a signal (SIGTERM, SIGHUP, SIGINT) or Ctrl-C stops it and returns; TorchServe
        exiting by itself raises ServeError."""
        import time

        from .serving import lifecycle, processes

        try:
            while processes.alive(self.info.pid) and not self.stopped:
                if self.info.v2_url and not processes.front_alive(self.state):  # TorchServe serves on
                    self.info = lifecycle.front_died(self.state)
                    warnings.warn(f"the Open Inference Protocol front stopped: {self.info.v2_status}; "
                                  "/predictions is still served")
                time.sleep(1)
        except KeyboardInterrupt:  # modelship.signals.Stopped is one
            return self.stop()
        if self.stopped:
            return
        self.stop()
        raise ServeError(f"TorchServe exited; see {self.state / 'logs'}")

    def detach(self) -> None:
        """Leave it running after this process ends (``modelship serve --stop --state DIR`` stops it then)."""
        self._signals.close()  # a signal before the next line can still stop it (stop() does, until it is detached)
        self.stopped = self.detached = True
        atexit.unregister(self.stop)

    def stop(self) -> None:
        """Stop TorchServe and its workers; remove the state folder if ``serve`` made it. Safe to call twice."""
        if self.stopped:
            return
        from .serving import lifecycle
        from .signals import deferred

        self.stopped = True
        try:
            with deferred():  # a signal meanwhile waits until TorchServe is stopped and serve.json says so
                try:
                    lifecycle.stop(self.state, pid=self.info.pid)
                finally:
                    if self._temporary is not None:
                        shutil.rmtree(self._temporary, ignore_errors=True)
        finally:  # after the deferred block: a held signal still meets this server's handler, not the one before
            atexit.unregister(self.stop)
            self._signals.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(store, state=None, *, port: int | None = None, max_request_bytes: int = 1 << 20, job_queue_size: int = 100,
          token_expiration_min: int = 24 * 60, auth: bool = True, startup_timeout_s: float = 120.0,
          model_api: bool = False, allow_promote: bool = False, oip: bool = True, v2_host: str = "127.0.0.1",
          v2_tls: tuple | None = None, insecure_public: bool = False) -> Server:
    """Start TorchServe on 127.0.0.1 (token auth on, model registration off) serving the ``.mar`` files of ``store``
    and return once every model is ready. ``state``: the folder for serve.json, config and logs (default: a new
    0700 temporary folder, removed on stop); ``port``: the inference port (default: a free one); ``allow_promote``
    (or ``model_api``): new model versions can be registered by the management token's holder (``promote``);
    ``oip``: the Open Inference Protocol v2 too (REST at ``info.v2_url``, gRPC at ``info.v2_grpc_address``;
    ``v2_host``: the address it listens on; off loopback it needs ``v2_tls`` (PEM certificate and key files) with
    the token, or ``auth=False`` with ``insecure_public=True``)."""
    from .serving import lifecycle
    from .serving.config import ServeConfig, free_port
    from .signals import deferred, stopping

    signals = contextlib.ExitStack()
    signals.enter_context(stopping())  # from here until stop(), SIGTERM and SIGHUP stop it too
    temporary = Path(tempfile.mkdtemp(prefix="modelship-state-")) if state is None else None
    info = None
    try:
        info = lifecycle.start(store, state or temporary, before_launch=_finish_promotes, config=ServeConfig(
            port=port or free_port(), max_request_bytes=max_request_bytes, job_queue_size=job_queue_size,
            token_auth=auth, token_expiration_min=token_expiration_min, startup_timeout_s=startup_timeout_s,
            model_api=model_api or allow_promote, oip=oip, v2_host=v2_host,
            v2_tls_cert=(v2_tls or (None, None))[0], v2_tls_key=(v2_tls or (None, None))[1],
            insecure_public=insecure_public))
        return Server(info, temporary, signals)
    except BaseException:  # a failed start stopped itself; a signal once it had started stops the server here
        try:
            with deferred():
                if info is not None:
                    lifecycle.stop(info.state, pid=info.pid)
        finally:
            signals.close()
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
        raise


def _finish_promotes(store: Path, state: Path) -> None:
    """A promote or rollback killed after its commit: its store file put in place before the server loads it."""
    from .promotion import RECORD, restore_store

    if (state / RECORD).is_file():
        restore_store(store, state, log=lambda msg: warnings.warn(msg))


def promote(state, model: str, candidate=None, *, samples: int = 200, slo_p95_ms: float | None = None,
            min_agreement: float | None = None, reference=None, live: int | None = None, rollback: bool = False,
            log=lambda msg: None):
    """Register ``candidate`` (a .mar of a new version) beside the served ``model`` of the server in ``state``
    (started with ``allow_promote``), judge ``samples`` of its answers against the reference and the current
    version (and up to ``live``, default as many, live requests the current version's shadow sampled, against
    the current version), then make it the default version or unregister it (GateError, the version kept). ``rollback``:
    the version the last promote replaced becomes the default again. Evidence in STATE/promote.json."""
    from . import promotion as p

    if rollback:
        return p.rollback(state, model, log=log)
    if candidate is None:
        raise ModelshipError("promote needs a CANDIDATE .mar (or rollback=True)")
    return p.promote(state, model, candidate, samples=samples, slo_p95_ms=slo_p95_ms, min_agreement=min_agreement,
                     reference=reference, live=live, log=log)


def tune(sources, out, slo_p95_ms: float, *, budget_minutes: float = 10.0, seconds: float = 5.0,
         batch_sizes=(1, 4, 8, 16), delays_ms=(1, 2, 5, 10), workers=(), threads=(), max_users: int = 64, data=None,
         log=lambda msg: None) -> TuneResult:
    """The served configuration (variant x batch size x batch delay x workers x threads) with the most requests/s
    inside ``slo_p95_ms``, every answer checked; its winner archived in ``out/model-store``."""
    from .tuning import Space, TuneOptions, tune as search, tune_artifacts

    opts = TuneOptions(slo_p95_ms=slo_p95_ms, budget_s=budget_minutes * 60, seconds=seconds, data=data_spec(data),
                       space=Space(workers=tuple(workers), threads=tuple(threads), batch_sizes=tuple(batch_sizes),
                                   delays_ms=tuple(delays_ms), max_users=max_users))
    arts = sources if isinstance(sources, dict) else None
    try:
        r = tune_artifacts(arts, out, opts, log) if arts else search([Path(s) for s in sources], out, opts, log)
    except GateError as e:
        if not e.result:
            raise
        r = e.result
        return TuneResult(False, str(e), e.kind, r["best"], r["pareto"], r["trials"], r)
    return TuneResult(True, None, None, r["best"], r["pareto"], r["trials"], r)


def pipeline(out="runs/demo", source=None, *, progress=None, **config) -> PipelineResult:
    """The whole flow on ``source`` and its ``data`` (or the built-in digits CNN and text model): export, variants,
    archive, serve, a load test of each served variant with every answer checked, tune, report.json/.md/.html.
    ``config``: the fields of ``modelship.flow.PipelineConfig`` (data, task, variants, loadtest_seconds, ...)."""
    from .loadtests.summary import kind_of
    from .models.checkpoints import TORCHVISION
    from .flow import OPTIONAL, PipelineConfig, run

    unknown = sorted(set(config) - set(PipelineConfig.__dataclass_fields__))
    if unknown:
        raise ModelshipError(f"unknown pipeline option(s) {', '.join(unknown)}")
    wrong = sorted(set(config.get("variants") or ()) - set(OPTIONAL))
    if wrong:
        raise ModelshipError(f"--variants {','.join(config['variants'])}: unknown {', '.join(wrong)}; expected some "
                             f"of {', '.join(OPTIONAL)} (torch and onnx are always made)")
    if source is not None and not str(source).startswith(TORCHVISION) and not Path(source).exists():
        raise ModelshipError(f"{source}: no such file or directory; expected a Hugging Face folder, a .pt2 file or a "
                             "torch artifact")
    report = run(out, PipelineConfig(source=None if source is None else str(source), **config), progress)
    failed = [s for s in report["steps"] if s["status"] == "failed"]
    reason = "; ".join(f"{s['name']}: {s['error']}" for s in failed) or None
    return PipelineResult(report["passed"], reason, kind_of(failed) if failed else None, report,
                          report["failed_steps"])
