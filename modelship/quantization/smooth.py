"""SmoothQuant (Xiao et al. 2023) on an ONNX graph: move activation outliers into the weights before INT8.

Per-tensor INT8 activation scales are set by a few outlier channels (transformers' LayerNorm and GELU outputs have
them), so every other channel keeps few levels. For each MatMul (or Gemm) with a constant weight W [in, out], per
input channel j: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (X's maxima over calibration data); X is divided by s
(folded into the parameters that make X where they can absorb it: a LayerNorm's scale and bias, or the weight
columns and bias of the MatMul that makes X; else one ``Mul`` inserted after the tensor, shared by all its MatMuls)
and W's row j multiplied by s_j. The float graph
computes the same function; its activations are flatter, so INT8 loses less. alpha near 1 moves more of the range
into the weights, which per-channel weight scales absorb.

onnxruntime's own SmoothQuant (``quantize_static(extra_options={"SmoothQuant": True})``) calls Intel Neural
Compressor 2.x, whose packages pin numpy < 2 (modelship needs numpy 2); it also smooths static builds only.
This does the same transform with onnx and onnxruntime, for dynamic and static builds alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QuantizeError


def _transposed(node) -> bool:
    """Whether the node's weight is [out, in] (a Gemm with transB) rather than [in, out]."""
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)


def _targets(graph) -> dict[str, list]:
    """activation tensor -> the MatMuls (and Gemms) that multiply it by a constant 2-D weight."""
    consts = {i.name: i for i in graph.initializer}
    out: dict[str, list] = {}
    for n in graph.node:
        plain = n.op_type == "MatMul" or (n.op_type == "Gemm" and not any(a.name == "transA" and a.i
                                                                           for a in n.attribute))
        if plain and n.input[1] in consts and len(consts[n.input[1]].dims) == 2 and n.input[0] not in consts:
            out.setdefault(n.input[0], []).append(n)
    return out


def _activation_maxima(model, names: list[str], feed: dict, batch: int) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each named tensor over the feed (run in batches through onnxruntime)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    n = len(next(iter(feed.values())))
    maxima: dict[str, np.ndarray] = {}
    for i in range(0, n, batch):
        outs = sess.run(names, {k: v[i:i + batch] for k, v in feed.items() if k in wanted})
        for name, x in zip(names, outs):
            m = np.abs(x.reshape(-1, x.shape[-1])).max(0)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    return maxima


def _cached_maxima(model, names: list[str], feed: dict, batch: int, cache: Path | None) -> dict[str, np.ndarray]:
    """The activation maxima, read from ``cache`` when an earlier build of the same graph on the same data wrote them
    there (an accuracy-aware search builds dozens of variants of one graph), else measured and written."""
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            kept = dict(zip(z["names"].tolist(), (z[f"arr_{i}"] for i in range(len(z["names"])))))
        if set(names) <= set(kept):
            return {n: kept[n] for n in names}
    maxima = _activation_maxima(model, names, feed, batch)
    if cache is not None:
        np.savez(cache, *(maxima[n] for n in names), names=np.array(names))
    return maxima


def smooth(src: Path, dst: Path, feed: dict, alpha: float, batch: int = 16, maxima_cache: Path | None = None,
           quantized=None) -> dict:
    """Write ``src`` smoothed with migration strength ``alpha`` to ``dst``; return what was done. ``maxima_cache``:
    a file that keeps the activation maxima for later builds of the same graph on the same data. ``quantized(node)``:
    whether the build will quantize that MatMul; a tensor that only float MatMuls read is left alone (flatter
    activations gain them nothing, and its Mul would cost time)."""
    import onnx
    from onnx import numpy_helper

    if not 0.0 < alpha < 1.0:
        raise QuantizeError(f"SmoothQuant alpha {alpha}: expected a number between 0 and 1 (0.5 is the paper's "
                            "default; larger moves more of the activations' range into the weights)")
    model = onnx.load(str(src))
    graph = model.graph
    every = _targets(graph)
    targets = {t: users for t, users in every.items() if quantized is None or any(quantized(u) for u in users)}
    if not every:
        raise QuantizeError(f"{src}: SmoothQuant found no MatMul with constant weights to smooth")
    # measured for every candidate, so later builds that quantize other nodes read them from the cache too
    maxima = _cached_maxima(model, list(every), feed, batch, maxima_cache)
    consts = {i.name: i for i in graph.initializer}
    muls, folded, matmuls, nodes = [], [], 0, list(graph.node)
    uses: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for name, users in targets.items():
        if any(uses[u.input[1]] > 1 for u in users):
            continue  # a weight shared with other nodes (tied embeddings): scaling it would change them too
        # each weight as [in, out], whatever its layout
        weights = {u.input[1]: (numpy_helper.to_array(consts[u.input[1]]), _transposed(u)) for u in users}
        w_max = np.max([np.abs(w.T if t else w).max(1) for w, t in weights.values()], axis=0)
        x_max = maxima[name]
        if x_max.shape != w_max.shape:
            continue
        s = np.clip(x_max, 1e-5, None) ** alpha / np.clip(w_max, 1e-5, None) ** (1 - alpha)
        s = np.where((x_max > 0) & (w_max > 0), s, 1.0).astype(np.float32)
        for wname, (w, t) in weights.items():
            consts[wname].CopyFrom(numpy_helper.from_array((w * (s[None, :] if t else s[:, None])).astype(w.dtype),
                                                           wname))
        matmuls += len(users)
        absorber = _absorber(graph, nodes, name, users, consts, uses)
        if absorber is not None:  # X / s folded into the parameters that make X: the graph gains no node
            for pname, axis in absorber:
                p = numpy_helper.to_array(consts[pname])
                by = s[:, None] if axis == 0 and p.ndim == 2 else s
                consts[pname].CopyFrom(numpy_helper.from_array((p / by).astype(p.dtype), pname))
            folded.append(name)
            continue
        scaled, inv = f"{name}_smoothed", f"{name}_smooth_scale"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), inv))
        for u in users:
            u.input[0] = scaled
        mul = onnx.helper.make_node("Mul", [name, inv], [scaled], name=f"{name}_SmoothQuant")
        producer = next((i for i, n in enumerate(nodes) if name in n.output), -1)
        nodes.insert(producer + 1, mul)
        muls.append(mul.name)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return {"alpha": alpha, "smoothed_tensors": len(muls) + len(folded), "smoothed_matmuls": matmuls,
            "folded": len(folded), "mul_nodes": muls}


def _absorber(graph, nodes: list, name: str, users: list, consts: dict, uses: dict) -> list | None:
    """(constant, axis) pairs whose ``axis`` can absorb a per-channel ``1/s`` of tensor ``name`` (so no ``Mul`` is
    needed), or None: the scale and bias of the LayerNormalization that makes it, or the weight columns and bias of
    the MatMul (+ Add) or Gemm that makes it, also through a Relu (relu(x/s) = relu(x)/s for s > 0). Only where
    ``name`` feeds nothing but the smoothed MatMuls (a residual ``Add`` reading a LayerNorm's output, as in post-LN
    encoders, would see the scaled values) and those constants feed nothing else."""
    readers = [n for n in nodes if name in n.input]
    if name in {o.name for o in graph.output} or any(r not in users for r in readers) or _has_subgraphs(nodes):
        return None  # (a subgraph of If/Loop/Scan may read any tensor of the graph by name)
    return _makers(graph, nodes, name, consts, uses)


def _makers(graph, nodes: list, name: str, consts: dict, uses: dict) -> list | None:
    producer = next((n for n in nodes if name in n.output), None)
    if producer is None or list(producer.output).index(name) != 0:
        return None

    def own(names: list[str], rank: int) -> bool:
        return all(n in consts and uses.get(n, 0) == 1 and len(consts[n].dims) == rank for n in names)

    def alone(tensor: str) -> bool:  # read by one node only, and not a graph output
        return sum(tensor in n.input for n in nodes) == 1 and tensor not in {o.name for o in graph.output}

    op, ins = producer.op_type, list(producer.input)
    if op == "LayerNormalization":
        axis = next((a.i for a in producer.attribute if a.name == "axis"), -1)
        params = [i for i in ins[1:3] if i]
        return [(p, -1) for p in params] if axis == -1 and own(params, 1) else None
    if op == "Relu":
        return _makers(graph, nodes, ins[0], consts, uses) if alone(ins[0]) else None
    if op == "MatMul" and own(ins[1:2], 2):
        return [(ins[1], -1)]
    if op == "Gemm" and own(ins[1:2], 2) and (len(ins) < 3 or not ins[2] or own(ins[2:3], 1)):
        attrs = {a.name: a.i for a in producer.attribute}
        if attrs.get("transA", 0):
            return None
        return [(ins[1], 0 if attrs.get("transB", 0) else -1)] + ([(ins[2], -1)] if len(ins) > 2 and ins[2] else [])
    if op == "Add":
        bias = [i for i in ins if i in consts]
        other = [i for i in ins if i not in consts]
        mm = next((n for n in nodes if other and other[0] in n.output and n.op_type == "MatMul"), None)
        if len(bias) == 1 and len(other) == 1 and mm is not None and own(bias, 1) and own([mm.input[1]], 2) and \
                alone(other[0]):
            return [(bias[0], -1), (mm.input[1], -1)]
    return None


def _has_subgraphs(nodes: list) -> bool:
    import onnx

    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute)
