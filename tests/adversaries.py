"""The wrong candidates a real pipeline produces, made from a good ONNX artifact by editing its graph: every one is a
well-formed artifact (manifest, hashes) that loads, serves and answers, wrongly. Each gate must refuse every one of
them, with its own kind and a message a user can act on, and pass the good one (tests/test_adversaries.py).

- ``nan``: NaN on the rows whose inputs sum above their 85th percentile (a broken custom op, FP16 overflow);
- ``inf``: +inf on the same rows, -inf on the next ones (inf - inf in a reduced-precision build);
- ``label_shift``: the classifier's rows rolled by one class (a label map off by one);
- ``constant``: the mean answer whatever the input (a graph folded to a constant, a bad TensorRT build);
- ``truncated``: outputs cast to int and back (an integer output type in a conversion);
- ``batch1_only``: right alone, moved by the other samples of its batch (a reduction over the batch axis);
- ``swapped``: two outputs of one shape exchanged (output names bound in the wrong order; two-output models).

Each keeps the good artifact's manifest, parity record included: a copied artifact claims what its source passed,
so only a gate that looks at the answers can refuse it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelship import data as datasets
from modelship.manifest import load_artifact, write_artifact

ZOO = ("nan", "inf", "label_shift", "constant", "truncated", "batch1_only")


def make(kind: str, good, out: Path):
    """The ``kind`` wrong candidate of the ONNX artifact ``good`` in ``out`` (an Artifact)."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(good.path, out)
    model = onnx.load(str(out / good.manifest.file))
    EDITS[kind](model, good)
    onnx.checker.check_model(model)
    onnx.save(model, str(out / good.manifest.file))
    man = load_artifact(out, verify=False).manifest
    ref = good.resolve(good.manifest.reference)  # the copy sits elsewhere: its reference by absolute path
    man.reference = str(ref) if ref is not None else None
    return write_artifact(out, man)


def zoo(good, root: Path, kinds=ZOO) -> dict:
    return {k: make(k, good, Path(root) / k) for k in kinds}


# ---- graph edits --------------------------------------------------------------------------------------------------

def _const(model, name: str, value) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _rewire(model, output: str, build) -> None:
    """Rename the producer of graph output ``output`` to ``output + '_good'`` and let ``build(model, good_name)``
    append nodes that compute the new ``output`` from it."""
    good = output + "_good"
    for node in model.graph.node:
        node.output[:] = [good if o == output else o for o in node.output]
        node.input[:] = [good if i == output else i for i in node.input]
    build(model, good)


def _reduce(model, op: str, x: str, axes: list, out: str):
    """A keepdims reduction in the model's opset: axes an input from opset 18 (ReduceSum: 13), an attribute before."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= (13 if op == "ReduceSum" else 18):
        return helper.make_node(op, [x, _const(model, out + "_axes", np.array(axes, np.int64))], [out], keepdims=1)
    return helper.make_node(op, [x], [out], axes=axes, keepdims=1)


def _row_sums(model, tag: str) -> str:
    """Per-row sum of the first input over every non-batch axis, as [batch, 1]."""
    x = model.graph.input[0].name
    rank = len(model.graph.input[0].type.tensor_type.shape.dim)
    flat = tag + "_flat"
    model.graph.node.extend([
        helper.make_node("Cast", [x], [tag + "_f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", [tag + "_f", _const(model, tag + "_shape", np.array([0, -1], np.int64))], [flat])
        if rank > 2 else helper.make_node("Identity", [tag + "_f"], [flat]),
        _reduce(model, "ReduceSum", flat, [1], tag)])
    return tag


def _threshold(good, q: float) -> float:
    """The ``q`` quantile of the per-row input sums on ``good``'s evaluation data."""
    feed, _ = datasets.load(good.manifest.data, "test", good.manifest.inputs)
    x = feed[good.manifest.inputs[0].name]
    return float(np.quantile(x.reshape(len(x), -1).astype(np.float64).sum(-1), q))


def _outputs(model):
    return [o.name for o in model.graph.output]


def _nan(model, good):
    t = _threshold(good, 0.85)

    def build(m, src):
        s = _row_sums(m, "adv_sum")
        m.graph.node.extend([
            helper.make_node("Greater", [s, _const(m, "adv_t", np.float32(t))], ["adv_rows"]),
            helper.make_node("Where", ["adv_rows", _const(m, "adv_nan", np.float32(np.nan)), src], [out])])
    out = _outputs(model)[0]
    _rewire(model, out, build)


def _inf(model, good):
    hi, lo = _threshold(good, 0.9), _threshold(good, 0.8)

    def build(m, src):
        s = _row_sums(m, "adv_sum")
        m.graph.node.extend([
            helper.make_node("Greater", [s, _const(m, "adv_hi", np.float32(hi))], ["adv_pos"]),
            helper.make_node("Greater", [s, _const(m, "adv_lo", np.float32(lo))], ["adv_neg"]),
            helper.make_node("Where", ["adv_neg", _const(m, "adv_minf", np.float32(-np.inf)), src], ["adv_a"]),
            helper.make_node("Where", ["adv_pos", _const(m, "adv_pinf", np.float32(np.inf)), "adv_a"], [out])])
    out = _outputs(model)[0]
    _rewire(model, out, build)


def _label_shift(model, good):
    out = _outputs(model)[0]
    k = len(good.manifest.labels or []) or 2
    perm = np.roll(np.arange(k), 1).astype(np.int64)

    def build(m, src):
        m.graph.node.append(helper.make_node("Gather", [src, _const(m, "adv_perm", perm)], [out], axis=1))
    _rewire(model, out, build)


def _constant(model, good):
    """Every row answers the mean of the good model's answers on the evaluation data."""
    from modelship.runners import open_runner

    feed, _ = datasets.load(good.manifest.data, "test", good.manifest.inputs)
    first = good.manifest.outputs[0].name
    mean = np.asarray(open_runner(good).infer(feed)[first], np.float32).mean(0, keepdims=True)
    out = _outputs(model)[0]

    def build(m, src):
        m.graph.node.extend([
            helper.make_node("Mul", [src, _const(m, "adv_zero", np.float32(0))], ["adv_z"]),
            helper.make_node("Add", ["adv_z", _const(m, "adv_mean", mean)], [out])])
    _rewire(model, out, build)


def _truncated(model, good):
    for out in _outputs(model):
        def build(m, src, out=out):
            m.graph.node.extend([helper.make_node("Cast", [src], [out + "_int"], to=TensorProto.INT32),
                                 helper.make_node("Cast", [out + "_int"], [out], to=TensorProto.FLOAT)])
        _rewire(model, out, build)


def _batch1_only(model, good):
    """out + 3·spread·(batch mean of the row sums - this row's sum)/(std of the row sums), on the first column: zero
    for a batch of one, a label-moving shift in a batch of several different samples."""
    feed, _ = datasets.load(good.manifest.data, "test", good.manifest.inputs)
    x = feed[good.manifest.inputs[0].name]
    std = float(x.reshape(len(x), -1).astype(np.float64).sum(-1).std()) or 1.0
    out = _outputs(model)[0]
    k = good.manifest.outputs[0].shape[-1]
    column = np.zeros((1, k), np.float32)
    column[0, 0] = 6.0 / std

    def build(m, src):
        s = _row_sums(m, "adv_sum")
        m.graph.node.extend([
            _reduce(m, "ReduceMean", s, [0], "adv_mean"),
            helper.make_node("Sub", ["adv_mean", s], ["adv_shift"]),
            helper.make_node("Mul", ["adv_shift", _const(m, "adv_col", column)], ["adv_move"]),
            helper.make_node("Add", [src, "adv_move"], [out])])
    _rewire(model, out, build)


def _swapped(model, good):
    a, b = _outputs(model)[:2]
    for node in model.graph.node:
        node.output[:] = [{a: b, b: a}.get(o, o) for o in node.output]
        node.input[:] = [{a: b, b: a}.get(i, i) for i in node.input]


EDITS = {"nan": _nan, "inf": _inf, "label_shift": _label_shift, "constant": _constant, "truncated": _truncated,
         "batch1_only": _batch1_only, "swapped": _swapped}
