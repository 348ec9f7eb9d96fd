"""Attack the verifier: the wrong candidates a real pipeline produces (tests/adversaries.py) against every gate.
Each must be refused with its own kind and a message a user can act on; the good candidate must pass them all.
Parity here (in seconds); the served gates (load test, shadow, promote) and pytest --modelship share one server in
the module below them."""

import json

import numpy as np
import pytest
import torch

import adversaries
from conftest import cli
from modelship.manifest import load_artifact


# what each wrong candidate's parity failure says (a user reads it to know what broke)
PARITY_SAYS = {
    "nan": "answers NaN or inf where the reference is finite",
    "inf": "answers NaN or inf where the reference is finite",
    "label_shift": "top-1 agreement",
    "constant": "top-1 agreement",
    "truncated": "moved by max_abs_diff",
    "batch1_only": "top-1 agreement",
}


@pytest.fixture(scope="module")
def wrong(cnn_onnx, tmp_path_factory):
    return adversaries.zoo(cnn_onnx, tmp_path_factory.mktemp("adversaries"))


@pytest.mark.parametrize("kind", adversaries.ZOO)
def test_parity_refuses_every_wrong_candidate(kind, cnn, cnn_onnx, wrong, tmp_path):
    cand = wrong[kind]
    assert cand.manifest.parity["passed"]  # it claims its source's verdict: only the answers can refuse it
    p = cli("parity", cnn.path, cand.path, "--json", tmp_path / "p.json")
    rec = json.loads((tmp_path / "p.json").read_text())
    assert p.returncode == 1 and rec["kind"] == "parity" and not rec["passed"], p.stdout + p.stderr
    assert any(PARITY_SAYS[kind] in f for f in rec["failures"]), rec["failures"]
    assert rec["max_abs_diff"] is not None and not np.isnan(rec["max_abs_diff"])


def test_the_good_candidate_passes_parity(cnn, cnn_onnx, tmp_path):
    cli("parity", cnn.path, cnn_onnx.path, "--json", tmp_path / "p.json", check=0)


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory):
    """A torch.export regression model with two outputs of one shape ([batch, 3]: a location and a scale), exported
    to ONNX, and evaluation data for it (.npz)."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh())
            self.loc, self.scale = torch.nn.Linear(16, 3), torch.nn.Linear(16, 3)

        def forward(self, x):
            h = self.body(x)
            return self.loc(h) * 4.0, torch.nn.functional.softplus(self.scale(h)) + 1.0

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("two")
    ep = torch.export.export(Head().eval(), (torch.randn(4, 8),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(ep, folder / "head.pt2")
    np.savez(folder / "data.npz", x=np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32))
    cli("export", folder / "head.pt2", "--out", folder / "onnx", "--data", folder / "data.npz",
        "--output-names", "loc,scale", check=0)
    return folder


def test_swapped_outputs_and_nan_of_a_regression_model_fail_parity(two_outputs, tmp_path):
    """The issue's case: an ONNX regression model made elsewhere answers NaN on some rows; and a model whose two
    outputs of one shape come back in each other's place. Both are judged output by output, by name."""
    good = load_artifact(two_outputs / "onnx")
    src, data = two_outputs / "head.pt2", two_outputs / "data.npz"
    cli("parity", src, good.path, "--data", data, check=0)
    for kind, says in (("swapped", "output 'loc' moved by"), ("nan", "output 'loc' answers NaN or inf")):
        cand = adversaries.make(kind, good, tmp_path / kind)
        p = cli("parity", src, cand.path, "--data", data, "--json", tmp_path / f"{kind}.json")
        rec = json.loads((tmp_path / f"{kind}.json").read_text())
        assert p.returncode == 1 and rec["kind"] == "parity" and says in " ".join(rec["failures"]), rec["failures"]
        assert "passed yes" not in p.stdout
    nan = json.loads((tmp_path / "nan.json").read_text())
    assert nan["max_abs_diff"] == float("inf") and nan["per_output"]["loc"]["nonfinite"] > 0
    assert "of 256 rows" in " ".join(nan["failures"])
