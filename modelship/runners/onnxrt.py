"""ONNX Runtime runner. Providers by availability (CUDA EP -> CPU) or by name (cpu, cuda, tensorrt)."""

from __future__ import annotations

from ..errors import ArtifactError, MissingDependencyError
from ..machine import exact_int8
from ..manifest import Artifact
from .base import Runner

# "auto" never picks TensorRT's EP: it builds engines silently, with its own precision rules and caches.
# Ask for it by name (--provider tensorrt), or build an engine with modelship compile.
PREFERENCE = ["CUDAExecutionProvider", "CPUExecutionProvider"]
ALIASES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def choose_providers(provider: str | None = None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider in (None, "auto"):
        return [p for p in PREFERENCE if p in available]
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
        if exact_int8():  # x86 without VNNI: the exact (u8u8) INT8 path instead of the saturating u8s8 one
            opts.add_session_config_entry("session.x64quantprecision", "1")
        self.providers = choose_providers(provider)
        try:
            # FP32 means FP32: the CUDA EP's default TF32 math moves logits by ~1e-3 (opt in with tf32=True)
            options = [{"use_tf32": "1" if tf32 else "0"} if p == "CUDAExecutionProvider" else {} for p in self.providers]
            self.session = ort.InferenceSession(str(art.model_path), opts, providers=self.providers,
                                                provider_options=options)
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own Fail/InvalidGraph types
            raise ArtifactError(f"{art.model_path}: onnxruntime cannot load this model ({str(e).splitlines()[0][:300]}); "
                                "expected a valid ONNX file — re-export it") from None
        graph_out = [o.name for o in self.session.get_outputs()]
        self._out = [t.name for t in self.outputs]  # outputs are fetched by name, never by position
        missing = [n for n in self._out if n not in graph_out]
        if missing:
            raise ArtifactError(f"{art.model_path}: the graph has no output(s) {', '.join(missing)} named in the "
                                f"manifest (graph outputs: {', '.join(graph_out)}); re-export the artifact")

    @property
    def device(self) -> str:
        return "cuda" if self.session.get_providers()[0] != "CPUExecutionProvider" else "cpu"

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def _infer(self, feed: dict) -> dict:
        return dict(zip(self._out, self.session.run(self._out, feed)))
