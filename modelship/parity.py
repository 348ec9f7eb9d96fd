"""Parity: compare a candidate artifact's outputs with its PyTorch reference on evaluation data.

One record format everywhere (manifest, --json, report). A failed record is fatal to the command.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from .errors import ParityError
from .models import data as datasets
from .runners import Runner


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float | None  # None: not judged (int8 is judged on agreement and accuracy)
    min_top1_agreement: float | None
    max_accuracy_drop: float | None

    def override(self, **kw) -> "Tolerance":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


DEFAULT_TOLERANCES = {
    "fp32": Tolerance(1e-4, 0.999, 0.001),
    "fp16": Tolerance(0.05, 0.995, 0.005),
    "int8": Tolerance(None, 0.99, 0.01),
    "student": Tolerance(None, None, 0.01),  # a distilled student is judged on accuracy alone
}


def default_tolerance(precision: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])


def collect(runner: Runner, feed: dict, batch: int = 64) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for b in datasets.batches(feed, batch):
        for k, v in runner.infer(b).items():
            parts.setdefault(k, []).append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def compare(reference: Runner, candidate: Runner, split: str = "test", tolerance: Tolerance | None = None,
            reference_name: str | None = None, batch: int = 64) -> dict:
    """Run both on the candidate's evaluation data and return the parity record (not raising)."""
    man = candidate.manifest
    feed, labels = datasets.load(man.data, split, man.inputs)
    ref = collect(reference, feed, batch)
    cand = collect(candidate, feed, batch)
    return record(ref, cand, labels, candidate, tolerance or default_tolerance(man.precision), reference_name)


def record(ref: dict, cand: dict, labels, candidate: Runner, tol: Tolerance, reference_name: str | None) -> dict:
    man = candidate.manifest
    per_output = {}
    for name in cand:
        if name in ref:
            d = np.abs(ref[name] - cand[name])
            per_output[name] = (float(d.max()), float(d.mean()))
    first = man.outputs[0].name
    max_diff, mean_diff = per_output[first]
    agreement = acc = ref_acc = None
    if man.is_classifier:
        ref_top = ref[first].argmax(-1)
        cand_top = cand[first].argmax(-1)
        agreement = float(np.mean(ref_top == cand_top))
        if labels is not None:
            acc = float(np.mean(cand_top == labels))
            ref_acc = float(np.mean(ref_top == labels))
    failures = []
    if tol.max_abs_diff is not None:
        for name, (mx, _) in per_output.items():
            if not mx <= tol.max_abs_diff:
                failures.append(f"output '{name}' moved by max_abs_diff {mx:.3g} > {tol.max_abs_diff:g}")
    if tol.min_top1_agreement is not None and agreement is not None and agreement < tol.min_top1_agreement:
        failures.append(f"output '{first}' top-1 agreement {agreement:.4f} < {tol.min_top1_agreement:g}")
    if tol.max_accuracy_drop is not None and acc is not None and ref_acc - acc > tol.max_accuracy_drop + 1e-12:
        failures.append(f"accuracy dropped {ref_acc - acc:.4f} ({ref_acc:.4f} -> {acc:.4f}) > {tol.max_accuracy_drop:g}")
    return {
        "artifact": str(candidate.artifact.path), "backend": candidate.backend, "device": candidate.device,
        "precision": man.precision, "reference": reference_name, "samples": int(len(cand[first])),
        "max_abs_diff": max_diff, "mean_abs_diff": mean_diff, "top1_agreement": agreement,
        "accuracy": acc, "reference_accuracy": ref_acc, "tolerance": asdict(tol),
        "per_output": {k: {"max_abs_diff": v[0], "mean_abs_diff": v[1]} for k, v in per_output.items()},
        "failures": failures, "passed": not failures,
    }


def enforce(rec: dict) -> dict:
    if not rec["passed"]:
        raise ParityError(f"parity failed for {rec['artifact']} ({rec['backend']}, {rec['precision']}): "
                          + "; ".join(rec["failures"]), rec)
    return rec
