"""Tolerances that fit real models, not only the digits CNN: INT8 and FP16 bounds scale with each output's own
spread on the data (a classifier's median top-1 margin, any other output's standard deviation), so a multi-head
regression model with heads of spread 0.1-0.5 and a 1000-class classifier with margins of a few tenths get a real
verdict (pass or fail, with the number) where the fixed defaults only ever called the evidence weak. Output names
come from the program. The bounds asserted here hold on any CPU: they depend on the reference and the data only,
and a failure is asserted only where its cause is built in."""

import json

import numpy as np
import pytest
import torch

from conftest import cli
from modelship.manifest import load_artifact
from modelship.comparison import DEFAULT_TOLERANCES


class Heads(torch.nn.Module):
    """A face-detector-like model: a shared trunk and three heads returned by name (box [B,4], landmarks [B,10],
    face probability [B,2]), each of a small spread."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU())
        self.box, self.landmarks, self.face = torch.nn.Linear(48, 4), torch.nn.Linear(48, 10), torch.nn.Linear(48, 2)

    def forward(self, x):
        h = self.trunk(x)
        return {"box": torch.sigmoid(2 * self.box(h)), "landmarks": 0.6 * torch.tanh(self.landmarks(h)),
                "face": torch.softmax(0.3 * self.face(h), -1)}


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("heads")
    ep = torch.export.export(Heads().eval(), (torch.randn(4, 24),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, folder / "heads.pt2")
    np.savez(folder / "data.npz", x=np.random.default_rng(0).standard_normal((256, 24)).astype(np.float32))
    return folder


def test_output_names_come_from_the_program(heads, tmp_path):
    cli("export", heads / "heads.pt2", "--data", heads / "data.npz", "--out", tmp_path / "o", check=0)
    man = load_artifact(tmp_path / "o").manifest
    assert [t.name for t in man.outputs] == ["box", "landmarks", "face"]
    assert [t.shape for t in man.outputs] == [["batch", 4], ["batch", 10], ["batch", 2]]
    assert man.parity["passed"] and set(man.parity["per_output"]) == {"box", "landmarks", "face"}
    cli("export", heads / "heads.pt2", "--data", heads / "data.npz", "--output-names", "b,l,f", "--out",
        tmp_path / "r", check=0)
    assert [t.name for t in load_artifact(tmp_path / "r").manifest.outputs] == ["b", "l", "f"]
    p = cli("export", heads / "heads.pt2", "--output-names", "a,b", "--out", tmp_path / "bad")
    assert p.returncode == 2 and "the model has 3 output(s) (box, landmarks, face)" in p.stderr


@pytest.mark.parametrize("mode", ["dynamic", "fp16"])
def test_a_multi_head_regression_model_gets_a_verdict(heads, tmp_path, mode, int8_kernels):
    cli("export", heads / "heads.pt2", "--data", heads / "data.npz", "--out", tmp_path / "o", check=0)
    p = cli("quantize", tmp_path / "o", "--mode", mode, "--out", tmp_path / "q", "--json", tmp_path / "q.json")
    rec = json.loads((tmp_path / "q.json").read_text())
    assert rec["weak"] == [] and "weak evidence" not in p.stderr  # the fixed defaults called all three weak
    default = DEFAULT_TOLERANCES["int8" if mode == "dynamic" else "fp16"]
    for name, po in rec["per_output"].items():
        bound = rec["tolerance"]["per_output"][name]
        assert bound["spread_of"] == "std" and po["cap"] == pytest.approx(default.spread_fraction * bound["spread"])
        assert po["cap"] < default.max_abs_diff  # never looser than the precision's own bound
        assert 0.01 < bound["spread"] < 0.5 and po["cap"] < bound["spread"]
    verdict = "passed" if rec["passed"] else "failed"  # a verdict either way: with the number when it fails
    assert (p.returncode == 0) == rec["passed"], f"{verdict}: {p.stderr}"
    if not rec["passed"]:
        assert rec["kind"] == "parity" and "moved by max_abs_diff" in p.stderr
    # the fixed default judged against the same outputs: every head's spread is below it, so nothing was judged
    p = cli("quantize", tmp_path / "o", "--mode", mode, "--out", tmp_path / "q2", "--max-abs-diff",
            str(default.max_abs_diff))
    assert p.returncode == 1 and "weak evidence" in p.stderr and "its spread over the data" in p.stderr


class ManyClasses(torch.nn.Module):
    """1000 classes whose top two logits sit a few tenths apart, like an ImageNet model on photo crops."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1000))

    def forward(self, x):
        return 5 * self.net(x)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("many")
    model = ManyClasses().eval()
    x = torch.randn(400, 32)
    with torch.no_grad():
        labels = model(x).argmax(-1).numpy()  # real labels would do; these keep the reference's accuracy at 1.0
    ep = torch.export.export(model, (x[:4],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, folder / "many.pt2")
    np.savez(folder / "data.npz", x=x.numpy(), labels=labels)
    return folder


def test_a_classifier_with_small_margins_gets_a_verdict(many, tmp_path, int8_kernels):
    cli("export", many / "many.pt2", "--task", "classification", "--data", many / "data.npz", "--out", tmp_path / "o",
        check=0)
    p = cli("quantize", tmp_path / "o", "--mode", "dynamic", "--out", tmp_path / "q", "--json", tmp_path / "q.json")
    rec = json.loads((tmp_path / "q.json").read_text())
    bound = rec["tolerance"]["per_output"]["logits"]
    assert bound["spread_of"] == "median top-1 margin" and 0.05 < bound["spread"] < 1.0
    assert rec["per_output"]["logits"]["cap"] == pytest.approx(0.5 * bound["spread"]) and rec["weak"] == []
    assert rec["top1_agreement"] is not None and (p.returncode == 0) == rec["passed"]
    if not rec["passed"]:  # a real verdict: what moved and by how much
        assert rec["kind"] == "parity" and ("moved by max_abs_diff" in p.stderr or "agreement" in p.stderr)
    # today's fixed INT8 bound (2.0) on the same logits: margins below it, so the gate could never judge
    p = cli("quantize", tmp_path / "o", "--mode", "dynamic", "--out", tmp_path / "q2", "--max-abs-diff", "2.0")
    assert p.returncode == 1 and "median top-1 logit margin" in p.stderr and "weak evidence" in p.stderr


def test_a_broken_int8_of_a_small_margin_classifier_fails_with_the_number(many, tmp_path):
    """A variant whose logits all moved by 0.6 of the median margin: within the old 2.0 bound, beyond the scaled one."""
    from modelship.comparison import record, tolerance_of
    from modelship.runners import open_runner

    cli("export", many / "many.pt2", "--task", "classification", "--data", many / "data.npz", "--out", tmp_path / "o",
        check=0)
    art = load_artifact(tmp_path / "o")
    art.manifest.precision = "int8"
    runner = open_runner(art)
    x = np.load(many / "data.npz")["x"]
    ref = {"logits": runner.infer({"x": x})["logits"]}
    srt = np.sort(ref["logits"], -1)
    margin = float(np.median(srt[:, -1] - srt[:, -2]))
    moved = {"logits": ref["logits"] + 0.6 * margin * np.sign(np.random.default_rng(0).standard_normal(ref["logits"].shape))}
    rec = record(ref, moved, np.load(many / "data.npz")["labels"], runner, tolerance_of(art.manifest), "ref")
    assert not rec["passed"] and rec["kind"] == "parity" and "moved by max_abs_diff" in rec["failures"][0]
    assert rec["per_output"]["logits"]["max_abs_diff"] == pytest.approx(0.6 * margin, rel=1e-3)
