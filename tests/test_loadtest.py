"""Real Locust against real TorchServe: every answer checked against the PyTorch reference, gates set
the exit code, distributed totals agree with per-worker sums. Each run is bounded to a few seconds."""

import json
import shutil

import pytest

from conftest import cli
from modelship.manifest import load_artifact, write_artifact

pytestmark = pytest.mark.serve


def test_correct_run_passes_gates(served, work, tmp_path):
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "4", "--duration", "6s",
            "--slo-p95-ms", "2000", "--out", tmp_path / "lt", "--json", tmp_path / "r.json", check=0)
    r = json.loads((tmp_path / "r.json").read_text())
    for key in ("requests", "failures", "rps", "p50_ms", "p95_ms", "p99_ms", "top1_agreement", "max_abs_diff", "slo",
                "passed"):
        assert key in r
    assert r["passed"] and r["requests"] > 50 and r["failures"] == 0
    assert r["checked"] == r["requests"] and r["mismatches"] == 0 and r["top1_agreement"] == 1.0
    assert r["max_abs_diff"] < 1e-5
    assert (tmp_path / "lt" / "locust_u4_stats.csv").is_file() and (tmp_path / "lt" / "locust_u4.html").is_file()
    assert "users" in p.stdout


def test_too_tight_slo_fails_latency_gate(served, work, tmp_path):
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "2", "--duration", "3s",
            "--slo-p95-ms", "0.01", "--out", tmp_path / "lt", "--json", tmp_path / "r.json")
    assert p.returncode == 1 and "latency: p95" in p.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert not r["passed"] and r["top1_agreement"] == 1.0


def test_wrong_model_fails_agreement_gate(served, work, tmp_path, cnn):
    """A served variant whose answers are shuffled: HTTP is fine, the agreement gate catches it."""
    wrong = tmp_path / "wrong-ref"
    shutil.copytree(cnn.path, wrong)
    import torch

    state = torch.load(wrong / "model.pt")
    last = [k for k in state if k.startswith("head.") and k.endswith("weight")][-1]
    bias = last.replace("weight", "bias")
    perm = torch.roll(torch.arange(10), 3)
    state[last], state[bias] = state[last][perm], state[bias][perm]  # labels shifted by 3
    torch.save(state, wrong / "model.pt")
    write_artifact(wrong, load_artifact(wrong, verify=False).manifest)
    p = cli("loadtest", "--state", work / "state", "--model", "cnn-onnx", "--users", "2", "--duration", "3s",
            "--reference", wrong, "--out", tmp_path / "lt", "--json", tmp_path / "r.json")
    assert p.returncode == 1 and "agreement:" in p.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["failures"] == 0 and r["mismatches"] > 0 and r["top1_agreement"] < 0.5
    assert r["mismatch_examples"]


def test_distributed_totals_match_worker_sums(served, work, tmp_path):
    cli("loadtest", "--state", work / "state", "--model", "cnn-int8", "--users", "4", "--duration", "5s",
        "--workers", "2", "--out", tmp_path / "lt", "--json", tmp_path / "r.json", check=0)
    r = json.loads((tmp_path / "r.json").read_text())
    assert len(r["per_worker"]) == 2
    assert r["requests"] == sum(w["responses"] for w in r["per_worker"].values()) == r["locust_responses"]
    assert r["checked"] == sum(w["checked"] for w in r["per_worker"].values())
    assert all(w["responses"] > 0 for w in r["per_worker"].values())
    assert r["passed"]


def test_concurrency_sweep(served, work, tmp_path):
    cli("loadtest", "--state", work / "state", "--model", "cnn-torch", "--users", "1,4", "--duration", "3s",
        "--out", tmp_path / "lt", "--json", tmp_path / "r.json", check=0)
    r = json.loads((tmp_path / "r.json").read_text())
    assert [lv["users"] for lv in r["levels"]] == [1, 4]
    assert all(lv["requests"] > 0 and lv["top1_agreement"] == 1.0 for lv in r["levels"])
