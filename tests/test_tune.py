"""``modelship tune`` against the real TorchServe with real Locust: a pruned search under a p95 SLO, every answer
checked; its winner written ready to serve; configurations rejected for the SLO and for wrong answers."""

import json
import shutil

import pytest
import yaml

from conftest import cli
from modelship.manifest import load_artifact, write_artifact

pytestmark = pytest.mark.serve
TRIAL_KEYS = {"config", "rps", "p50_ms", "p95_ms", "p99_ms", "agreement", "max_abs_diff", "passed", "reason"}


def test_tune_finds_a_configuration_inside_the_slo_and_its_winner_serves(tmp_path, cnn_onnx, cnn_int8):
    from modelship.loadtests.runner import loadtest
    from modelship.loadtests.summary import Gates
    from modelship.serving import config, lifecycle

    out = tmp_path / "t"
    p = cli("tune", cnn_onnx.path, cnn_int8.path, "--slo-p95-ms", "200", "--out", out, "--budget-minutes", "1.5",
            "--seconds", "2", "--batch-sizes", "1,8", "--batch-delays-ms", "2", "--max-users", "8",
            "--json", tmp_path / "t.json")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "t.json").read_text())
    assert {"best", "pareto", "trials"} <= set(r)
    assert len(r["trials"]) >= 2 and all(TRIAL_KEYS <= set(t) for t in r["trials"])
    assert {t["config"]["variant"] for t in r["trials"]} == {cnn_onnx.path.name, cnn_int8.path.name}
    for t in r["trials"]:
        assert t["checked"] > 0  # every configuration's answers were judged
        if t["passed"]:
            assert t["p95_ms"] <= 200 and t["reason"] is None and t["agreement"] >= 0.95  # INT8: judged on its 95 % bound
    best = r["best"]
    assert best["passed"] and best["rps"] == max(t["rps"] for t in r["trials"] if t["passed"])
    assert best["name"] in {t["name"] for t in r["pareto"]} and all(t["passed"] for t in r["pareto"])
    assert all(s["reason"].split(":")[0] in ("dominated", "oversubscribed", "budget") for s in r["skipped"])
    assert r["seconds"] <= 1.5 * 60 + 60  # the budget bounds the search (a level in flight may finish)
    assert (out / "pareto.png").stat().st_size > 5_000 and (out / "tune.json").is_file()
    assert best["name"] in p.stdout and "best:" in p.stdout

    # the winner: archived with its configuration, ready to serve; it passes its own load test
    c = best["config"]
    cfg = yaml.safe_load((out / "model-config.yaml").read_text())
    assert (cfg["batchSize"], cfg["minWorkers"], cfg["handler"]["threads"]) == (c["batch_size"], c["workers"], c["threads"])
    mar = out / "model-store" / f"{c['variant']}.mar"
    assert mar.is_file()
    info = lifecycle.start(out / "model-store", tmp_path / "state", config.ServeConfig(port=config.free_port()))
    try:
        assert info.models == [c["variant"]]
        run = loadtest(tmp_path / "state", c["variant"], tmp_path / "lt", users=(best["users"],), duration_s=3,
                       gates=Gates(slo_p95_ms=200))
        assert run["passed"], run["gate_failures"]
        assert run["checked"] > 0 and run["failures"] == 0
    finally:
        lifecycle.stop(tmp_path / "state")


def test_tune_rejects_wrong_answers_and_a_missed_slo_with_the_reason(tmp_path, cnn, cnn_onnx):
    """A variant whose served answers differ from its reference is dropped for parity; one that answers right but
    slower than the SLO is rejected for the SLO; with nothing left the command fails and says why."""
    import torch

    wrong_ref = tmp_path / "wrong-ref"
    shutil.copytree(cnn.path, wrong_ref)
    state = torch.load(wrong_ref / "model.pt")
    last = [k for k in state if k.startswith("head.") and k.endswith("weight")][-1]
    perm = torch.roll(torch.arange(10), 3)  # labels shifted by 3
    state[last], state[last.replace("weight", "bias")] = state[last][perm], state[last.replace("weight", "bias")][perm]
    torch.save(state, wrong_ref / "model.pt")
    write_artifact(wrong_ref, load_artifact(wrong_ref, verify=False).manifest)
    judged_wrongly = tmp_path / "judged-wrongly"  # the right ONNX model, its reference swapped for the wrong one
    shutil.copytree(cnn_onnx.path, judged_wrongly)
    art = load_artifact(judged_wrongly)
    art.manifest.reference = str(wrong_ref)
    write_artifact(judged_wrongly, art.manifest)

    p = cli("tune", judged_wrongly, cnn_onnx.path, "--slo-p95-ms", "0.01", "--out", tmp_path / "t",
            "--seconds", "2", "--workers", "1", "--threads", "1", "--batch-sizes", "1", "--json", tmp_path / "t.json")
    assert p.returncode == 1 and "no configuration met the SLO" in p.stderr and "Traceback" not in p.stderr
    r = json.loads((tmp_path / "t.json").read_text())
    reasons = {t["config"]["variant"]: t["reason"] for t in r["trials"]}
    assert reasons["judged-wrongly"].startswith("parity: ") and "agreement" in reasons["judged-wrongly"]
    assert reasons[cnn_onnx.path.name].startswith("SLO: ")
    assert r["best"] is None and r["pareto"] == [] and r["dropped_variants"] == ["judged-wrongly"]
    assert not (tmp_path / "t" / "model-store").exists()


def test_tune_refuses_what_it_cannot_search(tmp_path, cnn_onnx):
    p = cli("tune", tmp_path / "nothing", "--slo-p95-ms", "10", "--out", tmp_path / "t")
    assert p.returncode != 0 and "not found" in p.stderr and "Traceback" not in p.stderr
    p = cli("tune", cnn_onnx.path, "--slo-p95-ms", "10", "--out", tmp_path / "t", "--batch-sizes", "0,8")
    assert p.returncode != 0 and "--batch-sizes" in p.stderr
    p = cli("archive", cnn_onnx.path, "--out", tmp_path / "s", "--batch-size", "8", "--max-batch-delay-ms", "0")
    assert p.returncode != 0 and "100 ms default" in p.stderr
    failed = tmp_path / "failed-onnx"  # an artifact whose gate failed: refused before any server starts
    shutil.copytree(cnn_onnx.path, failed)
    art = load_artifact(failed)
    art.manifest.parity = {**art.manifest.parity, "passed": False, "failures": ["made to fail"]}
    write_artifact(failed, art.manifest)
    p = cli("tune", failed, "--slo-p95-ms", "10", "--out", tmp_path / "t2")
    assert p.returncode != 0 and "passed parity record (made to fail)" in p.stderr
    assert not (tmp_path / "t2" / "state").exists()


def test_archive_defaults_come_from_the_machine_and_the_model(tmp_path, monkeypatch, cnn_onnx):
    """Unset workers/threads: one single-threaded worker per core, at most 4 and as many as memory holds;
    OMP_NUM_THREADS caps the cores; what the user gives is kept and the rest fills the cores."""
    import os

    from modelship.serving import archive as ar

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert ar.fits_in_memory(cnn_onnx) >= 1
    assert ar.machine_defaults(cnn_onnx) == (4, 1)
    monkeypatch.setattr(ar, "fits_in_memory", lambda art: 2)  # a model whose workers fill memory sooner
    assert ar.machine_defaults(cnn_onnx) == (2, 1)
    assert ar.machine_defaults(cnn_onnx, workers=2) == (2, 4) and ar.machine_defaults(cnn_onnx, threads=2) == (4, 2)
    assert ar.machine_defaults(cnn_onnx, device="cuda") == (1, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert ar.machine_defaults(cnn_onnx) == (2, 1) and ar.machine_defaults(cnn_onnx, workers=1) == (1, 3)
    p = cli("archive", cnn_onnx.path, "--out", tmp_path / "s", "--json", tmp_path / "a.json")
    assert p.returncode == 0 and "(from this machine and model)" in p.stdout
    cfg = json.loads((tmp_path / "a.json").read_text())["config"]
    assert (cfg["minWorkers"], cfg["handler"]["threads"]) == (2, 1)
    p = cli("archive", cnn_onnx.path, "--out", tmp_path / "s", "--workers", "3", "--threads", "1",
            "--json", tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["config"]["minWorkers"] == 3 and "from this" not in p.stdout


def test_tune_takes_a_pipeline_runs_main_model_variants_that_passed(tmp_path, cnn_onnx, cnn_int8):
    from modelship.tuning import expand

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"model": "digits-cnn"}))
    shutil.copytree(cnn_onnx.path, run / "digits-cnn-onnx")
    shutil.copytree(cnn_int8.path, run / "digits-cnn-int8-static")
    shutil.copytree(cnn_onnx.path, run / "drugreview-text-onnx")  # another model of the run: not tuned with it
    failed = load_artifact(run / "digits-cnn-int8-static")
    failed.manifest.parity = {**failed.manifest.parity, "passed": False, "failures": ["made to fail"]}
    write_artifact(failed.path, failed.manifest)
    assert set(expand([run])) == {"digits-cnn-onnx"}
