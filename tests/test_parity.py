"""Parity gates that can fail: each weak case fails its gate with a message and passes with real data;
outputs are matched by name and shape; the user's own .npz data is used and recorded; a student is judged
against its teacher; the task comes from the checkpoint or --task, never from the output shape."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import cli, label_shifted
from modelship.errors import ArtifactError
from modelship.manifest import load_artifact, write_artifact
from modelship import data as datasets
from modelship.comparison import DEFAULT_TOLERANCES, record
from modelship.machine import kernel_facts
from modelship.runners import open_runner


@pytest.fixture(scope="module")
def regression_pt2(tmp_path_factory):
    """A torch.export regression model with one output column, [batch, 1], outputs of spread ~10."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(30.0)
    ep = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    path = tmp_path_factory.mktemp("reg") / "reg.pt2"
    torch.export.save(ep, path)
    return path


@pytest.fixture(scope="module")
def regression_onnx(regression_pt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("reg-onnx") / "onnx"
    cli("export", regression_pt2, "--out", out, check=0)
    return load_artifact(out)


@pytest.fixture(scope="module")
def outlier_onnx(tmp_path_factory):
    """A regression model whose hidden layer has one outlier channel (~1000, next to values of ~1) that does not
    reach the output: per-tensor INT8 activations give it the whole range, so the channels the output depends on
    round to a step or two. The error is in the quantized values themselves, not in how a CPU sums them: every
    INT8 kernel (saturating AVX2 u8s8, exact VNNI / AMX) computes the same wrong answer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(30.0)
        model[0].weight[0].zero_()
        model[0].bias[0] = 1000.0
        model[2].weight[0, 0] = 0.0
    ep = torch.export.export(model, (torch.randn(4, 16),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    folder = tmp_path_factory.mktemp("outlier")
    torch.export.save(ep, folder / "outlier.pt2")
    cli("export", folder / "outlier.pt2", "--out", folder / "onnx", check=0)
    return load_artifact(folder / "onnx")


def test_pt2_task_comes_from_the_checkpoint_not_the_output_shape(regression_onnx, regression_pt2, tmp_path):
    man = regression_onnx.manifest
    assert man.task == "regression" and man.outputs[0].shape == ["batch", 1] and man.labels is None
    assert man.parity["passed"] and man.parity["top1_agreement"] is None and not man.parity["weak"]
    # told it is a classifier, the one-column output is judged by argmax: weak, so the gate fails and says why
    p = cli("export", regression_pt2, "--task", "classification", "--out", tmp_path / "c", "--json", tmp_path / "c.json")
    assert p.returncode == 1 and "has one column" in p.stderr and "--task regression" in p.stderr
    assert json.loads((tmp_path / "c.json").read_text())["weak"]


def test_int8_of_a_regression_model_is_judged_by_its_output_difference(outlier_onnx, regression_onnx, tmp_path,
                                                                      int8_kernels):
    """Argmax over one column would call any INT8 variant perfect; its outputs' difference is judged instead. The
    failing case is built to fail on every INT8 kernel (see outlier_onnx), the weak ones depend on the reference
    and the data only."""
    p = cli("quantize", outlier_onnx.path, "--mode", "dynamic", "--out", tmp_path / "q", "--json", tmp_path / "q.json")
    rec = json.loads((tmp_path / "q.json").read_text())
    po = next(iter(rec["per_output"].values()))
    assert rec["top1_agreement"] is None and not rec["weak"] and rec["kind"] == "parity"
    assert p.returncode == 1 and "moved by max_abs_diff" in p.stderr and po["violations"] > 0
    std = np.std(np.asarray(open_runner(load_artifact(outlier_onnx.path)).infer(
        datasets.load(outlier_onnx.manifest.data, "test", outlier_onnx.manifest.inputs)[0])["logits"]))
    assert po["cap"] == pytest.approx(0.5 * std, rel=1e-3) and po["max_abs_diff"] > 2 * po["cap"]  # by far
    assert rec["judged_on"]["int8"] == ("exact" if int8_kernels == "exact" else kernel_facts()["int8"])
    # a tolerance wider than the outputs' spread cannot tell a good INT8 model from a constant: weak
    p = cli("quantize", regression_onnx.path, "--mode", "dynamic", "--out", tmp_path / "q3", "--max-abs-diff", "1000")
    assert p.returncode == 1 and "spread over the data" in p.stderr and "--allow-weak-parity" in p.stderr
    cli("quantize", regression_onnx.path, "--mode", "dynamic", "--out", tmp_path / "q4", "--max-abs-diff", "1000",
        "--allow-weak-parity", check=0)
    assert load_artifact(tmp_path / "q4").manifest.parity["allow_weak"] is True


def _npz(path, feed, labels=None):
    np.savez(path, **feed, **({"labels": labels} if labels is not None else {}))
    return path


def test_one_class_data_is_weak_and_real_data_passes(tmp_path, cnn, cnn_int8):
    feed, y = datasets.load({"name": "digits"}, "test", cnn_int8.manifest.inputs)
    threes = _npz(tmp_path / "threes.npz", {"pixels": feed["pixels"][y == 3]}, y[y == 3])
    p = cli("parity", cnn.path, cnn_int8.path, "--data", threes, "--json", tmp_path / "p.json")
    assert p.returncode == 1 and "predicts class 3 for every one" in p.stderr
    rec = json.loads((tmp_path / "p.json").read_text())
    assert rec["data"]["name"] == "npz" and len(rec["data"]["sha256"]) == 64 and rec["samples"] == int((y == 3).sum())
    everything = _npz(tmp_path / "all.npz", feed, y)
    cli("parity", cnn.path, cnn_int8.path, "--data", everything, "--json", tmp_path / "p2.json", check=0)
    rec = json.loads((tmp_path / "p2.json").read_text())
    assert rec["passed"] and not rec["weak"] and rec["accuracy"] >= 0.97


def test_student_is_judged_against_its_teacher(tmp_path, cnn, student):
    assert student.resolve(student.manifest.reference) == cnn.path
    rec = student.manifest.parity
    assert rec["reference"] == str(cnn.path) and 0.95 <= rec["top1_agreement"] < 1.0 and rec["accuracy"] >= 0.96
    cli("export", student.path, "--out", tmp_path / "s-onnx", check=0)
    exported = load_artifact(tmp_path / "s-onnx").manifest.parity
    assert exported["reference"] == str(cnn.path) and exported["top1_agreement"] < 1.0  # vs the teacher
    assert exported["conversion"]["passed"] and exported["conversion"]["max_abs_diff"] < 1e-4  # vs the student
    # judged on generated inputs without labels, agreement with the teacher says little: weak
    shutil.copytree(student.path, tmp_path / "r")
    art = load_artifact(tmp_path / "r")
    art.manifest.reference = str(cnn.path)  # the copy sits elsewhere: name its teacher by absolute path
    art.manifest.data = {"name": "random", "samples": 64}
    write_artifact(art.path, art.manifest)
    p = cli("parity", cnn.path, tmp_path / "r", "--min-agreement", "0")
    assert p.returncode == 1 and "generated inputs without labels" in p.stderr
    feed, y = datasets.load({"name": "digits"}, "test", art.manifest.inputs)
    cli("parity", cnn.path, tmp_path / "r", "--data", _npz(tmp_path / "d.npz", feed, y), check=0)


def test_every_variant_of_a_student_is_also_judged_against_the_student(tmp_path, cnn, student, int8_kernels):
    """The student's INT8 carries a `conversion` record against the student at INT8's own tolerance, as its export
    does at FP32's: a label-shifted INT8 of the student fails it, whatever the student tolerance says."""
    cli("export", student.path, "--out", tmp_path / "s-onnx", check=0)
    cli("quantize", tmp_path / "s-onnx", "--mode", "dynamic", "--out", tmp_path / "s-int8", check=0)
    rec = load_artifact(tmp_path / "s-int8").manifest.parity
    assert rec["reference"] == str(cnn.path) and rec["tolerance"]["min_top1_agreement"] == 0.95  # vs the teacher
    conv = rec["conversion"]
    assert conv["passed"] and conv["reference"] == str(student.path) and conv["tolerance"]["min_top1_agreement"] == 0.99
    shifted = label_shifted(tmp_path / "s-onnx", tmp_path / "shifted").path  # every label moves
    p = cli("quantize", shifted, "--mode", "dynamic", "--out", tmp_path / "bad-int8")
    rec = load_artifact(tmp_path / "bad-int8").manifest.parity
    assert p.returncode == 1 and not rec["conversion"]["passed"] and rec["kind"] == "parity"
    assert any(f.startswith(f"conversion from {student.path}: output 'logits' top-1 agreement") for f in rec["failures"])


def test_archive_refuses_a_student_that_failed_its_gate(tmp_path, cnn):
    from modelship.serving.archive import archive

    p = cli("distill", cnn.path, "--out", tmp_path / "s", "--epochs", "1", "--max-accuracy-drop", "0")
    assert p.returncode == 1
    with pytest.raises(ArtifactError, match="failed passed parity record"):
        archive(load_artifact(tmp_path / "s"), tmp_path / "store")
    assert archive(load_artifact(tmp_path / "s"), tmp_path / "store", force=True).is_file()
    assert archive(cnn, tmp_path / "store").is_file()  # a root PyTorch model has nothing to be judged against


class _Fake:
    """A runner stand-in for the comparator's own cases (outputs given directly)."""

    def __init__(self, art):
        self.manifest, self.artifact, self.backend, self.device = art.manifest, art, "onnxruntime", "cpu"
        self.provider = "CPUExecutionProvider"


def test_comparator_matches_names_and_checks_shapes(cnn_onnx):
    tol = DEFAULT_TOLERANCES["fp32"]
    ref = {"logits": np.eye(10, dtype=np.float32)[np.arange(20) % 10] * 5}
    fake = _Fake(cnn_onnx)
    assert record(ref, {"logits": ref["logits"].copy()}, None, fake, tol, "ref")["passed"]
    missing = record(ref, {}, None, fake, tol, "ref")
    assert not missing["passed"] and "output 'logits' is missing from the candidate" in missing["failures"][0]
    shape = record(ref, {"logits": ref["logits"][:, :9]}, None, fake, tol, "ref")
    assert not shape["passed"] and "shape [20, 9], reference [20, 10]" in shape["failures"][0]
    extra = record(ref, {"logits": ref["logits"], "scores": ref["logits"]}, None, fake, tol, "ref")
    assert not extra["passed"] and "'scores' from the candidate is not in the manifest" in extra["failures"][0]
    per = tol.override(per_output={"logits": {"atol": 0.5}})
    moved = {"logits": ref["logits"] + 0.25}
    assert not record(ref, moved, None, fake, tol, "ref")["passed"] and record(ref, moved, None, fake, per, "ref")["passed"]
    rel = tol.override(rtol=0.1)
    scaled = {"logits": ref["logits"] * 1.05}
    assert record(ref, scaled, None, fake, rel, "ref")["passed"] and not record(ref, scaled, None, fake, tol, "ref")["passed"]


def test_nothing_judged_is_weak(regression_onnx):
    ref = {"output": np.linspace(0, 10, 32, dtype=np.float32)[:, None]}
    name = regression_onnx.manifest.outputs[0].name
    ref = {name: ref["output"]}
    rec = record(ref, dict(ref), None, _Fake(regression_onnx), DEFAULT_TOLERANCES["student"], "ref")
    assert not rec["passed"] and "nothing is judged" in rec["failures"][0]


def test_runner_fetches_outputs_by_name(tmp_path, cnn_onnx):
    d = tmp_path / "a"
    shutil.copytree(cnn_onnx.path, d)
    art = load_artifact(d)
    art.manifest.outputs[0].name = "scores"
    write_artifact(d, art.manifest)
    with pytest.raises(ArtifactError, match="no output\\(s\\) scores named in the manifest"):
        open_runner(load_artifact(d))


def test_user_npz_is_recorded_and_checked(tmp_path, cnn):
    _, module = __import__("modelship.models.checkpoints", fromlist=["open_source"]).open_source(cnn.path)
    ep = torch.export.export(module, (torch.randn(4, 1, 8, 8),),
                             dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(ep, tmp_path / "cnn.pt2")
    feed, y = datasets.load({"name": "digits"}, "test", cnn.manifest.inputs)
    data = _npz(tmp_path / "mine.npz", {"pixels": feed["pixels"][:100]}, y[:100])
    cli("export", tmp_path / "cnn.pt2", "--task", "classification", "--data", data, "--out", tmp_path / "o",
        "--json", tmp_path / "o.json", check=0)
    rec = json.loads((tmp_path / "o.json").read_text())
    assert rec["samples"] == 100 and rec["accuracy"] >= 0.95 and rec["data"]["path"] == str(data.resolve())
    cli("quantize", tmp_path / "o", "--mode", "static", "--out", tmp_path / "q", check=0)
    assert load_artifact(tmp_path / "q").manifest.extra["calibration_samples"] == 100  # calibrated on the user's data
    _npz(data, {"pixels": feed["pixels"][:50]}, y[:50])  # the file changes after it was recorded
    p = cli("parity", tmp_path / "cnn.pt2", tmp_path / "o")
    assert p.returncode != 0 and "sha256 differs from the one recorded" in p.stderr
    np.savez(tmp_path / "bad.npz", image=feed["pixels"][:5])
    p = cli("parity", cnn.path, tmp_path / "q", "--data", tmp_path / "bad.npz")
    assert p.returncode != 0 and "no array for input(s) pixels" in p.stderr


def test_fp16_io_end_to_end(tmp_path, cnn_onnx):
    """--fp16-io: the manifest says float16, parity feeds float16, the REST codec decodes and answers it."""
    from modelship.serving.codec import Codec, softmax

    cli("quantize", cnn_onnx.path, "--mode", "fp16", "--fp16-io", "--out", tmp_path / "h", check=0)
    art = load_artifact(tmp_path / "h")
    assert art.manifest.inputs[0].dtype == "float16" and art.manifest.outputs[0].dtype == "float16"
    assert art.manifest.parity["passed"] and art.manifest.parity["max_abs_diff"] < 0.05
    codec, runner = Codec(art.manifest), open_runner(art)
    x = np.random.default_rng(0).random((1, 8, 8)).astype(np.float32)
    req = codec.decode(json.dumps({"inputs": x.tolist()}))
    assert req.feed["pixels"].dtype == np.float16
    answer = codec.encode(req, runner.infer(req.feed))
    want = softmax(open_runner(cnn_onnx).infer({"pixels": x[None]})["logits"])[0]
    np.testing.assert_allclose(answer["probabilities"], want, atol=0.05)
