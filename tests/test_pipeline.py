"""The one-command pipeline on the built-in model, with its report (short load tests)."""

import json

import pytest

from conftest import cli_process as cli, files_holding

pytestmark = pytest.mark.serve


def test_pipeline_report(tmp_path):
    cli("pipeline", "--out", tmp_path / "demo", "--loadtest-seconds", "3", "--no-text", "--tune-minutes", "0.75",
        "--json", tmp_path / "p.json", check=0)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["passed"] and not report["failed_steps"]
    variants = {r["variant"]: r for r in report["variants"]}
    assert set(variants) == {"torch", "onnx", "int8-dynamic", "int8-static", "fp16", "student"}
    assert variants["torch"]["parity_passed"] == "root"  # the reference itself: nothing judged it, so no "pass"
    for key, r in variants.items():  # every served answer judged against the original PyTorch model
        assert r["loadtest_passed"] and r["served_p50_ms"] > 0 and r["served_max_abs_diff"] is not None
        assert r["reference"] == "digits-cnn-torch" and not r["weak"]
        # the gate judges agreement on its 95 % upper bound (a 3 s sample of a few dozen answers of a busy CI machine:
        # one INT8 flip among 50 reads 0.98); FP32 variants may differ on no label at all
        lt = report["loadtests"][key]
        assert lt["agreement_upper_95"] >= lt["tolerance"]["min_top1_agreement"] and r["served_agreement"] >= 0.95
    for key in ("torch", "onnx"):
        assert variants[key]["served_agreement"] == 1.0
    assert variants["onnx"]["served_max_abs_diff"] < 1e-4
    assert variants["student"]["served_agreement"] < 1.0  # the student is judged against its teacher, not itself
    assert variants["int8-static"]["size_mb"] < 0.4 * variants["onnx"]["size_mb"]
    best = report["fastest_within_budget"]
    assert best and best["variant"] in variants
    # the recommendation: modelship tune's winner among the served variants, with its configuration
    rec = report["recommendation"]
    tuned = json.loads((tmp_path / "demo" / "tune" / "tune.json").read_text())
    assert rec and rec["variant"] == tuned["best"]["config"]["variant"] and rec["p95_ms"] <= rec["slo_p95_ms"]
    assert {t["config"]["variant"] for t in tuned["trials"]} <= {f"digits-cnn-{k}" for k in variants}
    assert len({t["config"]["variant"] for t in tuned["trials"]}) <= 2  # the two with the most requests/s
    assert (tmp_path / "demo" / "tune" / "model-store" / f"{rec['variant']}.mar").is_file()
    # no secret outside serve.json / key_file.json: neither the pipeline's server's tokens nor tune's
    keys = [json.loads((tmp_path / "demo" / state / "key_file.json").read_text()) for state in ("serve-state", "tune/state")]
    tokens = [k[kind]["key"] for k in keys for kind in ("inference", "management", "API")]
    assert files_holding(tokens, tmp_path) == []
    html = (tmp_path / "demo" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and rec["variant"] in html and "Recommended" in html
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "| variant |" in md and "latency_vs_accuracy.png" in md and "served max \\|Δ\\|" in md
    assert (tmp_path / "demo" / "latency_histograms.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the report at a glance


@pytest.mark.slow  # the built-in text model (cached weights), its ONNX, INT8 and student, load-tested: minutes more
def test_pipeline_serves_the_text_model_with_raw_text(tmp_path):
    cli("pipeline", "--out", tmp_path / "demo", "--loadtest-seconds", "3", "--tune-minutes", "0",
        "--variants", "int8-dynamic", check=0, timeout=1800)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["variants"]}
    for key in ("text-onnx", "text-int8", "text-student"):  # every served answer to a raw review judged
        r = rows[key]
        assert r["loadtest_passed"] and r["served_p50_ms"] > 0 and r["parity_passed"] is True
        assert report["loadtests"][key]["data"]["name"] == "rottentomatoes"  # raw reviews were sent
    # the text INT8 keeps each answer at any batch (per-row activations): served with batching like the others;
    # the digits' per-tensor dynamic INT8 does not, and is served one request at a time
    assert rows["text-int8"]["same_at_any_batch"] is True and rows["int8-dynamic"]["same_at_any_batch"] is False
    archived = next(s for s in report["steps"] if s["name"] == "archive")["detail"]["batch_size_1"]
    assert [n for n in archived if "int8" in n] == [n for n in archived if n.endswith("int8-dynamic")] != []
    assert rows["text-onnx"]["reference"] == "reviews-text-torch" and rows["text-onnx"]["served_agreement"] == 1.0
    assert rows["text-torch"]["accuracy"] > rows["text-torch"]["majority_baseline"] + 0.15
    assert rows["text-int8"]["top1_agreement"] >= 0.99  # its gate, on the 1350 held-out reviews
    assert rows["text-student"]["accuracy"] >= 0.97 * rows["text-torch"]["accuracy"]
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "Text model" in md and "Ship text-" in md and "student accuracy" in md


def _users_model_run(tmp_path, source, data, *extra):
    p = cli("pipeline", source, "--data", data, "--out", tmp_path / "run", "--loadtest-seconds", "3",
            "--tune-minutes", "0", *extra)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    return p, report, {r["variant"]: r for r in report["variants"]}


def test_pipeline_runs_on_the_users_text_model_with_its_own_data(tmp_path):
    """A user's Hugging Face BERT folder and a CSV of text,label: imported with its tokenizer, exported, served,
    and load-tested with the raw texts of the CSV, every answer judged against the user's PyTorch model."""
    import hf_models

    model = hf_models.fine_tune(hf_models.text_classifier(tmp_path / "my-bert", "bert"))
    csv = hf_models.write_reviews_csv(tmp_path / "reviews.csv")
    p, report, rows = _users_model_run(tmp_path, model, csv, "--variants", "fp16")
    assert p.returncode == 0, p.stderr
    assert report["model"] == "my-bert" and set(rows) == {"torch", "onnx", "fp16"}
    imported = report["steps"][0]
    assert imported["name"] == "import" and imported["detail"]["loader"] == "hf"
    assert imported["detail"]["preprocess"] == "text" and imported["detail"]["data"]["path"] == str(csv)
    for key, r in rows.items():
        lt = report["loadtests"][key]
        assert lt["data"]["name"] == "text" and lt["checked"] == lt["requests"] > 0  # raw texts, each judged
        assert r["reference"] == "my-bert-torch" and r["served_agreement"] == 1.0 and r["loadtest_passed"]
    assert rows["torch"]["accuracy"] == rows["onnx"]["accuracy"] is not None  # measured on the CSV's labels
    assert json.loads((tmp_path / "run" / "loadtests" / "onnx" / "bodies.json").read_text())[0].startswith('{"inputs": "')
    assert (tmp_path / "run" / "model-store" / "my-bert-torch.mar").is_file()  # the PyTorch model served as well


def test_pipeline_on_the_users_image_model_refuses_a_variant_its_data_cannot_judge(tmp_path):
    """A random ViT and an ImageFolder whose every image is the same picture: the images are served and checked; the
    FP16 variant is judged by its difference, with a bound scaled to the logits' tiny margins, and served; the INT8
    variant, judged by agreement, cannot be: the reference gives one class for every image (weak evidence, whatever
    the CPU), so the run fails, says why, and never serves that variant."""
    import hf_models

    model = hf_models.image_classifier(tmp_path / "vit")
    images = hf_models.image_folder(tmp_path / "images")
    first = next(images.rglob("*.png")).read_bytes()
    for f in images.rglob("*.png"):
        f.write_bytes(first)
    p, report, rows = _users_model_run(tmp_path, model, images, "--variants", "fp16,int8-dynamic")
    assert p.returncode == 1 and report["failed_steps"] == ["quantize dynamic"]
    said = " ".join(p.stderr.split())  # the console wraps its lines where the tmp path's length puts the breaks
    assert "weak evidence" in said and "for every one of the 24 samples" in said
    assert set(report["loadtests"]) == {"torch", "onnx", "fp16"}
    assert not (tmp_path / "run" / "model-store" / "vit-int8-dynamic.mar").exists()
    fp16 = rows["fp16"]
    assert fp16["parity_passed"] is True and fp16["loadtest_passed"]
    for key in ("torch", "onnx", "fp16"):
        lt = report["loadtests"][key]
        assert lt["passed"] and lt["data"]["name"] == "images" and lt["checked"] == lt["requests"] > 0
    import base64

    body = json.loads((tmp_path / "run" / "loadtests" / "onnx" / "bodies.json").read_text())[0]
    assert base64.b64decode(body).startswith(b"\x89PNG")  # the images themselves were sent, as image/png


def test_pipeline_refuses_an_unknown_variant_or_a_missing_source(tmp_path):
    from conftest import cli as in_process

    p = in_process("pipeline", "--variants", "fp16,int4", "--out", tmp_path / "run")
    assert p.returncode == 2 and "unknown int4" in p.stderr and "int8-dynamic" in p.stderr
    p = in_process("pipeline", tmp_path / "nothing-here", "--out", tmp_path / "run")
    assert p.returncode == 2 and "no such file or directory" in p.stderr
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_text_advice_names_the_variant_to_ship_for_an_slo():
    """The report's text recommendation: the most accurate text variant, and the fastest that keeps 97 % of the
    PyTorch model's accuracy for a tighter SLO; a variant below that, or whose load test failed, is never named."""
    from modelship.report import text_advice

    def row(variant, acc, p95, passed=True):
        return {"variant": variant, "model": "text", "accuracy": acc, "served_p95_ms": p95, "loadtest_passed": passed}

    rows = [row("text-torch", 0.814, 60.0), row("text-onnx", 0.814, 40.0), row("text-int8", 0.812, 30.0),
            row("text-student", 0.80, 15.0), {"variant": "onnx", "model": "digits-cnn", "accuracy": 0.99,
                                              "served_p95_ms": 2.0, "loadtest_passed": True}]
    advice = text_advice(rows)
    assert advice.startswith("Ship text-onnx (accuracy 0.8140") and "text-student (accuracy 0.8000" in advice
    rows[3]["accuracy"] = 0.78  # below 97 % of 0.814: the INT8 is then the fastest to name
    assert "text-int8 (accuracy 0.8120" in text_advice(rows) and "text-student" not in text_advice(rows)
    rows[2]["loadtest_passed"] = False
    assert "text-int8" not in text_advice(rows)
    assert text_advice([row("text-torch", 0.8, 10.0)]).endswith("also the most accurate.")
