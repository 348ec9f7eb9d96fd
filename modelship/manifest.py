"""The artifact manifest (schema and I/O): the one thing every stage agrees on.

An artifact directory holds one model file (or folder) and ``manifest.json`` with its input/output
signature (named dynamic dims), labels, lineage (parent + hashes), evaluation data and parity record.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ArtifactError
from .integrity import SIGNING_KEY_ENV, check_seal, seal  # noqa: F401 — re-exported: the manifest's seal

MANIFEST = "manifest.json"
DTYPES = ("float32", "float16", "int64", "int32", "bool")
# numpy dtype -> the Open Inference Protocol v2 datatype (Triton's and KServe's names), and back
V2_DTYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
             "int16": "INT16", "int8": "INT8", "uint64": "UINT64", "uint32": "UINT32", "uint16": "UINT16",
             "uint8": "UINT8", "bool": "BOOL"}
V2_NUMPY = {v: k for k, v in V2_DTYPES.items()}


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list  # ints for fixed dims, strings for named dynamic dims ("batch", "sequence")

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ArtifactError(f"tensor '{self.name}': dtype '{self.dtype}' is not one of {', '.join(DTYPES)}")


@dataclass
class Manifest:
    name: str
    task: str  # "classification" or any other task name
    format: str  # torch | onnx | tensorrt
    precision: str  # fp32 | fp16 | int8
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    sha256: str = ""
    labels: list[str] | None = None
    parent: str | None = None
    parent_sha256: str | None = None
    reference: str | None = None  # the PyTorch model this artifact's parity is judged against
    created_by: str = ""
    parity: dict | None = None
    loader: str | None = None  # torch artifacts: zoo | pt2 | hf
    arch: dict | None = None  # zoo architecture name + config
    data: dict | None = None  # evaluation / calibration data spec (see modelship.data)
    preprocess: dict | None = None  # raw text / image -> inputs (see modelship.preprocess); files in preprocess/
    extra: dict = field(default_factory=dict)  # stage-specific facts (quantization settings, TensorRT build info)
    integrity: dict | None = None  # sha256 (and HMAC with a signing key) of everything above: see seal()

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        try:
            d = dict(d)
            d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
            d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in d.items() if k in known})
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"manifest is missing or has a malformed field ({e}); expected the keys "
                                "name, task, format, precision, file, inputs, outputs") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def is_classifier(self) -> bool:
        return self.task == "classification"


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder (relative names and contents, in sorted order)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def size_mb(path: str | os.PathLike) -> float | None:
    """A model file's size in MB, or a model folder's (a Hugging Face checkpoint) files together; None if absent."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else []
    return round(sum(f.stat().st_size for f in files) / 1e6, 3) if files else None


def inside(base: Path, name: str) -> Path:
    """Resolve ``name`` under ``base``; refuse names that escape it (absolute paths, '..', symlinks out)."""
    base = base.resolve()
    target = (base / name).resolve()
    if not (target == base or base in target.parents):
        raise ArtifactError(f"path '{name}' escapes its artifact directory {base}; expected a name inside it")
    return target


@dataclass
class Artifact:
    """An artifact directory opened from disk."""

    path: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return inside(self.path, self.manifest.file)

    def resolve(self, rel: str | None) -> Path | None:
        """Resolve a lineage path (parent, reference) written relative to this artifact."""
        if rel is None:
            return None
        p = Path(rel)
        return p if p.is_absolute() else (self.path / p).resolve()


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{p}: no such file or directory; expected an artifact directory with {MANIFEST}")
    if not p.is_dir() or not (p / MANIFEST).is_file():
        raise ArtifactError(f"{p}: not an artifact directory; expected a folder holding {MANIFEST} and a model file")
    try:
        raw = json.loads((p / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p / MANIFEST}: not valid JSON ({e}); expected an artifact manifest") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{p / MANIFEST}: expected a JSON object")
    if verify:
        check_seal(raw, str(p / MANIFEST))
    art = Artifact(p.resolve(), Manifest.from_dict(raw))
    model = art.model_path
    if not model.exists():
        raise ArtifactError(f"{p}: model file '{art.manifest.file}' named in the manifest is missing")
    if verify:
        actual = sha256_path(model)
        if actual != art.manifest.sha256:
            raise ArtifactError(
                f"{model}: sha256 {actual[:12]}… does not match the manifest's {art.manifest.sha256[:12]}…; "
                "the model file was modified after it was written — rebuild the artifact")
    return art


def write_artifact(path: str | os.PathLike, manifest: Manifest) -> Artifact:
    """Hash the model file into the manifest and write manifest.json."""
    p = Path(path).resolve()
    art = Artifact(p, manifest)
    manifest.sha256 = sha256_path(art.model_path)
    (p / MANIFEST).write_text(json.dumps(seal(manifest.to_dict()), indent=2) + "\n")
    return art


def relpath(target: str | os.PathLike, start: str | os.PathLike) -> str:
    return os.path.relpath(Path(target).resolve(), Path(start).resolve())
