"""Integrity records: a sha256 of a record's canonical JSON (catches any edit made outside modelship) and,
when $MODELSHIP_SIGNING_KEY is set, an HMAC-SHA256 under that key (only a holder of the key can recompute
it). Manifests carry one; every ``.mar`` carries one more over the digest of each of its members
(handler, model config, manifest, model and any other file), checked by ``serve`` before TorchServe
starts and by the handler again when a worker loads the model.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import zipfile
from pathlib import Path

from .errors import ArtifactError

SIGNING_KEY_ENV = "MODELSHIP_SIGNING_KEY"  # when set: records are signed on write and must be on load
ARCHIVE_RECORD = "modelship-integrity.json"  # inside every .mar: {"members": {name: sha256}, "integrity": {...}}


def _canonical(d: dict) -> bytes:
    return json.dumps({k: v for k, v in d.items() if k != "integrity"}, sort_keys=True,
                      separators=(",", ":")).encode()


def seal(d: dict) -> dict:
    """The manifest dict with its integrity record: a sha256 of its canonical JSON, which catches any
    edit made outside modelship, and an HMAC-SHA256 under $MODELSHIP_SIGNING_KEY when that is set, which
    only a holder of the key can recompute."""
    body = _canonical(d)
    integrity = {"sha256": hashlib.sha256(body).hexdigest()}
    key = os.environ.get(SIGNING_KEY_ENV)
    if key:
        integrity["hmac_sha256"] = hmac.new(key.encode(), body, hashlib.sha256).hexdigest()
    return {**d, "integrity": integrity}


def check_seal(d: dict, where: str, what: str = "the manifest") -> None:
    """Refuse a record (``what``) edited since modelship wrote it, or (with a signing key set) one not signed
    with it."""
    body = _canonical(d)
    integrity = d.get("integrity") or {}
    if not isinstance(integrity, dict):
        integrity = {"sha256": None}
    if not hmac.compare_digest(str(integrity.get("sha256", "")), hashlib.sha256(body).hexdigest()):
        state = "has no integrity record" if not integrity else "was modified after modelship wrote it"
        raise ArtifactError(f"{where}: {what} {state}; write the artifact again with the modelship "
                            "stage that made it")
    key = os.environ.get(SIGNING_KEY_ENV)
    if key:
        if "hmac_sha256" not in integrity:
            raise ArtifactError(f"{where}: {what} is not signed but {SIGNING_KEY_ENV} is set; write the "
                                "artifact again with the key set")
        if not hmac.compare_digest(str(integrity["hmac_sha256"]), hmac.new(key.encode(), body, hashlib.sha256).hexdigest()):
            raise ArtifactError(f"{where}: {what}'s signature does not match {SIGNING_KEY_ENV}: it was "
                                "modified or signed with another key")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal_archive(mar: str | Path) -> dict:
    """Append to ``mar`` a sealed record of the sha256 of every member it holds."""
    with zipfile.ZipFile(mar) as z:
        members = {i.filename: _digest(z.read(i)) for i in z.infolist() if not i.is_dir()}
    record = seal({"members": dict(sorted(members.items()))})
    with zipfile.ZipFile(mar, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(ARCHIVE_RECORD, json.dumps(record, indent=2))
    return record


def _record(raw: bytes | None, where: str) -> dict:
    if raw is None:
        raise ArtifactError(f"{where}: no {ARCHIVE_RECORD} inside (written by an older modelship, or not by "
                            "modelship archive); archive the artifact again")
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where}: {ARCHIVE_RECORD} is not valid JSON ({e}); archive the artifact again") from None
    if not isinstance(record, dict) or not isinstance(record.get("members"), dict):
        raise ArtifactError(f"{where}: {ARCHIVE_RECORD} is malformed; archive the artifact again")
    check_seal(record, where, what=f"the archive's integrity record ({ARCHIVE_RECORD})")
    return record


def check_members(record: dict, actual: dict, where: str, complete: bool = True) -> None:
    """Every recorded member present with its digest; with ``complete``, no member beyond them."""
    for name, digest in record["members"].items():
        if name not in actual:
            raise ArtifactError(f"{where}: member '{name}' named in the integrity record is missing; the archive "
                                "was modified — archive the artifact again")
        if not hmac.compare_digest(str(digest), actual[name]):
            raise ArtifactError(f"{where}: member '{name}' sha256 does not match the archive's integrity record; "
                                "the archive was modified — archive the artifact again")
    extra = sorted(set(actual) - set(record["members"]))
    if complete and extra:
        raise ArtifactError(f"{where}: member '{extra[0]}' is not in the archive's integrity record (added after "
                            "modelship archive wrote it); refusing the archive")


def verify_archive(z: zipfile.ZipFile, where: str) -> None:
    """A ``.mar`` opened as a zip: its record is sealed and names exactly its members, each unchanged."""
    names = [i.filename for i in z.infolist() if not i.is_dir() and i.filename != ARCHIVE_RECORD]
    raw = z.read(ARCHIVE_RECORD) if ARCHIVE_RECORD in z.namelist() else None
    check_members(_record(raw, where), {n: _digest(z.read(n)) for n in names}, where)


def verify_folder(folder: str | Path) -> None:
    """An unpacked ``.mar`` (TorchServe's model_dir): every recorded member present and unchanged."""
    folder = Path(folder)
    p = folder / ARCHIVE_RECORD
    record = _record(p.read_bytes() if p.is_file() else None, str(folder))
    actual = {n: _digest((folder / n).read_bytes()) for n in record["members"] if (folder / n).is_file()}
    check_members(record, actual, str(folder), complete=False)
