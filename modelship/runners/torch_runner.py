"""PyTorch eager runner (CPU or CUDA)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ArtifactError, MissingDependencyError
from ..manifest import Artifact
from .base import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, art: Artifact, device: str = "cpu", module: torch.nn.Module | None = None, **_):
        super().__init__(art)
        from ..models.checkpoints import load_module

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise MissingDependencyError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
        self._device = torch.device(device)
        if self._device.type == "cuda":  # FP32 means FP32: no TF32 convolutions or matmuls
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.module = (module if module is not None else load_module(art)).to(self._device)
        self._out = [t.name for t in self.outputs]

    @property
    def device(self) -> str:
        return str(self._device)

    def _infer(self, feed: dict) -> dict:
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feed[t.name])).to(self._device) for t in self.inputs]
            out = self.module(*args)
        if isinstance(out, dict):  # outputs returned by name: taken by name (in order, when renamed)
            out = [out[n] for n in self._out] if set(self._out) <= set(out) else list(out.values())
        elif hasattr(out, "_fields"):  # a named tuple
            out = [getattr(out, n) for n in self._out] if set(self._out) <= set(out._fields) else list(out)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if len(outs) != len(self._out):
            raise ArtifactError(f"{self.artifact.path}: the model returned {len(outs)} output(s); the manifest names "
                                f"{len(self._out)} ({', '.join(self._out)})")
        return {name: o.detach().float().cpu().numpy() if o.dtype == torch.bfloat16 else o.detach().cpu().numpy()
                for name, o in zip(self._out, outs)}
