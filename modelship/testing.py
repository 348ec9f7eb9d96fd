"""Gates as pytest assertions, for a user's own test suite (the ``modelship`` pytest plugin also gives the
``modelship_server`` fixture and ``pytest --modelship``; see ``modelship.pytest_plugin``).

    from modelship.testing import assert_parity, assert_served

    def test_int8_keeps_its_answers():
        assert_parity("runs/x/int8", data="reviews.csv")

    def test_served_int8(modelship_server):
        assert_served(modelship_server, "int8", users=2, duration="5s", slo_p95_ms=200)

A failed gate raises AssertionError whose text is the gate's own message: what moved and by how much, the label
that differs, the request that failed, the p95 that missed its target.
"""

from __future__ import annotations

from . import api


def assert_parity(candidate, reference=None, data=None, **tolerance) -> "api.ParityResult":
    """The parity gate of ``candidate`` (an artifact or its folder) against ``reference`` (default: the root PyTorch
    model of its lineage) on ``data`` (default: its own evaluation data). ``tolerance``: the keys of
    ``modelship.convert.Judge`` (max_abs_diff, rtol, min_agreement, max_accuracy_drop, output_tol, allow_weak)."""
    result = api.parity(candidate, reference, data=data, judge=tolerance or None)
    if not result.passed:
        raise AssertionError(f"{result.kind} gate failed for {result.artifact}: {result.reason}")
    return result


def assert_served(server, model: str, data=None, users: int = 1, duration="10s", slo_p95_ms: float | None = None,
                  **gates) -> "api.LoadResult":
    """A load test of ``model`` on ``server`` (``modelship.api.Server``, e.g. the ``modelship_server`` fixture), every
    answer judged against the root PyTorch model; fails on a wrong answer, a failed request, or a p95 over
    ``slo_p95_ms``. ``gates``: more of ``modelship.api.loadtest``'s options (max_failure_ratio, min_agreement, ...)."""
    result = server.loadtest(model, data=data, users=users, duration=duration, slo_p95_ms=slo_p95_ms, **gates)
    if not result.passed:
        raise AssertionError(f"{result.kind} gate failed for served '{model}': {result.reason}")
    return result
