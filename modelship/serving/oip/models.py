"""KServe's side of the v2 front: each model of the store as a KServe ``Model`` (metadata from its manifest, gRPC
inference forwarded to TorchServe, readiness and versions from TorchServe's management API) and a ``DataPlane``
whose server readiness is every model's. Imports kserve at its top: only the running front imports this module.
Written against kserve 0.21's public API (``Model``, ``DataPlane``, ``InferRequest``/``InferInput``/
``InferOutput``/``InferResponse``)."""

from __future__ import annotations

import contextvars
import json
import zipfile
from pathlib import Path

import numpy as np
from kserve import Model
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from ...manifest import MANIFEST, V2_DTYPES, V2_NUMPY, Manifest
from ..codec import BINARY_HEADER, DESCRIBE, SERVED_ON
from ..state import visible_mars
from .upstream import Upstream, loads, message

VERSION = contextvars.ContextVar("modelship_oip_version", default=None)  # the version a request names


def tensors(specs) -> list[dict]:
    """Manifest tensor specs as protocol metadata: named dynamic dims are -1."""
    return [{"name": t.name, "datatype": V2_DTYPES.get(t.dtype, t.dtype.upper()),
             "shape": [d if isinstance(d, int) else -1 for d in t.shape]} for t in specs]


def metadata(man: Manifest) -> tuple[list[dict], list[dict]]:
    """What a client sends and gets back: a raw-input model (text, image) takes one BYTES input (texts as UTF-8,
    images as PNG/JPEG bytes), a tensor model its tensors."""
    kind = (man.preprocess or {}).get("kind")
    inputs = [{"name": kind, "datatype": "BYTES", "shape": [-1]}] if kind else tensors(man.inputs)
    return inputs, tensors(man.outputs)


class Served(Model):
    """One model of the store."""

    def __init__(self, name: str, man: Manifest, upstream: Upstream):
        super().__init__(name, return_response_headers=True)
        self.inputs, self.outputs = metadata(man)
        self.upstream = upstream
        self.ready = True

    async def versions(self) -> list[dict]:
        """TorchServe's record of each version (its workers and their status); the requested one must be there."""
        if self.upstream.token.key_file is not None and self.upstream.token.key("management") is None:
            raise ModelNotReady(self.name, "TorchServe is starting (no management token yet)")
        try:
            status, listed = await self.upstream.versions(self.name)
        except OSError as e:
            raise ModelNotReady(self.name, f"TorchServe's management API did not answer: {e}") from None
        if status == 404:
            raise ModelNotFound(self.name)
        if status != 200:
            raise ModelNotReady(self.name, f"TorchServe answered {status}")
        want = VERSION.get()
        if want is not None and not any(v.get("modelVersion") == want for v in listed):
            raise ModelNotFound(f"{self.name} version {want}")
        return listed

    async def healthy(self) -> bool:
        try:
            listed = await self.versions()
        except ModelNotReady:
            return False
        want = VERSION.get()
        mine = [v for v in listed if (v.get("modelVersion") == want if want else v.get("isDefault", True))]
        return bool(mine) and all(w.get("status") == "READY" for v in mine for w in v.get("workers") or [{}])

    def get_input_types(self):
        return self.inputs

    def get_output_types(self):
        return self.outputs

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        """A gRPC request, sent on to TorchServe in the binary tensor extension; its answer back in the protocol."""
        version = payload.model_version or VERSION.get()
        body, send = rest_body(payload, headers or {})
        try:
            status, got, content = await self.upstream.predict(self.name, version, body, send)
        except OSError as e:
            raise InferenceError(f"TorchServe did not answer: {e}") from None
        if response_headers is not None and got.get(SERVED_ON.lower()):
            response_headers[SERVED_ON] = got[SERVED_ON.lower()]
        if status != 200:
            raise refusal(status, content, self.name, version)
        return response_of(loads(content), payload, self.name)


def rest_body(payload: InferRequest, headers: dict) -> tuple[bytes, dict]:
    """A decoded gRPC request as a REST body in the binary tensor extension (every input's contents as raw bytes)
    and the headers to send with it (the token, and what modelship asks)."""
    inputs = []
    for t in payload.inputs:
        raw = InferInput(t.name, t.shape, t.datatype, parameters=t.parameters)
        raw.set_data_from_numpy(t.as_numpy(), binary_data=True)
        inputs.append(raw)
    request = InferRequest(payload.model_name, inputs, request_id=payload.id, parameters=payload.parameters,
                           request_outputs=payload.request_outputs)
    body, json_length = request.to_rest()
    head, tail = (json.loads(body[:json_length]), body[json_length:]) if json_length is not None else (body, b"")
    for key in ("model_name", "model_version"):  # the path names them; a request body does not
        head.pop(key, None)
    for p in [head.get("parameters")] + [o.get("parameters") for o in head.get("outputs") or []]:
        if p:  # TorchServe answers in JSON; the answer is encoded here as the client asked
            p.pop("binary_data_output", None), p.pop("binary_data", None)
    head = json.dumps(head).encode()
    send = {"Content-Type": "application/json", **({BINARY_HEADER: str(len(head))} if tail else {})}
    for name in ("authorization", DESCRIBE.lower(), "x-request-id"):
        if headers.get(name):
            send[name] = headers[name]
    return head + tail, send


def refusal(status: int, content: bytes, name: str, version: str | None) -> Exception:
    """TorchServe's refusal as the protocol's error."""
    text = message(content)
    if status == 404:
        return ModelNotFound(name + (f" version {version}" if version else ""))
    if status in (400, 413):
        return InvalidInput(text)
    if status == 503:
        return ModelNotReady(name, text)
    return InferenceError(f"TorchServe answered {status}: {text}")


def response_of(answer: dict, payload: InferRequest, name: str) -> InferResponse:
    outputs = []
    for t in answer.get("outputs", []):
        out = InferOutput(t["name"], t["shape"], t["datatype"])
        if t["datatype"] == "BYTES":
            out.data = t["data"]
        else:
            out.set_data_from_numpy(np.asarray(t["data"], dtype=V2_NUMPY.get(t["datatype"], "float32"))
                                    .reshape(t["shape"]), binary_data=False)
        outputs.append(out)
    params = {k: v for k, v in (answer.get("parameters") or {}).items() if isinstance(v, (bool, int, float, str))}
    return InferResponse(answer.get("id") or payload.id, name, outputs, model_version=answer.get("model_version"),
                         from_grpc=payload.from_grpc, parameters=params or None,
                         use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)


class Plane(DataPlane):
    """KServe's data plane; server readiness is every model ready in TorchServe, versions listed."""

    def __init__(self, registry: ModelRepository, upstream: Upstream):
        super().__init__(registry)
        self.registry, self.upstream = registry, upstream

    def metadata(self):
        return {"name": "modelship", "version": _version(), "extensions": ["binary_tensor_data"]}

    async def ready(self) -> bool:
        return all([await m.healthy() for m in self.registry.get_models().values()])

    async def model_metadata(self, model_name: str):
        versions = await self.get_model_from_registry(model_name).versions()  # a version not served: 404
        return {**await super().model_metadata(model_name), "versions": [v.get("modelVersion") for v in versions]}

    def has(self, name: str) -> bool:
        return self.registry.get_model(name) is not None


def plane_for(store: Path, upstream: Upstream) -> Plane:
    """The data plane of the store's models (their manifests read from the archives)."""
    registry = ModelRepository()
    for mar in visible_mars(store):
        with zipfile.ZipFile(mar) as z:
            man = Manifest.from_dict(json.loads(z.read(MANIFEST)))
        registry.update(Served(mar.stem, man, upstream))
    return Plane(registry, upstream)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("modelship")
    except PackageNotFoundError:
        return "0"
