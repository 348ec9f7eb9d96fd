"""Pack any artifact into a TorchServe ``.mar`` with torch-model-archiver."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from .. import batch_gate
from ..errors import ArtifactError, ServeError
from ..machine import cores
from ..integrity import check_seal, seal, seal_archive, verify_archive
from ..manifest import MANIFEST, Artifact, Manifest, inside, sha256_path, size_mb, write_artifact
from ..preprocess import FOLDER as PREPROCESS

HANDLER = Path(__file__).with_name("handler.py")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.-]{0,31}$")
SHADOW_REFERENCE = "shadow-reference"  # the folder inside a .mar holding the reference that shadow parity runs


@dataclass
class ModelConfig:
    """TorchServe's per-model config (model-config.yaml) plus the handler's own options."""

    batch_size: int = 8
    max_batch_delay_ms: int = 5
    workers: int | None = None  # None: from the machine and the model (machine_defaults)
    response_timeout_s: int = 30
    max_items: int = 64
    threads: int | None = None  # compute threads per worker; None: from the machine and the model
    provider: str | None = None
    device: str = "cpu"
    shadow_rate: float = 0.0  # the fraction of live requests re-run on the reference (shadow parity); 0: off
    shadow_queue: int = 256  # samples waiting for the reference; a full queue drops (and counts) the sample
    shadow_capture: str | None = None  # folder for the inputs of mismatched answers (off unless given)
    shadow_capture_mb: float = 64.0  # the most those inputs may take

    def for_model(self, art: Artifact) -> "ModelConfig":
        """This config with workers and threads filled in from the machine and the model where not given."""
        workers, threads = machine_defaults(art, self.workers, self.threads, self.device)
        return replace(self, workers=workers, threads=threads)

    def yaml(self) -> dict:
        if self.max_batch_delay_ms < 1 < self.batch_size:  # TorchServe reads a maxBatchDelay of 0 as unset
            raise ArtifactError(f"batch delay {self.max_batch_delay_ms} ms with batch size {self.batch_size}: "
                                "expected 1 ms or more (TorchServe takes 0 as its 100 ms default); with batch "
                                "size 1 the delay is never waited")
        if not 0.0 <= self.shadow_rate <= 1.0:
            raise ArtifactError(f"shadow rate {self.shadow_rate}: expected a fraction of requests from 0 to 1")
        handler = {"max_items": self.max_items, "threads": self.threads, "device": self.device}
        if self.provider:
            handler["provider"] = self.provider
        if self.shadow_rate:
            handler["shadow"] = {"rate": self.shadow_rate, "queue": self.shadow_queue,
                                 "capture": self.shadow_capture, "capture_mb": self.shadow_capture_mb}
        return {"minWorkers": self.workers, "maxWorkers": self.workers, "batchSize": self.batch_size,
                "maxBatchDelay": self.max_batch_delay_ms, "responseTimeout": self.response_timeout_s,
                "handler": handler}


def machine_defaults(art: Artifact, workers: int | None = None, threads: int | None = None,
                     device: str = "cpu") -> tuple[int, int]:
    """(workers, threads per worker) for this machine and model, where the user gave none. The cores are the CPU
    affinity (or OMP_NUM_THREADS where set lower). On CPU: one single-threaded worker per core, at most 4 and as
    many as memory holds — what modelship tune measured best here for both the digits CNN and the MiniLM text
    model (a second worker gained 1.6-2x requests/s; a second thread in one worker gained nothing, as the load
    generator and TorchServe's frontend share the cores). Given only threads, workers fill the cores; given only
    workers, threads do. On a GPU, one worker. Run modelship tune for your model and traffic."""
    n = cores()
    if art.manifest.format == "tensorrt" or device == "cuda":
        return workers or 1, threads or 1
    if workers is None and threads is None:
        return max(1, min(n, 4, fits_in_memory(art))), 1
    if workers is None:
        return max(1, n // threads), threads
    return workers, threads if threads is not None else max(1, n // workers)


def fits_in_memory(art: Artifact) -> int:
    """How many workers of this model the available memory holds: each ~300 MB of Python and libraries plus
    three times the model file (the loaded weights and the runtime's copies), with half the memory kept free."""
    import psutil

    per_worker = 300e6 + 3 * size_mb(art.model_path) * 1e6
    return int(psutil.virtual_memory().available / 2 // per_worker)


def check_gates(art: Artifact, batch_size: int = 1) -> None:
    """Refuse an artifact whose manifest records a failed gate (any format: a student that failed its
    distillation gate too), or a derived artifact with no parity record at all; with ``batch_size`` above 1, one
    whose answers depend on what they are batched with (the parity record's batch gate; batch size 1 is always
    allowed)."""
    from ..stages import is_root

    rec = art.manifest.parity
    if rec is None and is_root(art):
        return  # a PyTorch model that is its own reference: nothing to be judged against
    if not (rec or {}).get("passed"):
        why = "; ".join((rec or {}).get("failures", [])[:2]) or "no parity record"
        raise ArtifactError(f"{art.path}: {'failed' if rec else 'no'} passed parity record ({why}); only artifacts "
                            "that passed parity are archived (run modelship parity, or pass --force)")
    batch = batch_gate.failed(rec)
    if batch_size > 1 and batch:
        raise ArtifactError(f"{art.path}: batch size {batch_size} refused: {batch['message']} (archive it with "
                            "--batch-size 1, which is always allowed, or pass --force)")


def archiver() -> str:
    exe = shutil.which("torch-model-archiver") or str(Path(sys.executable).with_name("torch-model-archiver"))
    if not Path(exe).exists():
        raise ServeError("torch-model-archiver not found; install the project: pip install -e .")
    return exe


def shadow_reference(art: Artifact, reference: str | Path | None = None) -> Artifact:
    """The model shadow parity re-runs sampled requests on: ``reference`` (an FP32 artifact of the same inputs and
    outputs), or the root PyTorch model of ``art``'s lineage — what the load test judges served answers against."""
    from ..manifest import load_artifact
    from ..stages import reference_of

    if reference is None:
        return reference_of(art)[0]
    ref = load_artifact(reference)
    if ref.manifest.precision != "fp32":
        raise ArtifactError(f"{reference}: a {ref.manifest.precision} artifact; a shadow reference must be FP32 "
                            "(the root PyTorch model, or its FP32 ONNX export)")
    if [t.name for t in ref.manifest.inputs] != [t.name for t in art.manifest.inputs] or \
            [t.name for t in ref.manifest.outputs] != [t.name for t in art.manifest.outputs]:
        raise ArtifactError(f"{reference}: its inputs/outputs ({', '.join(t.name for t in ref.manifest.inputs)} -> "
                            f"{', '.join(t.name for t in ref.manifest.outputs)}) are not those of {art.path}; "
                            "expected a reference of the same model")
    return ref


def _pack_reference(ref: Artifact, dst: Path) -> None:
    """``ref``'s model file and a manifest for it in ``dst`` (a folder inside the archive)."""
    dst.mkdir(parents=True)
    man = Manifest.from_dict(ref.manifest.to_dict())
    man.reference, man.parity = None, None  # run as it is: its own lineage is not needed to serve it
    if ref.model_path.is_dir():
        shutil.copytree(ref.model_path, dst / man.file)
    else:
        (dst / man.file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ref.model_path, dst / man.file)
    if man.preprocess and (ref.path / PREPROCESS).is_dir():  # an exported reference's recorded tokenizer
        shutil.copytree(ref.path / PREPROCESS, dst / PREPROCESS)
    write_artifact(dst, man)


def archive(art: Artifact, store: str | Path, name: str | None = None, config: ModelConfig | None = None,
            force: bool = False, version: str = "1.0", shadow_reference_of: str | Path | None = None) -> Path:
    """Write ``STORE/NAME.mar``; refuses artifacts without a passed parity record unless ``force``. With a shadow
    rate in ``config``, the reference (``shadow_reference_of``, or the root PyTorch model) travels inside it."""
    config = (config or ModelConfig()).for_model(art)
    name = name or art.path.name
    if not NAME_RE.match(name):
        raise ArtifactError(f"model name '{name}': expected letters, digits, '-', '_' or '.' (at most 64)")
    if not VERSION_RE.match(version):
        raise ArtifactError(f"version '{version}': expected letters, digits, '.', '-' or '_' (at most 32), e.g. 2.0")
    if shadow_reference_of is not None and not config.shadow_rate:
        raise ArtifactError("a shadow reference was given without a shadow rate; pass --shadow-rate (e.g. 0.01)")
    if config.shadow_capture and not Path(config.shadow_capture).is_absolute():
        config = replace(config, shadow_capture=str(Path(config.shadow_capture).resolve()))
    ref = shadow_reference(art, shadow_reference_of) if config.shadow_rate else None
    man = art.manifest
    if not force:
        check_gates(art, config.batch_size)
    if man.format == "tensorrt":  # one request must fit the engine's profile; bigger served batches are split
        from ..exporters.tensorrt import max_batch

        limit = max_batch((man.extra.get("tensorrt") or {}).get("profile"))
        if limit and config.max_items > limit:
            raise ArtifactError(f"{art.path}: --max-items {config.max_items} is more than the engine's profile takes "
                                f"(batch up to {limit}); archive with --max-items {limit} or rebuild with "
                                f"modelship compile --profile batch=1:8:{config.max_items}")
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    model_path = art.model_path  # refuses a 'file' that escapes the artifact directory
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        served = Manifest.from_dict(man.to_dict())
        served.extra = {**served.extra, "archive": {"source": str(art.path), "name": name, **asdict(config)}}
        (tmp / MANIFEST).write_text(json.dumps(seal(served.to_dict()), indent=2))
        (tmp / "model-config.yaml").write_text(yaml.safe_dump(config.yaml()))
        extra = [str(tmp / MANIFEST)]
        folders = tmp / "folders"  # the archiver copies a folder's contents: its sub-folders keep their names
        if model_path.is_dir():  # e.g. a Hugging Face folder: keep its name inside the archive
            shutil.copytree(model_path, folders / man.file)
            serialized = []
        else:
            serialized = ["--serialized-file", str(model_path)]
        if man.preprocess and (art.path / PREPROCESS).is_dir():  # the tokenizer travels with the model
            shutil.copytree(art.path / PREPROCESS, folders / PREPROCESS)
        if ref is not None:
            _pack_reference(ref, folders / SHADOW_REFERENCE)
            served.extra["archive"]["shadow_reference"] = str(ref.path)
            (tmp / MANIFEST).write_text(json.dumps(seal(served.to_dict()), indent=2))
        if folders.is_dir():
            extra.append(str(folders))

        cmd = [archiver(), "--model-name", name, "--version", version, "--handler", str(HANDLER),
               *serialized, "--extra-files", ",".join(extra), "--config-file", str(tmp / "model-config.yaml"),
               "--export-path", str(store), "--force"]
        # the archiver stages files in TMPDIR/NAME: a folder of our own, so two archives of one name never collide
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
        if p.returncode != 0:
            raise ServeError(f"torch-model-archiver failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    seal_archive(store / f"{name}.mar")  # the digest of every member: handler, config, manifest, model, ...
    return store / f"{name}.mar"


def read_mar(path: str | Path) -> Manifest:
    """Open a .mar and check it: no member escapes it, its integrity record names exactly its members with
    their sha256 (the handler, model config and archiver manifest too), its manifest is sealed, and the
    model file's sha256 matches the manifest."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if MANIFEST not in names:
                raise ArtifactError(f"{path}: no {MANIFEST} inside; expected a .mar written by modelship archive")
            raw = json.loads(z.read(MANIFEST))
            if not isinstance(raw, dict):
                raise ArtifactError(f"{path}: {MANIFEST} is not a JSON object")
            check_seal(raw, f"{path}: {MANIFEST}")
            man = Manifest.from_dict(raw)
            inside(Path("/mar"), man.file)
            with tempfile.TemporaryDirectory() as tmp:
                for n in names:  # TorchServe unpacks every member: none may land outside its folder
                    if n.startswith(("/", "\\")) or not (Path(tmp) / n).resolve().is_relative_to(Path(tmp).resolve()):
                        raise ArtifactError(f"{path}: member '{n}' escapes the archive; refusing it")
                verify_archive(z, str(path))
                if HANDLER.name in names and z.read(HANDLER.name) != HANDLER.read_bytes():
                    raise ArtifactError(f"{path}: archived by another modelship version (its {HANDLER.name} is not "
                                        "this one's, and it imports this one's modules); archive the artifact again")
                members = [n for n in names if n == man.file or n.startswith(man.file.rstrip("/") + "/")]
                if not members:
                    raise ArtifactError(f"{path}: model file '{man.file}' named by the manifest is not inside")
                for n in members:
                    z.extract(n, tmp)
                if sha256_path(Path(tmp) / man.file) != man.sha256:
                    raise ArtifactError(f"{path}: model file sha256 does not match the manifest; the archive was "
                                        "modified — archive the artifact again")
    except zipfile.BadZipFile:
        raise ArtifactError(f"{path}: not a zip archive; expected a .mar written by modelship archive") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON ({e})") from None
    return man
