"""Runners: one per backend, all validating feeds against the manifest the same way.

``open_runner(artifact)`` picks the backend from the artifact's format; heavy or optional imports
(onnxruntime providers, TensorRT, CUDA) happen inside the backend module, never here.
"""

from __future__ import annotations

import importlib

from ..errors import ArtifactError
from ..manifest import Artifact
from .base import Runner

BACKENDS = {  # artifact format -> "module:Class"
    "torch": "modelship.runners.torch_runner:TorchRunner",
    "onnx": "modelship.runners.onnxrt:OnnxRuntimeRunner",
    "tensorrt": "modelship.runners.tensorrt:TensorRTRunner",
}


def open_runner(art: Artifact, **options) -> Runner:
    target = BACKENDS.get(art.manifest.format)
    if target is None:
        raise ArtifactError(f"{art.path}: no runner for format '{art.manifest.format}'; expected one of {', '.join(BACKENDS)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(art, **options)


__all__ = ["Runner", "open_runner", "BACKENDS"]
