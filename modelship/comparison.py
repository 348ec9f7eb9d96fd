"""Parity: compare a candidate artifact's outputs with the root PyTorch model of its lineage.

One record format everywhere (manifest, --json, report). Every output is matched by name, its shape
checked, and judged elementwise (``|ref - cand| <= atol + rtol * |ref|``); classifiers are also judged
on top-1 agreement and accuracy. A record also says what its data could not tell (``weak``): a gate
with a weak record fails unless the weakness was accepted on purpose (``--allow-weak-parity``).
A failed record is fatal to the command.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .errors import ArtifactError, ModelshipError, ParityError
from .manifest import V2_DTYPES
from . import data as datasets
from .runners import Runner


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float | None  # atol per output element; None: differences are not judged
    min_top1_agreement: float | None
    max_accuracy_drop: float | None
    rtol: float = 0.0  # elementwise: |ref - cand| <= max_abs_diff + rtol * |ref|
    max_prob_diff: float | None = None  # served classifier answers: |probabilities - reference softmax|
    per_output: dict = field(default_factory=dict)  # output name -> {"atol": x, "rtol": y, "cap": z, ...}
    # the difference allowed is also capped at this fraction of each output's own spread on the evaluation data
    # (a classifier's logits: the median top-1 margin; any other output: its standard deviation), so outputs of
    # any scale get a verdict; None: the bound is atol + rtol·|ref| as given
    spread_fraction: float | None = None

    def override(self, **kw) -> "Tolerance":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def adjusted(self, overrides: dict | None = None, per_output: dict | None = None) -> "Tolerance":
        """This tolerance with the command line's overrides and per-output bounds (added to its own). A bound
        the user sets (atol or rtol) is used as given: it is not capped by the outputs' spread."""
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        tol = self.override(**overrides)
        if "max_abs_diff" in overrides or "rtol" in overrides:  # and bounds resolved from data give way to it
            tol = replace(tol, spread_fraction=None,
                          per_output={k: v for k, v in tol.per_output.items() if "spread" not in v})
        return replace(tol, per_output={**tol.per_output, **per_output}) if per_output else tol

    def for_output(self, name: str) -> tuple[float | None, float, float | None]:
        """(atol, rtol, cap) for one output: |ref - cand| <= min(atol + rtol·|ref|, cap)."""
        own = self.per_output.get(name, {})
        return own.get("atol", self.max_abs_diff), own.get("rtol", self.rtol), own.get("cap")

    def resolved(self, ref: dict, man) -> "Tolerance":
        """Each output's bound made explicit, capped by its spread on this data where ``spread_fraction`` says
        so (outputs with a bound of their own, and outputs that do not vary, keep the precision's)."""
        if self.spread_fraction is None or self.max_abs_diff is None:
            return self
        per = dict(self.per_output)
        for t in man.outputs:
            if t.name in per or t.name not in ref:
                continue
            first = man.is_classifier and t.name == man.outputs[0].name
            what, s = spread(ref[t.name], first)
            if s > 0:
                per[t.name] = {"atol": self.max_abs_diff, "rtol": self.rtol, "cap": float(self.spread_fraction * s),
                               "spread": s, "spread_of": what}
        return replace(self, per_output=per)

    @classmethod
    def from_dict(cls, d: dict) -> "Tolerance":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def spread(values: np.ndarray, logits: bool) -> tuple[str, float]:
    """How much an output varies over the data: a classifier's logits by their median top-1 margin (what a
    difference must stay under not to flip labels), any other output by its standard deviation."""
    v = np.asarray(values, dtype=np.float64)
    if logits and v.ndim >= 2 and v.reshape(len(v), -1).shape[1] > 1:
        rows = v.reshape(len(v), -1)
        srt = np.sort(rows[np.isfinite(rows).all(-1)], axis=-1)  # NaN or inf: no evidence (weak_reasons says so)
        return "median top-1 margin", float(np.median(srt[:, -1] - srt[:, -2])) if len(srt) else 0.0
    v = v[np.isfinite(v)]
    return "std", float(np.std(v)) if v.size else 0.0


DEFAULT_TOLERANCES = {
    "fp32": Tolerance(1e-4, 1.0, 0.001, max_prob_diff=1e-4),
    "fp16": Tolerance(0.05, 0.995, 0.005, max_prob_diff=0.05, spread_fraction=0.1),
    "int8": Tolerance(2.0, 0.99, 0.01, rtol=0.1, max_prob_diff=0.2, spread_fraction=0.5),
    # a distilled student is a different model: judged against its teacher on agreement and accuracy
    "student": Tolerance(None, 0.95, 0.01),
}


def default_tolerance(precision: str) -> Tolerance:
    return DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES["fp32"])


def tolerance_of(man) -> Tolerance:
    """The tolerance an artifact is judged with: its precision's, or a student's anywhere below a distillation."""
    if man.extra.get("distilled_from"):  # a student may declare its own (a text student: quantization/distill.py)
        own = man.extra.get("student_tolerance")
        return Tolerance.from_dict(own) if own else DEFAULT_TOLERANCES["student"]
    return default_tolerance(man.precision)


def served_tolerance(man) -> Tolerance:
    """What a served answer of this artifact is judged with: the tolerance its parity gate used, each output's
    bound as resolved on the gate's data (the precision's defaults when it has no record)."""
    rec = (man.parity or {}).get("tolerance")
    return Tolerance.from_dict(rec) if rec else tolerance_of(man)


def parse_output_tolerance(text: str) -> tuple[str, dict]:
    """``logits=1e-3`` or ``logits=1e-3:0.01`` -> ("logits", {"atol": 1e-3, "rtol": 0.01})."""
    try:
        name, vals = text.split("=")
        parts = [float(x) for x in vals.split(":")]
        if not 1 <= len(parts) <= 2 or min(parts) < 0:
            raise ValueError
    except ValueError:
        raise ModelshipError(f"--output-tol '{text}': expected NAME=ATOL or NAME=ATOL:RTOL, e.g. logits=1e-3:0.01") from None
    return name.strip(), {"atol": parts[0], **({"rtol": parts[1]} if len(parts) == 2 else {})}


def as_inputs(runner: Runner, feed: dict) -> dict:
    """``feed`` with its float arrays cast to the runner's input dtypes; integers (token ids) pass as they are."""
    dtypes = {t.name: np.dtype(t.dtype) for t in runner.inputs}
    return {k: v.astype(dtypes[k], copy=False) if v.dtype.kind == "f" else v for k, v in feed.items()}


def collect(runner: Runner, feed: dict, batch: int = 64) -> dict[str, np.ndarray]:
    """Run ``feed`` through ``runner`` in batches (cast to the runner's input dtypes), outputs concatenated."""
    batch = min(batch, getattr(runner, "max_batch", None) or batch)
    parts: dict[str, list] = {}
    for b in datasets.batches(feed, batch):
        for k, v in runner.infer(as_inputs(runner, b)).items():
            parts.setdefault(k, []).append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in parts.items()}


def with_model_labels(spec: dict, art) -> dict:
    """A user's text or image data whose labels may be the model's label names: the spec with those names."""
    if spec.get("name") in ("text", "images") and not spec.get("labels") and art.manifest.labels:
        return {**spec, "labels": art.manifest.labels}
    return spec


def evaluation_feeds(ref_art, cand_art, spec: dict | None, split: str):
    """(reference feed, candidate feed, labels): the same tensors for both, or, for a candidate with its own
    preprocessing and raw data, raw samples preprocessed two ways: the original way for the reference, the
    recorded way (what serving does) for the candidate."""
    from .models.reference import reference_preprocessor
    from .preprocess import open_preprocessor

    prep = open_preprocessor(cand_art)
    if prep is None or not datasets.has_raw(spec):
        feed, labels = datasets.load(spec, split, cand_art.manifest.inputs)
        return feed, feed, labels
    raw, labels = datasets.load_raw(with_model_labels(spec, cand_art), split)
    original = reference_preprocessor(ref_art)
    if original is None:
        raise ArtifactError(f"{ref_art.path}: the reference records no preprocessing, but {cand_art.path} does; "
                            "compare on tensors (--data FILE.npz) or give the reference its preprocessing")
    return original(raw), prep(raw)[0], labels


def compare(reference: Runner, candidate: Runner, split: str = "test", tolerance: Tolerance | None = None,
            reference_name: str | None = None, batch: int = 64, allow_weak: bool = False,
            data: dict | None = None) -> dict:
    """Run both on the evaluation data (``data`` or the candidate's) and return the parity record (not raising).
    A candidate that carries its preprocessing is fed raw samples through it, and the reference the same raw
    samples preprocessed the original way (``modelship.preprocess``). The record's ``batch`` is the batch gate's
    (``modelship.batch_gate``): the candidate's answers alone vs inside batches of other samples."""
    from . import batch_gate

    man = candidate.manifest
    spec = data or man.data
    ref_feed, cand_feed, labels = evaluation_feeds(reference.artifact, candidate.artifact, spec, split)
    ref = collect(reference, ref_feed, batch)
    cand = collect(candidate, cand_feed, batch)
    rec = record(ref, cand, labels, candidate, tolerance or tolerance_of(man), reference_name, allow_weak, spec)
    rec["batch"] = batch_gate.judge(candidate, batch_gate.samples_for(candidate.artifact, spec, split, cand_feed))
    return rec


def bound(ref: np.ndarray, atol: float, rtol: float, cap: float | None = None) -> np.ndarray:
    """The difference each value may have: atol + rtol·|ref|, capped at ``cap`` (in float64, as the differences)."""
    b = atol + (rtol * np.abs(np.asarray(ref, dtype=np.float64)) if rtol else np.zeros(np.shape(ref)))
    return np.minimum(b, cap) if cap is not None else b


def beyond(ref: np.ndarray, d: np.ndarray, atol: float, rtol: float, cap: float | None = None) -> np.ndarray:
    """Which values of |ref - cand| = ``d`` break the elementwise bound (a NaN difference breaks every bound)."""
    return ~(d <= bound(ref, atol, rtol, cap))


def abs_diff(ref, cand) -> tuple[np.ndarray, np.ndarray]:
    """(|ref - cand| in float64, where the candidate is non-finite and the reference finite). Such a value is
    infinitely far from the reference (never NaN: NaN compares false with every bound and would pass); where both
    are non-finite the same way (NaN and NaN, inf and inf) the difference is 0: the reference's own values are
    judged as evidence instead (``nonfinite_reference``)."""
    r, c = np.asarray(ref, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(r - c)
    rf, cf = np.isfinite(r), np.isfinite(c)
    wrong = rf & ~cf
    same = ~rf & ((r == c) | (np.isnan(r) & np.isnan(c)))
    d[wrong | (~rf & ~same)] = np.inf
    d[same] = 0.0
    return d, wrong


def bad_rows(mask: np.ndarray) -> np.ndarray:
    """Which rows (samples: the first dim) hold a True of ``mask``."""
    mask = np.atleast_1d(mask)
    return mask.reshape(len(mask), -1).any(-1)


def nonfinite_text(name: str, wrong: np.ndarray, whose: str = "answers") -> str:
    """What a non-finite answer is, said with how many rows (samples) and values, and the first row."""
    rows = bad_rows(wrong)
    return (f"output '{name}' {whose} NaN or inf where the reference is finite: {int(rows.sum())} of {len(rows)} "
            f"rows ({int(np.sum(wrong))} values; first at row {int(np.argmax(rows))})")


def bound_text(atol: float, rtol: float, cap: float | None = None) -> str:
    text = f"{atol:g}" + (f" + {rtol:g}·|ref|" if rtol else "")
    return f"min({text}, {cap:.3g})" if cap is not None else text


def p99(d: np.ndarray) -> float:
    if not d.size:
        return 0.0
    with np.errstate(invalid="ignore"):
        p = float(np.percentile(d, 99))
    return np.inf if np.isnan(p) else p  # between two infinite differences


def _max_finite(r, c) -> float:
    d, _ = abs_diff(r, c)
    d = d[np.isfinite(d)]
    return float(d.max()) if d.size else 0.0


def _diffs(r: np.ndarray, c: np.ndarray, atol, rtol, cap) -> dict:
    """One output's differences. A non-finite candidate value where the reference is finite counts in
    ``nonfinite`` and, whatever the bound (or none), as a violation; it makes the maxima inf, never NaN."""
    d, wrong = abs_diff(r, c)
    out = {"shape": list(r.shape), "max_abs_diff": float(d.max()) if d.size else 0.0,
           "mean_abs_diff": float(d.mean()) if d.size else 0.0,
           "p99_abs_diff": p99(d), "atol": atol, "rtol": rtol, "cap": cap,
           "nonfinite": int(wrong.sum())}
    if atol is not None:
        over = beyond(r, d, atol, rtol, cap) & np.isfinite(np.asarray(r, dtype=np.float64))
        out["violations"] = int((over | wrong).sum())
        if out["violations"]:
            with np.errstate(invalid="ignore"):
                out["worst_excess"] = float(np.max(np.where(over | wrong, d - bound(r, atol, rtol, cap), -np.inf)))
    elif out["nonfinite"]:
        out["violations"] = out["nonfinite"]
    return out


def weak_reasons(ref: dict, man, tol: Tolerance, labels, spec: dict | None) -> list[str]:
    """What the evaluation data could not tell about this candidate (empty when the judgement is sound)."""
    reasons = []
    first = man.outputs[0].name
    if any(len(v) == 0 for v in ref.values()):
        return ["the evaluation data holds no samples, so nothing was judged; supply data (--data)"]
    for t in man.outputs:
        if t.name in ref and not np.all(np.isfinite(ref[t.name])):
            rows = bad_rows(~np.isfinite(ref[t.name]))
            reasons.append(f"the reference itself answers NaN or inf in output '{t.name}' on {int(rows.sum())} of "
                           f"{len(rows)} samples (first at row {int(np.argmax(rows))}), so nothing can be judged "
                           "there; supply data the reference answers with finite values (--data)")
    judged_by_difference = tol.max_abs_diff is not None
    generated = datasets.is_generated(spec)
    if man.is_classifier and first in ref:
        logits = ref[first].reshape(len(ref[first]), -1)
        if logits.shape[1] == 1:
            reasons.append(f"output '{first}' has one column: its argmax is always 0, so labels and agreement say "
                           "nothing; if this model is not a classifier, pass --task regression")
        else:
            top = logits.argmax(-1)
            if not judged_by_difference or man.precision == "int8":  # the verdict rests on agreement / accuracy
                if len(np.unique(top)) == 1:
                    reasons.append(f"the reference predicts class {int(top[0])} for every one of the {len(top)} "
                                   "samples, so agreement cannot fail; supply data that covers the classes (--data)")
                if generated and labels is None:
                    reasons.append("judged by agreement on generated inputs without labels; supply real data "
                                   "with labels (--data FILE)")
            atol, rtol, cap = tol.for_output(first)
            _, margin = spread(logits, True)
            allowed = float(np.median(bound(logits.max(-1), atol, rtol, cap))) if atol is not None else None
            if allowed is not None and margin < allowed:
                reasons.append(f"output '{first}': the median top-1 logit margin {margin:.3g} is below the difference "
                               f"allowed ({bound_text(atol, rtol, cap)}, {allowed:.3g} at the top logit), so a "
                               "difference within tolerance can still flip labels; supply data the model separates "
                               "(--data) or a tighter --max-abs-diff")
    for t in man.outputs:
        if t.name not in ref or (man.is_classifier and t.name == first):
            continue  # a classifier's logits: judged by their margins above
        atol, rtol, cap = tol.for_output(t.name)
        if atol is None:
            if not man.is_classifier:
                reasons.append(f"output '{t.name}': this tolerance judges no output difference and the task "
                               f"'{man.task}' has no labels to agree on, so nothing is judged; pass --max-abs-diff")
        else:
            _, std = spread(ref[t.name], False)
            allowed = float(np.median(bound(ref[t.name], atol, rtol, cap)))
            if std < allowed:
                reasons.append(f"output '{t.name}': its spread over the data (std {std:.3g}) is below the "
                               f"difference allowed ({bound_text(atol, rtol, cap)}, median {allowed:.3g}), so any "
                               "answer near the mean passes; pass a tighter --max-abs-diff or --output-tol")
    return reasons


def record(ref: dict, cand: dict, labels, candidate: Runner, tol: Tolerance, reference_name: str | None,
           allow_weak: bool = False, spec: dict | None = None) -> dict:
    from .machine import kernel_facts

    man = candidate.manifest
    spec = spec if spec is not None else man.data
    tol = tol.resolved(ref, man)  # each output's bound, capped by its spread on this data where the precision says
    expected = [t.name for t in man.outputs]
    failures, per_output = [], {}
    for name in expected + sorted((set(ref) | set(cand)) - set(expected)):
        if name not in expected:
            side = "candidate" if name in cand else "reference"
            failures.append(f"output '{name}' from the {side} is not in the manifest ({', '.join(expected)})")
            continue
        missing = [side for side, outs in (("reference", ref), ("candidate", cand)) if name not in outs]
        if missing:
            failures.append(f"output '{name}' is missing from the {' and '.join(missing)}")
            continue
        if ref[name].shape != cand[name].shape:
            failures.append(f"output '{name}': shape {list(cand[name].shape)}, reference {list(ref[name].shape)}")
            continue
        atol, rtol, cap = tol.for_output(name)
        po = per_output[name] = _diffs(ref[name], cand[name], atol, rtol, cap)
        if po["nonfinite"]:
            failures.append(nonfinite_text(name, abs_diff(ref[name], cand[name])[1]))
        if po.get("violations", 0) > po["nonfinite"]:
            moved = po["violations"] - po["nonfinite"]
            finite = _max_finite(ref[name], cand[name])
            failures.append(f"output '{name}' moved by max_abs_diff {finite:.3g} > "
                            f"{bound_text(atol, rtol, cap)} ({moved} of {ref[name].size} values)")
    first = expected[0]
    agreement = acc = ref_acc = None
    if man.is_classifier and first in per_output:
        ref_top = ref[first].reshape(len(ref[first]), -1).argmax(-1)
        cand_top = cand[first].reshape(len(cand[first]), -1).argmax(-1)
        wrong = ~np.isfinite(cand[first]) & np.isfinite(ref[first])
        cand_top[bad_rows(wrong)] = -1  # a row answering NaN or inf has no label: it disagrees
        agreement = float(np.mean(ref_top == cand_top))
        if labels is not None:
            acc = float(np.mean(cand_top == labels))
            ref_acc = float(np.mean(ref_top == labels))
    if tol.min_top1_agreement is not None and agreement is not None and agreement < tol.min_top1_agreement:
        failures.append(f"output '{first}' top-1 agreement {agreement:.4f} < {tol.min_top1_agreement:g}")
    if tol.max_accuracy_drop is not None and acc is not None and ref_acc - acc > tol.max_accuracy_drop + 1e-12:
        failures.append(f"accuracy dropped {ref_acc - acc:.4f} ({ref_acc:.4f} -> {acc:.4f}) > {tol.max_accuracy_drop:g}")
    moved = bool(failures)
    weak = weak_reasons(ref, man, tol, labels, spec)
    if weak and not allow_weak:
        failures.append("weak evidence: " + "; ".join(weak) + " (or accept it on purpose with --allow-weak-parity)")
    head = per_output.get(first, {})
    return {
        "artifact": str(candidate.artifact.path), "backend": candidate.backend, "device": candidate.device,
        "precision": man.precision, "task": man.task, "reference": reference_name,
        "samples": int(len(next(iter(cand.values())))) if cand else 0,
        "max_abs_diff": max((p["max_abs_diff"] for p in per_output.values()), default=None),
        "mean_abs_diff": head.get("mean_abs_diff"), "top1_agreement": agreement,
        "accuracy": acc, "reference_accuracy": ref_acc, "tolerance": asdict(tol),
        "per_output": per_output, "data": datasets.describe(spec), "weak": weak, "allow_weak": bool(allow_weak and weak),
        "failures": failures, "passed": not failures,
        "kind": None if not failures else "parity" if moved else "weak",  # what failed: the answers, or the evidence
        "judged_on": kernel_facts(candidate.provider),
    }


def enforce(rec: dict) -> dict:
    if not rec["passed"]:
        raise ParityError(f"parity failed for {rec['artifact']} ({rec['backend']}, {rec['precision']}): "
                          + "; ".join(rec["failures"]), rec)
    return rec


@dataclass
class Verdict:
    label_ok: bool | None  # classifiers: the served label index equals the reference's
    within: bool  # every returned output within tolerance (and none missing)
    diff: float  # worst |served - reference| over every output of this answer (inf for NaN or inf, never NaN)
    why: str = ""
    served_on: dict | None = None  # where the answer was computed (the handler's Modelship-Served-On header)
    nonfinite: bool = False  # the answer holds NaN or inf where the reference is finite

    @property
    def ok(self) -> bool:
        return self.within and self.label_ok is not False and not self.nonfinite

    @property
    def kind(self) -> str | None:
        """What is wrong with the answer: ``nonfinite``, ``label``, ``tolerance``, or None when it is right."""
        return None if self.ok else "nonfinite" if self.nonfinite else "label" if self.label_ok is False \
            else "tolerance"


def _judge(name: str, got, want: np.ndarray, atol, rtol, cap=None) -> tuple[bool, float, str, bool]:
    """(within, worst difference, why not, whether it answers NaN or inf where the reference is finite)."""
    try:
        got = np.asarray(got, dtype=np.float64)
    except (TypeError, ValueError):
        return False, float("inf"), f"output '{name}' is not numbers", False
    if got.shape != want.shape:
        return False, float("inf"), f"output '{name}' has shape {list(got.shape)}, reference {list(want.shape)}", False
    d, wrong = abs_diff(want, got)
    diff = float(d.max()) if d.size else 0.0
    if wrong.any():
        return False, diff, f"output '{name}' answers NaN or inf on {int(wrong.sum())} of {wrong.size} values", True
    if atol is not None and np.any(beyond(want, d, atol, rtol, cap)):
        return False, diff, f"output '{name}' |diff| {diff:.3g} > {bound_text(atol, rtol, cap)}", False
    return True, diff, "", False


def check(spec: dict, golden, i: int, payload: dict) -> Verdict:
    """The verdict on a served answer (``payload``, as the REST API returns it) to sample ``i`` of ``golden`` (the
    reference's outputs: ``out0``.. by output position, and a classifier's ``probabilities`` and ``index``),
    judged with ``spec``'s task, outputs and tolerance: what the load test and shadow parity both decide with."""
    tol = Tolerance.from_dict(spec["tolerance"])
    problems, worst, label_ok, within, nonfinite = [], 0.0, None, True, False
    if isinstance(payload.get("outputs"), list):  # an Open Inference Protocol answer: judged the same way
        payload = from_v2(spec, payload)
        problems += payload.pop("wrong", [])
        within = not problems
    expected = list(spec["outputs"])
    returned = dict(payload.get("outputs") or {})
    if spec["task"] == "classification":
        first = expected.pop(0)
        want = int(golden["index"][i])
        label_ok = payload.get("index") == want
        if not label_ok:
            problems.append(f"label index {payload.get('index')}, reference {want}")
        names = spec.get("labels") or []
        if label_ok and "label" in payload and payload["label"] != (names[want] if want < len(names) else str(want)):
            label_ok = False  # the right index under another class's name: what a client shows is wrong
            problems.append(f"label {payload['label']!r} for index {want}, which is "
                            f"{names[want] if want < len(names) else str(want)!r}")
        ok, diff, why, bad = _judge("probabilities", payload.get("probabilities"), golden["probabilities"][i],
                                    tol.max_prob_diff, 0.0)
        worst, within, nonfinite = max(worst, diff), within and ok, nonfinite or bad
        problems += [why] if why else []
        if first in returned:  # the client got the logits too (a v2 answer): judged as any output
            ok, diff, why, bad = _judge(first, returned.pop(first), golden["out0"][i], *tol.for_output(first))
            worst, within, nonfinite = max(worst, diff), within and ok, nonfinite or bad
            problems += [why] if why else []
    for name in expected:
        if name not in returned:
            problems.append(f"output '{name}' is missing from the answer")
            worst, within = float("inf"), False
            continue
        key = f"out{spec['outputs'].index(name)}"  # golden arrays are stored by output position
        ok, diff, why, bad = _judge(name, returned.pop(name), golden[key][i], *tol.for_output(name))
        worst, within, nonfinite = max(worst, diff), within and ok, nonfinite or bad
        problems += [why] if why else []
    if returned:
        problems.append(f"unexpected output(s) {', '.join(sorted(returned))}")
        within = False
    return Verdict(label_ok, within, worst, f"sample {i}: " + "; ".join(problems) if problems else "",
                   nonfinite=nonfinite)


def from_v2(spec: dict, payload: dict) -> dict:
    """An Open Inference Protocol answer to one sample (its tensors, a leading batch dim of 1) as the REST API's
    answer reads: each output by name and, for a classifier, the softmax of its first output and its argmax."""
    outputs, wrong = {}, []
    declared = spec.get("dtypes") or {}
    for t in payload["outputs"]:
        arr = np.asarray(t["data"], dtype=np.float64).reshape(t["shape"])
        outputs[t["name"]] = (arr[0] if arr.ndim and arr.shape[0] == 1 else arr).tolist()
        want = V2_DTYPES.get(declared.get(t["name"], ""))
        if want and t.get("datatype") != want:
            wrong.append(f"output '{t['name']}' is labelled {t.get('datatype')}, but the model declares {want}")
    answer = {"outputs": outputs, "wrong": wrong}
    if spec["task"] == "classification":
        p = softmax(outputs[spec["outputs"][0]])
        answer["probabilities"] = p.tolist()
        answer["index"] = int(np.argmax(p))
    return answer


def softmax(logits) -> np.ndarray:
    """Probabilities from logits along the last axis, in float64 (the one softmax: the REST answer's, the
    reference's golden probabilities, a v2 answer read as a REST one)."""
    z = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # a row of NaN or inf gives NaN, which the verdict then refuses
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)


def per_sample(answer: dict) -> list[dict]:
    """An answer to a request of n samples as n answers to one: a simple answer's ``predictions``, or a v2 answer
    whose tensors are cut along their first (batch) dimension."""
    if "predictions" in answer:
        return list(answer["predictions"])
    if not isinstance(answer.get("outputs"), list) or not answer["outputs"]:
        return [answer]
    n = answer["outputs"][0]["shape"][0] if answer["outputs"][0].get("shape") else 1
    items = []
    for i in range(n):
        tensors = []
        for t in answer["outputs"]:
            shape = list(t["shape"])
            size = int(np.prod(shape[1:])) if shape else 1
            tensors.append({**t, "shape": [1, *shape[1:]], "data": list(t["data"][i * size:(i + 1) * size])})
        items.append({**answer, "outputs": tensors})
    return items


def golden_of(task: str, outputs: list[str], ref: dict) -> dict:
    """The reference's outputs as ``check`` reads them (see ``check``)."""
    golden = {f"out{j}": np.asarray(ref[o], dtype=np.float32) for j, o in enumerate(outputs)}
    if task == "classification":  # the softmax the REST codec answers with
        golden["probabilities"] = softmax(ref[outputs[0]]).astype(np.float32)
        golden["index"] = golden["probabilities"].argmax(-1)
    return golden
