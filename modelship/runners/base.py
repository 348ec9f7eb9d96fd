"""The runner base class: public ``infer`` validates, backends implement ``_infer``."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..manifest import Artifact, TensorSpec


class Runner:
    backend = "base"
    max_batch: int | None = None  # the most samples one call takes (a TensorRT profile's max); None: any

    def __init__(self, art: Artifact):
        self.artifact = art
        self.manifest = art.manifest
        self.inputs: list[TensorSpec] = art.manifest.inputs
        self.outputs: list[TensorSpec] = art.manifest.outputs
        self._names = {t.name for t in self.inputs}
        self._dtypes = [np.dtype(t.dtype) for t in self.inputs]

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def provider(self) -> str:
        """What runs the model: the ONNX Runtime execution provider, or the backend's name."""
        return self.backend

    def infer(self, feed: dict) -> dict:
        """Validate ``feed`` (input name -> numpy array) against the manifest, then run the backend."""
        self.validate(feed)
        return self._infer(feed)

    def validate(self, feed: dict) -> None:
        if feed.keys() != self._names:
            check_names(self._names, feed, f"inputs: {self.signature()}")
        dims: dict[str, int] = {}
        for spec, dtype in zip(self.inputs, self._dtypes):
            a = feed[spec.name]
            if not isinstance(a, np.ndarray):
                raise InputError(f"input '{spec.name}': expected a numpy array, got {type(a).__name__}")
            if a.dtype != dtype:
                raise InputError(f"input '{spec.name}': dtype {a.dtype}, expected {spec.dtype}")
            if a.ndim != len(spec.shape):
                raise InputError(f"input '{spec.name}': shape {list(a.shape)} has {a.ndim} dims, expected {fmt_shape(spec.shape)}")
            for got, want in zip(a.shape, spec.shape):
                if isinstance(want, int):
                    if got != want:
                        raise InputError(f"input '{spec.name}': shape {list(a.shape)}, expected {fmt_shape(spec.shape)}")
                elif dims.setdefault(want, got) != got:
                    raise InputError(f"input '{spec.name}': dim '{want}' is {got} but {dims[want]} in another input; "
                                     f"expected the same {want} for every input")
                elif got == 0:
                    raise InputError(f"input '{spec.name}': dim '{want}' is 0; expected at least 1")

    def signature(self) -> str:
        return ", ".join(f"{t.name}: {t.dtype}{fmt_shape(t.shape)}" for t in self.inputs)

    def _infer(self, feed: dict) -> dict:
        raise NotImplementedError


def check_names(expected, given, wanted: str) -> None:
    """Raise InputError naming missing and unexpected inputs; ``wanted`` describes what was expected."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected), key=str)
    if missing or extra:
        parts = ([f"missing input(s) {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected input(s) {', '.join(map(str, extra))}"] if extra else [])
        raise InputError(f"{'; '.join(parts)}; expected {wanted}")


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"
