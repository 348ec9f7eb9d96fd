"""Shared steps of the CLI and the pipeline: open the reference, run the parity gate, record it."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ArtifactError
from .manifest import MANIFEST, Artifact, write_artifact
from .comparison import compare, enforce, tolerance_of
from .runners import open_runner


def reference_of(art: Artifact):
    """The root PyTorch model of an artifact's lineage (its manifest's ``reference``; a student's is its
    teacher), opened as (Artifact, module)."""
    from .models.checkpoints import open_source

    ref = art.resolve(art.manifest.reference)
    if ref is None and art.manifest.format == "torch":
        ref = art.path  # a PyTorch artifact with no reference is the root of its lineage
    if ref is None:
        raise ArtifactError(f"{art.path}: the manifest names no PyTorch reference; pass one explicitly")
    return open_source(ref, data=None)


def is_root(art: Artifact) -> bool:
    """A PyTorch source that is its own reference (trained here, or a user's checkpoint)."""
    ref = art.resolve(art.manifest.reference)
    return art.manifest.format == "torch" and (ref is None or ref == art.path)


def _name(ref_art: Artifact) -> str:
    return str(ref_art.path if (ref_art.path / MANIFEST).is_file() else ref_art.model_path)


def parity_record(art: Artifact, reference=None, split: str = "test", provider=None, device: str = "cpu",
                  overrides: dict | None = None, tolerance=None, allow_weak: bool = False, data: dict | None = None,
                  per_output: dict | None = None) -> dict:
    from .runners.torch_runner import TorchRunner

    ref_art, module = reference if reference is not None else reference_of(art)
    ref_runner = TorchRunner(ref_art, device="cpu", module=module)  # the reference as trained; the candidate on `device`
    cand = open_runner(art, provider=provider, device=device)
    tol = (tolerance or tolerance_of(art.manifest)).adjusted(overrides, per_output)
    return compare(ref_runner, cand, split=split, tolerance=tol, reference_name=_name(ref_art),
                   allow_weak=allow_weak, data=data)


def student_of(art: Artifact) -> Path | None:
    """The distilled student's PyTorch model that ``art`` was converted from (following its parents), or None when
    ``art`` is not made from a student (or is the student itself)."""
    from .manifest import is_artifact, load_artifact

    if not art.manifest.extra.get("distilled_from"):
        return None
    node = art
    while node.manifest.format != "torch":
        parent = node.resolve(node.manifest.parent)
        if parent is None or not is_artifact(parent):
            return None
        node = load_artifact(parent, verify=False)
    return None if node.path == art.path else node.path


def gate_parity(art: Artifact, reference=None, json_path: Path | None = None, **kw) -> dict:
    """Judge ``art`` against the root PyTorch model of its lineage, record the result in its manifest and
    --json, then fail if it did not pass. Anything made from a distilled student (its ONNX export, INT8, FP16,
    engine) is judged against the teacher with the student's tolerance, and the conversion itself against the
    student with its own precision's tolerance (``conversion``), so a broken conversion cannot hide behind the
    student's looser bound."""
    from .models.checkpoints import open_source
    from .comparison import default_tolerance

    rec = parity_record(art, reference, **kw)
    student = student_of(art)
    if student is not None:
        pkw = {k: v for k, v in kw.items() if k not in ("tolerance", "overrides", "per_output")}
        conv = parity_record(art, open_source(student), tolerance=default_tolerance(art.manifest.precision), **pkw)
        rec["conversion"] = {k: conv[k] for k in ("reference", "max_abs_diff", "top1_agreement", "per_output",
                                                  "tolerance", "weak", "failures", "passed", "kind")}
        if not conv["passed"]:
            rec["failures"] = rec["failures"] + [f"conversion from {conv['reference']}: {f}" for f in conv["failures"]]
            rec["passed"] = False
            rec["kind"] = "parity" if "parity" in (rec["kind"], conv["kind"]) else "weak"
    art.manifest.parity = rec
    write_artifact(art.path, art.manifest)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rec, indent=2) + "\n")
    return enforce(rec)
