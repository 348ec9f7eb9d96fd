"""GPU execution (marked gpu; skipped without CUDA): torch on CUDA, ONNX Runtime CUDA, TensorRT."""

import pytest

from modelship.manifest import load_artifact
from modelship.models.checkpoints import open_source
from modelship.stages import parity_record

pytestmark = pytest.mark.gpu


def test_torch_cuda_parity(cnn, text, tmp_path):
    """The PyTorch models on CUDA against themselves on the CPU: FP32 stays FP32 (no TF32)."""
    from modelship.models.checkpoints import save_source

    bert = save_source(open_source(text, data=str(text.parent / "reviews.csv"))[0], tmp_path / "text-torch")
    for art in (cnn, bert):
        rec = parity_record(art, open_source(art.path), device="cuda")
        assert rec["device"].startswith("cuda") and rec["passed"] and rec["top1_agreement"] == 1.0, rec["failures"]


@pytest.mark.parametrize("artifact", ["cnn_onnx", "text_onnx"])
def test_onnxruntime_cuda_parity(request, artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) not installed")
    art = request.getfixturevalue(artifact)
    rec = parity_record(load_artifact(art.path), provider="cuda")
    assert rec["device"] == "cuda" and rec["passed"] and rec["top1_agreement"] == 1.0
    assert rec["judged_on"]["provider"] == "CUDAExecutionProvider"


def test_tensorrt_engine_parity(tmp_path, cnn_onnx):
    pytest.importorskip("tensorrt")
    from modelship.exporters.tensorrt import build

    art = build(cnn_onnx, tmp_path / "engine")
    rec = parity_record(art)
    assert rec["backend"] == "tensorrt" and rec["passed"]
