"""Real Locust against real TorchServe: every answer checked against the PyTorch reference, gates set
the exit code, distributed totals agree with per-worker sums. Each run is bounded to a few seconds."""

import json
import shutil

import pytest

from conftest import cli, files_holding
from modelship.manifest import load_artifact, write_artifact

pytestmark = pytest.mark.serve


def test_correct_run_passes_gates(served, work, tmp_path, cnn, cnn_onnx):
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "4", "--duration", "6s",
            "--slo-p95-ms", "2000", "--out", tmp_path / "lt", "--json", tmp_path / "r.json", check=0)
    r = json.loads((tmp_path / "r.json").read_text())
    for key in ("requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms", "top1_agreement", "max_abs_diff", "slo",
                "passed", "mismatches", "p99_abs_diff", "reference"):
        assert key in r
    assert r["passed"] and r["requests"] > 50 and r["failures"] == 0
    assert r["checked"] == r["requests"] and r["mismatches"] == 0 and r["top1_agreement"] == 1.0
    assert r["max_abs_diff"] < 1e-5 and r["p99_abs_diff"] <= r["max_abs_diff"]
    assert r["reference"] == str(cnn.path)  # judged against the root PyTorch model, not the served ONNX file
    assert r["first_answer_ms"] > 0  # one answered request before the clock starts: no cold start in the figures
    assert r["tolerance"]["min_top1_agreement"] == 1.0 and r["warmup_s"] == 0.6  # FP32: no label may differ
    assert (tmp_path / "lt" / "locust_u4_stats.csv").is_file() and (tmp_path / "lt" / "locust_u4.html").is_file()
    assert "users" in p.stdout
    # Locust got the token through its environment: no spec, report or log holds it
    token = json.loads((work / "state" / "serve.json").read_text())["token"]
    assert "token" not in json.loads((tmp_path / "lt" / "locust_u4.spec.json").read_text())
    assert files_holding([token], tmp_path, work / "state") == []
    # where the verdict was judged and where the answers were computed: the same machine here
    assert r["served_on"]["int8"] in ("exact", "saturating") and r["served_on"]["cpu"] == r["judged_on"]["cpu"]
    assert r["judged_on"] == cnn_onnx.manifest.parity["judged_on"]
    assert r["kernels_differ"] == []


def test_a_variant_judged_on_other_kernels_says_its_served_answers_are_the_evidence(served, work, tmp_path):
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-int8-elsewhere", "--users", "2", "--duration", "3s",
            "--out", tmp_path / "lt", "--json", tmp_path / "r.json", check=0)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["judged_on"]["int8"] != r["served_on"]["int8"] and r["passed"] and r["checked"] == r["requests"] > 0
    assert r["kernels_differ"] == [f"INT8 arithmetic: judged with {r['judged_on']['int8']} ({r['judged_on']['kernels']}), "
                                   f"served with {r['served_on']['int8']} ({r['served_on']['kernels']})"]
    assert "served elsewhere than judged" in p.stdout and "evidence for the serving machine" in p.stdout


def test_too_tight_slo_fails_latency_gate(served, work, tmp_path):
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "2", "--duration", "3s",
            "--slo-p95-ms", "0.01", "--out", tmp_path / "lt", "--json", tmp_path / "r.json")
    assert p.returncode == 1 and "latency: p95" in p.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert not r["passed"] and r["top1_agreement"] == 1.0


def test_wrong_model_fails_agreement_gate(served, work, tmp_path, cnn):
    """A served variant whose answers are shuffled: HTTP is fine, the agreement gate catches it."""
    import torch

    perm = torch.roll(torch.arange(10), 3)
    wrong = _reference_copy(cnn, tmp_path / "wrong-ref", lambda w, b: (w[perm], b[perm]))  # labels shifted by 3
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "2", "--duration", "3s",
            "--reference", wrong, "--out", tmp_path / "lt", "--json", tmp_path / "r.json")
    assert p.returncode == 1 and "agreement:" in p.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["failures"] == 0 and r["mismatches"] > 0 and r["top1_agreement"] < 0.5
    assert r["mismatch_examples"]


def test_distributed_totals_match_worker_sums(served, work, tmp_path):
    cli("loadtest", "--state", work / "state", "--model", "cnn-int8", "--users", "4", "--duration", "5s",
        "--workers", "2", "--warmup", "0", "--out", tmp_path / "lt", "--json", tmp_path / "r.json", check=0)
    r = json.loads((tmp_path / "r.json").read_text())
    assert len(r["per_worker"]) == 2
    assert r["requests"] == sum(w["responses"] for w in r["per_worker"].values()) == r["locust_responses"]
    assert r["checked"] == sum(w["checked"] for w in r["per_worker"].values())
    assert all(w["responses"] > 0 for w in r["per_worker"].values())
    assert r["passed"]


def _reference_copy(cnn, dst, change):
    """A copy of the reference artifact whose classifier head is changed by ``change(weight, bias)``."""
    import torch

    shutil.copytree(cnn.path, dst)
    state = torch.load(dst / "model.pt")
    last = [k for k in state if k.startswith("head.") and k.endswith("weight")][-1]
    bias = last.replace("weight", "bias")
    state[last], state[bias] = change(state[last], state[bias])
    torch.save(state, dst / "model.pt")
    write_artifact(dst, load_artifact(dst, verify=False).manifest)
    return dst


def test_probabilities_are_judged_not_only_labels(served, work, tmp_path, cnn):
    """Logits scaled by 1 %: every label still agrees, but the served probabilities moved beyond FP32's tolerance."""
    ref = _reference_copy(cnn, tmp_path / "scaled", lambda w, b: (w * 1.01, b * 1.01))
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "2", "--duration", "3s",
            "--reference", ref, "--out", tmp_path / "lt", "--json", tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["top1_agreement"] == 1.0 and r["label_mismatches"] == 0
    assert p.returncode == 1 and "difference:" in p.stderr, p.stderr
    assert r["out_of_tolerance"] > 0 and r["max_abs_diff"] > 1e-4 and not r["passed"]
    # the same run passes when the user widens the served tolerance on purpose
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "2", "--duration", "3s",
            "--reference", ref, "--max-prob-diff", "0.5", "--out", tmp_path / "lt2", "--json", tmp_path / "r2.json",
            check=0)


def test_summary_counts_failures_in_latency_and_skips_warmup(tmp_path):
    """Percentiles include failed and timed-out requests at their time to failure; the warm-up counts nowhere."""
    from modelship.loadtests.summary import GateFailure, Gates, summarize

    (tmp_path / "t_stats.csv").write_text("Type,Name\n")
    ok = [True, True, 0.0]
    samples = [[0.1, 5000.0, False, None]]  # a slow failure during the warm-up: left out
    samples += [[1.0 + i / 100, 10.0, True, ok] for i in range(90)]
    samples += [[2.0 + i / 100, 30000.0, False, None] for i in range(10)]  # time-outs after warm-up: counted
    (tmp_path / "counts.json").write_text(json.dumps({"started": 101, "responses": 101, "samples": samples}))
    spec = {"report": str(tmp_path / "counts.json"), "model": "m", "tolerance": {"min_top1_agreement": 1.0}}
    r = summarize(tmp_path, "t", spec, users=4, duration_s=11.0, warmup_s=1.0)
    assert r["requests"] == 100 and r["failures"] == 10 and r["checked"] == 90
    assert r["p50_ms"] == 10.0 and r["p95_ms"] == 30000.0 and r["max_ms"] == 30000.0
    assert r["rps"] == 10.0
    assert Gates(slo_p95_ms=100, max_failure_ratio=0.2).judge(r) == [GateFailure("slo", "latency: p95 30000.0 ms > SLO 100 ms")]
    # a run whose every request was sent during the warm-up measured nothing: it fails and says why
    (tmp_path / "counts.json").write_text(json.dumps({"started": 1, "responses": 1, "samples": samples[:1]}))
    r = summarize(tmp_path, "t", spec, users=4, duration_s=11.0, warmup_s=1.0)
    assert r["requests"] == 0
    assert Gates().judge(r) == [GateFailure("errors", f"no request was answered after the 1 s warm-up (1 answered in "
                                                      f"all; Locust log: {tmp_path / 't.log'})")]


def test_concurrency_sweep(served, work, tmp_path):
    cli("loadtest", "--state", work / "state", "--model", "cnn-torch", "--users", "1,4", "--duration", "3s",
        "--out", tmp_path / "lt", "--json", tmp_path / "r.json", check=0)
    r = json.loads((tmp_path / "r.json").read_text())
    assert [lv["users"] for lv in r["levels"]] == [1, 4]
    assert all(lv["requests"] > 0 and lv["top1_agreement"] == 1.0 for lv in r["levels"])


def test_agreement_gate_judges_what_the_run_can_show():
    """INT8's floor 0.99: one known disagreement in 93 answers cannot show agreement below it; 95 % in 1000 can.
    FP32's floor 1.0: a single differing label fails."""
    from modelship.loadtests.summary import Gates, wilson_upper

    def run(agree, n, floor):
        r = {"requests": n, "failures": 0, "p95_ms": 1.0, "top1_agreement": agree / n, "label_mismatches": n - agree,
             "agreement_upper_95": wilson_upper(agree, n), "tolerance": {"min_top1_agreement": floor}}
        failed = Gates().judge(r)
        assert all(f.kind == "parity" for f in failed)  # a wrong label is a parity failure, not an SLO or an error
        return [f.message for f in failed]

    assert run(92, 93, 0.99) == [] and run(1000, 1000, 1.0) == []
    assert run(950, 1000, 0.99)[0].startswith("agreement: 0.9500 (95% upper bound 0.96")
    assert run(999, 1000, 1.0)[0].startswith("agreement: 0.9990")


def test_a_starved_load_generator_is_measured_again_but_a_failing_server_is_not():
    """A level with no request after the warm-up is measured once more only when the server answered every request it
    got (each user's first, then the load generator got no CPU); failures or requests cut off at the stop are
    verdicts on the server and stand."""
    from modelship.loadtests.runner import starved

    idle = {"locust_responses": 4, "requests": 0, "failures": 0, "failures_in_warmup": 0, "cancelled_at_stop": 0}
    assert starved(idle)
    assert not starved({**idle, "requests": 3})
    assert not starved({**idle, "failures_in_warmup": 1})
    assert not starved({**idle, "cancelled_at_stop": 4})  # hung requests: the server's
    assert not starved({**idle, "locust_responses": 0})
