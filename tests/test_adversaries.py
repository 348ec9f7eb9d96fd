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
    if kind == "batch1_only":  # the batch gate sees it too: right alone, moved inside a batch
        assert rec["batch"]["passed"] is False and "answers depend on what they are batched with" in \
            rec["batch"]["message"]


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


# ---- the served gates: one server, every wrong candidate -------------------------------------------------------------

# how each wrong candidate's served answers are refused: (the load test's or promote's message, shadow's mismatch kinds)
SERVED_SAYS = {
    "nan": ("non-finite", {"nonfinite"}),
    "inf": ("non-finite", {"nonfinite"}),
    "label_shift": ("agreement", {"label"}),
    "constant": ("agreement", {"label", "tolerance"}),  # where its one label is the right one: its probabilities
    "truncated": ("difference", {"label", "tolerance"}),
    "batch1_only": ("agreement", {"label", "tolerance"}),
}


@pytest.fixture(scope="module")
def zoo_server(wrong, cnn_onnx, tmp_path_factory):
    """One TorchServe (--allow-promote) serving 'good' (the digits ONNX model) and each wrong candidate under its
    kind's name, every request shadowed on the root PyTorch model and dynamic batching on (so requests arriving
    together share a batch, as in production)."""
    import modelship as ms
    from modelship.serving.config import free_port

    work = tmp_path_factory.mktemp("zoo-served")
    store = work / "store"
    opts = dict(workers=1, batch_size=8, max_batch_delay_ms=20, shadow_rate=1.0)
    ms.archive(cnn_onnx, store, name="good", **opts)
    for kind, cand in wrong.items():
        ms.archive(cand, store, name=kind, force=True, **opts)  # it claims a passed record; force in any case
    server = ms.serve(store, work / "state", allow_promote=True, port=free_port(), oip=False)
    yield {"server": server, "work": work, "opts": opts}
    server.stop()


def test_the_served_check_and_shadow_refuse_every_wrong_candidate(zoo_server):
    """A 4-user load test of each (every answer judged against the PyTorch model, requests batched together):
    refused with kind parity and its message; shadow counts the same answers as mismatches of their kind; the
    good model passes both."""
    from modelship.errors import ModelshipError

    server = zoo_server["server"]
    good = server.loadtest("good", users=4, duration="4s", out=zoo_server["work"] / "lt-good")
    assert good.passed and good.mismatches == 0, good.reason
    results = {}
    for kind in adversaries.ZOO:
        try:
            results[kind] = server.loadtest(kind, users=4, duration="4s", out=zoo_server["work"] / f"lt-{kind}")
        except ModelshipError as e:
            results[kind] = e
    for kind, r in results.items():
        assert not r.passed and r.kind == "parity", (kind, r.reason)
        assert SERVED_SAYS[kind][0] in r.reason, (kind, r.reason)
    metrics = settled(server, ["good", *adversaries.ZOO])
    assert mismatches(metrics, "good") == {}
    for kind in adversaries.ZOO:
        found = mismatches(metrics, kind)
        assert found and set(found) <= SERVED_SAYS[kind][1], (kind, found)


def test_promote_refuses_every_wrong_candidate_and_takes_the_good_one(zoo_server, wrong, cnn_onnx, tmp_path):
    import modelship as ms
    from modelship.errors import GateError
    from modelship.promotion import versions

    server = zoo_server["server"]
    for kind, cand in wrong.items():
        mar = ms.archive(cand, tmp_path / kind, name="good", version="2.0", force=True, **zoo_server["opts"])
        with pytest.raises(GateError) as refused:
            server.promote("good", mar, samples=40, live=0)
        result = refused.value.result
        assert refused.value.kind == "parity" and result.decision == "refused", kind
        assert SERVED_SAYS[kind][0] in str(refused.value), (kind, str(refused.value))
        assert versions(server.info, "good") == (["1.0"], "1.0"), kind  # withdrawn; 1.0 answers every client
    good = ms.archive(cnn_onnx, tmp_path / "good", name="good", version="2.0", **zoo_server["opts"])
    r = server.promote("good", good, samples=40, live=0)
    assert r.decision == "promoted" and r.burst == 32 and r.agreement == 1.0  # 16 at once, 16 in one request


def scrape_shadow(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(server.metrics()) for s in fam.samples}


def mismatches(metrics: dict, model: str) -> dict:
    """{kind: count > 0} of the shadow's mismatches for ``model``."""
    out = {}
    for (name, labels), v in metrics.items():
        d = dict(labels)
        if name == "modelship_shadow_mismatch_total" and d.get("model") == model and v > 0:
            out[d["kind"]] = out.get(d["kind"], 0) + v
    return out


def settled(server, models, timeout_s=90) -> dict:
    """The shadow metrics once every sampled request of ``models`` is checked or dropped."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape_shadow(server)
        total = lambda name, model: sum(v for (n, ls), v in m.items() if n == name and dict(ls).get("model") == model)
        if all(total("modelship_shadow_checked_total", k) + total("modelship_shadow_dropped_total", k)
               >= total("modelship_shadow_sampled_total", k) for k in models) or time.monotonic() > deadline:
            return m
        time.sleep(0.5)
