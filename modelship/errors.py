"""Typed errors. Each message says what is wrong and what was expected, so a user can act on it."""


class ModelshipError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""

    exit_code = 2


class ArtifactError(ModelshipError):
    """A path is missing, is not an artifact/checkpoint, or its files do not match the manifest."""


class InputError(ModelshipError):
    """A feed does not match the manifest's input signature (name, dtype, shape, values)."""


class ExportError(ModelshipError):
    """A model could not be converted."""


class QuantizeError(ModelshipError):
    """A variant could not be produced."""


class ParityError(ModelshipError):
    """A candidate's outputs moved beyond tolerance; the record is attached."""

    exit_code = 1

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record


class ServeError(ModelshipError):
    """TorchServe could not be started, reached or stopped."""


class GateError(ModelshipError):
    """A load-test or benchmark gate failed."""

    exit_code = 1


class MissingDependencyError(ModelshipError):
    """An optional component (TensorRT, CUDA, Java) is not installed."""


class EngineMismatchError(ArtifactError):
    """A TensorRT engine was built for another TensorRT version or GPU."""
