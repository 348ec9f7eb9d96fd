"""torch -> ONNX with named dynamic axes, onnx.checker, shape inference, manifest and parity gate."""

from __future__ import annotations

import copy
import io
import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExportError
from . import DEFAULT_OPSET
from ..lineage import inherited_extra, lineage
from ..manifest import Artifact, Manifest, relpath, write_artifact
from .. import data as datasets
from ..paths import check_out, data_path



@dataclass(frozen=True)
class ExportConfig:
    """Per-loader facts (Optimum-style): which torch.onnx exporter handles this kind of source."""

    dynamo: bool


EXPORT_CONFIGS = {
    "zoo": ExportConfig(dynamo=False),
    "hf": ExportConfig(dynamo=False),
    "pt2": ExportConfig(dynamo=True),  # an ExportedProgram goes through the dynamo exporter as is
}


# onnxruntime's transformer optimizer fusions by Hugging Face model_type (others: generic graph optimization)
OPTIMIZER_TYPES = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert",
                   "electra": "bert", "vit": "vit"}


def example_feed(src: Artifact, batch: int = 2) -> dict:
    man = src.manifest
    if datasets.has_raw(man.data) and man.preprocess:  # raw samples, preprocessed the source's own way
        from ..models.reference import reference_preprocessor

        raw, _ = datasets.load_raw(man.data, "test")
        return reference_preprocessor(src)(raw[:batch])
    feed, _ = datasets.load(man.data, "test", man.inputs)
    return {k: v[:batch] for k, v in feed.items()}


def export(src: Artifact, module: torch.nn.Module, out_dir: str | Path, opset: int = DEFAULT_OPSET,
           dynamo: bool | None = None) -> Artifact:
    out = Path(out_dir)
    check_out(out, source=src.path if (src.path / "manifest.json").is_file() else src.model_path,
              data=data_path(src.manifest.data))
    out.mkdir(parents=True, exist_ok=True)
    man = src.manifest
    cfg = EXPORT_CONFIGS.get(man.loader or "zoo", EXPORT_CONFIGS["zoo"])
    use_dynamo = cfg.dynamo if dynamo is None else dynamo
    feed = example_feed(src)
    args = tuple(torch.from_numpy(feed[t.name]) for t in man.inputs)
    in_names = [t.name for t in man.inputs]
    out_names = [t.name for t in man.outputs]
    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                    for t in man.inputs + man.outputs}
    path = out / "model.onnx"
    import logging

    for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            if use_dynamo:
                _export_dynamo(src, module, args, path, opset, dynamic_axes, in_names, out_names)
            else:
                torch.onnx.export(module, args, str(path), input_names=in_names, output_names=out_names,
                                  dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                                  do_constant_folding=True)
    except Exception as e:  # noqa: BLE001 — exporters raise many types
        raise ExportError(f"torch.onnx could not export {src.path} ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    check(path)
    manifest = copy.deepcopy(man)
    manifest.format, manifest.precision, manifest.file = "onnx", "fp32", "model.onnx"
    manifest.created_by = "modelship export"
    manifest.parity = None
    manifest.loader = None
    manifest.extra = {**inherited_extra(man), "opset": opset, "exporter": "dynamo" if use_dynamo else "torchscript"}
    if OPTIMIZER_TYPES.get(man.extra.get("model_type")):  # lets the optimizer apply its transformer fusions
        manifest.extra["model_type"] = OPTIMIZER_TYPES[man.extra["model_type"]]
    else:
        manifest.extra.pop("model_type", None)
    for k, v in lineage(src, out).items():
        setattr(manifest, k, v)
    if not (src.path / "manifest.json").is_file():  # a raw checkpoint: point at the file itself
        manifest.parent = manifest.reference = relpath(src.model_path, out)
    return write_artifact(out, manifest)


def _export_dynamo(src, module, args, path, opset, dynamic_axes, in_names, out_names):
    from torch.export import Dim, load

    if (src.manifest.loader == "pt2"):
        program = load(str(src.model_path))
    else:
        dims = {}
        shapes = {}
        for t in src.manifest.inputs:
            shapes[t.name] = {i: dims.setdefault(d, Dim(d, min=1)) for i, d in enumerate(t.shape) if isinstance(d, str)}
        program = torch.export.export(module, args, dynamic_shapes=shapes)
    onnx_program = torch.onnx.export(program, args, input_names=in_names, output_names=out_names,
                                     opset_version=opset, dynamo=True, optimize=True, verbose=False)
    onnx_program.save(str(path))
    _rename_dims(path, src.manifest)


def _rename_dims(path: Path, man: Manifest) -> None:
    """Give the dynamo exporter's symbolic dims (s0, s1…) the manifest's names."""
    import onnx

    model = onnx.load(str(path))
    specs = {t.name: t for t in man.inputs + man.outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        spec = specs.get(vi.name)
        if spec is None:
            continue
        for d, want in zip(vi.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str):
                d.dim_param = want
    onnx.save(model, str(path))


def check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{path}: onnx.checker rejected the exported model ({str(e).splitlines()[0][:300]})") from None
