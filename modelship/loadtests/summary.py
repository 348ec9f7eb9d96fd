"""What a load test measured and whether it passed: statistics over the requests sent after the warm-up
(failed and timed-out ones included at their time to failure) and the SLO, failure, agreement, difference,
recovery and memory gates."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..comparison import p99
from ..errors import GateError


SEVERITY = ("parity", "weak", "errors", "slo")  # a result's kind: its most severe failed gate


@dataclass(frozen=True)
class GateFailure:
    kind: str  # parity | errors | slo (modelship.errors.KINDS)
    message: str


def kind_of(failures) -> str | None:
    """The most severe kind among failed gates (``GateFailure`` or {"kind": ...}), None when none failed."""
    kinds = {f.kind if isinstance(f, GateFailure) else f["kind"] for f in failures}
    return next((k for k in SEVERITY if k in kinds), None)


@dataclass
class Gates:
    slo_p95_ms: float | None = None
    max_failure_ratio: float = 0.0
    min_agreement: float | None = None  # None: the served artifact's precision tolerance (FP32: every label)
    max_recovery_s: float | None = None  # with a worker fault: until a replaced worker answers correctly
    max_memory_growth: float | None = None  # worker RSS, end vs after warm-up, as a fraction

    def judge(self, r: dict) -> list[GateFailure]:
        out = []
        fault = r.get("fault")
        if fault is not None:
            if not fault.get("answer_after_recovery_correct"):
                out.append(GateFailure("errors", f"fault: no correct answer after the worker kill "
                                                 f"({fault.get('error', 'wrong answer')})"))
            elif self.max_recovery_s is not None and fault["recovery_s"] > self.max_recovery_s:
                out.append(GateFailure("slo", f"recovery: {fault['recovery_s']:.1f} s > {self.max_recovery_s} s"))
        if self.max_memory_growth is not None:
            g = (r.get("memory") or {}).get("growth")
            if g is None:
                out.append(GateFailure("errors", "memory: too few worker memory samples to judge growth (run longer)"))
            elif g > self.max_memory_growth:
                m = r["memory"]
                out.append(GateFailure("slo", f"memory: worker RSS grew {g:.1%} ({m['start_mb']:.0f} -> "
                                              f"{m['end_mb']:.0f} MiB) > {self.max_memory_growth:.0%}"))
        if self.slo_p95_ms is not None and (r["p95_ms"] is None or r["p95_ms"] > self.slo_p95_ms):
            out.append(GateFailure("slo", f"latency: p95 {_ms(r['p95_ms'])} ms > SLO {self.slo_p95_ms:g} ms"))
        if r["requests"] == 0:
            out.append(GateFailure("errors", f"no request was answered after the {r.get('warmup_s', 0):g} s warm-up "
                                             f"({r.get('locust_responses') or 0} answered in all; Locust log: "
                                             f"{r.get('log')})"))
        elif r["failures"] / r["requests"] > self.max_failure_ratio:
            out.append(GateFailure("errors", f"failures: {r['failures']}/{r['requests']} = "
                                             f"{r['failures'] / r['requests']:.4f} > {self.max_failure_ratio}"))
        floor = self.min_agreement if self.min_agreement is not None else (r.get("tolerance") or {}).get("min_top1_agreement")
        # judged on the 95 % upper bound: a short run that met one known disagreement in 90 answers cannot show
        # agreement below 0.99; a floor of 1.0 (FP32) still fails on a single differing label
        upper = r.get("agreement_upper_95")
        if r.get("top1_agreement") is not None and floor is not None and upper is not None and upper < floor:
            out.append(GateFailure("parity", f"agreement: {r['top1_agreement']:.4f} (95% upper bound {upper:.4f}) < "
                                             f"{floor} ({r['label_mismatches']} labels differ from the reference)"))
        if r.get("nonfinite"):
            out.append(GateFailure("parity", f"non-finite: {r['nonfinite']} answers hold NaN or inf where the "
                                             f"reference is finite (e.g. "
                                             f"{'; '.join(r.get('mismatch_examples', [])[:1])})"))
        if r.get("out_of_tolerance", 0) > r.get("nonfinite", 0):
            out.append(GateFailure("parity", f"difference: {r['out_of_tolerance']} answers beyond the "
                                             f"{r.get('precision')} tolerance (max |diff| {r['max_abs_diff']:.3g}; e.g. "
                                             f"{'; '.join(r.get('mismatch_examples', [])[:1])})"))
        if r.get("checked") == 0 and r["requests"]:
            out.append(GateFailure("errors", "no answer could be checked against the reference"))
        return out


def summarize(out_dir: Path, tag: str, spec: dict, users: int, duration_s: float | None = None,
              warmup_s: float = 0.0) -> dict:
    """Statistics over the requests sent after the warm-up: failed and timed-out ones count in the latency
    percentiles at their time to failure; every answered one is judged against the reference."""
    stats = out_dir / f"{tag}_stats.csv"
    if not stats.is_file():
        tail = (out_dir / f"{tag}.log").read_text(errors="replace").strip().splitlines()[-3:]
        raise GateError(f"Locust wrote no statistics ({' | '.join(tail)})")
    counts = json.loads(Path(spec["report"]).read_text()) if Path(spec["report"]).is_file() else {}
    final = counts.get("stats") or {}
    rows = [s for s in counts.get("samples", []) if s[0] >= warmup_s]
    lat = np.array([s[1] for s in rows], dtype=float)
    verdicts = [s[3] for s in rows if s[3] is not None]
    diffs = np.array([v[2] for v in verdicts], dtype=float)
    diffs[diffs >= 1e30] = np.inf  # the Locust user's stand-in for inf (NaN or inf answered, an output missing)
    labels = [v[0] for v in verdicts if v[0] is not None]
    label_mismatches = sum(1 for ok in labels if not ok)
    out_of_tol = sum(1 for v in verdicts if not v[1])
    nonfinite = sum(1 for v in verdicts if len(v) > 3 and v[3])
    mismatches = sum(1 for v in verdicts if not v[1] or v[0] is False)
    span = (duration_s - warmup_s) if duration_s else None
    # requests Locust itself cancelled when the run ended (not failures: the server never got to answer)
    cancelled = max(0, counts.get("started", 0) - counts.get("responses", 0))
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: None)
    return {
        "model": spec.get("model"), "users": users, "warmup_s": warmup_s, "requests": len(rows),
        "failures": sum(1 for s in rows if not s[2]), "cancelled_at_stop": cancelled,
        "failures_in_warmup": sum(1 for s in counts.get("samples", []) if s[0] < warmup_s and not s[2]),
        "max_ms": float(lat.max()) if len(lat) else None,  # slowest request, failed ones included
        "rps": len(rows) / span if span else _num(final.get("rps")),
        "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": float(lat.mean()) if len(lat) else None,
        "checked": len(verdicts), "mismatches": mismatches, "label_mismatches": label_mismatches,
        "out_of_tolerance": out_of_tol, "nonfinite": nonfinite,
        "top1_agreement": (1 - label_mismatches / len(labels)) if labels else None,
        "agreement_upper_95": wilson_upper(len(labels) - label_mismatches, len(labels)) if labels else None,
        "max_abs_diff": float(diffs.max()) if len(diffs) else None,
        "p99_abs_diff": p99(diffs) if len(diffs) else None,
        "precision": spec.get("precision"), "tolerance": spec.get("tolerance"), "reference": spec.get("reference"),
        "mismatch_examples": counts.get("examples", []), "per_worker": counts.get("per_worker", {}),
        "locust_requests": final.get("requests"), "locust_responses": counts.get("responses"),
        "latencies_ms": lat.round(3).tolist(), "csv": str(stats), "log": str(out_dir / f"{tag}.log"), "html": str(out_dir / f"{tag}.html"),
    }


def wilson_upper(agree: int, n: int, z: float = 1.96) -> float:
    """Upper end of the Wilson score interval (95 %) for ``agree`` of ``n``; exactly 1.0 when all agree."""
    if agree == n:
        return 1.0
    p = agree / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + half) / (1 + z * z / n)


def _ms(v) -> str:
    return "none" if v is None else f"{v:.1f}"


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
