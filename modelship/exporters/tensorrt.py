"""ONNX -> TensorRT engine with the TensorRT 10/11 Python API (strongly typed networks).

Precision comes from the ONNX graph (FP16 ONNX, or symmetric-int8 QDQ), not builder flags, which
TensorRT 11 removed. One optimization profile covers every dynamic input, derived from the
manifest's named dims (overridable); a timing cache keyed by TensorRT version and GPU is reused
across builds. ``tensorrt`` is imported only inside ``build``: everything else here runs anywhere.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ArtifactError, EngineMismatchError, ExportError, MissingDependencyError
from ..lineage import inherited_extra, lineage
from ..manifest import Artifact, Manifest, write_artifact

# (min, opt, max) per named dim. The batch max covers parity's batches (64) and the most samples one request may
# carry by default (--max-items 64); the handler splits bigger served batches into runs of at most this many.
PARITY_BATCH = 64
DIM_DEFAULTS = {"batch": (1, 8, PARITY_BATCH), "sequence": (1, 128, 512)}
OTHER_DIM = (1, 16, 64)
INSTALL_HINT = ("install TensorRT 10 or newer on a machine with an NVIDIA GPU: pip install 'modelship[tensorrt]' "
                "(the tensorrt wheels come from NVIDIA's package index)")


@dataclass
class BuildOptions:
    workspace_bytes: int = 4 << 30
    dims: dict = field(default_factory=dict)  # dim name -> (min, opt, max), overriding DIM_DEFAULTS
    timing_cache_dir: str | None = None  # default: ~/.cache/modelship/tensorrt


def parse_dim_override(text: str) -> tuple[str, tuple[int, int, int]]:
    """``batch=1:8:64`` -> ("batch", (1, 8, 64)), checked min <= opt <= max."""
    try:
        name, rng = text.split("=")
        lo, opt, hi = (int(x) for x in rng.split(":"))
    except ValueError:
        raise ArtifactError(f"profile '{text}': expected NAME=MIN:OPT:MAX, e.g. batch=1:8:64") from None
    if not 1 <= lo <= opt <= hi:
        raise ArtifactError(f"profile '{text}': expected 1 <= MIN <= OPT <= MAX")
    return name.strip(), (lo, opt, hi)


def derive_profile(man: Manifest, dims: dict | None = None) -> dict[str, dict[str, list[int]]]:
    """{input name: {"min": shape, "opt": shape, "max": shape}} from the manifest's named dims."""
    dims = {**DIM_DEFAULTS, **(dims or {})}
    if "sequence" not in (dims.keys() - DIM_DEFAULTS.keys()):
        limits = [((man.arch or {}).get("config") or {}).get("max_position_embeddings"),
                  (man.preprocess or {}).get("max_length")]  # the tokenizer never makes longer sequences
        cfg_max = min((int(x) for x in limits if x), default=None)
        if cfg_max:  # never ask for more positions than the model has
            lo, opt, hi = dims["sequence"]
            dims["sequence"] = (lo, min(opt, cfg_max), min(hi, cfg_max))
    unknown = set((dims.keys() - DIM_DEFAULTS.keys())) - {d for t in man.inputs for d in t.shape if isinstance(d, str)}
    if unknown:
        raise ArtifactError(f"profile names dim(s) {', '.join(sorted(unknown))} that no input has; inputs: "
                            + ", ".join(f"{t.name}{t.shape}" for t in man.inputs))
    profile = {}
    for t in man.inputs:
        shapes = {"min": [], "opt": [], "max": []}
        for d in t.shape:
            triple = (d, d, d) if isinstance(d, int) else dims.get(d, OTHER_DIM)
            for key, v in zip(("min", "opt", "max"), triple):
                shapes[key].append(int(v))
        profile[t.name] = shapes
    return profile


def max_batch(profile: dict | None) -> int | None:
    """The most samples one call may carry under an engine's profile (its batch dim's max)."""
    maxes = [shapes["max"][0] for shapes in (profile or {}).values() if shapes.get("max")]
    return min(maxes) if maxes else None


def check_shapes(profile: dict, feed: dict) -> None:
    """Refuse a feed outside the engine's optimization profile, naming the input, dim and range (TensorRT
    itself would only return False from set_input_shape)."""
    from ..errors import InputError

    for name, shapes in profile.items():
        got = list(feed[name].shape)
        for i, (g, lo, hi) in enumerate(zip(got, shapes["min"], shapes["max"])):
            if not lo <= g <= hi:
                raise InputError(f"input '{name}': dim {i} is {g}, outside the engine's profile {lo}..{hi}; "
                                 f"rebuild with modelship compile --profile DIM={lo}:OPT:{max(g, hi)} or send less")


def device_facts() -> dict:
    """TensorRT version, GPU name and compute capability of this machine (what an engine is tied to)."""
    facts = {"tensorrt_version": None, "gpu": None, "compute_capability": None}
    try:
        import tensorrt as trt
        facts["tensorrt_version"] = trt.__version__
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
            facts["compute_capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    except ImportError:
        pass
    return facts


def cache_key(facts: dict) -> str:
    """Timing caches are valid for one TensorRT version on one GPU model."""
    raw = f"{facts['tensorrt_version']}|{facts['gpu']}|{facts['compute_capability']}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def check_compatible(built: dict, here: dict, source: str = "SRC") -> None:
    """Raise EngineMismatchError when an engine was built for another TensorRT version or GPU."""
    if not built:
        raise EngineMismatchError("the engine manifest records no TensorRT build facts; "
                                  f"rebuild with modelship compile {source} --out DIR")
    diffs = [f"{label} {built.get(k)} (this machine: {here.get(k) or 'none'})"
             for k, label in (("tensorrt_version", "TensorRT"), ("gpu", "GPU"),
                              ("compute_capability", "compute capability"))
             if built.get(k) != here.get(k)]
    if diffs:
        raise EngineMismatchError("engine built for " + ", ".join(diffs) +
                                  f"; engines only run where they were built — rebuild with modelship compile {source} --out DIR")


def check_graph(path: Path) -> str:
    """Precision TensorRT will build from this graph; refuses QDQ with uint8 (asymmetric) activations."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    if any(n.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul")
           for n in model.graph.node):
        raise ExportError(f"{path}: an integer-operator (dynamic or QOperator) INT8 model; TensorRT builds INT8 "
                          "from QDQ graphs: use modelship quantize --mode static --activation-type int8")
    for n in qdq:
        if len(n.input) > 2 and n.input[2] in inits and inits[n.input[2]].data_type == onnx.TensorProto.UINT8:
            raise ExportError(f"{path}: QDQ node '{n.name}' uses uint8 (asymmetric) activations; TensorRT needs "
                              "symmetric int8: quantize with --mode static --activation-type int8")
    if qdq:
        return "int8"
    fp16 = any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    return "fp16" if fp16 else "fp32"


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(f"TensorRT is not installed; {INSTALL_HINT}") from None
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        raise MissingDependencyError("no NVIDIA GPU with CUDA is visible; TensorRT engines are built and run on "
                                     "the GPU they are for")
    return trt


def build(art: Artifact, out_dir: str | Path, opts: BuildOptions | None = None) -> Artifact:
    opts = opts or BuildOptions()
    if art.manifest.format != "onnx":
        raise ExportError(f"{art.path}: a '{art.manifest.format}' artifact; compile takes an ONNX artifact "
                          "(FP32, FP16, or static INT8 QDQ)")
    from ..paths import check_out

    check_out(out_dir, source=art.path)
    precision = check_graph(art.model_path)
    profile = derive_profile(art.manifest, opts.dims)
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(art.model_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {art.model_path}: " + "; ".join(
            f"node {e.node()} ({e.node_name() if hasattr(e, 'node_name') else ''}): {e.desc()}" for e in errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_bytes)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 means FP32: TF32 tactics move logits by ~1e-3
    prof = builder.create_optimization_profile()
    for name, shapes in profile.items():
        prof.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(prof)
    facts = device_facts()
    cache_dir = Path(opts.timing_cache_dir or os.path.expanduser("~/.cache/modelship/tensorrt"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file = cache_dir / f"timing-{cache_key(facts)}.cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT could not build an engine from {art.model_path}; see the TensorRT log above")
    cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.engine").write_bytes(bytes(engine))
    man = copy.deepcopy(art.manifest)
    man.format, man.file, man.precision = "tensorrt", "model.engine", precision
    man.created_by, man.parity = "modelship compile", None
    man.extra = {**inherited_extra(art.manifest),
                 "tensorrt": {**facts, "profile": profile, "workspace_bytes": opts.workspace_bytes,
                              "timing_cache": str(cache_file), "strongly_typed": True}}
    for k, v in lineage(art, out).items():
        setattr(man, k, v)
    return write_artifact(out, man)
