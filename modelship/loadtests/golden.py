"""The one comparison of a served answer with the golden outputs of the root PyTorch model, used by the
Locust user for every request and by the fault monitor for its probe after a worker kill.

Every part of the answer is judged: a classifier's label (agreement) and probabilities, and every other
output it returns, matched by name, shape-checked, within the artifact's precision tolerance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Verdict:
    label_ok: bool | None  # classifiers: the served label index equals the reference's
    within: bool  # every returned output within tolerance (and none missing)
    diff: float  # worst |served - reference| over every output of this answer
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.within and self.label_ok is not False


def _judge(name: str, got, want: np.ndarray, atol, rtol) -> tuple[bool, float, str]:
    got = np.asarray(got, dtype=np.float64)
    if got.shape != want.shape:
        return False, float("inf"), f"output '{name}' has shape {list(got.shape)}, reference {list(want.shape)}"
    d = np.abs(got - want)
    diff = float(d.max()) if d.size else 0.0
    if atol is not None and np.any(d > atol + rtol * np.abs(want)):
        bound = f"{atol:g}" + (f" + {rtol:g}·|ref|" if rtol else "")
        return False, diff, f"output '{name}' |diff| {diff:.3g} > {bound}"
    return True, diff, ""


def check(spec: dict, golden, i: int, payload: dict) -> Verdict:
    """The verdict on the answer to sample ``i``; ``golden`` is the loaded golden.npz."""
    tol = spec["tolerance"]
    per = tol.get("per_output") or {}
    bounds = {n: (per.get(n, {}).get("atol", tol["max_abs_diff"]), per.get(n, {}).get("rtol", tol["rtol"]))
              for n in spec["outputs"]}
    problems, worst, label_ok = [], 0.0, None
    expected = list(spec["outputs"])
    returned = dict(payload.get("outputs") or {})
    if spec["task"] == "classification":
        first = expected.pop(0)
        label_ok = payload["index"] == int(golden["index"][i])
        if not label_ok:
            problems.append(f"label index {payload['index']}, reference {int(golden['index'][i])}")
        ok, diff, why = _judge("probabilities", payload["probabilities"], golden["probabilities"][i],
                               tol.get("max_prob_diff"), 0.0)
        worst = max(worst, diff)
        if not ok:
            problems.append(why)
        returned.pop(first, None)
    for name in expected:
        if name not in returned:
            problems.append(f"output '{name}' is missing from the answer")
            worst = float("inf")
            continue
        key = f"out{spec['outputs'].index(name)}"  # golden arrays are stored by output position
        ok, diff, why = _judge(name, returned.pop(name), golden[key][i], *bounds[name])
        worst = max(worst, diff)
        if not ok:
            problems.append(why)
    if returned:
        problems.append(f"unexpected output(s) {', '.join(sorted(returned))}")
    within = not [p for p in problems if not p.startswith("label index")]
    return Verdict(label_ok, within, worst, f"sample {i}: " + "; ".join(problems) if problems else "")
