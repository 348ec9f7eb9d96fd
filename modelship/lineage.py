"""Lineage: what a derived artifact takes from its parent — the path and hash of its parent, the root PyTorch model
it is judged against, the facts it inherits, and its preprocessing files (copied beside it)."""

from __future__ import annotations

import os
from typing import Any

from .manifest import Artifact, Manifest, relpath
from .preprocess import carry

INHERITED_EXTRA = ("opset", "model_type", "distilled_from", "student_tolerance")  # facts a derived artifact keeps


def inherited_extra(man: Manifest) -> dict:
    return {k: v for k, v in man.extra.items() if k in INHERITED_EXTRA}


def lineage(src: Artifact, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Fields a derived artifact in ``out_dir`` takes from its parent ``src`` (its preprocessing files are
    copied beside it)."""
    ref = src.resolve(src.manifest.reference) if src.manifest.reference else src.path
    return {
        "parent": relpath(src.path, out_dir),
        "parent_sha256": src.manifest.sha256,
        "reference": relpath(ref, out_dir),
        "preprocess": carry(src, out_dir),
    }
