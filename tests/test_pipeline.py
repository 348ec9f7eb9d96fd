"""The one-command pipeline on the built-in model, with its report (short load tests)."""

import json

import pytest

from conftest import cli_process as cli

pytestmark = pytest.mark.serve


def test_pipeline_report(tmp_path):
    cli("pipeline", "--out", tmp_path / "demo", "--loadtest-seconds", "3", "--no-text", "--json", tmp_path / "p.json", check=0)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["passed"] and not report["failed_steps"]
    variants = {r["variant"]: r for r in report["variants"]}
    assert set(variants) == {"torch", "onnx", "int8-dynamic", "int8-static", "fp16", "student"}
    for key, r in variants.items():  # every served answer judged against the original PyTorch model
        assert r["loadtest_passed"] and r["served_p50_ms"] > 0 and r["served_max_abs_diff"] is not None
        assert r["reference"] == "digits-cnn-torch" and not r["weak"]
        # the gate judged agreement on its 95 % upper bound; a 3 s sample of a few hundred answers may dip a little
        assert r["served_agreement"] >= (0.95 if key == "student" else 0.98)
    assert variants["onnx"]["served_agreement"] == 1.0 and variants["onnx"]["served_max_abs_diff"] < 1e-4
    assert variants["student"]["served_agreement"] < 1.0  # the student is judged against its teacher, not itself
    assert variants["int8-static"]["size_mb"] < 0.4 * variants["onnx"]["size_mb"]
    best = report["fastest_within_budget"]
    assert best and best["variant"] in variants
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and best["variant"] in html
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "| variant |" in md and "latency_vs_accuracy.png" in md and "served max \\|Δ\\|" in md
    assert (tmp_path / "demo" / "latency_histograms.png").stat().st_size > 10_000


@pytest.mark.slow  # trains the built-in text model (embeds ~860 reviews) and load-tests it: about 3 more minutes
def test_pipeline_serves_the_text_model_with_raw_text(tmp_path):
    cli("pipeline", "--out", tmp_path / "demo", "--loadtest-seconds", "3", check=0)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    text = rows["text-onnx"]
    assert text["reference"] == "drugreview-text-torch" and text["loadtest_passed"] and text["served_agreement"] == 1.0
    assert rows["text-torch"]["accuracy"] > rows["text-torch"]["majority_baseline"]
    assert report["loadtests"]["text-onnx"]["data"]["name"] == "drugreview"  # raw reviews were sent
    assert "Text model" in (tmp_path / "demo" / "report.md").read_text()
