"""modelship: take a trained PyTorch model to production and prove it still gives the same answers.

``import modelship as ms`` gives the Python API (``ms.export``, ``ms.quantize``, ``ms.distill``, ``ms.compile``,
``ms.parity``, ``ms.archive``, ``ms.serve``, ``ms.loadtest``, ``ms.promote``, ``ms.tune``, ``ms.pipeline``; see
``modelship.api``),
loaded on first use so that importing a part of modelship (the TorchServe handler does) stays light."""

__version__ = "0.1.0"

import os as _os

from .errors import (ArtifactError, GateError, InputError, MissingDependencyError, ModelshipError,  # noqa: F401
                     ParityError, ServeError)

# Quiet third-party progress bars and hub look-ups: modelship never downloads models at run time.
for _k, _v in {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}.items():
    _os.environ.setdefault(_k, _v)

_API = {"export", "quantize", "distill", "compile", "parity", "archive", "serve", "loadtest", "promote", "tune", "pipeline",
        "Judge", "Server", "Result", "ParityResult", "LoadResult", "TuneResult", "PipelineResult", "Artifact",
        "load_artifact"}


def __getattr__(name):  # PEP 562: the API module is imported when one of its names is first used
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'modelship' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _API)
