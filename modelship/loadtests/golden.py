"""The one comparison of a served answer with the golden output of the PyTorch reference, used by the
Locust user for every request and by the fault monitor for its probe after a worker kill."""

from __future__ import annotations

import numpy as np


def check(spec: dict, golden, i: int, payload: dict) -> tuple[bool, float, str]:
    """(agrees, max |diff|, why not) for the answer to sample ``i``; ``golden`` is the loaded golden.npz."""
    if spec["task"] == "classification":
        probs = np.asarray(payload["probabilities"], dtype=np.float64)
        want = golden["probabilities"][i]
        diff = float(np.max(np.abs(probs - want))) if probs.shape == want.shape else float("inf")
        ok = payload["index"] == int(golden["index"][i])
        return ok, diff, "" if ok else f"sample {i}: label index {payload['index']}, reference {int(golden['index'][i])}"
    out = np.asarray(next(iter(payload["outputs"].values())), dtype=np.float64)
    want = golden["outputs"][i]
    diff = float(np.max(np.abs(out - want))) if out.shape == want.shape else float("inf")
    ok = diff <= spec.get("atol", 1e-3)
    return ok, diff, "" if ok else f"sample {i}: max |diff| {diff:.3g}"
