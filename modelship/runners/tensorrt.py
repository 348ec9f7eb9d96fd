"""TensorRT runner: inputs and outputs on the GPU, one CUDA stream, shapes set and checked per call."""

from __future__ import annotations

import numpy as np

from ..errors import EngineMismatchError, ModelshipError
from ..exporters.tensorrt import check_compatible, check_shapes, device_facts, max_batch, require_tensorrt
from ..manifest import Artifact
from .base import Runner


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, art: Artifact, **_):
        super().__init__(art)
        trt = require_tensorrt()
        built = art.manifest.extra.get("tensorrt") or {}
        check_compatible(built, device_facts(), source=str(art.resolve(art.manifest.parent) or "SRC"))
        import torch

        self._torch, self._trt = torch, trt
        self.profile = built.get("profile") or {}
        self.max_batch = max_batch(self.profile)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # kept alive as long as the engine: the engine needs it
        self.engine = self._runtime.deserialize_cuda_engine(art.model_path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"{art.model_path}: TensorRT could not deserialize this engine; "
                                      "rebuild with modelship compile")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._out = [t.name for t in self.outputs]
        # output dtypes through TensorRT's own mapping (DataType.HALF -> float16, ...), not by name
        self._out_dtype = {n: torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                           for n in self._out}

    @property
    def device(self) -> str:
        return "cuda"

    def _infer(self, feed: dict) -> dict:
        torch = self._torch
        check_shapes(self.profile, feed)  # a clear InputError instead of stale or truncated output
        with torch.cuda.stream(self.stream):
            keep = []
            for t in self.inputs:
                x = torch.from_numpy(np.ascontiguousarray(feed[t.name])).to("cuda", non_blocking=True)
                keep.append(x)
                if not self.context.set_input_shape(t.name, tuple(x.shape)):
                    raise ModelshipError(f"TensorRT refused input '{t.name}' of shape {list(x.shape)} "
                                         f"(profile {self.profile.get(t.name)})")
                self.context.set_tensor_address(t.name, x.data_ptr())
            outs = {}
            for name in self._out:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ModelshipError(f"TensorRT could not infer the shape of output '{name}' ({list(shape)})")
                y = torch.empty(shape, dtype=self._out_dtype[name], device="cuda")
                self.context.set_tensor_address(name, y.data_ptr())
                outs[name] = y
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise ModelshipError(f"TensorRT failed to run {self.artifact.model_path} (execute_async_v3 returned "
                                     "False; see the TensorRT log)")
        self.stream.synchronize()
        return {k: v.float().cpu().numpy() if v.dtype == torch.float16 else v.cpu().numpy() for k, v in outs.items()}
