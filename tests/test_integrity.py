"""Artifact integrity: a tampered model file or manifest refuses to load, with or without a signing
key; manifest and archive paths that escape their folder are rejected; archive refuses artifacts
without a passed parity record unless --force."""

import json
import shutil

import pytest

from conftest import cli, rewrite_mar
from modelship.errors import ArtifactError, ServeError
from modelship.manifest import MANIFEST, SIGNING_KEY_ENV, load_artifact, seal, write_artifact
from modelship.serving.archive import archive, read_mar


def _copy(art, dst):
    shutil.copytree(art.path, dst)
    return dst


def _edit(folder, **changes):
    """Change manifest fields the way a hand edit would (the integrity record left as it was)."""
    raw = json.loads((folder / MANIFEST).read_text())
    raw.update(changes)
    (folder / MANIFEST).write_text(json.dumps(raw))
    return raw


def test_written_manifest_carries_integrity_record(cnn_onnx):
    raw = json.loads((cnn_onnx.path / MANIFEST).read_text())
    assert len(raw["integrity"]["sha256"]) == 64 and "hmac_sha256" not in raw["integrity"]
    load_artifact(cnn_onnx.path)


@pytest.mark.parametrize("change", [{"precision": "int8"}, {"parity": {"passed": True}}, {"labels": list("abcdefghij")}])
def test_hand_edited_manifest_is_refused(tmp_path, cnn_onnx, change):
    d = _copy(cnn_onnx, tmp_path / "a")
    _edit(d, **change)
    with pytest.raises(ArtifactError, match="modified after modelship wrote it"):
        load_artifact(d)
    p = cli("archive", d, "--out", tmp_path / "store")  # the real entry point, one line, non-zero exit
    assert p.returncode == 2 and "modified after modelship wrote it" in p.stderr and len(p.stderr.splitlines()) == 1
    assert not (tmp_path / "store").exists()


def test_manifest_without_integrity_record_is_refused(tmp_path, cnn_onnx, monkeypatch):
    d = _copy(cnn_onnx, tmp_path / "a")
    raw = json.loads((d / MANIFEST).read_text())
    del raw["integrity"]
    (d / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="has no integrity record"):
        load_artifact(d)
    for garbage in ("x", 7, {"sha256": 7}):
        (d / MANIFEST).write_text(json.dumps({**raw, "integrity": garbage}))
        with pytest.raises(ArtifactError, match="modified after modelship wrote it"):
            load_artifact(d)
    monkeypatch.setenv(SIGNING_KEY_ENV, "k" * 32)
    (d / MANIFEST).write_text(json.dumps(seal(raw) | {"integrity": {**seal(raw)["integrity"], "hmac_sha256": 5}}))
    with pytest.raises(ArtifactError, match="signature does not match"):
        load_artifact(d)


def test_manifest_file_path_escaping_its_folder_is_rejected(tmp_path, cnn_onnx):
    """Even with a recomputed integrity record (what an attacker without a signing key can do)."""
    d = _copy(cnn_onnx, tmp_path / "a")
    (tmp_path / "outside.onnx").write_bytes((d / "model.onnx").read_bytes())
    for name in ("../outside.onnx", str(tmp_path / "outside.onnx")):
        raw = json.loads((d / MANIFEST).read_text())
        (d / MANIFEST).write_text(json.dumps(seal({**raw, "file": name})))
        with pytest.raises(ArtifactError, match="escapes its artifact directory"):
            load_artifact(d)


def test_signing_key_detects_resealed_edits(tmp_path, cnn_onnx, monkeypatch):
    monkeypatch.setenv(SIGNING_KEY_ENV, "k1-" + "x" * 29)
    d = _copy(cnn_onnx, tmp_path / "a")
    with pytest.raises(ArtifactError, match="not signed"):  # written before a key existed
        load_artifact(d)
    art = write_artifact(d, load_artifact(d, verify=False).manifest)
    assert "hmac_sha256" in json.loads((d / MANIFEST).read_text())["integrity"]
    load_artifact(d)
    raw = json.loads((d / MANIFEST).read_text())  # an edit with a recomputed sha256 but no key
    forged = seal({k: v for k, v in raw.items() if k != "integrity"} | {"precision": "int8"})
    forged["integrity"]["hmac_sha256"] = raw["integrity"]["hmac_sha256"]
    (d / MANIFEST).write_text(json.dumps(forged))
    with pytest.raises(ArtifactError, match="signature does not match"):
        load_artifact(d)
    write_artifact(d, art.manifest)
    monkeypatch.setenv(SIGNING_KEY_ENV, "another-key-" + "y" * 20)
    with pytest.raises(ArtifactError, match="signature does not match"):
        load_artifact(d)


def _edit_manifest(change):
    return lambda name, data: json.dumps(change(json.loads(data))).encode() if name == MANIFEST else data


def test_tampered_or_escaping_archive_is_refused(tmp_path, cnn_onnx):
    mar = archive(cnn_onnx, tmp_path / "good", name="cnn")
    assert read_mar(mar).name == cnn_onnx.manifest.name
    cases = {
        "edited": ({"edit": _edit_manifest(lambda m: {**m, "precision": "fp16"})}, "modified after modelship wrote it"),
        "escaping_member": ({"add": {"../../evil.py": b"print('x')"}}, "escapes the archive"),
        "absolute_member": ({"add": {"/tmp/evil.py": b"print('x')"}}, "escapes the archive"),
        "escaping_file": ({"edit": _edit_manifest(lambda m: seal({**m, "file": "../model.onnx"}))}, "escapes its artifact"),
    }
    for case, (kw, want) in cases.items():
        store = tmp_path / case
        store.mkdir()
        rewrite_mar(mar, store / "cnn.mar", **kw)
        with pytest.raises(ArtifactError, match=want):
            read_mar(store / "cnn.mar")
        p = cli("serve", store, "--state", tmp_path / f"state-{case}", "--detach")  # refused before TorchServe starts
        assert p.returncode == 2 and want.split()[0] in p.stderr, p.stderr


@pytest.mark.parametrize("case", ["handler", "config", "added", "archiver_manifest", "record_removed"])
def test_every_member_of_the_archive_is_checked(tmp_path, cnn_onnx, case):
    """A replaced handler.py, an edited model-config.yaml or MAR-INF/MANIFEST.json, an added member: serve names
    the member and refuses the archive before TorchServe starts."""
    from modelship.integrity import ARCHIVE_RECORD

    mar = archive(cnn_onnx, tmp_path / "good", name="cnn")
    edits = {
        "handler": ({"edit": lambda n, d: b"class ModelshipHandler: pass\n" if n == "handler.py" else d}, "'handler.py'"),
        "config": ({"edit": lambda n, d: d.replace(b"batchSize: 8", b"batchSize: 512") if n == "model-config.yaml" else d},
                   "'model-config.yaml'"),
        "archiver_manifest": ({"edit": lambda n, d: d.replace(b'"cnn"', b'"evil"') if n == "MAR-INF/MANIFEST.json" else d},
                              "'MAR-INF/MANIFEST.json'"),
        "added": ({"add": {"extra.py": b"import os\n"}}, "'extra.py' is not in the archive's integrity record"),
        "record_removed": ({"edit": lambda n, d: d, "drop": ARCHIVE_RECORD}, f"no {ARCHIVE_RECORD} inside"),
    }
    kw, want = edits[case]
    store = tmp_path / "store"
    store.mkdir()
    rewrite_mar(mar, store / "cnn.mar", **kw)
    with pytest.raises(ArtifactError, match=want):
        read_mar(store / "cnn.mar")
    p = cli("serve", store, "--state", tmp_path / "state", "--detach")
    assert p.returncode == 2 and want.strip("'") in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr


def test_archive_record_is_signed_with_the_key(tmp_path, cnn_onnx, monkeypatch):
    from modelship.integrity import ARCHIVE_RECORD

    monkeypatch.setenv(SIGNING_KEY_ENV, "k" * 32)
    d = _copy(cnn_onnx, tmp_path / "a")
    write_artifact(d, load_artifact(d, verify=False).manifest)
    mar = archive(load_artifact(d), tmp_path / "good", name="cnn")
    import zipfile
    record = json.loads(zipfile.ZipFile(mar).read(ARCHIVE_RECORD))
    assert "hmac_sha256" in record["integrity"] and "handler.py" in record["members"]
    read_mar(mar)
    monkeypatch.setenv(SIGNING_KEY_ENV, "another-key-" + "y" * 20)
    with pytest.raises(ArtifactError, match="signature does not match"):
        read_mar(mar)


def test_handler_checks_the_archive_again_inside_torchserve(tmp_path, cnn_onnx, monkeypatch):
    """Past serve's own check, the worker refuses an edited model config and startup fails fast."""
    from modelship.serving import config, lifecycle

    store = tmp_path / "store"
    store.mkdir()
    mar = archive(cnn_onnx, tmp_path / "good", name="cnn")
    rewrite_mar(mar, store / "cnn.mar",
                edit=lambda n, d: d.replace(b"maxBatchDelay: 5", b"maxBatchDelay: 6") if n == "model-config.yaml" else d)
    monkeypatch.setattr(lifecycle, "read_mar", lambda p: type("M", (), {"name": "cnn"})())
    with pytest.raises(ServeError, match="model-config.yaml"):
        lifecycle.start(store, tmp_path / "state", config.ServeConfig(port=config.free_port(), startup_timeout_s=60))
