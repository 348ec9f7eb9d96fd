"""The verdict code on its own, in seconds (no model, no server): the parity record, the served answer's check, the
load test's gates, promote's comparison of two answers and shadow's mismatch kind. Each test knows the input that
makes its gate fail and shows that it does: NaN, inf, another label, a difference just past the bound, an output
missing or extra. These tests are also what ``make mutants`` runs against the verdict modules."""

import re
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


# ---- shadow's verdict on one answer as the client read it ----------------------------------------------------------

def test_shadow_verdict_picks_the_most_severe_kind():
    from modelship.serving.shadow import verdict

    man = manifest()
    z = logits(3)
    golden = golden_of("classification", ["logits"], {"logits": z})
    spec = spec_of(man)
    good = {"predictions": [answer(z[i]) for i in range(3)]}
    assert verdict(spec, golden, good, 3) == (pytest.approx(0.0, abs=1e-6), None, [])
    wrong = {"predictions": [answer(z[0]), answer(np.roll(z[1], 1)), answer(z[2])]}
    wrong["predictions"][2]["probabilities"][0] = NAN
    worst, kind, bad = verdict(spec, golden, wrong, 3)
    assert kind == "nonfinite" and worst == INF and len(bad) == 2
    wrong["predictions"][2] = answer(z[2])
    assert verdict(spec, golden, wrong, 3)[1] == "label"
    close = {"predictions": [answer(z[i]) for i in range(3)]}
    close["predictions"][1]["probabilities"][0] += 1e-3
    assert verdict(spec, golden, close, 3)[1] == "tolerance"
    worst, kind, bad = verdict(spec, golden, {"predictions": good["predictions"][:2]}, 3)  # an answer short
    assert kind == "tolerance" and worst == INF and "2 answers to 3 samples" in bad[-1].why
    single = verdict(spec, golden, answer(z[0]), 1)
    assert single[1] is None


def test_shadow_verdict_reads_v2_answers_per_sample_and_their_datatypes():
    from modelship.serving.shadow import verdict

    man = manifest()
    z = logits(2)
    golden = golden_of("classification", ["logits"], {"logits": z})
    spec = {**spec_of(man), "dtypes": {"logits": "float32"}, "labels": ["0", "1", "2", "3"]}
    v2 = {"outputs": [{"name": "logits", "shape": [2, 4], "datatype": "FP32", "data": z.ravel().tolist()}]}
    assert verdict(spec, golden, v2, 2)[1] is None
    swapped = {"outputs": [{**v2["outputs"][0], "data": z[::-1].ravel().tolist()}]}
    assert verdict(spec, golden, swapped, 2)[1] == "label"
    mislabelled = {"outputs": [{**v2["outputs"][0], "datatype": "FP64"}]}
    worst, kind, bad = verdict(spec, golden, mislabelled, 2)
    assert kind == "tolerance" and "labelled FP64, but the model declares FP32" in bad[0].why
    named = answer(z[0])
    named["label"] = "3"  # the right index under another class's name
    worst, kind, bad = verdict(spec, golden, named, 1)
    assert kind == "label" and "label '3' for index" in bad[0].why


# ---- exact records: every key and value (what reports, the CLI and CI read) -------------------------------------

def test_the_parity_record_in_full():
    z = logits(8)
    cand = z.copy()
    cand[1, 1] += 5e-5  # within 1e-4
    labels = np.argmax(z, -1)
    labels[0] = (labels[0] + 1) % 4  # the reference is wrong on one of the labels
    rec = judge({"logits": z}, {"logits": cand}, labels=labels)
    assert set(rec) == {"artifact", "backend", "device", "precision", "task", "reference", "samples", "max_abs_diff",
                        "mean_abs_diff", "top1_agreement", "accuracy", "reference_accuracy", "tolerance",
                        "per_output", "data", "weak", "allow_weak", "failures", "passed", "kind", "judged_on"}
    assert (rec["artifact"], rec["backend"], rec["device"], rec["precision"], rec["task"], rec["reference"]) == \
        ("cand", "onnxruntime", "cpu", "fp32", "classification", "ref")
    assert rec["samples"] == 8 and rec["top1_agreement"] == 1.0
    assert rec["accuracy"] == rec["reference_accuracy"] == 7 / 8
    moved = float(abs(np.float64(cand[1, 1]) - np.float64(z[1, 1])))
    assert rec["max_abs_diff"] == moved and rec["mean_abs_diff"] == pytest.approx(moved / 32)
    assert rec["tolerance"] == {**asdict(DEFAULT_TOLERANCES["fp32"])}
    assert rec["data"] == {"name": "npz", "path": "data.npz"} and rec["weak"] == [] and rec["allow_weak"] is False
    assert rec["failures"] == [] and rec["passed"] is True and rec["kind"] is None
    assert rec["judged_on"]["provider"] == "CPUExecutionProvider"
    po = rec["per_output"]["logits"]
    assert set(po) == {"shape", "max_abs_diff", "mean_abs_diff", "p99_abs_diff", "atol", "rtol", "cap", "nonfinite",
                       "violations"}
    assert po["shape"] == [8, 4] and (po["atol"], po["rtol"], po["cap"]) == (1e-4, 0.0, None)
    assert po["nonfinite"] == 0 and po["violations"] == 0 and 0 < po["p99_abs_diff"] < po["max_abs_diff"]


def test_violations_count_each_value_and_say_how_far():
    z = logits(10)
    cand = z.copy()
    cand[2, 0] += 0.5
    cand[3, 1] -= 0.25
    rec = judge({"logits": z}, {"logits": cand})
    po = rec["per_output"]["logits"]
    assert po["violations"] == 2 and po["worst_excess"] == pytest.approx(0.5 - 1e-4, rel=1e-4)
    assert rec["failures"][0].startswith("output 'logits' moved by max_abs_diff 0.5 > 0.0001 (2 of 40 values)")
    assert rec["kind"] == "parity" and rec["max_abs_diff"] == pytest.approx(0.5, rel=1e-4)
    nan = cand.copy()
    nan[7, 2] = np.nan
    po = judge({"logits": z}, {"logits": nan})["per_output"]["logits"]
    assert po["violations"] == 3 and po["nonfinite"] == 1 and po["worst_excess"] == INF


def test_accuracy_drop_and_agreement_floors():
    z = logits(100)
    labels = np.argmax(z, -1)
    cand = z.copy()
    cand[0] = np.roll(cand[0], 1)  # one label moved: agreement 0.99, accuracy 0.99 (drop 0.01)
    tol = Tolerance(None, 0.99, 0.01)
    rec = judge({"logits": z}, {"logits": cand}, tol=tol, labels=labels)
    assert rec["passed"] and rec["top1_agreement"] == 0.99 and rec["accuracy"] == 0.99
    rec = judge({"logits": z}, {"logits": cand}, tol=Tolerance(None, 0.995, 0.01), labels=labels)
    assert rec["failures"] == ["output 'logits' top-1 agreement 0.9900 < 0.995"]
    rec = judge({"logits": z}, {"logits": cand}, tol=Tolerance(None, 0.99, 0.009), labels=labels)
    assert rec["failures"] == ["accuracy dropped 0.0100 (1.0000 -> 0.9900) > 0.009"]
    better = judge({"logits": z}, {"logits": z}, tol=Tolerance(None, 1.0, 0.0), labels=labels)
    assert better["passed"]


def test_outputs_are_matched_by_name_and_shape():
    man = manifest("regression", outputs=(("a", 2), ("b", 2)))
    a, b = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(20, 40, dtype=np.float32).reshape(10, 2)
    ok = judge({"a": a, "b": b}, {"a": a, "b": b}, man)
    assert ok["passed"] and set(ok["per_output"]) == {"a", "b"}
    assert judge({"a": a, "b": b}, {"a": a}, man)["failures"] == ["output 'b' is missing from the candidate"]
    assert judge({"a": a}, {"a": a, "b": b}, man)["failures"] == ["output 'b' is missing from the reference"]
    assert judge({"a": a, "b": b}, {"a": a, "b": b, "c": b}, man)["failures"] == \
        ["output 'c' from the candidate is not in the manifest (a, b)"]
    assert judge({"a": a, "b": b, "c": b}, {"a": a, "b": b}, man)["failures"] == \
        ["output 'c' from the reference is not in the manifest (a, b)"]
    assert judge({"a": a, "b": b}, {"a": a, "b": b[:, :1]}, man)["failures"] == \
        ["output 'b': shape [10, 1], reference [10, 2]"]
    swapped = judge({"a": a, "b": b}, {"a": b, "b": a}, man)
    assert [f.split(" moved")[0] for f in swapped["failures"]] == ["output 'a'", "output 'b'"]


def test_weak_reasons_each_with_its_cause():
    z = logits(40)
    one_class = np.tile(z[:1], (40, 1))
    rec = judge({"logits": one_class}, {"logits": one_class}, manifest(precision="int8"))
    assert rec["kind"] == "weak" and any("predicts class 0 for every one of the 40" in w for w in rec["weak"])
    gen = manifest(precision="int8", data={"name": "random", "samples": 40})
    rec = judge({"logits": z}, {"logits": z}, gen)
    assert any("generated inputs without labels" in w for w in rec["weak"])
    assert not any("generated" in w for w in judge({"logits": z}, {"logits": z}, gen, labels=np.argmax(z, -1))["weak"])
    one_col = manifest(outputs=(("logits", 1),))
    rec = judge({"logits": z[:, :1]}, {"logits": z[:, :1]}, one_col)
    assert any("has one column" in w for w in rec["weak"])
    tight = z * 1e-5  # margins below the allowed difference
    rec = judge({"logits": tight}, {"logits": tight}, tol=Tolerance(1e-4, 1.0, None))
    assert any("median top-1 logit margin" in w for w in rec["weak"])
    flat = np.full((20, 1), 3.0, np.float32)
    flat[::2] += 1e-6
    reg = manifest("regression", outputs=(("y", 1),))
    assert any("spread over the data" in w for w in judge({"y": flat}, {"y": flat}, reg)["weak"])
    assert any("nothing is judged" in w
               for w in judge({"y": flat}, {"y": flat}, reg, DEFAULT_TOLERANCES["student"])["weak"])
    accepted = record({"y": flat}, {"y": flat}, None, runner(reg), DEFAULT_TOLERANCES["fp32"], "ref", allow_weak=True)
    assert accepted["passed"] and accepted["allow_weak"] is True and accepted["kind"] is None and accepted["weak"]
    assert judge({"logits": z}, {"logits": z})["weak"] == []


# ---- the tolerance rules ----------------------------------------------------------------------------------------------

def test_the_default_tolerances_per_precision():
    from modelship.comparison import default_tolerance, served_tolerance, tolerance_of

    t = {k: asdict(v) for k, v in DEFAULT_TOLERANCES.items()}
    assert t["fp32"] == {"max_abs_diff": 1e-4, "min_top1_agreement": 1.0, "max_accuracy_drop": 0.001, "rtol": 0.0,
                         "max_prob_diff": 1e-4, "per_output": {}, "spread_fraction": None}
    assert t["fp16"] == {"max_abs_diff": 0.05, "min_top1_agreement": 0.995, "max_accuracy_drop": 0.005, "rtol": 0.0,
                         "max_prob_diff": 0.05, "per_output": {}, "spread_fraction": 0.1}
    assert t["int8"] == {"max_abs_diff": 2.0, "min_top1_agreement": 0.99, "max_accuracy_drop": 0.01, "rtol": 0.1,
                         "max_prob_diff": 0.2, "per_output": {}, "spread_fraction": 0.5}
    assert t["student"] == {"max_abs_diff": None, "min_top1_agreement": 0.95, "max_accuracy_drop": 0.01, "rtol": 0.0,
                            "max_prob_diff": None, "per_output": {}, "spread_fraction": None}
    assert default_tolerance("bf16") is DEFAULT_TOLERANCES["fp32"] and default_tolerance("int8") is \
        DEFAULT_TOLERANCES["int8"]
    man = manifest(precision="int8")
    assert tolerance_of(man) is DEFAULT_TOLERANCES["int8"]
    man.extra = {"distilled_from": "teacher"}
    assert tolerance_of(man) is DEFAULT_TOLERANCES["student"]
    man.extra = {"distilled_from": "teacher", "student_tolerance": {"max_abs_diff": None, "min_top1_agreement": 0.9,
                                                                     "max_accuracy_drop": 0.02, "bogus": 1}}
    assert asdict(tolerance_of(man))["min_top1_agreement"] == 0.9
    man.parity = {"tolerance": {**t["fp16"], "max_abs_diff": 0.5}}
    assert served_tolerance(man).max_abs_diff == 0.5
    man.parity = None
    assert served_tolerance(man).min_top1_agreement == 0.9


def test_overrides_per_output_bounds_and_spread_caps():
    from modelship.comparison import bound, bound_text, parse_output_tolerance, spread

    int8 = DEFAULT_TOLERANCES["int8"]
    assert int8.override(max_abs_diff=None).max_abs_diff == 2.0 and int8.override(rtol=0.3).rtol == 0.3
    adj = int8.adjusted({"max_abs_diff": 0.5})
    assert adj.max_abs_diff == 0.5 and adj.spread_fraction is None and adj.rtol == 0.1
    kept = int8.adjusted({"min_top1_agreement": 0.9})
    assert kept.spread_fraction == 0.5 and kept.min_top1_agreement == 0.9
    per = int8.adjusted(None, {"y": {"atol": 0.1}})
    assert per.for_output("y") == (0.1, 0.1, None) and per.for_output("z") == (2.0, 0.1, None)
    spread_bound = Tolerance(2.0, None, None, rtol=0.1, per_output={"y": {"atol": 1, "spread": 3, "cap": 0.5},
                                                                     "w": {"atol": 7}})
    cleared = spread_bound.adjusted({"rtol": 0.2})
    assert cleared.per_output == {"w": {"atol": 7}} and cleared.rtol == 0.2
    assert int8.adjusted({}, None) is int8 or int8.adjusted({}, None) == int8
    man = manifest("regression", outputs=(("y", 1), ("w", 1)))
    y = np.linspace(0, 10, 50, dtype=np.float32)[:, None]
    res = int8.resolved({"y": y, "w": np.zeros_like(y)}, man)
    std = float(np.std(y.astype(np.float64)))
    assert res.per_output == {"y": {"atol": 2.0, "rtol": 0.1, "cap": pytest.approx(0.5 * std), "spread": std,
                                    "spread_of": "std"}}  # w does not vary: the precision's bound
    cls = manifest(precision="int8")
    z = logits(20)
    margin = spread(z, True)[1]
    assert int8.resolved({"logits": z}, cls).per_output["logits"]["spread_of"] == "median top-1 margin"
    assert int8.resolved({"logits": z}, cls).per_output["logits"]["cap"] == pytest.approx(0.5 * margin)
    assert DEFAULT_TOLERANCES["fp32"].resolved({"logits": z}, cls) is DEFAULT_TOLERANCES["fp32"]
    assert DEFAULT_TOLERANCES["student"].resolved({"logits": z}, cls) is DEFAULT_TOLERANCES["student"]
    own = int8.adjusted(None, {"logits": {"atol": 0.3}}).resolved({"logits": z}, cls)
    assert own.per_output["logits"] == {"atol": 0.3}  # a bound of its own is not capped
    assert spread(np.array([[1.0, 3.0, 2.0], [0.0, 0.5, 0.25]]), True) == ("median top-1 margin", 0.625)
    assert spread(np.array([[1.0], [3.0]]), True) == ("std", 1.0) and spread(np.zeros(0), False) == ("std", 0.0)
    assert bound(np.array([-2.0, 4.0]), 0.5, 0.25).tolist() == [1.0, 1.5]
    assert bound(np.array([-2.0, 4.0]), 0.5, 0.25, 1.2).tolist() == [1.0, 1.2]
    assert bound_text(0.5, 0.0) == "0.5" and bound_text(0.5, 0.25) == "0.5 + 0.25·|ref|"
    assert bound_text(0.5, 0.25, 1.2) == "min(0.5 + 0.25·|ref|, 1.2)"
    assert parse_output_tolerance("logits=1e-3") == ("logits", {"atol": 1e-3})
    assert parse_output_tolerance(" y =0.5:0.01") == ("y", {"atol": 0.5, "rtol": 0.01})
    for bad in ("y", "y=a", "y=1:2:3", "y=-1", "y=1:-0.1", "y=", "=1=2"):
        with pytest.raises(Exception, match="expected NAME=ATOL"):
            parse_output_tolerance(bad)
    assert Tolerance.from_dict({"max_abs_diff": 1, "min_top1_agreement": None, "max_accuracy_drop": None,
                                "unknown": 3}) == Tolerance(1, None, None)


def test_the_bound_is_inclusive_at_its_exact_value():
    d = np.array([0.5, 0.5, np.nextafter(0.5, 1)])
    ref = np.array([0.0, 0.0, 0.0])
    assert beyond(ref, d, 0.5, 0.0).tolist() == [False, False, True]
    assert beyond(np.array([10.0]), np.array([1.5]), 0.5, 0.1).tolist() == [False]
    assert beyond(np.array([10.0]), np.array([1.5]), 0.5, 0.1, cap=1.0).tolist() == [True]
    assert beyond(np.array([-10.0]), np.array([1.5]), 0.5, 0.1).tolist() == [False]


def test_differences_are_taken_in_float64():
    d, wrong = abs_diff(np.array([3e38], np.float32), np.array([-3e38], np.float32))
    assert d[0] == pytest.approx(6e38) and not wrong[0]  # float32 would overflow to inf
    d, _ = abs_diff(np.array([1.0], np.float32), np.array([1.0 + 2 ** -23], np.float32))
    assert d[0] == 2 ** -23
    d, wrong = abs_diff(np.array([np.inf, -np.inf, np.nan, 1.0]), np.array([-np.inf, -np.inf, 1.0, 1.0]))
    assert d.tolist() == [INF, 0.0, INF, 0.0] and wrong.tolist() == [False] * 4


# ---- the served answer's check, exactly -------------------------------------------------------------------------

def test_check_judges_every_part_of_an_answer():
    man = manifest(outputs=(("logits", 4), ("emb", 2)))
    z = logits(3)
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    golden = golden_of("classification", ["logits", "emb"], {"logits": z, "emb": emb})
    assert set(golden) == {"out0", "out1", "probabilities", "index"}
    assert golden["index"].tolist() == np.argmax(z, -1).tolist()
    np.testing.assert_allclose(golden["probabilities"].sum(-1), 1.0, rtol=1e-6)
    spec = spec_of(man)
    good = {**answer(z[1]), "outputs": {"emb": emb[1].tolist()}}
    v = check(spec, golden, 1, good)
    assert (v.ok, v.label_ok, v.within, v.nonfinite, v.why, v.kind) == (True, True, True, False, "", None)
    assert v.diff < 1e-6
    moved = {**good, "outputs": {"emb": [emb[1, 0] + 1e-3, emb[1, 1]]}}
    v = check(spec, golden, 1, moved)
    assert not v.within and v.label_ok and v.diff == pytest.approx(1e-3, rel=1e-3)
    assert v.why == "sample 1: output 'emb' |diff| 0.001 > 0.0001" and v.kind == "tolerance"
    v = check(spec, golden, 1, {**answer(z[1])})
    assert v.why == "sample 1: output 'emb' is missing from the answer" and v.diff == INF and not v.within
    v = check(spec, golden, 1, {**good, "outputs": {"emb": [0.0]}})
    assert "output 'emb' has shape [1], reference [2]" in v.why and v.diff == INF
    v = check(spec, golden, 1, {**good, "outputs": {"emb": ["a", "b"]}})
    assert "output 'emb' is not numbers" in v.why and not v.within
    v = check(spec, golden, 1, {**good, "outputs": {"emb": emb[1].tolist(), "logits": z[1].tolist()}})
    assert v.ok  # the classifier's first output may be answered too
    v = check(spec, golden, 1, {**good, "outputs": {"emb": emb[1].tolist(), "extra": [1]}})
    assert v.why == "sample 1: unexpected output(s) extra" and not v.within and v.label_ok
    v = check(spec, golden, 1, {**good, "index": 0})
    assert v.why.startswith("sample 1: label index 0, reference 1") and v.label_ok is False and v.within
    v = check(spec, golden, 1, {"outputs": {"emb": emb[1].tolist()}})
    assert v.label_ok is False and "label index None" in v.why


def test_check_of_a_model_without_labels():
    man = manifest("regression", outputs=(("y", 2),))
    y = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)
    golden = golden_of("regression", ["y"], {"y": y})
    assert set(golden) == {"out0"}
    tol = Tolerance(0.1, None, None, rtol=0.1)
    spec = spec_of(man, tol)
    assert check(spec, golden, 1, {"outputs": {"y": [3.0 + 0.1 + 0.3, 4.0]}}).within  # 0.1 + 0.1·3
    v = check(spec, golden, 1, {"outputs": {"y": [3.0 + 0.1 + 0.31, 4.0]}})
    assert not v.within and v.label_ok is None and v.kind == "tolerance"
    assert "min(" not in v.why and "0.1 + 0.1·|ref|" in v.why


def test_v2_answers_read_as_simple_ones():
    from modelship.comparison import from_v2, per_sample

    man = manifest()
    z = logits(2)
    spec = {**spec_of(man), "dtypes": {"logits": "float32"}}
    one = {"outputs": [{"name": "logits", "shape": [1, 4], "datatype": "FP32", "data": z[0].tolist()}]}
    read = from_v2(spec, one)
    assert read["index"] == int(np.argmax(z[0])) and read["wrong"] == []
    np.testing.assert_allclose(read["outputs"]["logits"], z[0], rtol=1e-6)
    np.testing.assert_allclose(sum(read["probabilities"]), 1.0)
    flat = from_v2({**spec, "task": "regression"}, {"outputs": [{"name": "y", "shape": [3], "datatype": "FP32",
                                                                 "data": [1, 2, 3]}]})
    assert flat == {"outputs": {"y": [1.0, 2.0, 3.0]}, "wrong": []}  # no batch dim to take off; no label
    two = {"model_name": "m", "outputs": [{"name": "logits", "shape": [2, 4], "datatype": "FP32",
                                           "data": z.ravel().tolist()},
                                          {"name": "emb", "shape": [2], "datatype": "FP32", "data": [7, 8]}]}
    items = per_sample(two)
    assert len(items) == 2 and items[1]["model_name"] == "m"
    assert items[1]["outputs"][0] == {"name": "logits", "shape": [1, 4], "datatype": "FP32", "data": z[1].tolist()}
    assert items[1]["outputs"][1]["data"] == [8] and items[1]["outputs"][1]["shape"] == [1]
    assert per_sample({"predictions": [1, 2]}) == [1, 2] and per_sample({"index": 3}) == [{"index": 3}]
    assert per_sample({"outputs": []}) == [{"outputs": []}]
    assert len(per_sample({"outputs": [{"name": "s", "shape": [], "datatype": "FP32", "data": [1]}]})) == 1


# ---- the load test's gates and statistics, exactly --------------------------------------------------------------------

def gate_messages(**kw):
    return [(f.kind, f.message) for f in Gates(**{k: v for k, v in kw.items() if k in GATE_KEYS}).judge(
        load_result(**{k: v for k, v in kw.items() if k not in GATE_KEYS}))]


GATE_KEYS = {"slo_p95_ms", "max_failure_ratio", "min_agreement", "max_recovery_s", "max_memory_growth"}


def test_each_load_gate_at_its_boundary():
    assert gate_messages(slo_p95_ms=10.0) == []  # p95 10.0 at an SLO of 10: met
    assert gate_messages(slo_p95_ms=9.9) == [("slo", "latency: p95 10.0 ms > SLO 9.9 ms")]
    assert gate_messages(slo_p95_ms=9.9, p95_ms=None) == [("slo", "latency: p95 none ms > SLO 9.9 ms")]
    assert gate_messages(failures=1) == [("errors", "failures: 1/100 = 0.0100 > 0.0")]
    assert gate_messages(failures=1, max_failure_ratio=0.01) == []
    assert gate_messages(requests=0, failures=0, checked=0, warmup_s=2, locust_responses=3, log="l") == \
        [("errors", "no request was answered after the 2 s warm-up (3 answered in all; Locust log: l)")]
    assert gate_messages(checked=0) == [("errors", "no answer could be checked against the reference")]
    low = gate_messages(top1_agreement=0.98, agreement_upper_95=0.989, label_mismatches=2)
    assert low == [("parity", "agreement: 0.9800 (95% upper bound 0.9890) < 1.0 (2 labels differ from the reference)")]
    assert gate_messages(top1_agreement=0.98, agreement_upper_95=0.995, label_mismatches=2, min_agreement=0.99) == []
    assert gate_messages(top1_agreement=0.98, agreement_upper_95=0.99, label_mismatches=2, min_agreement=0.99) == []
    assert gate_messages(top1_agreement=None, agreement_upper_95=None) == []
    assert gate_messages(top1_agreement=0.5, agreement_upper_95=0.6, tolerance={"min_top1_agreement": None}) == []
    assert gate_messages(out_of_tolerance=2, max_abs_diff=0.5, mismatch_examples=["s1", "s2"]) == \
        [("parity", "difference: 2 answers beyond the fp32 tolerance (max |diff| 0.5; e.g. s1)")]


def test_fault_and_memory_gates():
    fault = {"answer_after_recovery_correct": False, "error": "HTTP 503"}
    assert gate_messages(fault=fault) == [("errors", "fault: no correct answer after the worker kill (HTTP 503)")]
    assert gate_messages(fault={"answer_after_recovery_correct": False}) == \
        [("errors", "fault: no correct answer after the worker kill (wrong answer)")]
    ok = {"answer_after_recovery_correct": True, "recovery_s": 5.0}
    assert gate_messages(fault=ok) == [] and gate_messages(fault=ok, max_recovery_s=5.0) == []
    assert gate_messages(fault=ok, max_recovery_s=4.9) == [("slo", "recovery: 5.0 s > 4.9 s")]
    assert gate_messages(max_memory_growth=0.1) == \
        [("errors", "memory: too few worker memory samples to judge growth (run longer)")]
    mem = {"growth": 0.25, "start_mb": 100.0, "end_mb": 125.0}
    assert gate_messages(max_memory_growth=0.25, memory=mem) == []
    assert gate_messages(max_memory_growth=0.2, memory=mem) == \
        [("slo", "memory: worker RSS grew 25.0% (100 -> 125 MiB) > 20%")]


def test_kinds_and_the_agreement_bound():
    from modelship.loadtests.summary import GateFailure, kind_of, wilson_upper

    assert kind_of([]) is None
    assert kind_of([GateFailure("slo", ""), {"kind": "errors"}]) == "errors"
    assert kind_of([{"kind": "slo"}, {"kind": "weak"}, {"kind": "parity"}]) == "parity"
    assert kind_of([{"kind": "weak"}, {"kind": "slo"}]) == "weak"
    assert wilson_upper(90, 90) == 1.0 and wilson_upper(0, 10) == pytest.approx(0.2775, abs=1e-4)
    assert wilson_upper(89, 90) == pytest.approx(0.99804, abs=1e-5)
    assert wilson_upper(89, 90, z=3.0) > wilson_upper(89, 90)
    assert wilson_upper(50, 100) == pytest.approx(0.596170, abs=1e-6)


def test_load_summary_in_full(tmp_path):
    import json

    from modelship.loadtests.summary import summarize

    (tmp_path / "t_stats.csv").write_text("")
    samples = [[0.5, 100.0, False, None],  # in the warm-up: a failure there, not counted after it
               [1.0, 10.0, True, [True, True, 0.001, False]],
               [1.5, 20.0, True, [False, True, 0.002, False]],
               [2.0, 30.0, True, [None, False, 0.5, False]],
               [2.5, 40.0, False, None],
               [3.0, 50.0, True, [True, False, 1e30, True]]]
    counts = {"started": 7, "responses": 6, "samples": samples, "examples": ["e"], "per_worker": {"w": 1},
              "stats": {"requests": 6, "rps": "3.5"}}
    (tmp_path / "c.json").write_text(json.dumps(counts))
    spec = {"report": str(tmp_path / "c.json"), "precision": "int8", "model": "m", "tolerance": {"x": 1},
            "reference": "ref"}
    r = summarize(tmp_path, "t", spec, 4, duration_s=5.0, warmup_s=1.0)
    assert (r["model"], r["users"], r["warmup_s"], r["requests"], r["failures"], r["cancelled_at_stop"],
            r["failures_in_warmup"]) == ("m", 4, 1.0, 5, 1, 1, 1)
    assert r["max_ms"] == 50.0 and r["rps"] == 5 / 4.0 and r["p50_ms"] == 30.0 and r["mean_ms"] == 30.0
    assert r["p95_ms"] == pytest.approx(48.0) and r["p99_ms"] == pytest.approx(49.6)
    assert (r["checked"], r["mismatches"], r["label_mismatches"], r["out_of_tolerance"], r["nonfinite"]) == \
        (4, 3, 1, 2, 1)
    assert r["top1_agreement"] == pytest.approx(2 / 3) and r["agreement_upper_95"] == pytest.approx(
        __import__("modelship.loadtests.summary", fromlist=["x"]).wilson_upper(2, 3))
    assert r["max_abs_diff"] == INF and r["p99_abs_diff"] == INF
    assert (r["precision"], r["tolerance"], r["reference"], r["mismatch_examples"], r["per_worker"]) == \
        ("int8", {"x": 1}, "ref", ["e"], {"w": 1})
    assert (r["locust_requests"], r["locust_responses"]) == (6, 6)
    assert r["latencies_ms"] == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert r["csv"].endswith("t_stats.csv") and r["log"].endswith("t.log") and r["html"].endswith("t.html")
    r = summarize(tmp_path, "t", spec, 4)  # no duration: Locust's own rate; every sample counts
    assert r["rps"] == 3.5 and r["requests"] == 6 and r["failures_in_warmup"] == 0
    (tmp_path / "c.json").write_text(json.dumps({"samples": [[1.0, 5.0, False, None]]}))
    r = summarize(tmp_path, "t", spec, 1, duration_s=2.0)
    assert r["checked"] == 0 and r["top1_agreement"] is None and r["max_abs_diff"] is None and r["rps"] == 0.5
    assert r["p99_abs_diff"] is None and r["agreement_upper_95"] is None and r["cancelled_at_stop"] == 0
    (tmp_path / "c.json").unlink()
    r = summarize(tmp_path, "t", spec, 1)
    assert r["requests"] == 0 and r["p50_ms"] is None and r["max_ms"] is None and r["mean_ms"] is None
    assert r["rps"] is None
    (tmp_path / "t_stats.csv").unlink()
    (tmp_path / "t.log").write_text("a\nb\nc\nd\n")
    with pytest.raises(Exception, match=r"Locust wrote no statistics \(b \| c \| d\)"):
        summarize(tmp_path, "t", spec, 1)


def test_promote_reads_answers_in_every_form():
    from modelship.promotion import _numbers

    assert _numbers({"index": 2, "probabilities": [0.1, 0.9]})[0] == [2]
    labels, values = _numbers({"predictions": [{"index": 1, "probabilities": [0.2, 0.8], "outputs": {"b": [3],
                                                                                                     "a": [4]}},
                                               {"index": 0, "probabilities": [0.7, 0.3]}]})
    assert labels == [1, 0] and values.tolist() == [0.2, 0.8, 4.0, 3.0, 0.7, 0.3]  # outputs in name order
    labels, values = _numbers({"outputs": [{"name": "y", "data": [1, 2]}, {"name": "x", "data": [5]}]})
    assert labels == [None] and values.tolist() == [5.0, 1.0, 2.0]
    assert _numbers({})[1].size == 0
    assert _versus({}, {}) == (True, 0.0)
    assert _versus({"outputs": {"y": [1.0, 2.0]}}, {"outputs": {"y": [1.0, 2.5]}}) == (True, 0.5)
    assert _versus({"outputs": {"y": [1.0, 2.0]}}, {"outputs": {"y": [1.0]}}) == (False, INF)
    assert _versus({"predictions": [{"index": 1}]}, {"predictions": [{"index": 1}, {"index": 1}]}) == (False, INF)


def test_promote_messages_and_figures_exactly():
    r = promote_judged(wrong={3}, n=20)
    ref_msg = next(f["message"] for f in r.failures if "the reference" in f["message"])
    assert ref_msg.startswith("agreement with the reference: 0.9750 of 40 answers (95% upper bound 0.9956) < 1.0")
    assert "; e.g. sample 3: label index" in ref_msg
    cur_msg = next(f["message"] for f in r.failures if "version 1.0" in f["message"])
    assert cur_msg.startswith("agreement with version 1.0: 0.9500 of 20 answers") and "e.g." not in cur_msg
    assert r.agreement_reference == 39 / 40 and r.agreement_current == 19 / 20 and r.agreement == 0.95
    assert r.beyond_tolerance == 1 and r.max_abs_diff == r.max_abs_diff_reference > 0.5
    assert r.max_abs_diff_current == r.max_abs_diff_reference
    diff_msg = next(f["message"] for f in r.failures if f["message"].startswith("difference"))
    assert diff_msg.startswith("difference: 1 of 40 answers beyond the fp32 tolerance of the reference's (max |diff|")
    r = promote_judged(slo=5.0)
    assert r.failures == [] and r.p95_ms_current == r.p95_ms_candidate == 5.0
    r = promote_judged(slo=4.9)
    assert r.failures == [{"kind": "slo", "message": "latency: version 2.0 p95 5.0 ms > SLO 4.9 ms (version 1.0: "
                                                     "5.0 ms)"}]
    r = promote_judged(missing=set(range(20)))  # the candidate answered only the burst
    assert r.samples == 0 and r.burst == 20 and r.agreement_current is None and r.agreement == 1.0
    assert r.failures == [{"kind": "errors", "message": "20 of 40 requests were not answered (e.g. )"}]


def test_promote_passes_at_its_floor_and_judges_live_requests_against_the_current_version():
    from modelship.promotion import judge as promote_judge

    answers, spec, golden, result = promote_case(n=200, wrong={7})
    spec["tolerance"] = asdict(DEFAULT_TOLERANCES["student"])  # agreement only: no difference judged
    promote_judge(answers, spec, golden, 0.99, result)
    assert result.failures == []  # 1 in 400 (and 1 in 200) is within a floor of 0.99 by its upper bound
    result.failures, result.samples, result.burst = [], 0, 0
    promote_judge(answers, spec, golden, 0.9999, result)
    assert [f["message"].split(":")[0] for f in result.failures] == [
        "agreement with the reference", "agreement with version 1.0"]
    answers, spec, golden, result = promote_case(n=10, live=5)
    answers.work[-1][1]["2.0"] = answer(np.roll(logits(10)[4], 1))  # a live request answered differently
    promote_judge(answers, spec, golden, 1.0, result)
    assert result.live == 5 and result.agreement_current == 14 / 15 and result.agreement_reference == 1.0
    answers, spec, golden, result = promote_case(n=10, live=2)
    answers.work[-1][1]["2.0"] = None  # a live request the candidate did not answer: an error
    answers.work[-2][1].update({"1.0": None, "2.0": None})  # one neither answered: no fault of the candidate's
    promote_judge(answers, spec, golden, 1.0, result)
    assert result.live == 0 and [f["kind"] for f in result.failures] == ["errors"]
    assert result.failures[0]["message"].startswith("1 of 22 requests")  # 12 in turn, 10 in the burst


# ---- every message, word for word (what a user acts on) -------------------------------------------------------------

def test_weak_reasons_word_for_word():
    z = logits(40)
    ref = z.copy()
    ref[[3, 9]] = np.nan
    rec = judge({"logits": ref}, {"logits": ref})
    assert rec["weak"] == ["the reference itself answers NaN or inf in output 'logits' on 2 of 40 samples (first at "
                           "row 3), so nothing can be judged there; supply data the reference answers with finite "
                           "values (--data)"]
    assert rec["failures"] == ["weak evidence: " + rec["weak"][0] + " (or accept it on purpose with "
                               "--allow-weak-parity)"]
    one_class = np.tile(z[1:2], (40, 1))
    rec = judge({"logits": one_class}, {"logits": one_class}, manifest(precision="int8"))
    assert rec["weak"][0] == ("the reference predicts class 1 for every one of the 40 samples, so agreement cannot "
                              "fail; supply data that covers the classes (--data)")
    rec = judge({"logits": one_class}, {"logits": one_class}, tol=DEFAULT_TOLERANCES["student"])
    assert rec["weak"][0].startswith("the reference predicts class 1")  # judged by agreement alone: weak too
    assert judge({"logits": one_class}, {"logits": one_class})["weak"] == []  # fp32: judged by difference
    gen = manifest(precision="int8", data={"name": "random", "samples": 40})
    assert judge({"logits": z}, {"logits": z}, gen)["weak"] == [
        "judged by agreement on generated inputs without labels; supply real data with labels (--data FILE)"]
    fp32_gen = manifest(data={"name": "random", "samples": 40})
    assert judge({"logits": z}, {"logits": z}, fp32_gen)["weak"] == []  # judged by difference: not weak
    one_col = manifest(outputs=(("logits", 1),))
    assert judge({"logits": z[:, :1]}, {"logits": z[:, :1]}, one_col)["weak"] == [
        "output 'logits' has one column: its argmax is always 0, so labels and agreement say nothing; if this model "
        "is not a classifier, pass --task regression"]
    tight = (z * 1e-5).astype(np.float32)
    from modelship.comparison import spread

    margin = spread(tight, True)[1]
    rec = judge({"logits": tight}, {"logits": tight}, tol=Tolerance(1e-4, 1.0, None, rtol=0.5))
    allowed = float(np.median(1e-4 + 0.5 * np.abs(tight.max(-1).astype(np.float64))))
    assert rec["weak"] == [f"output 'logits': the median top-1 logit margin {margin:.3g} is below the difference "
                           f"allowed (0.0001 + 0.5·|ref|, {allowed:.3g} at the top logit), so a difference within "
                           "tolerance can still flip labels; supply data the model separates (--data) or a tighter "
                           "--max-abs-diff"]
    capped = Tolerance(1e-4, 1.0, None, per_output={"logits": {"atol": 1.0, "rtol": 0.0, "cap": 1e-3}})
    assert judge({"logits": tight}, {"logits": tight}, tol=capped)["weak"][0].startswith(
        f"output 'logits': the median top-1 logit margin {margin:.3g} is below the difference allowed (min(1, 0.001), "
        "0.001 at the top logit)")
    at_margin = Tolerance(margin, 1.0, None)  # exactly the margin: not below it
    assert judge({"logits": tight}, {"logits": tight}, tol=at_margin)["weak"] == []


def test_regression_weak_reasons_word_for_word():
    reg = manifest("regression", outputs=(("y", 1), ("s", 1)))
    y = np.linspace(0, 1, 21, dtype=np.float64)[:, None]
    s = np.full((21, 1), 5.0)
    rec = judge({"y": y, "s": s}, {"y": y, "s": s}, reg, DEFAULT_TOLERANCES["student"])
    assert rec["weak"] == [f"output '{n}': this tolerance judges no output difference and the task 'regression' has "
                           "no labels to agree on, so nothing is judged; pass --max-abs-diff" for n in ("y", "s")]
    std = float(np.std(y))
    tol = Tolerance(0.1, None, None, rtol=0.5, per_output={"s": {"atol": 1e-3}})
    allowed = float(np.median(0.1 + 0.5 * np.abs(y)))
    assert judge({"y": y, "s": s}, {"y": y, "s": s}, reg, Tolerance(0.1, None, None, rtol=0.5))["weak"][0] == (
        f"output 'y': its spread over the data (std {std:.3g}) is below the difference allowed (0.1 + 0.5·|ref|, "
        f"median {allowed:.3g}), so any answer near the mean passes; pass a tighter --max-abs-diff or --output-tol")
    rec = judge({"y": y, "s": s}, {"y": y, "s": s}, reg, tol)
    assert [w.split(":")[0] for w in rec["weak"]] == ["output 'y'", "output 's'"]  # s: std 0 < 1e-3
    capped = Tolerance(1.0, None, None, per_output={"y": {"atol": 1.0, "rtol": 0.0, "cap": 0.01},
                                                    "s": {"atol": 1.0, "rtol": 0.0, "cap": 0.0}})
    rec = judge({"y": y, "s": s}, {"y": y, "s": s}, reg, capped)
    assert "(min(1, 0.01), median 0.01)" in rec["weak"][0] if rec["weak"] and "'y'" in rec["weak"][0] else True
    assert all("'y'" not in w for w in rec["weak"])  # y's spread (0.3) is above its capped bound 0.01
    at = Tolerance(std, None, None)  # a bound equal to the spread: not below it
    assert judge({"y": y}, {"y": y}, manifest("regression", outputs=(("y", 1),)), at)["weak"] == []


def test_a_classifiers_other_outputs_are_judged_for_spread_too():
    man = manifest(outputs=(("logits", 4), ("emb", 1)))
    z = logits(20)
    emb = np.full((20, 1), 2.0, np.float32)  # does not vary: a difference within 1e-4 says nothing
    rec = judge({"logits": z, "emb": emb}, {"logits": z, "emb": emb}, man)
    assert [w.split(":")[0] for w in rec["weak"]] == ["output 'emb'"]
    assert judge({"logits": z, "emb": emb}, {"logits": z, "emb": emb}, man, DEFAULT_TOLERANCES["student"])["weak"] == []


def test_failure_messages_word_for_word():
    man = manifest("regression", outputs=(("y", 2),))
    y = np.arange(20, dtype=np.float32).reshape(10, 2)
    tol = Tolerance(0.5, None, None, rtol=0.1, per_output={"y": {"atol": 0.5, "rtol": 0.1, "cap": 1.0}})
    cand = y.copy()
    cand[4, 1] += 3.0
    rec = judge({"y": y}, {"y": cand}, man, tol)
    assert rec["failures"] == ["output 'y' moved by max_abs_diff 3 > min(0.5 + 0.1·|ref|, 1) (1 of 20 values)"]
    assert rec["per_output"]["y"]["worst_excess"] == 2.0 and rec["per_output"]["y"]["cap"] == 1.0
    cand[2, 0] = np.inf
    rec = judge({"y": y}, {"y": cand}, man, tol)
    assert rec["failures"] == ["output 'y' answers NaN or inf where the reference is finite: 1 of 10 rows (1 values; "
                               "first at row 2)",
                               "output 'y' moved by max_abs_diff 3 > min(0.5 + 0.1·|ref|, 1) (1 of 20 values)"]
    both = judge({"y": y}, {}, man, tol)
    assert both["failures"] == ["output 'y' is missing from the candidate"] and both["max_abs_diff"] is None
    assert both["mean_abs_diff"] is None and both["samples"] == 0
    neither = record({}, {}, None, runner(man), tol, "ref")
    assert neither["failures"][0] == "output 'y' is missing from the reference and candidate"


# ---- edges the mutants showed: each kills a mutant of the verdict code ------------------------------------------------

NAMES = ["cat", "dog", "eel", "fox"]


def test_softmax_is_stable_and_per_row():
    from modelship.comparison import from_v2, softmax

    big = np.array([[1000.0, 999.0, 0.0], [0.0, -1.0, -1000.0]])
    p = softmax(big)
    assert np.all(np.isfinite(p)) and p.sum(-1) == pytest.approx([1.0, 1.0])
    np.testing.assert_allclose(p[0], p[1], rtol=1e-12)  # rows far apart in scale: each its own max
    golden = golden_of("classification", ["logits"], {"logits": big.astype(np.float32)})
    np.testing.assert_allclose(golden["probabilities"], p, rtol=1e-6)
    assert golden["out0"].dtype == np.float32 and golden["index"].tolist() == [0, 0]
    v2 = from_v2({"task": "classification", "outputs": ["logits"]},
                 {"outputs": [{"name": "logits", "shape": [1, 3], "datatype": "FP64", "data": [1000.0, 999.0, 0.0]}]})
    np.testing.assert_allclose(v2["probabilities"], p[0], rtol=1e-12)
    assert np.isnan(softmax(np.array([np.nan, 1.0]))).all()


def test_check_uses_each_outputs_own_bound_names_and_every_problem():
    man = manifest(outputs=(("logits", 4), ("a", 2), ("b", 2)))
    z = logits(2)
    a = np.array([[10.0, 10.0], [10.0, 10.0]], np.float32)
    golden = golden_of("classification", ["logits", "a", "b"], {"logits": z, "a": a, "b": a})
    tol = Tolerance(1e-4, 1.0, None, max_prob_diff=1e-4,
                    per_output={"a": {"atol": 0.1, "rtol": 0.1, "cap": 0.5}})
    spec = {**spec_of(man, tol), "labels": NAMES}
    base = {**answer(z[0]), "label": NAMES[int(np.argmax(z[0]))]}
    v = check(spec, golden, 0, {**base, "outputs": {"a": [10.5, 10.0], "b": [10.0, 10.0]}})
    assert v.ok  # 0.5 <= min(0.1 + 0.1·10, 0.5)
    v = check(spec, golden, 0, {**base, "outputs": {"a": [10.6, 10.0], "b": [10.0, 10.0]}})
    assert not v.within and v.why == "sample 0: output 'a' |diff| 0.6 > min(0.1 + 0.1·|ref|, 0.5)"
    v = check(spec, golden, 0, {**base, "outputs": {"b": [10.0, 10.0]}})
    assert v.why == "sample 0: output 'a' is missing from the answer" and v.within is False
    v = check(spec, golden, 0, base)
    assert v.why == "sample 0: output 'a' is missing from the answer; output 'b' is missing from the answer"
    v = check(spec, golden, 0, {**base, "outputs": {"a": [10.0, 10.0], "b": [10.0, 10.0], "x": 1, "w": 2}})
    assert v.why == "sample 0: unexpected output(s) w, x" and v.within is False
    off = dict(base, probabilities=[p + 0.25 if k == 0 else p for k, p in enumerate(base["probabilities"])])
    v = check(spec, golden, 0, {**off, "outputs": {"a": [10.0, 10.0], "b": [10.0, 10.0]}})
    assert v.why.startswith("sample 0: output 'probabilities' |diff| 0.25 > 0.0001")
    renamed = {**base, "label": "fox" if base["label"] != "fox" else "cat", "outputs": {"a": [10.0, 10.0],
                                                                                      "b": [10.0, 10.0]}}
    v = check(spec, golden, 0, renamed)
    assert v.label_ok is False and v.why == (f"sample 0: label {renamed['label']!r} for index {base['index']}, "
                                             f"which is {base['label']!r}")
    short = {**spec, "labels": NAMES[:1]}  # fewer names than classes: the index's number is its name
    want = int(np.argmax(z[0]))
    ok = check(short, golden, 0, {**base, "label": str(want) if want >= 1 else NAMES[0],
                                  "outputs": {"a": [10.0, 10.0], "b": [10.0, 10.0]}})
    assert ok.ok
    v = check(spec, golden, 0, {**base, "outputs": {"a": [[10.0], [10.0]], "b": [10.0, 10.0]}})
    assert v.within is False and v.diff == INF and not v.nonfinite
    v = check(spec, golden, 0, {**base, "outputs": {"a": ["x", "y"], "b": [10.0, 10.0]}})
    assert v.within is False and v.diff == INF and not v.nonfinite and v.kind == "tolerance"


def test_v2_outputs_keep_their_per_sample_shape():
    from modelship.comparison import from_v2

    spec = {"task": "regression", "outputs": ["m"], "dtypes": {"m": "float32"}}
    read = from_v2(spec, {"outputs": [{"name": "m", "shape": [1, 2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    assert read["outputs"]["m"] == [[1.0, 2.0], [3.0, 4.0]]
    assert from_v2(spec, {"outputs": [{"name": "m", "shape": [1, 1], "datatype": "INT64", "data": [1]}]})["wrong"] == \
        ["output 'm' is labelled INT64, but the model declares FP32"]
    assert from_v2({**spec, "dtypes": {}}, {"outputs": [{"name": "m", "shape": [1], "datatype": "INT64",
                                                         "data": [1]}]})["wrong"] == []


def test_record_details():
    z = logits(12)
    nan_on_label_1 = z.copy()
    row = int(np.flatnonzero(np.argmax(z, -1) == 1)[0])
    nan_on_label_1[row, 3] = np.nan  # argmax of the row would be... whatever: it has no label
    rec = judge({"logits": z}, {"logits": nan_on_label_1}, tol=DEFAULT_TOLERANCES["student"])
    assert rec["top1_agreement"] == 11 / 12
    reg = manifest("regression", outputs=(("y", 2),))
    y = np.arange(24, dtype=np.float32).reshape(12, 2)
    assert judge({"y": y}, {"y": y}, reg)["top1_agreement"] is None
    spec = {"name": "random", "samples": 12}
    rec = record({"logits": z}, {"logits": z}, None, runner(manifest(precision="int8")), DEFAULT_TOLERANCES["int8"],
                 "ref", spec=spec)
    assert rec["data"] == {"name": "random"} and any("generated inputs" in w for w in rec["weak"])
    tol = Tolerance(0.5, None, None, rtol=0.1, per_output={"y": {"atol": 0.5, "rtol": 0.1, "cap": 1.0}})
    cand = y.copy()
    cand[5, 1] += 1.2  # within 0.5 + 0.1·11 = 1.6, beyond the cap of 1
    po = judge({"y": y}, {"y": cand}, reg, tol)["per_output"]["y"]
    assert po["violations"] == 1 and po["worst_excess"] == pytest.approx(0.2, rel=1e-4)
    two = judge({"y": y}, {"y": y, "p": y, "q": y}, reg, tol)["failures"]
    assert two == ["output 'p' from the candidate is not in the manifest (y)",
                   "output 'q' from the candidate is not in the manifest (y)"]
    empty = judge({"y": y[:0]}, {"y": y[:0]}, reg, tol)
    po = empty["per_output"]["y"]
    assert (po["max_abs_diff"], po["mean_abs_diff"], po["p99_abs_diff"]) == (0.0, 0.0, 0.0)
    assert empty["weak"] == ["the evaluation data holds no samples, so nothing was judged; supply data (--data)"]
    assert empty["kind"] == "weak" and empty["samples"] == 0
    both_missing = judge({"logits": z}, {}, manifest())
    assert both_missing["mean_abs_diff"] is None and both_missing["top1_agreement"] is None


def test_tolerance_lookup_and_spread_details():
    from modelship.comparison import p99, parse_output_tolerance, spread

    t = Tolerance(1.0, None, None, rtol=0.05, per_output={"y": {"rtol": 0.3, "cap": 0.2}})
    assert t.for_output("y") == (1.0, 0.3, 0.2) and t.for_output("z") == (1.0, 0.05, None)
    assert parse_output_tolerance("y=0") == ("y", {"atol": 0.0})
    assert spread(np.array([[0.0, 1.5], [0.0, 0.5]]), True) == ("median top-1 margin", 1.0)  # two classes
    reg = manifest("regression", outputs=(("own", 2), ("v", 2)))
    v = np.tile(np.array([[0.0, 0.25], [0.5, 1.0]]), (5, 1))
    res = DEFAULT_TOLERANCES["int8"].adjusted(None, {"own": {"atol": 0.1}}).resolved({"own": v, "v": v}, reg)
    assert res.per_output["own"] == {"atol": 0.1}
    assert res.per_output["v"]["spread_of"] == "std" and res.per_output["v"]["spread"] == pytest.approx(np.std(v))
    assert 0 < res.per_output["v"]["spread"] < 1  # a spread under 1 still caps
    assert p99(np.zeros(0)) == 0.0 and p99(np.array([1.0, np.inf, np.inf])) == INF
    assert p99(np.arange(101, dtype=float)) == pytest.approx(99.0)


def test_load_gates_read_old_and_partial_results():
    bare = {"requests": 0, "failures": 0, "p95_ms": None}
    assert [(f.kind, f.message) for f in Gates().judge(bare)] == \
        [("errors", "no request was answered after the 0 s warm-up (0 answered in all; Locust log: None)")]
    partial = {"requests": 10, "failures": 0, "p95_ms": 1.0, "checked": 10}
    assert Gates().judge(partial) == []  # a result without the difference counts has none to fail on
    two = gate_messages(nonfinite=2, out_of_tolerance=5, max_abs_diff=INF, mismatch_examples=["s1", "s2"])
    assert two == [("parity", "non-finite: 2 answers hold NaN or inf where the reference is finite (e.g. s1)"),
                   ("parity", "difference: 5 answers beyond the fp32 tolerance (max |diff| inf; e.g. s1)")]
    assert gate_messages(nonfinite=2, out_of_tolerance=2) == \
        [("parity", "non-finite: 2 answers hold NaN or inf where the reference is finite (e.g. )")]


def test_summary_reads_a_log_that_is_not_utf8(tmp_path):
    from modelship.loadtests.summary import summarize

    (tmp_path / "t.log").write_bytes(b"started\n\xff\xfe broken\nend\n")
    with pytest.raises(Exception, match="Locust wrote no statistics \\(started \\| \ufffd\ufffd broken \\| end\\)"):
        summarize(tmp_path, "t", {"report": str(tmp_path / "none.json")}, 1)


def test_promote_edges():
    from modelship.promotion import Answers, Promotion, judge as promote_judge

    empty = Promotion("m", "refused", "2.0", "1.0")
    promote_judge(Answers("1.0", "2.0", latency_ms={"1.0": [], "2.0": []}), {}, {}, 1.0, empty)
    assert empty.failures == [{"kind": "errors", "message": "no evaluation sample was answered by both versions"}]
    assert empty.p95_ms_current is None and empty.p95_ms_candidate is None
    answers, spec, golden, result = promote_case(n=10)
    answers.burst[3], answers.burst[5] = (3, None), (5, None)
    answers.example = "version 2.0 (in a burst): HTTP 503"
    promote_judge(answers, spec, golden, 1.0, result)
    assert result.failures == [{"kind": "errors", "message": "2 of 20 requests were not answered (e.g. version 2.0 "
                                                             "(in a burst): HTTP 503)"}]
    assert result.burst == 8 and result.samples == 10
    answers, spec, golden, result = promote_case(n=10, wrong={2})
    promote_judge(answers, spec, golden, 1.0, result)
    ref_msg = result.failures[0]["message"]
    assert ref_msg.endswith("; e.g. " + ref_msg.split("; e.g. ")[1]) and "sample 2" in ref_msg
    cur = next(f["message"] for f in result.failures if f["message"].startswith("agreement with version 1.0"))
    assert cur == "agreement with version 1.0: 0.9000 of 10 answers (95% upper bound 0.9821) < 1.0"
    assert all(f["kind"] == "parity" for f in result.failures)
    answers, spec, golden, result = promote_case(n=10, nan={1}, wrong={4})
    promote_judge(answers, spec, golden, 1.0, result)
    diff = next(f for f in result.failures if f["message"].startswith("difference"))
    nonf = next(f for f in result.failures if f["message"].startswith("non-finite"))
    assert diff["kind"] == nonf["kind"] == "parity" and diff["message"].startswith("difference: 1 of 20 answers")
    assert nonf["message"].startswith("non-finite: 1 of 20 answers hold NaN or inf where the reference is finite")
    answers, spec, golden, result = promote_case(n=10, slo=1.0)
    answers.latency_ms = {"1.0": list(range(1, 101)), "2.0": []}
    promote_judge(answers, spec, golden, 1.0, result)
    assert result.p95_ms_current == pytest.approx(95.05) and result.p95_ms_candidate is None
    assert result.failures == [{"kind": "slo", "message": "latency: version 2.0 p95 nan ms > SLO 1 ms (version 1.0: "
                                                          "95.0 ms)"}]


def test_shadow_verdict_of_nothing():
    from modelship.serving.shadow import verdict

    assert verdict(spec_of(manifest()), {}, {"predictions": []}, 0) == (INF, None, [])


def test_more_edges_of_the_record():
    man = manifest("regression", outputs=(("a", 2), ("b", 2)))
    a = np.arange(20, dtype=np.float32).reshape(10, 2)
    assert judge({"a": a, "b": a}, {}, man)["failures"] == ["output 'a' is missing from the candidate",
                                                            "output 'b' is missing from the candidate"]
    assert judge({"a": a, "b": a}, {"a": a[:, :1], "b": a[:, :1]}, man)["failures"] == [
        "output 'a': shape [10, 1], reference [10, 2]", "output 'b': shape [10, 1], reference [10, 2]"]
    one = judge({"logits": logits(1)}, {"logits": logits(1)}, manifest(precision="int8"))
    assert one["weak"][0].startswith("the reference predicts class 0 for every one of the 1 samples")
    gen = manifest(precision="int8", data={"name": "random", "samples": 5})
    z = np.tile(logits(1), (5, 1))
    rec = judge({"logits": z}, {"logits": z}, gen)
    assert len(rec["weak"]) == 2 and rec["failures"] == [
        "weak evidence: " + rec["weak"][0] + "; " + rec["weak"][1] + " (or accept it on purpose with "
        "--allow-weak-parity)"]
    assert rec["allow_weak"] is False
    near = np.stack([np.arange(10.0), np.arange(10.0) + 1e-6], 1)  # spread 2.9, but columns 1e-6 apart
    reg = manifest("regression", outputs=(("y", 2),))
    assert judge({"y": near}, {"y": near}, reg)["weak"] == []
    small = np.linspace(0, 0.003, 10)[:, None]
    capped = Tolerance(1.0, None, None, per_output={"y": {"atol": 1.0, "rtol": 0.0, "cap": 0.01}})
    w = judge({"y": small}, {"y": small}, manifest("regression", outputs=(("y", 1),)), capped)["weak"]
    assert len(w) == 1 and "(min(1, 0.01), median 0.01)" in w[0]
    ref = np.array([[np.inf, 1.0], [2.0, 3.0]])
    cand = np.array([[5.0, 11.0], [2.0, 3.0]])
    po = judge({"a": ref, "b": ref}, {"a": cand, "b": ref}, man, Tolerance(0.5, None, None, rtol=0.1)
               )["per_output"]["a"]
    assert po["violations"] == 1 and po["worst_excess"] == pytest.approx(10 - 0.6)  # the inf row is no evidence


def test_float64_throughout():
    from modelship.comparison import softmax

    d, _ = abs_diff(np.array([1.7e308]), np.array([-1.7e308]))
    assert d[0] == INF  # an overflow, not a warning
    assert softmax(np.array([1.0, 2.0], np.float32)).dtype == np.float64
    assert np.isnan(softmax(np.array([np.inf, 1.0]))).any()
    assert golden_of("regression", ["y"], {"y": np.ones((2, 2))})["out0"].dtype == np.float32
    spec = spec_of(manifest("regression", outputs=(("y", 0),)))
    assert check(spec, golden_of("regression", ["y"], {"y": np.zeros((2, 0))}), 1, {"outputs": {"y": []}}).diff == 0.0


def test_label_names_past_the_list_are_numbers():
    man = manifest()
    z = logits(4)
    golden = golden_of("classification", ["logits"], {"logits": z})
    i = int(np.flatnonzero(golden["index"] == 1)[0])
    spec = {**spec_of(man), "labels": ["cat"]}  # one name for four classes
    v = check(spec, golden, i, {**answer(z[i]), "label": "x"})
    assert v.why == f"sample {i}: label 'x' for index 1, which is '1'"


def test_summary_counts_each_column_of_the_samples(tmp_path):
    import json

    from modelship.loadtests.summary import summarize

    (tmp_path / "t_stats.csv").write_text("")
    samples = [[0.2, 5.0, True, None],  # warm-up, answered, not checked
               [1.0, 70.0, False, None],  # at the warm-up's end: after it
               [1.0, 10.12345, True, [True, True, 0.001, False]],
               [1.5, 20.0, True, [False, True, 0.002, False]],
               [2.0, 30.0, True, [None, False, 0.5, False]],
               [2.5, 40.0, False, None],
               [3.0, 50.0, True, [True, False, 1e30, True]],
               [3.5, 60.0, True, [False, True, 0.0, False]],
               [4.0, 5.0, True, [None, True, 0.0]],  # a verdict from a Locust user of before (three fields)
               [4.2, 5.0, True, [True, True, 0.0, False]],
               [4.3, 5.0, True, [False, True, 0.0, False]],
               [4.4, 5.0, True, [False, True, 0.0, False]],
               [4.5, 5.0, True, None]]
    (tmp_path / "c.json").write_text(json.dumps({"started": 9, "samples": samples}))
    r = summarize(tmp_path, "t", {"report": str(tmp_path / "c.json")}, 1, duration_s=5.0, warmup_s=1.0)
    assert (r["requests"], r["failures"], r["failures_in_warmup"], r["cancelled_at_stop"]) == (12, 2, 0, 9)
    assert (r["checked"], r["label_mismatches"], r["out_of_tolerance"], r["nonfinite"], r["mismatches"]) == \
        (9, 4, 2, 1, 6)  # mismatches: 2 beyond the tolerance + 4 labels off among those within it
    assert r["mismatch_examples"] == [] and r["per_worker"] == {} and r["latencies_ms"][1] == 10.123


def test_partial_load_results_still_fail_on_wrong_answers():
    partial = {"requests": 10, "failures": 0, "p95_ms": 1.0, "checked": 10, "out_of_tolerance": 1, "max_abs_diff": 0.5}
    assert [(f.kind, f.message) for f in Gates().judge(partial)] == \
        [("parity", "difference: 1 answers beyond the None tolerance (max |diff| 0.5; e.g. )")]
    assert [f.message for f in Gates().judge({**partial, "nonfinite": 1, "out_of_tolerance": 1})] == \
        ["non-finite: 1 answers hold NaN or inf where the reference is finite (e.g. )"]


def test_promote_edges_two():
    from modelship.promotion import judge as promote_judge

    answers, spec, golden, result = promote_case(n=10, live=1)
    answers.work[-1][1].update({"1.0": None, "2.0": None})  # a live request neither version answered: no fault
    promote_judge(answers, spec, golden, 1.0, result)
    assert result.failures == [] and result.live == 0
    answers, spec, golden, result = promote_case(n=10, slo=1.0)
    answers.latency_ms = {"1.0": [], "2.0": list(range(1, 101))}
    promote_judge(answers, spec, golden, 1.0, result)
    assert result.p95_ms_candidate == pytest.approx(95.05) and result.p95_ms_current is None
    assert result.failures == [{"kind": "slo", "message": "latency: version 2.0 p95 95.0 ms > SLO 1 ms (version 1.0: "
                                                          "nan ms)"}]


def test_bounds_in_float64_and_spreads_of_nothing():
    from modelship.comparison import bound, spread

    b = bound(np.array([3.0], np.float32), 1e-4, 0.1)
    assert b.dtype == np.float64 and float(b[0]) == 1e-4 + 0.1 * 3.0  # not rounded to float32
    assert bound(np.array([1.0, 2.0]), 0.5, 0.0).tolist() == [0.5, 0.5]
    assert bound(np.array([np.inf, 1.0]), 0.5, 0.0).tolist() == [0.5, 0.5]  # no 0·inf
    assert spread(np.full((3, 2), np.nan), True) == ("median top-1 margin", 0.0)
    assert spread(np.full((3, 1), np.nan), False) == ("std", 0.0)
    reg = manifest("regression", outputs=(("v", 2),))
    v = np.tile(np.array([[0.0, 0.25], [0.5, 1.0]]), (5, 1))
    assert DEFAULT_TOLERANCES["int8"].resolved({"v": v}, reg).per_output["v"]["spread_of"] == "std"


def test_a_v2_classifiers_logits_are_judged_too():
    man = manifest()
    z = logits(2)
    golden = golden_of("classification", ["logits"], {"logits": z})
    spec = {**spec_of(man), "dtypes": {"logits": "float32"}}

    def v2(row):
        return {"outputs": [{"name": "logits", "shape": [1, 4], "datatype": "FP32", "data": list(map(float, row))}]}
    good = check(spec, golden, 0, v2(z[0]))
    assert good.ok and good.why == ""
    shifted = check(spec, golden, 0, v2(z[0] + 100.0))  # the same softmax, logits 100 off
    assert not shifted.ok and shifted.kind == "tolerance" and "output 'logits' |diff| 100" in shifted.why
    under = z[0].astype(np.float64)
    under[np.argmin(under)] = -np.inf  # an FP16 underflow: probability 0, a logit the client cannot use
    v = check(spec, golden, 0, v2(under))
    assert v.kind == "nonfinite" and "output 'logits' answers NaN or inf" in v.why
    own = {**spec, "tolerance": asdict(Tolerance(1e-4, 1.0, None, max_prob_diff=1e-4,
                                                 per_output={"logits": {"atol": 200.0}}))}
    assert check(own, golden, 0, v2(z[0] + 100.0)).ok  # the logits' own bound


def test_replayed_v2_bodies_name_no_version_and_ipv6_hosts_get_brackets():
    import json

    from modelship.promotion import _replayable
    from modelship.serving.config import client_host as _client_host, is_loopback

    body = json.dumps({"model_version": "1.0", "inputs": [1]}).encode()
    assert json.loads(_replayable(body, {"Content-Type": "application/json"})) == {"inputs": [1]}
    assert _replayable(b"\x89PNG", {"Content-Type": "image/png"}) == b"\x89PNG"
    assert _replayable(body, {"Inference-Header-Content-Length": "5"}) == body
    assert json.loads(_replayable(b"  " + body, {})) == {"inputs": [1]}
    plain = b'{"inputs": [1]}'
    assert _replayable(plain, {}) == plain and _replayable(b"[1, 2]", {}) == b"[1, 2]"
    assert _replayable(b"{not json", {}) == b"{not json"
    assert _client_host("::1") == "[::1]" and _client_host("0.0.0.0") == "127.0.0.1"
    assert _client_host("::") == "127.0.0.1" and _client_host("10.0.0.2") == "10.0.0.2"
    assert is_loopback("::1") and is_loopback("127.0.0.2") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.org")


def test_images_other_than_png_and_jpeg_are_refused():
    import io

    from PIL import Image

    from modelship.errors import InputError
    from modelship.preprocess import decode_image

    for fmt in ("TIFF", "BMP", "GIF"):
        buf = io.BytesIO()
        Image.new("L", (4, 4)).save(buf, format=fmt)
        with pytest.raises(InputError, match="not an image; expected the bytes of a PNG or JPEG"):
            decode_image(buf.getvalue(), 1000)
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 1000).size == (4, 4)


# ---- the batch gate (modelship.batch_gate) -------------------------------------------------------------------------

from modelship import batch_gate  # noqa: E402

W = np.random.default_rng(1).normal(size=(3, 4))
X = np.random.default_rng(2).normal(size=(40, 3)).astype(np.float32)


class BatchRunner:
    """A runner of ``manifest()``'s signature answering ``answer(x)`` for a batch x of [n, 3] (float32, as its
    manifest says: the gate casts what it feeds)."""

    def __init__(self, answer, precision="fp32", first_dim="batch", max_batch=None):
        self.manifest = manifest(precision=precision)
        self.manifest.inputs[0].shape[0] = first_dim
        self.inputs, self.answer, self.max_batch, self.calls = self.manifest.inputs, answer, max_batch, []

    def infer(self, feed):
        x = feed["x"]
        assert x.dtype == np.float32 and x.ndim == 2, (x.dtype, x.shape)
        self.calls.append(len(x))
        return {"logits": self.answer(x)}


def linear(x):
    return x.astype(np.float64) @ W


def gate(answer, **kw):
    return batch_gate.judge(BatchRunner(answer, **kw), batch_gate.from_tensors({"x": X}))


def test_batch_gate_passes_answers_that_do_not_move_and_records_how_it_judged():
    r = BatchRunner(linear)
    rec = batch_gate.judge(r, batch_gate.from_tensors({"x": X}))
    assert rec["passed"] is True and rec["message"] is None and rec["max_abs_diff"] < 1e-12  # float64 sums
    assert rec["sizes"] == [3, 4, 16, 64] and rec["samples"] == 16 and rec["rel_bound"] == 1e-4
    assert rec["bound"] == pytest.approx(1e-4 * np.std(linear(X[:16])), rel=1e-6)
    assert rec["outlier"].startswith("sample ") and rec["outlier"].endswith("scaled 8 times")
    # 16 alone, the outlier alone, 5+4+1+1 batches of 3/4/16/64 (a last group of one is no batch) and one of 64
    # beside the outlier
    assert r.calls[:17] == [1] * 17 and sorted(r.calls[17:]) == [3] * 5 + [4] * 4 + [16, 64, 64]


def test_batch_gate_fails_just_past_its_bound_and_passes_just_inside():
    bound = gate(linear)["bound"]
    inside = gate(lambda x: linear(x) + 0.9 * bound * (len(x) > 1))
    past = gate(lambda x: linear(x) + 1.1 * bound * (len(x) > 1))
    assert inside["passed"] is True and past["passed"] is False
    assert re.match(r"answers depend on what they are batched with: sample \d+'s output 'logits' moved by ",
                    past["message"])
    assert f"inside a batch of {past['worst']['size']}" in past["message"] and "of the output's spread" in \
        past["message"] and past["worst"]["size"] == 3 and "--activations per-row" in past["message"]


def test_batch_gate_bound_follows_the_precision_and_never_goes_below_float32_steps():
    assert gate(linear, precision="fp16")["rel_bound"] == 2e-3
    assert gate(linear, precision="int8")["rel_bound"] == 1e-4
    assert batch_gate._bound(np.array([1e6, 1e6 + 1e-3]), 1e-4) == 16 * float(np.spacing(np.float32(1e6 + 1e-3)))
    assert batch_gate._bound(np.array([0.0, 2.0]), 1e-4) == pytest.approx(1e-4)
    assert batch_gate._bound(np.array([NAN, INF]), 1e-4) == 0.0
    assert batch_gate._bound(np.array([NAN, 0.0, 2.0]), 1e-4) == pytest.approx(1e-4)


def test_batch_gate_sees_one_scale_per_batch_beside_an_outlier():
    """Per-tensor INT8 in miniature: each batch rounded on a grid set by its largest value."""
    def per_tensor(x):
        s = np.abs(x).max() / 127
        return linear(np.round(x / s) * s)

    rec = gate(per_tensor)
    assert rec["passed"] is False and rec["worst"]["with_outlier"] is True and "beside an outlier" in rec["message"]


@pytest.mark.parametrize("case", ["sizes", "rows_past_16", "last_row", "nan_in_batch"])
def test_batch_gate_fails_each_way_an_answer_can_move(case):
    answer = {"sizes": lambda x: linear(x) + (len(x) == 3),
              "rows_past_16": lambda x: linear(x) + (np.arange(len(x)) >= 16)[:, None],
              "last_row": lambda x: linear(x) + ((np.arange(len(x)) == len(x) - 1) & (len(x) > 1))[:, None],
              "nan_in_batch": lambda x: linear(x) * (np.nan if len(x) > 1 else 1.0)}[case]
    rec = gate(answer)
    assert rec["passed"] is False and rec["max_abs_diff"] > rec["bound"]


def test_batch_gate_records_a_model_that_fails_instead_of_raising():
    def boom_batched(x):
        if len(x) > 1:
            raise RuntimeError("shape mismatch")
        return linear(x)

    rec = gate(boom_batched)
    assert rec["passed"] is False and rec["message"].startswith("the model fails on a batch of 3 (shape mismatch)")
    rec = gate(lambda x: (_ for _ in ()).throw(RuntimeError("nope")))
    assert rec["passed"] is False and rec["message"].startswith("the model fails on one sample alone (nope)")
    rec = gate(lambda x: linear(x)[:1])
    assert rec["passed"] is False and "does not hold one answer per sample (shape [1, 4])" in rec["message"]
    rec = gate(lambda x: linear(x)[0])
    assert rec["passed"] is False and "does not hold one answer per sample" in rec["message"]


def test_batch_gate_leaves_out_an_outlier_the_model_refuses_alone():
    top = float(np.abs(X[:16]).max())
    rec = gate(lambda x: (_ for _ in ()).throw(ValueError("out of range")) if np.abs(x).max() > 2 * top else linear(x))
    assert rec["passed"] is True and rec["outlier"].startswith("none: sample ") and "out of range" in rec["outlier"]
    assert rec["worst"]["with_outlier"] is False


def test_batch_gate_skips_what_it_cannot_judge_and_caps_its_sizes():
    rec = gate(linear, first_dim=1)
    assert rec["passed"] is None and rec["skipped"] == "the model takes batches of 1 only" and rec["message"] is None
    assert gate(linear, first_dim=4)["sizes"] == [3, 4]
    assert gate(linear, max_batch=8)["sizes"] == [3, 4, 8]
    one = batch_gate.judge(BatchRunner(linear), batch_gate.from_tensors({"x": X[:1]}))
    assert one["passed"] is None and one["skipped"] == "fewer than 2 samples"
    assert batch_gate.from_tensors({"x": X[:0]}).count == 0 and batch_gate.from_tensors({}).count == 0


def test_batch_gate_batches_and_samples():
    assert list(batch_gate._batches(5, [3, 8], True)) == [
        (3, [0, 1, 2]), (3, [3, 4]), (8, [0, 1, 2, 3, 4, 0, 1, 2]), (8, [0, 1, 2, 3, 4, 0, 1, 5])]
    assert list(batch_gate._batches(4, [4], False)) == [(4, [0, 1, 2, 3])]
    s = batch_gate.from_tensors({"x": X, "ids": np.arange(40)[:, None]})
    big = int(np.argmax(np.abs(X[:16]).sum(-1) + np.arange(16)))
    assert s.count == 16 and s.outlier == f"sample {big} scaled 8 times"
    feed = s.feed([0, 16])
    assert np.array_equal(feed["x"][1], X[big] * 8) and feed["ids"][1, 0] == big and np.array_equal(feed["x"][0], X[0])
    ints = batch_gate.from_tensors({"ids": np.arange(40)[:, None]})
    assert ints.outlier == "sample 15 (the largest)" and ints.feed([16])["ids"][0, 0] == 15


def test_batch_gate_text_samples_spread_over_lengths_with_a_long_outlier():
    class Prep:
        spec = SimpleNamespace(max_chars=60, truncation="truncate")

        def __call__(self, texts):
            return {"x": np.array([[len(t), 0, 0] for t in texts], np.float32)}, [{} for _ in texts]

    texts = [f"w{'x' * i}" for i in range(30)] + ["", "  ", 7]
    s = batch_gate.from_texts(texts, Prep())
    lengths = [int(v[0]) for v in s.feed(list(range(s.count)))["x"]]
    assert s.count == 16 and lengths == sorted(lengths) and lengths[0] == 1 and lengths[-1] == 30
    outlier = int(s.feed([s.count])["x"][0, 0])
    assert outlier == 60 and s.outlier == "the judged texts in one"
    Prep.spec = SimpleNamespace(max_chars=60, truncation="refuse")
    assert int(batch_gate.from_texts(texts, Prep()).feed([16])["x"][0, 0]) == 30  # the longest, as it is


def test_batch_gate_fixed_batch_reads_the_first_dim():
    man = manifest()
    assert batch_gate.fixed_batch(man) is None
    man.inputs[0].shape[0] = 2
    assert batch_gate.fixed_batch(man) == 2


def test_batch_gate_casts_what_it_feeds_and_judges_outputs_in_float64():
    class Typed(BatchRunner):
        def __init__(self, answer):
            super().__init__(answer)
            self.manifest.inputs.append(TensorSpec("ids", "int64", ["batch", 1]))
            self.inputs = self.manifest.inputs
            del self.max_batch  # a runner without the attribute (TensorRT's has it)

        def infer(self, feed):
            assert feed["ids"].dtype == np.int64
            return super().infer(feed)

    x64 = {"x": X.astype(np.float64), "ids": np.arange(40, dtype=np.int64)[:, None]}
    rec = batch_gate.judge(Typed(lambda x: linear(x).astype(np.float16)), batch_gate.from_tensors(x64))
    alone = linear(X[:16].astype(np.float32)).astype(np.float16).astype(np.float64)
    assert rec["passed"] is True and rec["bound"] == pytest.approx(1e-4 * float(np.std(alone)), rel=1e-12)
    assert rec["bounds"] == {"logits": rec["bound"]} and rec["worst"]["output"] == "logits"


def test_batch_gate_records_every_field_of_a_failure_and_cuts_long_errors():
    long = "x" * 500

    def boom_batched(x):
        if len(x) > 1:
            raise RuntimeError(long)
        return linear(x)

    rec = gate(boom_batched)
    assert rec["message"] == f"the model fails on a batch of 3 ({'x' * 300}) where each sample alone runs; serve it " \
        "with batch size 1"
    assert rec["max_abs_diff"] is None and rec["bound"] is None and rec["passed"] is False
    rec = gate(lambda x: (_ for _ in ()).throw(RuntimeError(long)))
    assert rec["message"] == f"the model fails on one sample alone ({'x' * 300}); a batch of one must run"
    top = float(np.abs(X[:16]).max())
    rec = gate(lambda x: (_ for _ in ()).throw(ValueError(long)) if np.abs(x).max() > 2 * top else linear(x))
    assert rec["outlier"] == f"none: {batch_gate.from_tensors({'x': X}).outlier} fails alone ({'x' * 120})"
    rec = gate(lambda x: {"other": 1}[0] if len(x) > 1 else linear(x))
    assert rec["passed"] is False and rec["message"].startswith("the model fails on a batch of 3")


def test_batch_gate_failure_message_in_full():
    past = gate(lambda x: linear(x) + 1.0 * (len(x) == 3))
    w = past["worst"]
    assert w == {"size": 3, "sample": w["sample"], "output": "logits", "with_outlier": False}
    assert past["message"] == (
        f"answers depend on what they are batched with: sample {w['sample']}'s output 'logits' moved by "
        f"{past['max_abs_diff']:.3g} inside a batch of 3 (bound {past['bound']:.3g}: 0.0001 of the output's "
        "spread); serve it with batch size 1, or quantize activations per row (modelship quantize --activations "
        "per-row)")

    def per_tensor(x):
        s = np.abs(x).max() / 127
        return linear(np.round(x / s) * s)

    out = gate(per_tensor)
    assert out["worst"]["with_outlier"] is True and f"inside a batch of 64 beside an outlier ({out['outlier']}) (bound" \
        in out["message"]


def test_batch_gate_edges():
    """Outputs missing from a batch or answering no rows fail; outputs of one value per sample are fine; NaN alone
    and NaN batched is no move; two samples are enough to judge; a runner of batches of 2 is judged at 2."""
    missing = batch_gate.judge(BatchRunner(linear), batch_gate.from_tensors({"x": X}))
    assert missing["passed"] is True

    class Renamed(BatchRunner):
        def infer(self, feed):
            out = super().infer(feed)
            return out if len(feed["x"]) == 1 else {"other": out["logits"]}

    rec = batch_gate.judge(Renamed(linear), batch_gate.from_tensors({"x": X}))
    assert rec["passed"] is False and "output 'logits' of a batch of 3 does not hold one answer per sample (shape [])" \
        in rec["message"]
    assert gate(lambda x: linear(x)[:, 0])["passed"] is True  # one value per sample: [n]
    nan = gate(lambda x: linear(x) * np.nan)
    assert nan["passed"] is True and nan["bound"] == 0.0 and nan["max_abs_diff"] == 0.0
    two = batch_gate.judge(BatchRunner(lambda x: linear(x) + (len(x) > 1)), batch_gate.from_tensors({"x": X[:2]}))
    assert two["passed"] is False and two["samples"] == 2
    assert gate(linear, max_batch=2)["sizes"] == [2]
    rec = gate(linear, first_dim=1)
    assert rec["max_abs_diff"] is None and rec["bound"] is None and rec["message"] is None
    assert list(batch_gate._batches(5, [3, 8, 16], False)) == [
        (3, [0, 1, 2]), (3, [3, 4]), (8, [0, 1, 2, 3, 4, 0, 1, 2]), (16, [i % 5 for i in range(16)])]
    empty = batch_gate.from_tensors({})
    assert empty.outlier == "none" and empty.feed([]) == {}
    s = batch_gate.from_tensors({"x": X, "ids": np.arange(40)[:, None]})
    assert s.feed([16])["x"].dtype == X.dtype
    with pytest.raises(IndexError):
        s.feed([17])  # one outlier row, no more


def test_batch_gate_text_samples_in_detail():
    class Prep:
        spec = SimpleNamespace()  # no max_chars, no truncation: the defaults

        def __init__(self):
            self.seen = []

        def __call__(self, texts):
            self.seen.append(list(texts))
            return {"x": np.array([[len(t), 0, 0] for t in texts], np.float32)}, [{} for _ in texts]

    ties = [f"t{i:02d}" for i in range(40)]  # every text of one length: picked in their order
    prep = Prep()
    s = batch_gate.from_texts(ties, prep)
    s.feed(list(range(s.count)))
    want = [ties[i] for i in np.linspace(0, 39, 16).astype(int)]
    assert prep.seen[-1] == want
    s.feed([16])
    assert prep.seen[-1] == [" ".join(reversed(want))]
    long = ["a" * 9_000, "b" * 9_000, "z"]
    s = batch_gate.from_texts(long, prep)
    s.feed([s.count])
    assert len(prep.seen[-1][0]) == 10_000  # cut where a model without max_chars would not take more
    prep.spec = SimpleNamespace(truncation="refuse", max_chars=100)
    s = batch_gate.from_texts(["zz", "aaaa", "b"], prep)
    s.feed([s.count])
    assert prep.seen[-1] == ["aaaa"]  # the longest (not the last in order), as it is
    assert batch_gate.from_texts([], prep).count == 0


def test_batch_gate_outlier_is_one_row_and_integers_pass_as_they_are():
    ids = np.arange(40)[:, None]
    ids[3] = 1000  # the largest, not the last judged sample
    for feed in ({"x": X}, {"ids": ids}):
        s = batch_gate.from_tensors(feed)
        assert s.feed([16])[next(iter(feed))].shape[0] == 1
        with pytest.raises(IndexError):
            s.feed([17])  # one outlier row, no more

    class Ints(BatchRunner):
        def __init__(self):
            super().__init__(linear)
            self.manifest.inputs.append(TensorSpec("ids", "int64", ["batch", 1]))
            self.inputs = self.manifest.inputs

        def infer(self, feed):
            assert feed["ids"].dtype == np.int32  # integers as they come, as parity's collect passes them
            return super().infer(feed)

    rec = batch_gate.judge(Ints(), batch_gate.from_tensors({"x": X, "ids": ids.astype(np.int32)}))
    assert rec["passed"] is True


def test_batch_gate_failed_names_only_a_failed_verdict():
    bad = {"passed": False, "message": "answers depend on what they are batched with: ..."}
    assert batch_gate.failed({"passed": True, "batch": bad}) is bad  # parity passed: the batch verdict still counts
    for rec in (None, {}, {"batch": None}, {"batch": {"passed": True}}, {"batch": {"passed": None, "skipped": "x"}}):
        assert batch_gate.failed(rec) is None, rec
