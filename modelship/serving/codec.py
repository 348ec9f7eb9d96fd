"""The REST format (README, "REST format"): simple JSON and Open Inference Protocol v2, in and out.

``decode`` turns one request body into a feed with a leading batch dim (raising InputError with a
message naming what was wrong and what was expected); ``encode`` turns that request's slice of the
outputs into its response. No TorchServe here: tests, the CLI and the load test use it directly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..manifest import V2_DTYPES, V2_NUMPY, Manifest  # noqa: F401 — V2_*: re-exported
from ..runners.base import check_names, fmt_shape

# a request carrying DESCRIBE gets its answer's SERVED_ON header: the machine and kernels that computed it (JSON)
DESCRIBE, SERVED_ON = "Modelship-Describe", "Modelship-Served-On"
BINARY_HEADER = "Inference-Header-Content-Length"  # the v2 binary tensor extension: its JSON header's length


@dataclass
class Request:
    feed: dict  # input name -> array with a leading batch dim
    protocol: str  # "simple" | "v2"
    batched: bool  # simple JSON: the client sent a list of samples
    request_id: str | None = None
    notes: list | None = None  # raw inputs: one dict per sample added to its answer ({"truncated": true})
    binary_outputs: set | bool = False  # v2 binary tensor extension: True (every output) or the output names
    binary_input: bool = False  # came in the binary tensor extension (its body is not JSON to replay as it is)

    @property
    def items(self) -> int:
        return len(next(iter(self.feed.values())))


class Codec:
    def __init__(self, manifest: Manifest, max_items: int = 64, prep=None, model_name: str | None = None,
                 model_version: str | None = None):
        self.manifest = manifest
        self.model_name, self.model_version = model_name, model_version  # as served (v2 answers name them)
        self.max_items = max_items
        self.specs = {t.name: t for t in manifest.inputs}
        self.prep = prep  # the artifact's preprocessing (modelship.preprocess), or None: tensors only

    # ---- decoding ----------------------------------------------------------------------------
    def decode(self, body, content_type: str | None = None, header_length: str | None = None) -> Request:
        """A request body as it came; ``header_length``: the ``Inference-Header-Content-Length`` header of the
        Open Inference Protocol's binary tensor extension (a JSON header, then the tensors' raw bytes)."""
        if header_length is not None:
            return self._decode_binary(body, header_length)
        ct = (content_type or "").split(";")[0].strip().lower()
        kind = self.prep.kind if self.prep else None
        # text/* is raw text for a text model; for any other model, a body that is JSON is read as JSON (clients
        # such as curl -d label JSON loosely), anything else is refused as text sent to a model that takes none
        if ct.startswith("image/") or ct.startswith("text/") and ct != "text/json" and not (
                kind != "text" and _is_json(body)):
            want = "image" if ct.startswith("image/") else "text"
            if kind != want:
                raise InputError(f"a {ct} body, but this model takes {kind or 'tensors'}; expected "
                                 f"{self.example()}")
            if want == "text":
                body = _utf8(body)
            return self._raw([bytes(body) if want == "image" else body], "simple", False)
        if kind == "image" and isinstance(body, (bytes, bytearray)) and not bytes(body[:64]).lstrip().startswith(b"{"):
            return self._raw([bytes(body)], "simple", False)  # an image sent without its content type
        if isinstance(body, (bytes, bytearray, str)):
            try:
                body = json.loads(body.decode("utf-8") if isinstance(body, (bytes, bytearray)) else body)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"body is not JSON ({e}); expected {self.example()}") from None
            except RecursionError:
                raise InputError(f"body nests too deeply; expected {self.example()}") from None
        if not isinstance(body, dict) or "inputs" not in body:
            raise InputError(f"expected a JSON object with an 'inputs' key, e.g. {self.example()}")
        unknown = set(body) - {"inputs", "id", "parameters", "outputs", "model_name", "model_version"}
        if unknown:
            raise InputError(f"unknown key(s) {', '.join(sorted(unknown))}; expected 'inputs' (and optionally 'id')")
        for key, served in (("model_name", self.model_name), ("model_version", self.model_version)):
            if body.get(key) is not None and served and str(body[key]) != served:  # KServe's client names them
                raise InputError(f"the body's {key} is {json.dumps(body[key])[:60]}, but it was sent to {served}")
        inputs = body["inputs"]
        if isinstance(inputs, list) and inputs and all(isinstance(x, dict) and "datatype" in x for x in inputs):
            req = self._decode_v2(inputs, body.get("id"))
            req.binary_outputs = _binary_outputs(body)
            return req
        raw = self._raw_simple(inputs) if self.prep else None
        if raw is not None:
            return raw
        if isinstance(inputs, dict):
            return self._decode_simple(inputs)
        if len(self.specs) != 1:
            raise InputError(f"this model has {len(self.specs)} inputs; send {{\"inputs\": {{name: nested list}}}} "
                             f"with {', '.join(self.specs)}")
        return self._decode_simple({next(iter(self.specs)): inputs})

    # ---- raw inputs (models that carry their preprocessing) --------------------------------------
    def _raw_simple(self, inputs):
        """``"text"`` / ``["text", ...]`` for text models, ``{"image_b64": ...}`` (or a list of them) for image
        models; None when ``inputs`` holds tensors."""
        if self.prep.kind == "text":
            if isinstance(inputs, str):
                return self._raw([inputs], "simple", False)
            if isinstance(inputs, list) and inputs and all(isinstance(x, str) for x in inputs):
                return self._raw(inputs, "simple", True)
            return None
        if isinstance(inputs, dict) and "image_b64" in inputs:
            return self._raw([_b64(inputs["image_b64"])], "simple", False)
        if isinstance(inputs, list) and inputs and all(isinstance(x, dict) and "image_b64" in x for x in inputs):
            return self._raw([_b64(x["image_b64"]) for x in inputs], "simple", True)
        return None

    def _raw(self, samples: list, protocol: str, batched: bool, request_id=None) -> Request:
        if len(samples) > self.max_items:
            raise InputError(f"{len(samples)} items in one request; expected at most {self.max_items}")
        feed, notes = self.prep(samples)
        return Request(feed, protocol, batched, request_id, notes)

    def _decode_simple(self, inputs: dict) -> Request:
        inputs = self._drop_token_types(inputs)
        self._check_names(inputs)
        feed, batched = {}, None
        for name, value in inputs.items():
            spec = self.specs[name]
            arr = self._array(name, value, spec.dtype)
            rank = len(spec.shape)
            if arr.ndim == rank - 1:
                arr, is_batch = arr[None], False
            elif arr.ndim == rank:
                is_batch = True
            else:
                raise InputError(f"input '{name}': got {arr.ndim} dims {list(arr.shape)}; expected one sample of shape "
                                 f"{fmt_shape(spec.shape[1:])} or a list of them {fmt_shape(spec.shape)}")
            if batched is not None and batched != is_batch:
                raise InputError("inputs mix single samples and lists of samples; send the same form for every input")
            batched = is_batch
            feed[name] = arr
        req = Request(feed, "simple", bool(batched))
        self._check_shapes(req)
        return req

    def _decode_binary(self, body, header_length) -> Request:
        """The binary tensor extension: ``header_length`` bytes of JSON (inputs whose ``parameters.binary_data_size``
        says how many of the following bytes are theirs, in order), then the raw tensors (little-endian; BYTES
        elements each after a 4-byte length)."""
        try:
            n = int(header_length)
        except (TypeError, ValueError):
            raise InputError(f"Inference-Header-Content-Length {str(header_length)[:20]!r}: expected the JSON "
                             "header's length in bytes") from None
        raw = bytes(body if isinstance(body, (bytes, bytearray)) else str(body).encode())
        if not 0 < n <= len(raw):
            raise InputError(f"Inference-Header-Content-Length {n}: the body has {len(raw)} bytes; expected the "
                             "length of its JSON header")
        try:
            head = json.loads(raw[:n].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise InputError(f"the binary request's JSON header is not JSON ({e})") from None
        if not isinstance(head, dict) or not isinstance(head.get("inputs"), list) or not head["inputs"]:
            raise InputError("the binary request's JSON header needs a non-empty 'inputs' list")
        rest, at = memoryview(raw)[n:], 0
        tensors = []
        for t in head["inputs"]:
            if not isinstance(t, dict):
                raise InputError("each Open Inference Protocol input must be an object")
            size = (t.get("parameters") or {}).get("binary_data_size")
            if size is None:
                tensors.append(t)
                continue
            if not isinstance(size, int) or size < 0 or at + size > len(rest):
                raise InputError(f"input '{t.get('name')}': binary_data_size {size!r} runs past the "
                                 f"{len(rest)} bytes after the header")
            chunk, at = bytes(rest[at:at + size]), at + size
            tensors.append({**t, "data": self._from_bytes(t, chunk)})
        if at != len(rest):
            raise InputError(f"{len(rest) - at} bytes after the header belong to no input (binary_data_size)")
        req = self._decode_v2(tensors, head.get("id"))
        req.binary_outputs, req.binary_input = _binary_outputs(head), True
        return req

    def _from_bytes(self, t: dict, chunk: bytes):
        name, dtype = t.get("name"), t.get("datatype")
        if dtype == "BYTES":
            items, i = [], 0
            while i < len(chunk):
                if i + 4 > len(chunk):
                    raise InputError(f"input '{name}': BYTES data ends inside an element's 4-byte length")
                k = int.from_bytes(chunk[i:i + 4], "little")
                items.append(chunk[i + 4:i + 4 + k])
                i += 4 + k
            if i != len(chunk):
                raise InputError(f"input '{name}': BYTES element lengths run past its binary_data_size")
            if self.prep is not None and self.prep.kind == "image":
                import base64

                return [base64.b64encode(x).decode() for x in items]
            try:
                return [x.decode("utf-8") for x in items]
            except UnicodeDecodeError:
                raise InputError(f"input '{name}': BYTES elements are not UTF-8 text") from None
        np_dtype = V2_NUMPY.get(dtype)
        if np_dtype is None:
            raise InputError(f"input '{name}': datatype {dtype!r} is not one this model takes")
        if len(chunk) % np.dtype(np_dtype).itemsize:
            raise InputError(f"input '{name}': {len(chunk)} bytes are not whole {dtype} values")
        return np.frombuffer(chunk, dtype=np.dtype(np_dtype).newbyteorder("<"))

    def _decode_v2(self, tensors: list, request_id) -> Request:
        by_name = {}
        for t in tensors:
            if not isinstance(t, dict) or not {"name", "shape", "datatype", "data"} <= t.keys():
                raise InputError("each Open Inference Protocol input needs 'name', 'shape', 'datatype' and 'data'")
            if not isinstance(t["name"], str):
                raise InputError(f"input 'name' must be a string, got {json.dumps(t['name'])[:40]}")
            by_name[t["name"]] = t
        if len(by_name) == 1 and next(iter(by_name.values()))["datatype"] == "BYTES":
            name, t = next(iter(by_name.items()))
            return self._decode_v2_bytes(name, t, request_id)
        by_name = self._drop_token_types(by_name, lambda t: t["data"])
        self._check_names(by_name)
        feed = {}
        for name, t in by_name.items():
            spec = self.specs[name]
            want = V2_DTYPES[spec.dtype]
            if t["datatype"] != want:
                raise InputError(f"input '{name}': datatype {t['datatype']!r}, expected {want!r}")
            shape = t["shape"]
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise InputError(f"input '{name}': shape must be a list of whole numbers, got {shape!r}")
            arr = self._array(name, t["data"], spec.dtype)
            if arr.size != math.prod(shape):
                raise InputError(f"input '{name}': {arr.size} values do not fill shape {shape}")
            arr = arr.reshape(shape)
            if arr.ndim != len(spec.shape):
                raise InputError(f"input '{name}': shape {shape}, expected {fmt_shape(spec.shape)}")
            feed[name] = arr
        req = Request(feed, "v2", True, request_id if isinstance(request_id, str) else None)
        self._check_shapes(req)
        return req

    def _decode_v2_bytes(self, name: str, t: dict, request_id) -> Request:
        """Open Inference Protocol v2 BYTES: texts as strings, images as base64 strings."""
        if not self.prep:
            raise InputError(f"input '{name}': BYTES, but this model takes tensors ({', '.join(self.specs)})")
        data = t["data"]
        if not isinstance(data, list) or not data or not all(isinstance(x, str) for x in data):
            raise InputError(f"input '{name}': BYTES data must be a non-empty list of strings")
        if t["shape"] not in ([len(data)], [len(data), 1]):
            raise InputError(f"input '{name}': shape {t['shape']} for {len(data)} strings; expected [{len(data)}]")
        samples = data if self.prep.kind == "text" else [_b64(x) for x in data]
        return self._raw(samples, "v2", True, request_id if isinstance(request_id, str) else None)

    def _drop_token_types(self, inputs: dict, values=lambda v: v) -> dict:
        """A tokenizer's full output is accepted: token_type_ids the model does not take are dropped when they
        are all zeros (one segment), which is what they mean to a model without segment embeddings."""
        if "token_type_ids" not in inputs or "token_type_ids" in self.specs or "input_ids" not in self.specs:
            return inputs
        try:
            zeros = not np.any(np.asarray(values(inputs["token_type_ids"]), dtype=np.int64))
        except (ValueError, TypeError):
            zeros = False
        if not zeros:
            raise InputError("input 'token_type_ids': this model takes one segment (no token_type_ids); send them "
                             "all zeros or leave them out")
        return {k: v for k, v in inputs.items() if k != "token_type_ids"}

    def _check_names(self, inputs: dict) -> None:
        check_names(self.specs, inputs, ", ".join(self.specs))

    def _array(self, name: str, value, dtype: str) -> np.ndarray:
        try:
            arr = np.asarray(value)
        except ValueError:
            raise InputError(f"input '{name}': ragged nested lists; expected a rectangular array") from None
        if arr.dtype == object or arr.dtype.kind in "USV":
            raise InputError(f"input '{name}': non-numeric or ragged values; expected numbers ({dtype})")
        if arr.dtype.kind == "b" and dtype != "bool":
            raise InputError(f"input '{name}': true/false values; expected numbers ({dtype})")
        if np.dtype(dtype).kind in "iu":
            if arr.dtype.kind == "f":
                if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                    raise InputError(f"input '{name}': non-integer values; expected whole numbers ({dtype})")
            info = np.iinfo(dtype)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise InputError(f"input '{name}': values outside the {dtype} range")
        elif np.dtype(dtype).kind == "f" and arr.size:
            if not np.all(np.isfinite(arr.astype(np.float64))):
                raise InputError(f"input '{name}': NaN or infinite values; expected finite numbers")
            with np.errstate(over="ignore"):
                cast = arr.astype(dtype, copy=False)
            if not np.all(np.isfinite(cast)):
                raise InputError(f"input '{name}': values beyond the {dtype} range (±{float(np.finfo(dtype).max):.4g})")
            return cast
        return arr.astype(dtype, copy=False)

    def _check_shapes(self, req: Request) -> None:
        dims: dict[str, int] = {}
        for name, arr in req.feed.items():
            spec = self.specs[name]
            for got, want in zip(arr.shape, spec.shape):
                if isinstance(want, int) and got != want:
                    shown = list(arr.shape if req.batched else arr.shape[1:])
                    expect = spec.shape if req.batched else spec.shape[1:]
                    raise InputError(f"input '{name}': shape {shown}, expected {fmt_shape(expect)}")
                if isinstance(want, str):
                    if got < 1:
                        raise InputError(f"input '{name}': dim '{want}' is {got}; expected at least 1")
                    if dims.setdefault(want, got) != got:
                        raise InputError(f"input '{name}': dim '{want}' is {got} but {dims[want]} in another input")
        if req.items > self.max_items:
            raise InputError(f"{req.items} items in one request; expected at most {self.max_items}")

    def example(self) -> str:
        if self.prep and self.prep.kind == "text":
            return '{"inputs": "some text"} or {"inputs": ["text", ...]} (or the token tensors)'
        if self.prep and self.prep.kind == "image":
            return ('a PNG/JPEG body (Content-Type: image/png), {"inputs": {"image_b64": "<base64>"}} '
                    '(or the pixel tensor)')
        if len(self.specs) == 1:
            spec = next(iter(self.specs.values()))
            return f'{{"inputs": <one sample as a nested list of shape {fmt_shape(spec.shape[1:])}>}}'
        return '{"inputs": {' + ", ".join(f'"{n}": <{fmt_shape(s.shape[1:])}>' for n, s in self.specs.items()) + "}}"

    # ---- encoding ----------------------------------------------------------------------------
    def encode(self, req: Request, outputs: dict) -> dict | Binary:
        if req.protocol == "v2":
            tensors, blobs = [], []
            for k, v in outputs.items():
                datatype = V2_DTYPES.get(str(v.dtype))
                if datatype is None:  # never label an answer with a type it is not in
                    v, datatype = v.astype(np.float64), "FP64"
                t = {"name": k, "shape": list(v.shape), "datatype": datatype}
                if req.binary_outputs is True or (req.binary_outputs and k in req.binary_outputs):
                    blob = np.ascontiguousarray(v, dtype=np.dtype(V2_NUMPY[datatype]).newbyteorder("<")).tobytes()
                    t["parameters"] = {"binary_data_size": len(blob)}
                    blobs.append(blob)
                else:
                    t["data"] = v.reshape(-1).tolist()
                tensors.append(t)
            resp = {"model_name": self.model_name or self.manifest.name, "outputs": tensors}
            if self.model_version:
                resp["model_version"] = self.model_version
            if req.request_id is not None:
                resp["id"] = req.request_id
            if req.notes and any(req.notes):
                cut = [str(i) for i, n in enumerate(req.notes) if n.get("truncated")]  # protocol parameters are
                resp["parameters"] = {"truncated": bool(cut), "truncated_samples": ",".join(cut)}  # scalars
            return Binary(resp, blobs) if blobs else resp
        items = [{**self.simple_item(outputs, i), **(req.notes[i] if req.notes else {})} for i in range(req.items)]
        return {"predictions": items} if req.batched else items[0]

    def simple_item(self, outputs: dict, i: int) -> dict:
        if self.manifest.is_classifier:
            first = self.manifest.outputs[0].name
            probs = softmax(outputs[first][i])
            idx = int(np.argmax(probs))
            labels = self.manifest.labels or []
            item = {"label": labels[idx] if idx < len(labels) else str(idx), "index": idx,
                    "probabilities": [float(p) for p in probs]}
            rest = {k: v[i].tolist() for k, v in outputs.items() if k != first}
            return {**item, "outputs": rest} if rest else item  # every output the model has is answered
        return {"outputs": {k: v[i].tolist() for k, v in outputs.items()}}


def _utf8(body) -> str:
    if isinstance(body, str):
        return body
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"body is not UTF-8 text ({e.reason} at byte {e.start}); expected UTF-8") from None


def _b64(value) -> bytes:
    import base64
    import binascii

    if not isinstance(value, str) or not value:
        raise InputError("image_b64 must be a non-empty base64 string of a PNG or JPEG file")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image_b64 is not valid base64; expected the base64 of a PNG or JPEG file") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    """The REST answer's probabilities (float32) of ``comparison.softmax``."""
    from ..comparison import softmax as probabilities

    return probabilities(logits).astype(np.float32)


@dataclass
class Binary:
    """An Open Inference Protocol answer in the binary tensor extension: the JSON header, then the outputs' bytes."""

    header: dict
    blobs: list

    def body(self) -> tuple[bytes, int]:
        head = json.dumps(self.header).encode()
        return head + b"".join(self.blobs), len(head)


def read_binary_answer(body: bytes, header_length: int) -> dict:
    """An answer in the v2 binary tensor extension read back as its JSON form: each output's ``data`` from the bytes
    after the header (``parameters.binary_data_size`` each, in order). What clients decode, so what is judged."""
    head = json.loads(bytes(body[:header_length]).decode("utf-8"))
    rest, at = memoryview(body)[header_length:], 0
    for t in head.get("outputs", []):
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is None:
            continue
        dtype = np.dtype(V2_NUMPY.get(t["datatype"], "float32")).newbyteorder("<")
        t["data"] = np.frombuffer(bytes(rest[at:at + size]), dtype=dtype).tolist()
        at += size
    return head


def _binary_outputs(body: dict) -> set | bool:
    """Which outputs the client asked for as raw bytes: all (``parameters.binary_data_output``), or those it names
    with ``parameters.binary_data``."""
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    asked = body.get("outputs") if isinstance(body.get("outputs"), list) else []
    named = {o.get("name") for o in asked if isinstance(o, dict) and (o.get("parameters") or {}).get("binary_data")}
    return True if params.get("binary_data_output") and not asked else named


def error_body(code: int, message: str) -> dict:
    return {"code": code, "message": message}


def _is_json(body) -> bool:
    try:
        json.loads(bytes(body).decode("utf-8") if isinstance(body, (bytes, bytearray)) else body)
        return True
    except (TypeError, ValueError, RecursionError):
        return False
