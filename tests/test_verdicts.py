"""The verdict code on its own, in seconds (no model, no server): the parity record, the served answer's check, the
load test's gates, promote's comparison of two answers and shadow's mismatch kind. Each test knows the input that
makes its gate fail and shows that it does: NaN, inf, another label, a difference just past the bound, an output
missing or extra. These tests are also what ``make mutants`` runs against the verdict modules."""

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from modelship.comparison import (DEFAULT_TOLERANCES, Tolerance, abs_diff, beyond, check, golden_of, record)
from modelship.loadtests.summary import Gates
from modelship.manifest import Manifest, TensorSpec
from modelship.promotion import _versus

NAN, INF = float("nan"), float("inf")


def manifest(task="classification", precision="fp32", outputs=(("logits", 4),), data=None) -> Manifest:
    return Manifest(name="m", task=task, format="onnx", precision=precision, file="model.onnx",
                    inputs=[TensorSpec("x", "float32", ["batch", 3])],
                    outputs=[TensorSpec(n, "float32", ["batch", k]) for n, k in outputs],
                    labels=[str(i) for i in range(outputs[0][1])] if task == "classification" else None,
                    data=data or {"name": "npz", "path": "data.npz"})


def runner(man: Manifest):
    """What ``record`` reads of a runner: its manifest, artifact path, backend and provider."""
    return SimpleNamespace(manifest=man, artifact=SimpleNamespace(path=Path("cand")), backend="onnxruntime",
                           device="cpu", provider="CPUExecutionProvider")


def logits(n=40, k=4, seed=0):
    """Logits with clear margins (each row's label by a margin of ~4), labels covering every class."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 0.1, (n, k)).astype(np.float32)
    z[np.arange(n), np.arange(n) % k] += 4.0
    return z


def judge(ref, cand, man=None, tol=None, labels=None):
    man = man or manifest()
    return record(ref, cand, labels, runner(man), tol or DEFAULT_TOLERANCES[man.precision], "ref")


# ---- the parity record ---------------------------------------------------------------------------------------

def test_identical_answers_pass_and_each_wrong_form_fails():
    z = logits()
    assert judge({"logits": z}, {"logits": z.copy()})["passed"]
    for why, cand in [("nan rows", np.where(np.arange(40)[:, None] % 7 == 0, np.nan, z)),
                      ("+inf", np.where(np.arange(40)[:, None] == 3, np.inf, z)),
                      ("-inf", np.where(np.arange(40)[:, None] == 5, -np.inf, z)),
                      ("all nan", np.full_like(z, np.nan))]:
        rec = judge({"logits": z}, {"logits": cand.astype(np.float32)})
        po = rec["per_output"]["logits"]
        assert not rec["passed"] and rec["kind"] == "parity", why
        assert po["nonfinite"] > 0 and po["violations"] >= po["nonfinite"], why
        assert rec["max_abs_diff"] == INF and po["max_abs_diff"] == INF, why  # never NaN
        assert any("answers NaN or inf where the reference is finite" in f for f in rec["failures"]), why


def test_nan_message_names_the_output_rows_and_first_row():
    z = logits()
    cand = z.copy()
    cand[[4, 9, 30]] = np.nan
    rec = judge({"logits": z}, {"logits": cand})
    text = next(f for f in rec["failures"] if "NaN" in f)
    assert "output 'logits'" in text and "3 of 40 rows" in text and "12 values" in text and "first at row 4" in text


def test_nan_fails_even_where_no_difference_is_judged():
    """A student's tolerance judges only agreement; a NaN row has no label, so it disagrees, and NaN still fails."""
    z = logits(n=200)
    cand = z.copy()
    cand[0, 0] = np.nan  # argmax of a row with NaN is the NaN's position: here its own label, were it counted
    rec = judge({"logits": z}, {"logits": cand}, tol=DEFAULT_TOLERANCES["student"])
    assert not rec["passed"] and rec["top1_agreement"] == pytest.approx(199 / 200)
    assert rec["per_output"]["logits"]["nonfinite"] == 1 and rec["per_output"]["logits"]["violations"] == 1


def test_regression_nan_and_inf_fail_and_finite_within_bound_passes():
    man = manifest("regression", outputs=(("y", 1),))
    y = np.linspace(-5, 5, 64, dtype=np.float32)[:, None]
    assert judge({"y": y}, {"y": y + 5e-5}, man)["passed"]
    assert not judge({"y": y}, {"y": y + 2e-4}, man)["passed"]
    for bad in (np.nan, np.inf, -np.inf):
        cand = y.copy()
        cand[7] = bad
        rec = judge({"y": y}, {"y": cand}, man)
        assert not rec["passed"] and rec["per_output"]["y"]["nonfinite"] == 1 and rec["max_abs_diff"] == INF


def test_a_reference_that_answers_nan_is_weak_evidence_not_a_comparison():
    z = logits()
    ref = z.copy()
    ref[2] = np.nan
    rec = judge({"logits": ref}, {"logits": ref.copy()})
    assert not rec["passed"] and rec["kind"] == "weak"
    assert any("the reference itself answers NaN or inf in output 'logits' on 1 of 40" in w for w in rec["weak"])
    assert rec["per_output"]["logits"]["nonfinite"] == 0  # where both are NaN the candidate is not blamed


def test_a_nan_difference_breaks_every_bound():
    d = np.array([0.0, NAN, 1.0])
    assert beyond(np.zeros(3), d, 0.5, 0.0).tolist() == [False, True, True]
    d, wrong = abs_diff(np.array([1.0, 2.0, np.inf, np.nan]), np.array([np.nan, np.inf, np.inf, np.nan]))
    assert d.tolist() == [INF, INF, 0.0, 0.0] and wrong.tolist() == [True, True, False, False]


def test_bounds_are_inclusive_and_rtol_and_cap_apply():
    man = manifest("regression", outputs=(("y", 1),))
    y = np.full((10, 1), 2.0, np.float32)
    y[:, 0] += np.arange(10)  # spread, so the evidence is not weak
    tol = Tolerance(0.5, None, None, rtol=0.1)
    assert judge({"y": y}, {"y": y + 0.5}, man, tol)["passed"]  # 0.5 <= 0.5 + 0.1·|ref|
    edge = y + (0.5 + 0.1 * y)
    assert judge({"y": y}, {"y": edge * (1 - 1e-7)}, man, tol)["passed"]
    assert not judge({"y": y}, {"y": y + (0.5 + 0.1 * y) * 1.01}, man, tol)["passed"]


# ---- the served answer's check (load test, shadow, promote) -----------------------------------------------------

def spec_of(man: Manifest, tol: Tolerance | None = None) -> dict:
    return {"task": man.task, "outputs": [t.name for t in man.outputs],
            "tolerance": asdict(tol or DEFAULT_TOLERANCES[man.precision])}


def answer(z: np.ndarray) -> dict:
    """The REST answer to one classifier sample as the codec writes it."""
    from modelship.serving.codec import softmax

    p = softmax(z)
    return {"label": str(int(np.argmax(p))), "index": int(np.argmax(p)), "probabilities": p.tolist()}


def test_served_answer_nan_is_its_own_kind():
    man = manifest()
    z = logits(4)
    golden = golden_of("classification", ["logits"], {"logits": z})
    spec = spec_of(man)
    assert check(spec, golden, 1, answer(z[1])).ok
    bad = answer(z[1])
    bad["probabilities"][2] = NAN
    v = check(spec, golden, 1, bad)
    assert not v.ok and v.nonfinite and v.kind == "nonfinite" and v.diff == INF and "NaN or inf" in v.why
    other = answer(z[2])
    v = check(spec, golden, 1, other)
    assert v.kind == "label" and v.label_ok is False
    close = answer(z[1])
    close["probabilities"][0] += 2e-4
    v = check(spec, golden, 1, close)
    assert v.kind == "tolerance" and v.label_ok and not v.within


def test_served_nan_fails_where_the_tolerance_judges_no_difference():
    man = manifest("regression", outputs=(("y", 2),))
    y = np.arange(8, dtype=np.float32).reshape(4, 2)
    spec = spec_of(man, DEFAULT_TOLERANCES["student"])
    golden = golden_of("regression", ["y"], {"y": y})
    assert check(spec, golden, 0, {"outputs": {"y": y[0].tolist()}}).ok
    v = check(spec, golden, 0, {"outputs": {"y": [1.0, INF]}})
    assert not v.ok and v.kind == "nonfinite"


def test_v2_answers_with_nan_are_judged_too():
    man = manifest()
    z = logits(2)
    golden = golden_of("classification", ["logits"], {"logits": z})
    v2 = {"outputs": [{"name": "logits", "shape": [1, 4], "datatype": "FP32", "data": [NAN, 1.0, 2.0, 3.0]}]}
    assert check(spec_of(man), golden, 0, v2).kind == "nonfinite"


def test_missing_and_extra_outputs_fail_the_check():
    man = manifest("regression", outputs=(("a", 2), ("b", 2)))
    ref = {"a": np.ones((2, 2), np.float32), "b": np.zeros((2, 2), np.float32)}
    golden, spec = golden_of("regression", ["a", "b"], ref), spec_of(man)
    assert check(spec, golden, 0, {"outputs": {"a": [1, 1], "b": [0, 0]}}).ok
    assert not check(spec, golden, 0, {"outputs": {"a": [1, 1]}}).ok
    assert not check(spec, golden, 0, {"outputs": {"a": [1, 1], "b": [0, 0], "c": [0]}}).ok
    swapped = check(spec, golden, 0, {"outputs": {"a": [0, 0], "b": [1, 1]}})
    assert not swapped.ok and swapped.kind == "tolerance"


# ---- the load test's gates -------------------------------------------------------------------------------------

def load_result(**kw) -> dict:
    base = {"requests": 100, "failures": 0, "p95_ms": 10.0, "checked": 100, "top1_agreement": 1.0,
            "agreement_upper_95": 1.0, "label_mismatches": 0, "out_of_tolerance": 0, "nonfinite": 0,
            "max_abs_diff": 0.0, "precision": "fp32", "tolerance": asdict(DEFAULT_TOLERANCES["fp32"]),
            "mismatch_examples": []}
    return {**base, **kw}


def test_load_gates_fail_on_nonfinite_answers_with_a_count():
    assert Gates().judge(load_result()) == []
    failures = Gates().judge(load_result(nonfinite=3, out_of_tolerance=3, max_abs_diff=INF,
                                         mismatch_examples=["sample 4: output 'y' answers NaN or inf"]))
    assert [f.kind for f in failures] == ["parity"]
    assert "3 answers hold NaN or inf" in failures[0].message and "sample 4" in failures[0].message
    both = Gates().judge(load_result(nonfinite=1, out_of_tolerance=3, max_abs_diff=INF))
    assert len(both) == 2 and "2 answers beyond" not in both[1].message and "difference" in both[1].message


def test_load_summary_turns_the_inf_stand_in_back_into_inf(tmp_path):
    import json

    from modelship.loadtests.summary import summarize

    (tmp_path / "t_stats.csv").write_text("")
    counts = {"started": 2, "responses": 2, "samples": [[1.0, 5.0, True, [True, True, 0.0, False]],
                                                        [1.5, 6.0, True, [None, False, 1e30, True]]]}
    (tmp_path / "counts.json").write_text(json.dumps(counts))
    r = summarize(tmp_path, "t", {"report": str(tmp_path / "counts.json"), "precision": "fp32"}, 1, 10.0)
    assert r["nonfinite"] == 1 and r["out_of_tolerance"] == 1 and r["max_abs_diff"] == INF


# ---- promote's comparison of two served answers ------------------------------------------------------------------

def test_promote_compares_nan_as_infinitely_far():
    a = {"index": 1, "probabilities": [0.1, 0.9]}
    assert _versus(a, dict(a)) == (True, 0.0)
    assert _versus(a, {"index": 1, "probabilities": [NAN, 0.9]}) == (False, INF)
    assert _versus({"index": 1, "probabilities": [NAN, 0.9]}, a) == (False, INF)
    same, d = _versus(a, {"index": 0, "probabilities": [0.6, 0.4]})
    assert not same and d == pytest.approx(0.5)


# ---- promote's judgement of collected answers (pure) -----------------------------------------------------------

def promote_case(n=20, wrong=(), nan=(), missing=(), burst_wrong=(), live=0, current_wrong=(), slo=None, lat=5.0):
    """Answers of versions 1.0 (current) and 2.0 (candidate) to ``n`` samples of a 4-class classifier, with the
    candidate wrong (another label), NaN or silent on the samples named, and a burst of every sample."""
    from modelship.promotion import Answers, Promotion

    z = logits(n)
    golden = golden_of("classification", ["logits"], {"logits": z})
    spec = {**spec_of(manifest()), "precision": "fp32"}
    work = []
    for i in range(n):
        cand = answer(np.roll(z[i], 1)) if i in wrong else answer(z[i])
        if i in nan:
            cand["probabilities"][0] = NAN
        cur = answer(np.roll(z[i], 1)) if i in current_wrong else answer(z[i])
        work.append((i, {"1.0": cur, "2.0": None if i in missing else cand}))
    work += [(None, {"1.0": answer(z[k % n]), "2.0": answer(z[k % n])}) for k in range(live)]
    burst = [(i, answer(np.roll(z[i], 1)) if i in burst_wrong else answer(z[i])) for i in range(n)]
    answers = Answers("1.0", "2.0", work=work, latency_ms={"1.0": [lat] * n, "2.0": [lat] * n}, burst=burst)
    result = Promotion("m", "refused", "2.0", "1.0", slo_p95_ms=slo)
    return answers, spec, golden, result


def promote_judged(**kw):
    from modelship.promotion import judge as promote_judge

    answers, spec, golden, result = promote_case(**kw)
    promote_judge(answers, spec, golden, 1.0, result)
    return result


def test_promote_judges_the_good_candidate_as_good():
    r = promote_judged(live=3)
    assert r.failures == [] and r.samples == 20 and r.burst == 20 and r.live == 3
    assert r.agreement == r.agreement_reference == r.agreement_current == 1.0 and r.max_abs_diff == 0.0


@pytest.mark.parametrize("case,kind,says", [
    ({"wrong": {3}}, "parity", "agreement with the reference"),
    ({"nan": {5}}, "parity", "non-finite: 1 of 40"),
    ({"missing": {2}}, "errors", "1 of 40 requests were not answered"),
    ({"burst_wrong": {4}}, "parity", "in a burst of 20"),
    ({"current_wrong": {6}}, "parity", "agreement with version 1.0"),
    ({"slo": 4.0}, "slo", "p95 5.0 ms > SLO 4 ms"),
])
def test_promote_refuses_each_wrong_form(case, kind, says):
    r = promote_judged(**case)
    assert r.kind == kind and any(says in f["message"] for f in r.failures), r.failures


def test_promote_counts_nan_as_a_difference_and_never_hides_it():
    r = promote_judged(nan={1, 2})
    assert r.max_abs_diff == INF and r.beyond_tolerance == 2
    assert "non-finite" in [f["message"].split(":")[0] for f in r.failures]
    assert r.agreement_current == 18 / 20  # no label shared with the current version's answer


def test_promote_with_nothing_judged_fails():
    r = promote_judged(n=3, missing={0, 1, 2})
    assert r.kind == "errors" and r.samples == 0
