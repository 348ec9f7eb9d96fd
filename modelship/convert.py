"""Convert and gate: every way of making a variant, each followed by its parity gate. The API, the CLI, the
pipeline, the tests and the benchmarks all convert through these four functions; each writes an artifact folder,
records its parity record in the manifest (and ``json_path``), and raises ``ParityError`` (kind ``parity`` or
``weak``) when the gate fails — the artifact stays on disk with its failed record, and ``archive`` refuses it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import data as datasets
from .errors import ModelshipError
from .exporters import DEFAULT_OPSET
from .manifest import Artifact, load_artifact
from .stages import gate_parity, is_root


@dataclass
class Judge:
    """How a gate judges, beyond the precision's defaults: a bound you set is used as given (not capped by the
    outputs' spread); ``output_tol`` sets one output's (name -> {"atol": x, "rtol": y}); ``allow_weak`` accepts on
    purpose a verdict the data cannot support (recorded)."""

    max_abs_diff: float | None = None
    rtol: float | None = None
    min_agreement: float | None = None
    max_accuracy_drop: float | None = None
    output_tol: dict = field(default_factory=dict)
    allow_weak: bool = False

    @classmethod
    def of(cls, judge: "Judge | dict | None") -> "Judge":
        if isinstance(judge, Judge):
            return judge
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(judge or {}) - known)
        if unknown:
            raise ModelshipError(f"unknown tolerance key(s) {', '.join(unknown)}; expected some of "
                                 f"{', '.join(sorted(known))}")
        return cls(**(judge or {}))

    def kwargs(self) -> dict:
        """The keyword arguments of ``stages.parity_record`` / ``gate_parity``."""
        return {"overrides": {"max_abs_diff": self.max_abs_diff, "rtol": self.rtol,
                              "min_top1_agreement": self.min_agreement, "max_accuracy_drop": self.max_accuracy_drop},
                "per_output": dict(self.output_tol), "allow_weak": self.allow_weak}


def artifact(a: Artifact | str | Path) -> Artifact:
    """An artifact given as itself or as its folder."""
    return a if isinstance(a, Artifact) else load_artifact(a)


def data_spec(data) -> dict | None:
    """``--data`` as given by a user (a path, a shipped dataset's name) or already resolved (a spec dict)."""
    return data if isinstance(data, dict) or data is None else datasets.resolve(str(data))


def export(source, out, *, data=None, task: str | None = None, weights=None, output_names: list | None = None,
           opset: int = DEFAULT_OPSET, exporter: str | None = None, judge: Judge | dict | None = None,
           provider: str | None = None, json_path=None, log=lambda msg: None) -> Artifact:
    """A PyTorch source (a torch artifact, a ``.pt2``, a Hugging Face folder, ``torchvision:NAME`` with ``weights``)
    to ONNX, gated against the root PyTorch model of its lineage (a student's: its teacher, and the conversion
    against the student itself)."""
    from .exporters.onnx_export import export as to_onnx
    from .models.checkpoints import TORCHVISION, open_source, save_source

    if exporter not in (None, "torchscript", "dynamo"):
        raise ModelshipError(f"unknown exporter '{exporter}'; expected torchscript or dynamo")
    source = source.path if isinstance(source, Artifact) else source
    src, module = open_source(source, data=None if data is None else str(data), task=task, weights=weights,
                              output_names=output_names)
    if str(source).startswith(TORCHVISION):  # the reference needs a folder of its own: the weights + its manifest
        src = save_source(src, Path(out).with_name(Path(out).name + "-torch"))
        log(f"imported {source} as {src.path} (the PyTorch reference of what is made from it)")
    art = to_onnx(src, module, out, opset=opset, dynamo=None if exporter is None else exporter == "dynamo")
    gate_parity(art, reference=(src, module) if is_root(src) else None, provider=provider, json_path=json_path,
                **Judge.of(judge).kwargs())
    return art


def quantize(source, mode: str, out, *, options=None, until_parity: bool = False, data=None,
             judge: Judge | dict | None = None, provider: str | None = None, json_path=None,
             log=lambda msg: None) -> Artifact:
    """An ONNX artifact to its INT8 (dynamic, static QDQ), FP16 or optimized variant, gated against the root PyTorch
    model. ``until_parity``: when the INT8 gate fails, the fewest sensitive nodes stay in float until it passes."""
    from .quantization.variants import QuantizeOptions, make_variant

    art, spec = artifact(source), data_spec(data)
    opts = options if isinstance(options, QuantizeOptions) else QuantizeOptions(**(options or {}))
    kw = {"provider": provider, **Judge.of(judge).kwargs()}
    if until_parity:
        from .quantization.until_parity import until_parity as search

        return search(art, mode, out, opts, data=spec, judge=kw, json_path=json_path, log=log)
    variant = make_variant(art, mode, out, opts, data=spec)
    gate_parity(variant, json_path=json_path, **kw)
    return variant


def distill(teacher, out, *, student: str = "mlp-small", temperature: float | None = None,
            alpha: float | None = None, seed: int = 0, epochs: int | None = None, layers: int | None = None,
            unlabelled=None, judge: Judge | dict | None = None, json_path=None, log=lambda msg: None) -> Artifact:
    """A smaller student trained on the teacher's soft labels (``manifest.extra["distillation"]`` compares them),
    gated against its teacher with the student tolerance. Digits teachers: a zoo ``student`` (and the same student
    trained without the teacher, to compare); text teachers: the teacher with ``layers`` of its transformer layers,
    trained on its logits over its training texts and the ``unlabelled`` texts (a CSV/JSONL with a text column)."""
    from .models.checkpoints import open_source
    from .comparison import tolerance_of
    from .quantization.distill import distill as train_student

    teacher_path = teacher.path if isinstance(teacher, Artifact) else teacher
    kd = {k: v for k, v in (("temperature", temperature), ("alpha", alpha)) if v is not None}
    art, report = train_student(teacher_path, out, student=student, seed=seed, epochs=epochs, layers=layers,
                                unlabelled=unlabelled, log=log, **kd)
    try:
        gate_parity(art, reference=open_source(teacher_path), tolerance=tolerance_of(art.manifest),
                    **Judge.of(judge).kwargs())
    finally:  # the comparison is written even when the student fails its gate
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps({"distillation": report, "parity": art.manifest.parity}, indent=2)
                                       + "\n")
    return art


def compile(source, out, *, profile: dict | None = None, workspace_gb: float = 4.0, timing_cache_dir=None,
            judge: Judge | dict | None = None, json_path=None) -> Artifact:  # noqa: A001 — the command's name
    """An ONNX artifact to a TensorRT engine (an NVIDIA GPU and TensorRT 10+), gated like any variant."""
    from .exporters.tensorrt import BuildOptions, build

    opts = BuildOptions(workspace_bytes=int(workspace_gb * (1 << 30)), dims=dict(profile or {}),
                        timing_cache_dir=str(timing_cache_dir) if timing_cache_dir else None)
    engine = build(artifact(source), out, opts)
    gate_parity(engine, json_path=json_path, **Judge.of(judge).kwargs())
    return engine
