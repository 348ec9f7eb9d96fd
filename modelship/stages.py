"""Shared steps of the CLI and the pipeline: open the reference, run the parity gate, record it."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ArtifactError
from .manifest import MANIFEST, Artifact, write_artifact
from .parity import compare, default_tolerance, enforce
from .runners import open_runner


def reference_of(art: Artifact):
    """The PyTorch reference an artifact's parity is judged against (its manifest's ``reference``)."""
    from .models.checkpoints import open_source

    ref = art.resolve(art.manifest.reference)
    if ref is None and art.manifest.format == "torch":
        ref = art.path  # a PyTorch artifact is its own reference
    if ref is None:
        raise ArtifactError(f"{art.path}: the manifest names no PyTorch reference; pass one explicitly")
    return open_source(ref, data=None)


def parity_record(art: Artifact, reference=None, split: str = "test", provider=None, device: str = "cpu",
                  overrides: dict | None = None, tolerance=None) -> dict:
    from .runners.torch_runner import TorchRunner

    ref_art, module = reference if reference is not None else reference_of(art)
    ref_runner = TorchRunner(ref_art, device="cpu", module=module)  # the reference as trained; the candidate on `device`
    cand = open_runner(art, provider=provider, device=device)
    tol = (tolerance or default_tolerance(art.manifest.precision)).override(**(overrides or {}))
    return compare(ref_runner, cand, split=split, tolerance=tol, reference_name=str(ref_art.model_path
                   if not (ref_art.path / MANIFEST).is_file() else ref_art.path))


def gate_parity(art: Artifact, reference=None, json_path: Path | None = None, **kw) -> dict:
    """Record parity into the artifact's manifest and --json, then fail if it did not pass."""
    rec = parity_record(art, reference, **kw)
    art.manifest.parity = rec
    write_artifact(art.path, art.manifest)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rec, indent=2) + "\n")
    return enforce(rec)
