"""Typed errors. Each message says what is wrong and what was expected, so a user can act on it.

Every error has a ``kind``, the same word a gate result carries, so callers (the CLI, ``tune``, CI) sort failures
without reading message text:

- ``parity``: an answer moved beyond tolerance (labels, differences, accuracy);
- ``weak``: the evidence could not support a verdict (data that cannot tell a good model from a bad one);
- ``slo``: a latency (or recovery, memory) target was missed;
- ``errors``: requests failed, a server or a tool did not do its job;
- ``input``: what the user gave is wrong (a path, a file, an option, a request).
"""

KINDS = ("parity", "weak", "slo", "errors", "input")


class ModelshipError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""

    exit_code = 2
    kind = "input"


class ArtifactError(ModelshipError):
    """A path is missing, is not an artifact/checkpoint, or its files do not match the manifest."""


class InputError(ModelshipError):
    """A feed does not match the manifest's input signature (name, dtype, shape, values)."""


class ExportError(ModelshipError):
    """A model could not be converted."""

    kind = "errors"


class QuantizeError(ModelshipError):
    """A variant could not be produced."""

    kind = "errors"


class ParityError(ModelshipError):
    """A candidate's outputs moved beyond tolerance (kind ``parity``), or its evidence was weak (``weak``); the
    record is attached."""

    exit_code = 1

    def __init__(self, message: str, record: dict | None = None, kind: str | None = None):
        super().__init__(message)
        self.record = record
        self.kind = kind or (record or {}).get("kind") or "parity"


class ServeError(ModelshipError):
    """TorchServe could not be started, reached or stopped."""

    kind = "errors"


class GateError(ModelshipError):
    """A load-test, tune or pipeline gate failed; ``result`` is what was measured, ``kind`` the first gate that
    failed (slo, errors, parity, weak)."""

    exit_code = 1

    def __init__(self, message: str, result: dict | None = None, kind: str = "errors"):
        super().__init__(message)
        self.result = result
        self.kind = kind


class MissingDependencyError(ModelshipError):
    """An optional component (TensorRT, CUDA, Java) is not installed."""

    kind = "errors"


class EngineMismatchError(ArtifactError):
    """A TensorRT engine was built for another TensorRT version or GPU."""
