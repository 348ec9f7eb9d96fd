"""TensorRT runner: inputs and outputs on the GPU, one CUDA stream, shapes set per call."""

from __future__ import annotations

import numpy as np

from ..export.tensorrt import _require_tensorrt, check_compatible, device_facts
from ..manifest import Artifact
from .base import Runner


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, art: Artifact, **_):
        super().__init__(art)
        trt = _require_tensorrt()
        import torch

        check_compatible(art.manifest.extra.get("tensorrt"), device_facts(),
                         source=str(art.resolve(art.manifest.parent) or "SRC"))
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(art.model_path.read_bytes())
        if self.engine is None:
            from ..errors import EngineMismatchError
            raise EngineMismatchError(f"{art.model_path}: TensorRT could not deserialize this engine; "
                                      "rebuild with modelship compile")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._out = [t.name for t in self.outputs]

    @property
    def device(self) -> str:
        return "cuda"

    def _infer(self, feed: dict) -> dict:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            keep = []
            for t in self.inputs:
                x = torch.from_numpy(np.ascontiguousarray(feed[t.name])).to("cuda", non_blocking=True)
                keep.append(x)
                self.context.set_input_shape(t.name, tuple(x.shape))
                self.context.set_tensor_address(t.name, x.data_ptr())
            outs = {}
            for name in self._out:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = {"float16": torch.float16}.get(str(self.engine.get_tensor_dtype(name)).split(".")[-1].lower(),
                                                       torch.float32)
                y = torch.empty(shape, dtype=dtype, device="cuda")
                self.context.set_tensor_address(name, y.data_ptr())
                outs[name] = y
            self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outs.items()}
