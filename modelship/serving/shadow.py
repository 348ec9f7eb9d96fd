"""Shadow parity: a sampled fraction of live requests re-run on the variant's reference, off the request path.

The handler offers each answered request as the client sent it (body and the headers that say how to read it:
JSON, a raw image or text, the v2 binary extension, which is what gRPC requests arrive as) with the answer the
client received; a fraction ``rate`` is put on a bounded queue without waiting, and a full queue drops the sample
and counts it. One thread per worker decodes the request again, preprocesses raw inputs the reference's own way,
runs the reference (packed in the .mar) and judges the answer as the client reads it (serialized and read back)
with the load test's own verdict (``comparison.check``, the served tolerance): preprocessing drift and encoding
errors are caught, not only the model's arithmetic. Metrics go through prometheus-client: in multiprocess mode
under TorchServe (``PROMETHEUS_MULTIPROC_DIR``, set by ``modelship serve``, whose exporter serves the sum of every
worker), in one in-process registry otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..comparison import Verdict, check, collect, golden_of, per_sample, served_tolerance
from ..errors import ArtifactError
from ..manifest import Manifest, load_artifact
from ..runners import open_runner

log = logging.getLogger("modelship")

SPOOL_ENV = "MODELSHIP_SPOOL"  # set by `modelship serve --allow-promote`: sampled live requests kept for promote
SPOOL_KEEP = 500  # the newest requests kept per model version; older ones are deleted

DIFF_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
LABELS = ("model", "version")
MISMATCH_KINDS = ("nonfinite", "label", "tolerance")  # NaN or inf answered; another label; a difference too large
DROP_REASONS = ("queue_full", "reference_error", "reference_nonfinite")
_metrics = None
_metrics_lock = threading.Lock()


def metrics():
    """The shadow metrics (created once per process; labelled by model and version)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            from prometheus_client import Counter, Histogram

            _metrics = {
                "sampled": Counter("modelship_shadow_sampled", "Live requests sampled for a shadow check", LABELS),
                "checked": Counter("modelship_shadow_checked", "Sampled requests re-run on the reference and judged",
                                   LABELS),
                "mismatch": Counter("modelship_shadow_mismatch", "Checked requests whose served answer the reference "
                                    "disagreed with (kind: nonfinite: NaN or inf where the reference is finite, label, or a "
                                    "difference beyond the tolerance: tolerance)",
                                    LABELS + ("kind",)),
                "dropped": Counter("modelship_shadow_dropped", "Sampled requests not checked (reason: queue_full, "
                                   "reference_error, reference_nonfinite)", LABELS + ("reason",)),
                "diff": Histogram("modelship_shadow_abs_diff", "Worst absolute difference of a checked answer from "
                                  "the reference, over every output", LABELS, buckets=DIFF_BUCKETS),
            }
    return _metrics


@dataclass
class Sample:
    """One answered request, as the client sent it and as it was answered: what shadow parity judges."""

    body: object  # the request body (bytes, text, or JSON TorchServe already parsed)
    headers: dict  # those that say how to read it: Content-Type, the binary extension's header length
    answer: object  # the codec's answer (a JSON-able dict, or a Binary): serialized here as the handler sends it
    request_id: str | None = None


class ReferencePrep:
    """Raw samples (texts, encoded images) → the reference model's feed, the reference's own way (its checkpoint's
    tokenizer or image processor; the recorded preprocessing for a reference that has no checkpoint of its own)."""

    def __init__(self, reference, served_kind: str):
        from ..models.reference import reference_preprocessor
        from ..preprocess import open_preprocessor

        self.kind = served_kind
        try:
            self.fn = reference_preprocessor(reference)
        except Exception:  # noqa: BLE001 — an exported (ONNX) reference: it carries its recorded preprocessing
            self.fn = None
        if self.fn is None:
            recorded = open_preprocessor(reference)
            self.fn = (lambda samples: recorded(samples)[0]) if recorded else None
        if self.fn is None:
            raise ArtifactError(f"{reference.path}: the shadow reference has no preprocessing for the {served_kind} "
                                "inputs this model takes")

    def __call__(self, samples: list) -> tuple[dict, list]:
        return self.fn(samples), [{} for _ in samples]


class Shadow:
    """Re-runs sampled requests of one served model version on its reference, in a thread of its own: the request
    as it arrived, decoded and preprocessed the reference's way, against the answer as the client received it."""

    def __init__(self, reference_dir: Path, served: Manifest, model: str, version: str, rate: float,
                 queue_size: int = 256, capture: str | None = None, capture_mb: float = 64.0):
        from .codec import Codec

        self.rate, self.model, self.version = float(rate), model, str(version)
        reference = load_artifact(reference_dir, verify=True)
        self.spec = {"task": served.task, "outputs": [t.name for t in served.outputs],
                     "labels": reference.manifest.labels or served.labels,  # the names a client must be shown
                     "dtypes": {t.name: t.dtype for t in served.outputs},
                     "tolerance": asdict(served_tolerance(served))}
        kind = (served.preprocess or {}).get("kind")
        # the request decoded by the contract of the served model, raw inputs preprocessed the reference's way
        self.codec = Codec(served, max_items=1 << 30, prep=ReferencePrep(reference, kind) if kind else None,
                           model_name=model, model_version=self.version)
        self.reference = open_runner(reference, threads=1)
        self.capture = Path(capture) if capture else None
        self.capture_bytes = int(capture_mb * 1e6)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        m = metrics()
        self.sampled, self.checked = m["sampled"].labels(model, self.version), m["checked"].labels(model, self.version)
        self.mismatch = {k: m["mismatch"].labels(model, self.version, k) for k in MISMATCH_KINDS}
        self.dropped = {k: m["dropped"].labels(model, self.version, k) for k in DROP_REASONS}
        self.diff = m["diff"].labels(model, self.version)
        spool = os.environ.get(SPOOL_ENV)
        self.spool = Path(spool) / model if spool else None
        self._spooled = 0
        self._thread = threading.Thread(target=self._loop, name=f"modelship-shadow-{model}", daemon=True)
        self._thread.start()

    def offer(self, sample: Sample) -> bool:
        """On the request path: sample, and queue without waiting (a full queue drops and counts). True when the
        request was sampled."""
        if self.rate < 1.0 and random.random() >= self.rate:
            return False
        self.sampled.inc()
        try:
            self.queue.put_nowait(sample)
        except queue.Full:
            self.dropped["queue_full"].inc()
        return True

    def _loop(self) -> None:
        while True:
            sample = self.queue.get()
            try:
                if self.spool is not None and sample.body is not None:
                    self._spool(sample.body, sample.headers)
                self._judge(sample)
            except Exception as e:  # noqa: BLE001 — a check that could not run is counted, never fatal
                self.dropped["reference_error"].inc()
                log.warning("modelship shadow: request %s could not be re-run on the reference (%s: %s)",
                            sample.request_id, type(e).__name__, e)
            finally:
                self.queue.task_done()

    def _judge(self, sample: Sample) -> None:
        from .codec import BINARY_HEADER, Binary, read_binary_answer

        req = self.codec.decode(sample.body, sample.headers.get("Content-Type"), sample.headers.get(BINARY_HEADER))
        ref = collect(self.reference, req.feed)
        if any(not np.all(np.isfinite(v)) for v in ref.values()):
            self.dropped["reference_nonfinite"].inc()  # no evidence: the reference itself answers NaN or inf
            log.warning("modelship shadow: request %s: the reference answers NaN or inf; not judged",
                        sample.request_id)
            return
        golden = golden_of(self.spec["task"], self.spec["outputs"], ref)
        try:
            if isinstance(sample.answer, Binary):  # what the client reads: the header, then the tensors' bytes
                body, length = sample.answer.body()
                answer = read_binary_answer(body, length)
            else:
                answer = json.loads(json.dumps(sample.answer))
            worst, kind, bad = verdict(self.spec, golden, answer, req.items)
        except Exception as e:  # noqa: BLE001 — an answer a client could not read is a wrong answer, not ours
            worst, kind = float("inf"), "tolerance"
            bad = [Verdict(None, False, worst, f"the answer cannot be read ({type(e).__name__}: {str(e)[:200]})")]
        self.checked.inc()
        self.diff.observe(worst if np.isfinite(worst) else 1e30)
        if kind is None:
            return
        self.mismatch[kind].inc()
        digest = input_hash(sample.body, req.feed)
        log.warning("modelship shadow mismatch: model %s version %s request %s input sha256 %s kind %s "
                    "max|diff| %.4g: %s", self.model, self.version, sample.request_id, digest, kind, worst, bad[0].why)
        if self.capture is not None:
            self._keep(req.feed, digest, sample.request_id)

    def _keep(self, feed: dict, digest: str, request_id: str | None) -> None:
        """The inputs of a mismatch as an .npz (one array per input name: ``modelship parity --data`` reads it),
        owner-only, while the capture folder holds less than its cap."""
        try:
            self.capture.mkdir(parents=True, exist_ok=True, mode=0o700)
            used = sum(p.stat().st_size for p in self.capture.glob("*.npz"))
            size = sum(np.asarray(v).nbytes for v in feed.values())
            if used + size > self.capture_bytes:
                log.warning("modelship shadow: capture folder %s is full (%.1f MB cap); not keeping request %s",
                            self.capture, self.capture_bytes / 1e6, request_id)
                return
            path = self.capture / f"{self.model}-{self.version}-{time.strftime('%Y%m%dT%H%M%S')}-{digest[:12]}.npz"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in feed.items()})
        except OSError as e:
            log.warning("modelship shadow: could not keep the inputs of request %s in %s: %s", request_id,
                        self.capture, e)

    def _spool(self, body, headers: dict) -> None:
        """The request as the client sent it (JSON, an image, the binary extension: gRPC requests come as that), for
        ``modelship promote`` to replay: owner-only files in the server's state folder (0700), the headers that say
        how to read the body on the first line, the newest ``SPOOL_KEEP`` per model version."""
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else \
            body.encode() if isinstance(body, str) else bytes(body or b"")
        folder = self.spool / self.version
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = folder / f"{time.time_ns()}-{os.getpid()}.req"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(headers).encode() + b"\n" + data)
            self._spooled += 1
            if self._spooled % 50 == 0:
                for old in sorted(folder.glob("*.req"))[:-SPOOL_KEEP]:
                    old.unlink(missing_ok=True)
        except OSError as e:
            log.warning("modelship shadow: could not spool a request in %s: %s", folder, e)

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued sample is judged (in-process use and tests); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


def verdict(spec: dict, golden: dict, answer: dict, items: int) -> tuple[float, str | None, list[Verdict]]:
    """Shadow's verdict on one answer (as the client read it) to a request of ``items`` samples: (the worst
    difference from the reference over every sample and output, the mismatch kind: the most severe among the
    samples' (``MISMATCH_KINDS``), or None when every sample is right, the verdicts that failed)."""
    answers = per_sample(answer)
    verdicts = [check(spec, golden, i, item) for i, item in enumerate(answers)]
    if len(answers) != items:
        verdicts.append(Verdict(None, False, float("inf"), f"{len(answers)} answers to {items} samples"))
    worst = max((v.diff for v in verdicts), default=float("inf"))
    bad = [v for v in verdicts if not v.ok]
    if not bad:
        return worst, None, []
    return worst, next(k for k in MISMATCH_KINDS if any(v.kind == k for v in bad)), bad


def read_spooled(data: bytes) -> tuple[dict, bytes]:
    """A spooled request: (the headers that say how to read its body, the body as the client sent it)."""
    import json

    head, _, body = data.partition(b"\n")
    text = head.decode(errors="replace")
    try:
        headers = json.loads(text) if text.startswith("{") else {"Content-Type": text}
    except ValueError:
        headers = {}
    return {str(k): str(v) for k, v in headers.items() if v is not None}, body


def input_hash(body, feed: dict) -> str:
    """sha256 of the request body as sent (of the decoded inputs where there is no body): names the input in logs
    without holding it."""
    h = hashlib.sha256()
    if isinstance(body, (bytes, bytearray, str)):
        h.update(body.encode() if isinstance(body, str) else bytes(body))
    else:
        for k in sorted(feed):
            h.update(k.encode())
            h.update(np.ascontiguousarray(feed[k]).tobytes())
    return h.hexdigest()
