"""The TensorRT path without TensorRT: profiles, cache keys, compatibility checks, graph checks, errors."""

import time

import numpy as np

import pytest

from conftest import cli
from modelship.errors import ArtifactError, EngineMismatchError, ExportError, MissingDependencyError
from modelship.exporters import tensorrt as trt_export
from modelship.quantization.variants import QuantizeOptions, make_variant

try:
    import tensorrt  # noqa: F401
    HAS_TRT = True
except ImportError:
    HAS_TRT = False


def test_profile_from_manifest(cnn_onnx, text_onnx):
    p = trt_export.derive_profile(cnn_onnx.manifest)
    assert p == {"pixels": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [64, 1, 8, 8]}}  # covers parity's 64
    p = trt_export.derive_profile(cnn_onnx.manifest, {"batch": (2, 4, 64)})
    assert p["pixels"]["max"] == [64, 1, 8, 8] and p["pixels"]["min"] == [2, 1, 8, 8]
    t = trt_export.derive_profile(text_onnx.manifest, dict([trt_export.parse_dim_override("sequence=8:64:128")]))
    assert t["input_ids"] == t["attention_mask"] == {"min": [1, 8], "opt": [8, 64], "max": [64, 128]}


def test_profile_never_exceeds_model_positions(text_onnx):
    man = text_onnx.manifest
    man2 = type(man).from_dict({**man.to_dict(), "arch": {"name": "text", "config": {"max_position_embeddings": 64}}})
    assert trt_export.derive_profile(man2)["input_ids"]["max"] == [64, 64]


@pytest.mark.parametrize("text", ["batch", "batch=1:2", "batch=4:2:8", "batch=0:1:2", "x=a:b:c"])
def test_bad_profile_override(text):
    with pytest.raises(ArtifactError, match="profile"):
        trt_export.parse_dim_override(text)


def test_profile_for_unknown_dim(cnn_onnx):
    with pytest.raises(ArtifactError, match="no input has"):
        trt_export.derive_profile(cnn_onnx.manifest, {"sequence_len": (1, 2, 3)})


def test_cache_key_tracks_version_and_gpu():
    a = {"tensorrt_version": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert trt_export.cache_key(a) == trt_export.cache_key(dict(a))
    assert trt_export.cache_key(a) != trt_export.cache_key({**a, "tensorrt_version": "11.0.0"})
    assert trt_export.cache_key(a) != trt_export.cache_key({**a, "gpu": "NVIDIA L4", "compute_capability": "8.9"})


def test_engine_from_another_machine_says_rebuild():
    built = {"tensorrt_version": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    trt_export.check_compatible(built, dict(built))
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10.13.0 \(this machine: 11.0.0\).*rebuild with modelship compile"):
        trt_export.check_compatible(built, {**built, "tensorrt_version": "11.0.0"})
    with pytest.raises(EngineMismatchError, match="GPU NVIDIA H100.*compute capability 9.0"):
        trt_export.check_compatible(built, {**built, "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(EngineMismatchError, match="rebuild"):
        trt_export.check_compatible(None, built)


def test_graph_precision_checks(tmp_path, cnn_onnx, cnn_int8):
    assert trt_export.check_graph(cnn_onnx.model_path) == "fp32"
    assert trt_export.check_graph(make_variant(cnn_onnx, "fp16", tmp_path / "h").model_path) == "fp16"
    sym = make_variant(cnn_onnx, "static", tmp_path / "s", QuantizeOptions(activation_type="int8"))
    assert trt_export.check_graph(sym.model_path) == "int8"
    with pytest.raises(ExportError, match="uint8 \\(asymmetric\\) activations.*--activation-type int8"):
        trt_export.check_graph(cnn_int8.model_path)  # the CPU default: asymmetric uint8
    with pytest.raises(ExportError, match="integer-operator"):
        trt_export.check_graph(make_variant(cnn_onnx, "dynamic", tmp_path / "d").model_path)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_compile_without_tensorrt_fails_fast(tmp_path, cnn_onnx):
    t0 = time.monotonic()
    p = cli("compile", cnn_onnx.path, "--out", tmp_path / "e")
    assert p.returncode != 0 and time.monotonic() - t0 < 30
    assert "TensorRT is not installed" in p.stderr and "modelship[tensorrt]" in p.stderr
    assert len([l for l in p.stderr.splitlines() if l.strip()]) == 1 and "Traceback" not in p.stderr


def test_compile_refuses_non_onnx(tmp_path, cnn):
    p = cli("compile", cnn.path, "--out", tmp_path / "e")
    assert p.returncode != 0 and "compile takes an ONNX artifact" in p.stderr


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_engine_artifact_without_tensorrt(tmp_path, cnn_onnx):
    import shutil

    from modelship.manifest import load_artifact, write_artifact
    from modelship.runners import open_runner

    shutil.copytree(cnn_onnx.path, tmp_path / "e")
    (tmp_path / "e" / "model.engine").write_bytes(b"engine")
    art = load_artifact(tmp_path / "e")
    art.manifest.format, art.manifest.file = "tensorrt", "model.engine"
    write_artifact(art.path, art.manifest)
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        open_runner(load_artifact(tmp_path / "e"))


def test_profile_limits_are_checked_before_tensorrt_runs(cnn_onnx):
    """A batch beyond the profile is refused with the dim, range and what to do (TensorRT only returns False)."""
    from modelship.errors import InputError

    profile = trt_export.derive_profile(cnn_onnx.manifest)
    assert trt_export.max_batch(profile) == trt_export.PARITY_BATCH == 64
    trt_export.check_shapes(profile, {"pixels": np.zeros((64, 1, 8, 8), np.float32)})
    with pytest.raises(InputError, match=r"dim 0 is 65, outside the engine's profile 1..64.*--profile"):
        trt_export.check_shapes(profile, {"pixels": np.zeros((65, 1, 8, 8), np.float32)})


def test_archive_refuses_an_engine_smaller_than_a_request(tmp_path, cnn_onnx):
    import shutil

    from modelship.manifest import load_artifact, write_artifact
    from modelship.serving.archive import ModelConfig, archive

    shutil.copytree(cnn_onnx.path, tmp_path / "e")
    (tmp_path / "e" / "model.engine").write_bytes(b"engine")
    art = load_artifact(tmp_path / "e")
    art.manifest.format, art.manifest.file = "tensorrt", "model.engine"
    art.manifest.extra = {"tensorrt": {"profile": trt_export.derive_profile(art.manifest, {"batch": (1, 8, 16)})}}
    write_artifact(art.path, art.manifest)
    with pytest.raises(ArtifactError, match=r"--max-items 64 is more than the engine's profile takes \(batch up to 16\)"):
        archive(load_artifact(tmp_path / "e"), tmp_path / "store", force=True)
    assert archive(load_artifact(tmp_path / "e"), tmp_path / "store", config=ModelConfig(max_items=16), force=True)


def test_auto_provider_never_picks_tensorrt_silently(monkeypatch):
    import onnxruntime as ort

    from modelship.runners.onnxrt import choose_providers

    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: every)
    assert choose_providers("auto") == choose_providers(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("tensorrt")[0] == "TensorrtExecutionProvider"  # only when asked by name


def test_handler_splits_served_batches_to_the_engine_profile(cnn_onnx):
    """TorchServe may hand the handler batch_size x max_items samples; runs never exceed the runner's max batch."""
    from modelship.runners import open_runner
    from modelship.serving.codec import Codec
    from modelship.serving.handler import ModelshipHandler

    h = ModelshipHandler()
    h.runner, h.codec = open_runner(cnn_onnx), Codec(cnn_onnx.manifest)
    h.runner.max_batch = 5  # as a TensorRT engine whose profile takes at most 5 samples
    reqs = [(i, h.codec.decode({"inputs": np.zeros((n, 1, 8, 8)).tolist()})) for i, n in enumerate([2, 2, 3, 5, 1])]
    runs = list(h._chunks(reqs))
    assert [[i for i, _ in run] for run in runs] == [[0, 1], [2], [3], [4]]
    assert all(sum(r.items for _, r in run) <= 5 for run in runs)
    outs = h._run([r for _, r in runs[0]])
    assert [o["logits"].shape for o in outs] == [(2, 10), (2, 10)]
