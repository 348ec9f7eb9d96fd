"""The batch gate: a request's answer must not depend on what it is batched with (modelship.batch_gate).

Per-tensor dynamic INT8 scales a whole batch's activations by one number, so another sample in the batch (an
outlier above all) moves every answer; that is in the quantized values, not in how a CPU sums them, so the
verdicts below hold on every INT8 kernel (each INT8 test runs with this CPU's kernels and with exact VNNI
arithmetic, ``int8_kernels``). Static INT8 (fixed scales), FP32 and per-row INT8 (each sample's activations scaled
on their own) keep every answer within the float model's own batch-to-batch rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cli

import adversaries
import modelship as ms
from modelship import batch_gate
from modelship.errors import ArtifactError
from modelship.manifest import load_artifact
from modelship.quantization.variants import QuantizeOptions, make_variant
from modelship.runners import open_runner
from modelship.stages import gate_parity, parity_record


def _beside_outlier(art) -> tuple[float, float]:
    """(the largest move of any judged sample's answer when batched beside the gate's outlier, the bound)."""
    runner = open_runner(art)
    spec = art.manifest.data
    samples = batch_gate.samples_for(art, spec, "test", {})
    alone = [batch_gate._infer(runner, samples.feed([i])) for i in range(samples.count)]
    idx = list(range(min(samples.count, 7))) + [samples.count]
    together = batch_gate._infer(runner, samples.feed(idx))
    name = next(iter(together))
    moved = max(float(np.abs(alone[i][name][0] - together[name][p]).max()) for p, i in enumerate(idx[:-1]))
    return moved, art.manifest.parity["batch"]["bounds"][name]


def test_float_and_static_int8_pass(cnn_onnx, cnn_int8):
    for art in (cnn_onnx, cnn_int8):
        b = art.manifest.parity["batch"]
        assert b["passed"] is True and b["max_abs_diff"] <= b["bound"], b
        assert b["sizes"] == [3, 4, 16, 64] and b["samples"] == 16 and "scaled 8 times" in b["outlier"]


def test_dynamic_int8_fails_and_is_archived_at_batch_size_1_only(tmp_path, cnn_onnx, int8_kernels):
    q = make_variant(cnn_onnx, "dynamic", tmp_path / "q", QuantizeOptions(reduce_range=True))
    gate_parity(q)  # right alone: parity passes
    b = load_artifact(q.path).manifest.parity["batch"]
    assert b["passed"] is False and b["max_abs_diff"] > 10 * b["bound"], b
    assert b["message"].startswith("answers depend on what they are batched with: sample ")
    assert f"inside a batch of {b['worst']['size']}" in b["message"]
    with pytest.raises(ArtifactError, match="batch size 8 refused: answers depend on what they are batched with"):
        ms.archive(q, tmp_path / "store", name="q")
    assert ms.archive(q, tmp_path / "store", name="q1", batch_size=1).is_file()  # batch size 1: always allowed
    p = cli("archive", q.path, "--out", tmp_path / "store", "--name", "q8", "--batch-size", "4")
    assert p.returncode != 0 and "--batch-size 1" in " ".join(p.stderr.split()) and "Traceback" not in p.stderr
    assert ms.archive(q, tmp_path / "store", name="forced", batch_size=4, force=True).is_file()
    p = cli("parity", cnn_onnx.resolve(cnn_onnx.manifest.reference), q.path)
    assert p.returncode == 0 and "answers depend on what they are batched with" in " ".join(p.stdout.split()), p.stdout


def test_per_row_text_int8_keeps_each_answer_beside_an_outlier(tmp_path, tuned_text_onnx, int8_kernels):
    """The text model's INT8 two ways: per-tensor (its answers move when the outlier review shares the batch: the
    gate fails) and per-row (every other review's answer stays what it is alone: the gate passes)."""
    tensor = make_variant(tuned_text_onnx, "dynamic", tmp_path / "tensor", QuantizeOptions(per_channel=True))
    row = make_variant(tuned_text_onnx, "dynamic", tmp_path / "row", QuantizeOptions(activations="per-row"))
    assert row.manifest.extra["matmulnbits_nodes"] >= 12
    for art in (tensor, row):
        art.manifest.parity = parity_record(art)
    bt, br = tensor.manifest.parity["batch"], row.manifest.parity["batch"]
    assert bt["passed"] is False and "answers depend on what they are batched with" in bt["message"], bt
    assert br["passed"] is True and br["max_abs_diff"] <= br["bound"], br
    assert row.manifest.parity["top1_agreement"] >= 0.97
    moved, bound = _beside_outlier(tensor)
    assert moved > bound
    moved, bound = _beside_outlier(row)
    assert moved <= bound, (moved, bound)


def test_the_batch_dependent_adversary_fails(cnn_onnx, tmp_path):
    cand = adversaries.make("batch1_only", cnn_onnx, tmp_path / "b")
    b = parity_record(cand)["batch"]
    assert b["passed"] is False and "answers depend on what they are batched with" in b["message"]


def test_a_model_of_fixed_batch_is_not_judged_batched(tmp_path, cnn_onnx):
    """A graph that takes one sample per call is served one at a time: the gate says so instead of failing."""
    art = load_artifact(cnn_onnx.path)
    art.manifest.inputs[0].shape[0] = 1
    runner = open_runner(art)
    feed = {cnn_onnx.manifest.inputs[0].name: np.zeros([4, *cnn_onnx.manifest.inputs[0].shape[1:]], np.float32)}
    rec = batch_gate.judge(runner, batch_gate.from_tensors(feed))
    assert rec["passed"] is None and "batches of 1 only" in rec["skipped"]


def test_until_parity_looks_for_a_build_that_keeps_its_answers(tmp_path, tuned_text_onnx):
    """Per-tensor dynamic INT8 that passes parity but moves with its batch is not the end of the search: the
    per-row build, which passes both, is."""
    from modelship.quantization.until_parity import until_parity

    out = until_parity(tuned_text_onnx, "dynamic", tmp_path / "q", QuantizeOptions(per_channel=True))
    rec = out.manifest.parity
    steps = [a["step"] for a in out.manifest.extra["until_parity"]["attempts"]]
    assert rec["passed"] and rec["batch"]["passed"], (rec["failures"], rec["batch"])
    assert "per-row activations" in steps and out.manifest.extra["options"]["activations"] == "per-row"


class _Fake:
    """A runner of the digits CNN's signature whose answers ``answer(x)`` (numpy, [n, 1, 8, 8] -> [n, 10])."""

    def __init__(self, art, answer):
        self.artifact, self.manifest, self.inputs, self.answer = art, art.manifest, art.manifest.inputs, answer

    def infer(self, feed):
        return {"logits": self.answer(next(iter(feed.values())))}


def _feed(art):
    from modelship import data as datasets

    return datasets.load(art.manifest.data, "test", art.manifest.inputs)[0]


W = np.random.default_rng(0).normal(size=(64, 10))


@pytest.mark.parametrize("case", ["odd_sizes", "past_16", "last_row", "one_row_only", "outlier_fails_alone", "huge"])
def test_the_gate_catches_what_a_broken_runner_does_and_records_instead_of_raising(cnn_onnx, case):
    """Answers right alone but wrong in batches of an odd size, past 16 rows, on the last row; an output of one
    row for a whole batch; an outlier the model refuses alone (dropped, not blamed); answers of 1e6 with a tiny
    spread (the bound is never below float32's own steps)."""
    top = float(np.abs(next(iter(_feed(cnn_onnx).values()))).max())  # no real sample goes beyond it

    def linear(x):
        return x.reshape(len(x), -1) @ W

    answer = {
        "odd_sizes": lambda x: linear(x) + (len(x) % 2) * (len(x) > 1),
        "past_16": lambda x: linear(x) + (np.arange(len(x)) >= 16)[:, None],
        "last_row": lambda x: linear(x) + ((np.arange(len(x)) == len(x) - 1) & (len(x) > 1))[:, None],
        "one_row_only": lambda x: linear(x)[:1],
        "outlier_fails_alone": lambda x: (_ for _ in ()).throw(ValueError("index out of range")) if
        np.abs(x).max() > 2 * top else linear(x),
        "huge": lambda x: 1e6 + 1e-3 * linear(x),
    }[case]
    rec = batch_gate.judge(_Fake(cnn_onnx, answer), batch_gate.from_tensors(_feed(cnn_onnx)))
    if case in ("outlier_fails_alone", "huge"):
        assert rec["passed"] is True, rec
        assert case != "outlier_fails_alone" or rec["outlier"].startswith("none: ")
    else:
        assert rec["passed"] is False and rec["message"].startswith("answers depend on what they are batched with")


def test_per_row_takes_node_lists_and_gemm_names(tmp_path, cnn_onnx):
    """The digits CNN's classifier Gemms quantized per row: --exclude-nodes with a Gemm's own name keeps it float,
    --op-types Conv alone is refused, --reduce-range is refused."""
    import onnx

    from modelship.errors import QuantizeError

    gemms = [n.name for n in onnx.load(str(cnn_onnx.model_path)).graph.node if n.op_type == "Gemm"]
    full = make_variant(cnn_onnx, "dynamic", tmp_path / "all", QuantizeOptions(activations="per-row"))
    assert full.manifest.extra["matmulnbits_nodes"] == len(gemms) >= 1
    if len(gemms) > 1:
        some = make_variant(cnn_onnx, "dynamic", tmp_path / "some",
                            QuantizeOptions(activations="per-row", exclude_nodes=gemms[:1]))
        assert some.manifest.extra["matmulnbits_nodes"] == len(gemms) - 1
    for opts, says in ((QuantizeOptions(activations="per-row", op_types=["Conv"]), "MatMul and Gemm only"),
                       (QuantizeOptions(activations="per-row", reduce_range=True), "--reduce-range")):
        with pytest.raises(QuantizeError, match=says):
            make_variant(cnn_onnx, "dynamic", tmp_path / "bad", opts)
