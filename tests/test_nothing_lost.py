"""Nothing lost: no command writes into, or clears, a folder that holds its own inputs. An --out equal to or
containing a source, weights, data or a store is refused before anything is touched, naming both paths."""

import shutil

import numpy as np

from conftest import cli
from modelship.manifest import sha256_path
from modelship import data as datasets


def test_pipeline_refuses_an_out_that_holds_its_weights(tmp_path):
    """The measured loss: `pipeline torchvision:resnet18 --weights runs/rn/resnet18-torch/resnet18.pth --out runs/rn`
    cleared runs/rn/resnet18-torch, weights and all, before copying them from there."""
    weights = tmp_path / "rn" / "resnet18-torch" / "resnet18.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"the only copy")
    p = cli("pipeline", "torchvision:resnet18", "--weights", weights, "--out", tmp_path / "rn")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"--out {tmp_path / 'rn'} contains the weights {weights}" in p.stderr.replace("\n", "")
    assert weights.read_bytes() == b"the only copy" and sorted(p.name for p in (tmp_path / "rn").iterdir()) == [
        "resnet18-torch"]


def test_tune_refuses_to_write_into_the_run_it_tunes(tmp_path, cnn_onnx):
    """`tune runs/demo --out runs/demo` deleted the pipeline's model-store."""
    run = tmp_path / "demo"
    shutil.copytree(cnn_onnx.path, run / "digits-cnn-onnx")
    (run / "model-store").mkdir()
    (run / "model-store" / "digits-cnn-onnx.mar").write_bytes(b"served")
    p = cli("tune", run, "--slo-p95-ms", "10", "--out", run)
    assert p.returncode == 2 and "contains the source digits-cnn-onnx" in p.stderr.replace("\n", "")
    assert (run / "model-store" / "digits-cnn-onnx.mar").read_bytes() == b"served"
    assert not (run / "state").exists() and not (run / "trials-store").exists()


def test_export_and_quantize_refuse_an_out_that_is_or_holds_their_source(tmp_path, cnn, cnn_onnx):
    src = tmp_path / "cnn"
    shutil.copytree(cnn.path, src)
    before = sha256_path(src)
    p = cli("export", src, "--out", src)
    assert p.returncode == 2 and f"--out {src} is the source" in p.stderr.replace("\n", "")
    assert sha256_path(src) == before

    onnx = tmp_path / "onnx"
    shutil.copytree(cnn_onnx.path, onnx)
    before = sha256_path(onnx)
    for out, verb in ((onnx, "is"), (tmp_path, "contains")):
        p = cli("quantize", onnx, "--mode", "dynamic", "--out", out)
        assert p.returncode == 2 and f"--out {out} {verb} the source" in p.stderr.replace("\n", ""), p.stderr
    assert sha256_path(onnx) == before and not (tmp_path / "model.onnx").exists()


def test_export_refuses_an_out_that_holds_its_data(tmp_path, cnn):
    feed, y = datasets.load({"name": "digits"}, "test", cnn.manifest.inputs)
    (tmp_path / "o").mkdir()
    data = tmp_path / "o" / "mine.npz"
    np.savez(data, pixels=feed["pixels"][:50], labels=y[:50])
    p = cli("export", cnn.path, "--data", data, "--out", tmp_path / "o")
    assert p.returncode == 2 and "contains the data" in p.stderr.replace("\n", "")
    assert sorted(x.name for x in (tmp_path / "o").iterdir()) == ["mine.npz"]
