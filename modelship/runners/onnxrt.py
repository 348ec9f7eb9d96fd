"""ONNX Runtime runner. Providers by availability (TensorRT EP -> CUDA EP -> CPU) or by name."""

from __future__ import annotations

from ..errors import ArtifactError, MissingDependencyError
from ..manifest import Artifact
from .base import Runner

PREFERENCE = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
ALIASES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def _tensorrt_libs() -> bool:
    """onnxruntime-gpu lists the TensorRT EP even where TensorRT's libraries are missing."""
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def choose_providers(provider: str | None = None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider in (None, "auto"):
        return [p for p in PREFERENCE if p in available
                and (p != "TensorrtExecutionProvider" or _tensorrt_libs())]
    name = ALIASES.get(provider.lower(), provider)
    if name not in available:
        raise MissingDependencyError(
            f"execution provider '{provider}' is not available in this onnxruntime (has: {', '.join(available)}); "
            "for CUDA/TensorRT install the gpu extra: pip install 'modelship[gpu]'")
    return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, art: Artifact, provider: str | None = None, threads: int = 0, tf32: bool = False, **_):
        super().__init__(art)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = choose_providers(provider)
        try:
            # FP32 means FP32: the CUDA EP's default TF32 math moves logits by ~1e-3 (opt in with tf32=True)
            options = [{"use_tf32": "1" if tf32 else "0"} if p == "CUDAExecutionProvider" else {} for p in self.providers]
            self.session = ort.InferenceSession(str(art.model_path), opts, providers=self.providers,
                                                provider_options=options)
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"{art.model_path}: onnxruntime cannot load this model ({str(e).splitlines()[0][:300]}); "
                                "expected a valid ONNX file — re-export it") from None
        self._out = [o.name for o in self.session.get_outputs()]
        self._names_out = [t.name for t in self.outputs]

    @property
    def device(self) -> str:
        return "cuda" if self.session.get_providers()[0] != "CPUExecutionProvider" else "cpu"

    def _infer(self, feed: dict) -> dict:
        return dict(zip(self._names_out, self.session.run(self._out, feed)))
