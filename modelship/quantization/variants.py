"""ONNX -> ONNX variants with onnxruntime's own tools, each followed by the parity gate.

Modes are declarative (precision + builder); the builders are thin calls into
``onnxruntime.quantization`` and ``onnxruntime.transformers``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ArtifactError, QuantizeError
from ..lineage import inherited_extra, lineage
from ..manifest import Artifact, write_artifact
from .. import data as datasets
from ..paths import check_out, data_path

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class QuantizeOptions:
    per_channel: bool = False
    calibration_method: str = "minmax"
    calibration_data: str | None = None  # a .npz with one array per input; default: the artifact's calib split
    calibration_samples: int = 256
    activation_type: str = "uint8"  # uint8 (asymmetric, best on CPU) or int8 (symmetric, what TensorRT builds)
    exclude_nodes: list[str] = field(default_factory=list)
    exclude_op_types: list[str] = field(default_factory=list)
    op_types: list[str] = field(default_factory=list)  # restrict quantization to these op types
    nodes_only: list[str] = field(default_factory=list)  # restrict quantization to these nodes (sensitivity)
    keep_io_types: bool = True  # fp16: keep float32 inputs/outputs
    reduce_range: bool = False
    smooth: float | None = None  # SmoothQuant's alpha (smooth.py): activation outliers moved into the weights first
    # dynamic: per-tensor (onnxruntime's quantize_dynamic: one scale for a whole batch's activations, so an answer
    # depends on what it is batched with) or per-row (MatMulNBits with 8-bit weights in blocks of block_size, its
    # activations quantized per row and block: each sample on its own)
    activations: str = "per-tensor"
    block_size: int = 64
    # static: a file of calibrated ranges, computed on the first build and reused by later ones with the same
    # method, activation type and op types (accuracy-aware INT8 builds dozens); --smooth keeps its activation maxima
    # beside it; not recorded in the manifest
    calibration_cache: str | None = None

    def recorded(self) -> dict:
        """These options as the manifest records them (what `quantize` rebuilds the variant with)."""
        return {k: v for k, v in asdict(self).items() if k != "calibration_cache"}


def _preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's quantization pre-processing (shape inference + optimization); falls back to the source."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return dst
    except Exception as e:  # noqa: BLE001 — pre-processing is best effort
        logging.getLogger("modelship").warning("quantization pre-processing skipped: %s", e)
        import shutil

        # a copy: onnxruntime's quantizers write temporary files beside the model they read, never in the source
        return Path(shutil.copyfile(src, dst))


class _Reader:
    """onnxruntime CalibrationDataReader over a feed dict, in batches."""

    def __init__(self, feed: dict, batch: int = 16):
        n = len(next(iter(feed.values())))
        batch = min(batch, n)
        whole = {k: v[: n - n % batch] for k, v in feed.items()}  # histogram calibrators need equal batches
        self._it = iter(list(datasets.batches(whole, batch)))

    def get_next(self):
        return next(self._it, None)


def calibration_feed(art: Artifact, opts: QuantizeOptions) -> dict:
    man = art.manifest
    if opts.calibration_data:
        p = Path(opts.calibration_data)
        if not p.is_file():
            raise QuantizeError(f"{p}: calibration data not found; expected a .npz with one array per input "
                                f"({', '.join(t.name for t in man.inputs)})")
        feed, _ = datasets.read_npz(p, man.inputs)
    elif datasets.is_generated(man.data):
        raise QuantizeError(f"{art.path}: static quantization (and --smooth) needs calibration data and this "
                            "artifact has none (no real data in its manifest); pass --data FILE.npz (or "
                            "--calibration-data FILE.npz) with one array per input")
    else:  # raw texts / images through what serving runs, or the data's tensors
        from ..preprocess import preprocessed

        feed = preprocessed(art, man.data, "calib", opts.calibration_samples)
    return {k: v[: opts.calibration_samples] for k, v in feed.items()}


def _smoothed(art: Artifact, src: Path, opts: QuantizeOptions, tmp: Path, feed: dict | None = None,
              static: bool = False) -> tuple[Path, dict, list[str]]:
    """The graph to quantize, what was done to it, and the nodes to keep in float: ``src`` as it is, or its
    SmoothQuant transform on the calibration data (``--smooth ALPHA``; ``feed`` when the caller has it), whose
    scaling Muls stay float; only the inputs of MatMuls this build quantizes are smoothed."""
    if opts.smooth is None:
        return src, {}, list(opts.exclude_nodes)
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    from .smooth import smooth

    feed = calibration_feed(art, opts) if feed is None else feed
    cache = Path(opts.calibration_cache).with_suffix(".smooth.npz") if opts.calibration_cache else None
    ops = set(_op_types(src, opts) or (QDQRegistry if static else IntegerOpsRegistry))

    def quantized(node) -> bool:  # what onnxruntime will quantize: op type, node lists
        op, name = node.op_type, node.name
        if op == "Gemm" and not static:  # a dynamic build first rewrites each Gemm as a MatMul named NAME_MatMul
            op, name = "MatMul", f"{name}_MatMul"
        return op in ops and name not in opts.exclude_nodes and (not opts.nodes_only or name in opts.nodes_only)

    facts = smooth(src, tmp / "smoothed.onnx", feed, opts.smooth, maxima_cache=cache, quantized=quantized)
    muls = facts.pop("mul_nodes")
    return (tmp / "smoothed.onnx", {"smoothquant": facts, "calibration_samples": int(len(next(iter(feed.values()))))},
            [*opts.exclude_nodes, *muls])


ACTIVATIONS = ("per-tensor", "per-row")


def _dynamic(art: Artifact, out: Path, opts: QuantizeOptions, tmp: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if opts.activations not in ACTIVATIONS:
        raise QuantizeError(f"--activations {opts.activations}: expected one of {', '.join(ACTIVATIONS)}")
    src, facts, keep = _smoothed(art, _preprocess(art.model_path, tmp / "pre.onnx"), opts, tmp)
    if opts.activations == "per-row":
        return {**facts, **_per_row(src, out, opts, keep)}
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, per_channel=opts.per_channel,
                     reduce_range=opts.reduce_range, nodes_to_exclude=keep or None,
                     nodes_to_quantize=opts.nodes_only or None, op_types_to_quantize=_op_types(src, opts),
                     extra_options={"MatMulConstBOnly": True})
    return facts


def _per_row(src: Path, out: Path, opts: QuantizeOptions, keep: list) -> dict:
    """INT8 with activations quantized per row (and block): onnxruntime's MatMulNBits with 8-bit symmetric weights
    in blocks of ``block_size`` along K, computed with int8 activations (accuracy level 4), one scale per row and
    block; MatMuls and Gemms with constant weights (the others, and Conv, stay float). Node lists name a Gemm G as
    it is or as G_MatMul (what it becomes); ``op_types`` / ``exclude_op_types`` take MatMul and Gemm."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if opts.block_size < 16 or opts.block_size & (opts.block_size - 1):
        raise QuantizeError(f"--block-size {opts.block_size}: expected a power of two, 16 or more (e.g. 64)")
    if opts.reduce_range:
        raise QuantizeError("--reduce-range is for per-tensor INT8 (u8s8 kernels); per-row activations use "
                            "8-bit symmetric weights in blocks: leave it out")
    if opts.op_types and not {"MatMul", "Gemm"} & set(opts.op_types):
        raise QuantizeError(f"--op-types {','.join(opts.op_types)}: per-row activations quantize MatMul and Gemm "
                            "only; name one of them, or use --activations per-tensor")
    model = onnx.load(str(src))
    origin = _gemms_as_matmuls(model)  # MatMul name -> the op type it came from (its own name for a Gemm)
    types = set(opts.op_types or ("MatMul", "Gemm")) - set(opts.exclude_op_types)

    def named(name: str, names) -> bool:
        return name in names or origin[name][1] in names

    include = [m for m in origin if origin[m][0] in types and not named(m, keep)
               and (not opts.nodes_only or named(m, opts.nodes_only))]
    # onnxruntime quantizes every MatMul of its op types or of its include list: the rest is excluded by name
    q = MatMulNBitsQuantizer(model, bits=8, block_size=opts.block_size, is_symmetric=True, accuracy_level=4,
                             nodes_to_exclude=[m for m in origin if m not in include])
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    quantized = sum(n.op_type == "MatMulNBits" for n in onnx.load(str(out), load_external_data=False).graph.node)
    if not quantized:
        raise QuantizeError(f"{src.name}: no MatMul or Gemm with constant weights to quantize per row (Conv stays "
                            "float); use --activations per-tensor")
    return {"activations": "per-row", "block_size": opts.block_size, "matmulnbits_nodes": quantized}


def _gemms_as_matmuls(model) -> dict[str, tuple[str, str]]:
    """Each Gemm with a constant weight (no transA, alpha = beta = 1) as a MatMul named NAME_MatMul (+ an Add of
    its bias), as onnxruntime's dynamic quantizer names it: MatMulNBits takes MatMuls only. Returns every MatMul
    (by name) with the op type and name it came from; unnamed nodes are named first (gemm_3, matmul_7)."""
    from onnx import helper, numpy_helper

    consts = {i.name: i for i in model.graph.initializer}
    taken = {n.name for n in model.graph.node}
    origin, nodes, transposed = {}, [], {}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = next(c for c in (f"{n.op_type.lower()}_{i}", f"{n.op_type.lower()}_{i}_{len(taken)}")
                          if c not in taken)
            taken.add(n.name)
        attrs = {a.name: (a.i if a.type == a.INT else a.f) for a in n.attribute}
        if n.op_type != "Gemm" or n.input[1] not in consts or attrs.get("transA", 0) or \
                attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or f"{n.name}_MatMul" in taken:
            nodes.append(n)
            if n.op_type == "MatMul":
                origin[n.name] = ("MatMul", n.name)
            continue
        wname = n.input[1]
        if attrs.get("transB", 0):
            if wname not in transposed:  # one transposed copy per weight, however many Gemms share it
                transposed[wname] = f"{wname}_T"
                w = numpy_helper.to_array(consts[wname])
                model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), transposed[wname]))
            wname = transposed[wname]
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        mm_out = f"{n.output[0]}_MatMul" if bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], wname], [mm_out], name=f"{n.name}_MatMul"))
        origin[f"{n.name}_MatMul"] = ("Gemm", n.name)
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias], [n.output[0]], name=f"{n.name}_Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return origin


def _static(art: Artifact, out: Path, opts: QuantizeOptions, tmp: Path) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if opts.calibration_method not in CALIBRATION_METHODS:
        raise QuantizeError(f"unknown calibration method '{opts.calibration_method}'; expected one of "
                            f"{', '.join(CALIBRATION_METHODS)}")
    feed = calibration_feed(art, opts)
    src, smoothed, keep = _smoothed(art, _preprocess(art.model_path, tmp / "pre.onnx"), opts, tmp, feed,
                                    static=True)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[opts.calibration_method]
    act = QuantType.QInt8 if opts.activation_type == "int8" else QuantType.QUInt8
    ops = _op_types(src, opts)
    cache = {}
    if opts.calibration_cache and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
        cache = {"calibration_cache_path": opts.calibration_cache}  # the ranges calibrated once, then reused
    quantize_static(str(src), str(out), _Reader(feed), quant_format=QuantFormat.QDQ, per_channel=opts.per_channel,
                    activation_type=act, weight_type=QuantType.QInt8, calibrate_method=method,
                    nodes_to_exclude=keep or None, nodes_to_quantize=opts.nodes_only or None,
                    op_types_to_quantize=ops,
                    reduce_range=opts.reduce_range,
                    extra_options={"ActivationSymmetric": opts.activation_type == "int8", "WeightSymmetric": True,
                                   "CalibTensorRangeSymmetric": opts.activation_type == "int8"}, **cache)
    return {**smoothed, "calibration_samples": int(len(next(iter(feed.values()))))}


def _op_types(path: Path, opts: QuantizeOptions) -> list[str] | None:
    """op_types_to_quantize after removing the excluded op types (None: onnxruntime's default set)."""
    if not opts.exclude_op_types:
        return opts.op_types or None
    import onnx
    from onnxruntime.quantization.registry import QDQRegistry, IntegerOpsRegistry

    present = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    candidates = opts.op_types or sorted(present & (set(QDQRegistry) | set(IntegerOpsRegistry)))
    return [t for t in candidates if t not in opts.exclude_op_types]


def _fp16(art: Artifact, out: Path, opts: QuantizeOptions, tmp: Path) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(art.model_path))
    block = list(opts.exclude_op_types) or None
    fp16 = convert_float_to_float16(model, keep_io_types=opts.keep_io_types, op_block_list=block,
                                    node_block_list=opts.exclude_nodes or None)
    onnx.save(fp16, str(out))
    return {"keep_io_types": opts.keep_io_types}


def _optimize(art: Artifact, out: Path, opts: QuantizeOptions, tmp: Path) -> dict:
    man = art.manifest
    kind = man.extra.get("model_type")
    if kind in ("bert", "vit"):
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = (man.arch or {}).get("config", {})  # a Hugging Face config, or one nested in the model's (an encoder's)
        cfg = next((c for c in (cfg, *cfg.values()) if isinstance(c, dict) and "num_attention_heads" in c), {})
        opt = optimize_model(str(art.model_path), model_type=kind, num_heads=int(cfg.get("num_attention_heads", 0)),
                             hidden_size=int(cfg.get("hidden_size", 0)), opt_level=1, use_gpu=False)
        opt.save_model_to_file(str(out))
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        return {"optimizer": f"onnxruntime.transformers ({kind})", "fused_operators": stats}
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(art.model_path), so, providers=["CPUExecutionProvider"])
    return {"optimizer": "onnxruntime offline graph optimization (extended)"}


@dataclass(frozen=True)
class Mode:
    precision: str
    build: Callable
    suffix: str


MODES = {
    "dynamic": Mode("int8", _dynamic, "int8-dynamic"),
    "static": Mode("int8", _static, "int8-static"),
    "fp16": Mode("fp16", _fp16, "fp16"),
    "optimize": Mode(None, _optimize, "optimized"),  # keeps the source's precision
}


def make_variant(art: Artifact, mode: str, out_dir: str | Path, opts: QuantizeOptions | None = None,
                 data: dict | None = None) -> Artifact:
    """``data``: the user's evaluation data spec (--data), recorded in the variant's manifest and used for
    static calibration when no --calibration-data is given."""
    opts = opts or QuantizeOptions()
    if data is not None:
        art = Artifact(art.path, replace(art.manifest, data=data))
    if opts.calibration_data:  # builds run inside a temp dir: make user paths absolute first
        opts = replace(opts, calibration_data=str(Path(opts.calibration_data).resolve()))
    if mode not in MODES:
        raise QuantizeError(f"unknown mode '{mode}'; expected one of {', '.join(MODES)}")
    if art.manifest.format != "onnx":
        raise QuantizeError(f"{art.path}: a '{art.manifest.format}' artifact; quantize takes an ONNX artifact "
                            f"(run modelship export first)")
    _check_onnx(art)
    m = MODES[mode]
    check_out(out_dir, source=art.path, data=data_path(art.manifest.data), calibration_data=opts.calibration_data)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp, _inside(tmp):
        try:
            facts = m.build(art, target.resolve(), opts, Path(tmp))
        except (QuantizeError, ArtifactError):
            raise
        except Exception as e:  # noqa: BLE001 — onnxruntime tools raise many types
            raise QuantizeError(f"{mode} failed on {art.model_path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    manifest = copy.deepcopy(art.manifest)
    manifest.precision = m.precision or art.manifest.precision
    manifest.file = "model.onnx"
    manifest.created_by = f"modelship quantize --mode {mode}"
    manifest.parity = None
    manifest.extra = {**inherited_extra(art.manifest), "variant": mode, **facts, "options": opts.recorded()}
    _signature_from_graph(target, manifest)
    for k, v in lineage(art, out).items():
        setattr(manifest, k, v)
    return write_artifact(out, manifest)


def _signature_from_graph(path: Path, manifest) -> None:
    """The manifest's input/output dtypes as the built graph has them (``--fp16-io`` makes them float16)."""
    import onnx

    from ..manifest import DTYPES

    graph = onnx.load(str(path), load_external_data=False).graph
    types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
             for v in list(graph.input) + list(graph.output)}
    for spec in manifest.inputs + manifest.outputs:
        dtype = types.get(spec.name, spec.dtype)
        if dtype not in DTYPES:
            raise QuantizeError(f"the variant's tensor '{spec.name}' is {dtype}; expected one of {', '.join(DTYPES)}")
        spec.dtype = dtype


@contextlib.contextmanager
def _inside(folder: str):
    """onnxruntime's shape inference and optimizer leave temp files in the working directory: keep them in ours."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def _check_onnx(art: Artifact) -> None:
    import onnx

    try:
        onnx.load(str(art.model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001
        raise QuantizeError(f"{art.model_path}: not an ONNX model ({str(e).splitlines()[0][:200]})") from None
