"""GPU execution (marked gpu; skipped without CUDA): torch on CUDA, ONNX Runtime CUDA, TensorRT."""

import pytest

from modelship.stages import parity_record

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("artifact", ["cnn", "text"])
def test_torch_cuda_parity(request, artifact):
    rec = parity_record(request.getfixturevalue(artifact), device="cuda")
    assert rec["device"].startswith("cuda") and rec["passed"] and rec["top1_agreement"] == 1.0


@pytest.mark.parametrize("artifact", ["cnn_onnx", "text_onnx"])
def test_onnxruntime_cuda_parity(request, artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) not installed")
    rec = parity_record(request.getfixturevalue(artifact), provider="cuda")
    assert rec["device"] == "cuda" and rec["passed"] and rec["top1_agreement"] == 1.0


def test_tensorrt_engine_parity(tmp_path, cnn_onnx):
    pytest.importorskip("tensorrt")
    from modelship.export.tensorrt import build

    art = build(cnn_onnx, tmp_path / "engine")
    rec = parity_record(art)
    assert rec["backend"] == "tensorrt" and rec["passed"]
