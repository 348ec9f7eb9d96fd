"""modelship: take a trained PyTorch model to production and prove it still gives the same answers."""

__version__ = "0.1.0"

import os as _os

# Quiet third-party progress bars and hub look-ups: modelship never downloads models at run time.
for _k, _v in {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}.items():
    _os.environ.setdefault(_k, _v)
