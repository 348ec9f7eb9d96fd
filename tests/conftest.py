import os
import subprocess
import sys

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


def cli(*args, check=None):
    """Run the real console entry point; returns CompletedProcess (text)."""
    p = subprocess.run([sys.executable, "-m", "modelship", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def rewrite_mar(src, dst, edit=None, add=None, drop=None):
    """Copy a .mar, passing each member through ``edit(name, data) -> data``, leaving out ``drop`` and adding
    ``add`` members: how tests tamper with archives."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if item.filename == drop:
                continue
            data = zin.read(item.filename)
            zout.writestr(item, edit(item.filename, data) if edit else data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def cnn(work):
    from modelship.models.train import train_artifact
    return train_artifact("cnn", work / "cnn")


def _exported(src, out):
    """Export a torch artifact to ONNX and pass its parity gate, as `modelship export` does."""
    from modelship.export.onnx_export import export
    from modelship.models.checkpoints import open_source
    from modelship.stages import gate_parity

    art, module = open_source(src.path)
    onnx_art = export(art, module, out)
    gate_parity(onnx_art, reference=(art, module))
    return onnx_art


@pytest.fixture(scope="session")
def cnn_onnx(work, cnn):
    return _exported(cnn, work / "cnn-onnx")


@pytest.fixture(scope="session")
def text(work):
    from modelship.models.train import train_artifact
    return train_artifact("text", work / "text")


@pytest.fixture(scope="session")
def text_onnx(work, text):
    return _exported(text, work / "text-onnx")


@pytest.fixture(scope="session")
def cnn_int8(work, cnn_onnx):
    from modelship.quantize.variants import make_variant
    from modelship.stages import gate_parity

    art = make_variant(cnn_onnx, "static", work / "cnn-int8")
    gate_parity(art)
    return art


@pytest.fixture(scope="session")
def served(work, cnn, cnn_onnx, cnn_int8, text_onnx):
    """One real TorchServe on 127.0.0.1 serving the digits CNN as torch, ONNX and static INT8 artifacts, and
    the text encoder as ONNX with a long batch delay (so concurrent requests share one batch)."""
    from modelship.serve import server
    from modelship.serve.archive import ModelConfig, archive

    store = work / "store"
    archive(cnn, store, name="cnn-torch")
    archive(cnn_onnx, store, name="cnn-onnx")
    archive(cnn_int8, store, name="cnn-int8")
    archive(text_onnx, store, name="text-onnx", config=ModelConfig(batch_size=8, max_batch_delay_ms=500))
    info = server.start(store, work / "state", server.ServeConfig(port=server.free_port()))
    yield info
    server.stop(work / "state")
